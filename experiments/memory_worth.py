#!/usr/bin/env python3
"""What a converted model's linear memory is worth, end to end and per layer: the model against the same model with
its memory switched off (window + sinks alone, models/linearized.without_memory), after stage 1 (the run's transfer
checkpoint, no LoRA) and after stage 2 (the saved model), with the memory kept in groups of layers only, beside the
teacher as StreamingLLM over the same window and sinks; and per layer, the stage-1 attention-output error relative
to the teacher layer's output power with and without the memory (teacher-forced, what stage 1 minimises).

    python3 experiments/memory_worth.py --run runs/default-w256 --rows 4 --groups 0-2,3-10,11-29 \
        --out docs/results/memory_worth.json
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.checkpoint import load_checkpoint
from linearize.evaluate.texts import eval_sequences
from linearize.layers.linear_attention import attention_preset
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of
from linearize.models.linearized import LinearizedForCausalLM, make_student_attention, without_memory
from linearize.convert.settings import ConvertSettings
from linearize.run_folder import training_data, write_json
from linearize.transfer.attention_transfer import layer_transfer_errors, load_transfer_state


def memory_only_in(model, layers: set[int]):
    """A copy of `model` whose linear memory is read in `layers` only (the others: window + sinks alone)."""
    off = without_memory(model)
    out = copy.deepcopy(model)
    for i, (a, b) in enumerate(zip(out.attention_modules(), off.attention_modules())):
        if i not in layers:
            a.config, a.spec = b.config, b.spec
    return out


def groups(text: str) -> list[tuple[str, set[int]]]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append((part, set(range(int(lo), int(hi or lo) + 1))))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--rows", type=int, default=4, help="held-out ShareGPT rows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--groups", default="", help="layer groups (e.g. 0-2,3-10,11-29) to keep the memory in alone")
    p.add_argument("--out", default="docs/results/memory_worth.json")
    args = p.parse_args()
    run = Path(args.run)
    t0 = time.time()
    teacher = load_teacher_of(run)[0].eval()
    final, tokenizer = load_student(run)
    settings = ConvertSettings(**json.loads((run / "convert.json").read_text())["settings"])
    config = settings.attention_config()
    rows = eval_sequences("sharegpt", tokenizer, args.seq_len, args.rows, data=training_data(run))
    with torch.no_grad():
        teacher_logp = [F.log_softmax(teacher(input_ids=r[None, :-1]).logits[0].float(), -1) for r in rows]
    teacher_nll = -sum(lt.gather(-1, r[1:, None]).sum().item() for r, lt in zip(rows, teacher_logp))

    @torch.no_grad()
    def score(model) -> dict:
        nll = kl = agree = count = 0.0
        for r, lt in zip(rows, teacher_logp):
            ls = F.log_softmax(model(input_ids=r[None, :-1]).logits[0].float(), -1)
            nll -= ls.gather(-1, r[1:, None]).sum().item()
            kl += (lt.exp() * (lt - ls)).sum().item()
            agree += (lt.argmax(-1) == ls.argmax(-1)).sum().item()
            count += len(r) - 1
        return {"ppl_ratio": round(math.exp((nll - teacher_nll) / count), 4), "kl": round(kl / count, 4),
                "top1": round(agree / count, 4)}

    students = make_student_attention(teacher, config)
    load_transfer_state(students, load_checkpoint(run / "checkpoints" / "transfer")[0])
    stage1 = LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), config, students).eval()
    res = {"run": str(run), "rows": args.rows, "seq_len": args.seq_len, "text": "sharegpt (held-out)",
           "window": config.window, "sinks": config.sinks, "end_to_end": {}}
    e2e = res["end_to_end"]
    for name, model in (("stage 1", stage1), ("stage 2 (saved model)", final)):
        e2e[name] = score(model)
        e2e[f"{name}, memory off"] = score(without_memory(model))
        for label, layers in groups(args.groups):
            e2e[f"{name}, memory in layers {label} only"] = score(memory_only_in(model, layers))
        print(json.dumps({k: v for k, v in e2e.items() if k.startswith(name)}), flush=True)
    streaming = LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), attention_preset(
        "streaming", window=config.window, sinks=config.sinks)).eval()
    e2e[f"teacher, streaming {config.sinks} + {config.window}"] = score(streaming)
    hybrid = layer_transfer_errors(teacher, stage1.attention_modules(), rows[:2], relative=True)
    off = layer_transfer_errors(teacher, without_memory(stage1).attention_modules(), rows[:2], relative=True)
    res["stage1_relative_layer_error"] = {"memory": [round(x, 5) for x in hybrid],
                                          "memory_off": [round(x, 5) for x in off]}
    res["seconds"] = round(time.time() - t0, 1)
    write_json(res, Path(args.out))
    print(json.dumps(e2e, indent=1))


if __name__ == "__main__":
    main()
