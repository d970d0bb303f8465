"""docs/results/families.json (issue 16) from a finished `linearize compare` folder: one row per attention family.

    linearize compare --attention streaming,lolcats,transnormer,transnormer-norm,nalaformer \
        --decode-context 16k --device cuda --out runs/families
    python scripts/families_table.py runs/families --out docs/results/families.json

Each row: the resolved attention config, per evaluation text the ppl ratio (student / teacher), top-1 agreement
and KL, the held-out ppl ratio of the conversion, the per-layer transfer error relative to the teacher layer's
output power (and its mean and max), passkey accuracy, decode tokens/s after the compare's --decode-context prefill,
the decoding state's bytes there, and the conversion's wall time. `streaming` is the training-free baseline.
"""

import argparse
import json
import sys
from pathlib import Path

ROW_KEYS = ("passkey", "decode_tokens_per_s", "state_bytes", "convert_seconds", "keep_softmax", "stage1_from")


def family_row(name: str, r: dict) -> dict:
    texts = r.get("texts", {})
    errors = r.get("layer_relative_error")
    return {
        "variant": name, "attention": r["attention"], "config": r.get("config"),
        "heldout_ppl_ratio": r["student_ppl"] / r["teacher_ppl"],
        "ppl_ratio": {t: v["ppl_ratio"] for t, v in texts.items()},
        "top1": {t: v["top1"] for t, v in texts.items()},
        "kl": {t: v["kl"] for t, v in texts.items()},
        "layer_relative_error": errors,
        "layer_relative_error_mean": errors and sum(errors) / len(errors),
        "layer_relative_error_max": errors and max(errors),
        **{k: r.get(k) for k in ROW_KEYS},
    }


def families(compare: dict, source: str) -> dict:
    s = compare["settings"]
    return {
        "source": source, "device": compare.get("device"),
        "budget": {k: s["convert"][k] for k in ("transfer_tokens", "lora_tokens", "seq_len", "eval_tokens")},
        "measured": {k: s["compare"][k] for k in ("texts", "kl_sequences", "layer_sequences", "passkey_length",
                                                  "passkey_trials", "decode_context", "decode_tokens")},
        "teacher": compare["teacher"],
        "rows": [family_row(name, r) for name, r in compare["variants"].items()],
    }


def main():
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
