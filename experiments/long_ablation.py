"""Which training makes the linear memory earn its bytes on long documents (issue 36 item 2)? The long-document
eval's student rows (evaluate/long.py) for several converted runs, against the teacher, memory-off and StreamingLLM
rows of one full `linearize eval` part long (--reference): those three do not depend on the training (the teacher
and StreamingLLM are the untrained teacher; with the memory off the exact part is the teacher's q/k/v and the cache
falls back on the value norms), so only each run's student is read here.

    python experiments/long_ablation.py --reference runs/smollm2/eval.json runs/smollm2 runs/wdrop \\
        --out docs/results/long_ablation.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from linearize.evaluate.long import BLOCK, _ppl, band_sums, long_documents, token_nll
from linearize.loading.student import load_student
from linearize.training_free import TrainingFree, add_arguments


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--reference", required=True, help="an eval.json with the part long (same texts and length)")
    add_arguments(ap)  # the students' training-free settings (--memory-cap, --cache-position, ...; as converted)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ref = json.loads(Path(args.reference).read_text())["long"]
    length, bands = ref["length"], [tuple(b) for b in ref["bands"]]
    rows = {}
    for run in args.runs:
        student, tokenizer = load_student(run, "cpu", torch.float32, TrainingFree.from_args(args))
        docs = long_documents(list(ref["texts"]), tokenizer, length)
        per_text, pooled, beyond = {}, [[0.0, 0] for _ in bands], [0.0, 0]
        for name, doc in docs.items():
            nll = token_nll(student, doc["ids"], BLOCK)
            sums = band_sums(nll, bands)
            teacher = ref["texts"][name]["models"]["teacher"]["ppl"]
            ppl = [_ppl(t, c) for t, c in sums]
            per_text[name] = {"ppl": ppl, "ratio": [p / q for p, q in zip(ppl, teacher)]}
            for acc, (t, c) in zip(pooled, sums):
                acc[0] += t
                acc[1] += c
            t, c = band_sums(nll, [(1024, length)])[0]
            beyond[0] += t
            beyond[1] += c
        from_1k = _ppl(*beyond)
        rows[run] = {"texts": per_text,
                     "all": {"ppl": [_ppl(t, c) for t, c in pooled]},
                     "from_1k": {"ppl": from_1k, "ratio": from_1k / ref["from_1k"]["teacher"]["ppl"]},
                     "convert": json.loads((Path(run) / "convert.json").read_text()).get("settings")}
        rows[run]["all"]["ratio"] = [p / q for p, q in zip(rows[run]["all"]["ppl"], ref["all"]["teacher"]["ppl"])]
        print(f"{run}: positions >= 1k ppl ratio to the teacher {rows[run]['from_1k']['ratio']:.3f} (memory off "
              f"{ref['from_1k']['memory_off']['ratio']:.3f}, StreamingLLM {ref['from_1k']['streaming']['ratio']:.3f})",
              flush=True)
    res = {"command": "python experiments/long_ablation.py " + " ".join(sys.argv[1:]), "reference": args.reference,
           "length": length, "bands": ref["bands"], "texts": list(ref["texts"]),
           "reference_from_1k": ref["from_1k"], "reference_all": ref["all"], "runs": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
