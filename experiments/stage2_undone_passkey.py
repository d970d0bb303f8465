"""Passkey of a converted run with stage 2's LoRA undone: the teacher's own q/k/v/o in every layer (stage 2 trains
LoRA on attention only; the feature maps and mixing factors stay stage 1's), with a sparse cache and the memory cap.
Is recall lost in the LoRA-adapted projections or in the cache and memory?

    python experiments/stage2_undone_passkey.py --run runs/default-w256 --cache 64 --memory-cap 764 --lengths 4k,8k \\
        --trials 10 > docs/results/passkey_stage2_undone.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.evaluate.passkey import passkey_accuracy  # noqa: E402
from linearize.loading.architectures import architecture_of  # noqa: E402
from linearize.loading.student import load_student  # noqa: E402
from linearize.loading.teacher import load_teacher_of  # noqa: E402
from linearize.options import token_counts  # noqa: E402
from linearize.training_free import TrainingFree  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--cache", type=int, default=64)
    p.add_argument("--memory-cap", type=int, default=None)
    p.add_argument("--lengths", type=token_counts, default=(4096, 8192))
    p.add_argument("--trials", type=int, default=10)
    args = p.parse_args(argv)
    model, tokenizer = load_student(args.run, training_free=TrainingFree(cache=args.cache, memory_cap=args.memory_cap))
    teacher, _ = load_teacher_of(args.run)
    arch = architecture_of(teacher.config)
    with torch.no_grad():
        for student, layer in zip(model.attention_modules(), arch.decoder_layers(teacher)):
            original = getattr(layer, arch.attention_attr)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(student, name).load_state_dict(getattr(original, name).state_dict())
        r = passkey_accuracy(model, tokenizer, list(args.lengths), args.trials)
    print(json.dumps({"run": args.run, "stage2_undone": True, "cache": args.cache, "memory_cap": args.memory_cap,
                      "trials": args.trials, "passkey": dict(zip(map(str, r["lengths"]), r["accuracy"]))}))


if __name__ == "__main__":
    main()
