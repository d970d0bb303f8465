"""docs/results/families.json (issue 16) from a finished `linearize compare` folder: one row per attention family.

    linearize compare --attention streaming,lolcats,transnormer,transnormer-norm,nalaformer \
        --decode-context 16k --device cuda --out runs/families
    python scripts/families_table.py runs/families --out docs/results/families.json

The rows are linearize/compare/families.py's (family_row, families): per family the resolved attention config, per
text the ppl ratio, top-1 and KL, the held-out ppl ratio, the per-layer transfer error, passkey, decode tokens/s,
state bytes and the conversion's wall time. `streaming` is the training-free baseline.
"""

import argparse
import json
import sys
from pathlib import Path


def main():
    from linearize.compare.families import families
    from linearize.run_folder import COMPARE, write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("compare_dir", nargs="+", help="`linearize compare --out` folders (each holds compare.json); "
                                                  "several (compares run in parallel, same settings) are joined")
    p.add_argument("--out", default="docs/results/families.json")
    args = p.parse_args()
    paths = [Path(d) / COMPARE for d in args.compare_dir]
    if missing := [str(p) for p in paths if not p.is_file()]:
        sys.exit(f"error: {', '.join(missing)} not found; run `linearize compare ... --out DIR` first")
    compares = [json.loads(p.read_text()) for p in paths]
    joined = {**compares[0], "variants": {k: v for c in compares for k, v in c["variants"].items()}}
    result = families(joined, ", ".join(map(str, paths)))
    write_json(result, args.out)
    for r in result["rows"]:
        ratios = ", ".join(f"{t} {v:.3f}" for t, v in r["ppl_ratio"].items())
        print(f"{r['variant']}: ppl ratio {ratios or '-'}; layer err {r['layer_relative_error_mean'] or float('nan'):.3f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
