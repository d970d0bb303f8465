"""A converted model with its linear memory read only from layer K on (the layers before: window + sinks alone,
training-free), scored against its teacher on the eval texts: which layers' memory is worth keeping.

    python experiments/memory_layers_probe.py --run runs/memonly --from-layer 11 --out docs/results/memory_layers_probe.json

8 x 1024 tokens per text (the `linearize eval` rows); ppl ratio, top-1 agreement and KL(teacher || model). The
trained equivalent is `linearize convert --local-layers K` (the first K layers window + sinks only).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_worth import memory_only_in  # noqa: E402

from linearize.evaluate.agreement import agreement  # noqa: E402
from linearize.evaluate.texts import EVAL_TEXTS, eval_sequences  # noqa: E402
from linearize.loading.student import load_student  # noqa: E402
from linearize.loading.teacher import load_teacher_of  # noqa: E402
from linearize.run_folder import training_data, write_json  # noqa: E402


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--from-layer", type=int, required=True)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    student, tokenizer = load_student(args.run)
    teacher, _ = load_teacher_of(args.run)
    layers = len(student.attention_modules())
    model = memory_only_in(student, set(range(args.from_layer, layers)))
    result = {"run": args.run, "memory_in_layers": [args.from_layer, layers - 1], "rows": args.rows, "texts": {}}
    for text in EVAL_TEXTS:
        rows = eval_sequences(text, tokenizer, 1024, args.rows, data=training_data(args.run))
        r = agreement(teacher, model, rows, progress=False)
        result["texts"][text] = {"ppl_ratio": r["student_ppl"] / r["teacher_ppl"], "top1": r["top1"], "kl": r["kl"],
                                 "teacher_ppl": r["teacher_ppl"], "student_ppl": r["student_ppl"]}
        print(text, result["texts"][text], flush=True)
        write_json(result, Path(args.out))


if __name__ == "__main__":
    main()
