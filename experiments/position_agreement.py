"""Where a converted model loses agreement with its teacher: positions whose keys all lie in the window + sinks
("near": the exact part sees everything) against the rest ("far": only the linear memory holds what left the window).

    python experiments/position_agreement.py --run runs/default [--run runs/other ...] [--text sharegpt] [--rows 8]
                                         --out docs/results/position_agreement.json

For each run: the converted model, the same with its memory switched off (models.linearized.without_memory), and,
when the run kept its stage-1 checkpoint, the model after stage 1 alone (no LoRA); once: the teacher as
StreamingLLM over the same sinks + window (untrained). Each gets top-1 agreement, KL(teacher || model) and NLL,
split near / far, on the eval's rows of --text (the `linearize eval` rows: 8 x 1024 held-out ShareGPT tokens).
"""

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.evaluate.texts import eval_sequences
from linearize.layers.linear_attention import LinearAttentionConfig, attention_preset
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of
from linearize.models.linearized import LinearizedForCausalLM, without_memory
from linearize.run_folder import CHECKPOINTS, load_tensors, training_data, write_json
from linearize.transfer.attention_transfer import load_transfer_state


def split_scores(model, rows, teacher_logp, near: int) -> dict:
    """{"near"|"far"|"all": {"top1", "kl", "nll"}} means over rows (N, T) per position, near = positions < `near`."""
    T = rows.shape[1] - 1
    agree, kl, nll = torch.zeros(T), torch.zeros(T), torch.zeros(T)
    for row, lt in zip(rows, teacher_logp):
        ls = F.log_softmax(model(input_ids=row[None, :-1]).logits[0].float(), -1)
        agree += (ls.argmax(-1) == lt.argmax(-1)).float()
        kl += (lt.exp() * (lt - ls)).sum(-1)
        nll -= ls.gather(-1, row[1:, None])[:, 0]
    parts = {"near": slice(0, near), "far": slice(near, None), "all": slice(None)}
    return {k: {"top1": (agree[s] / len(rows)).mean().item(), "kl": (kl[s] / len(rows)).mean().item(),
                "nll": (nll[s] / len(rows)).mean().item()} for k, s in parts.items()}


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True)
    p.add_argument("--text", default="sharegpt")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    first, tokenizer = load_student(args.run[0])
    teacher, _ = load_teacher_of(args.run[0])
    rows = eval_sequences(args.text, tokenizer, args.seq_len, args.rows, data=training_data(args.run[0]))
    teacher_logp = [F.log_softmax(teacher(input_ids=r[None, :-1]).logits[0].float(), -1) for r in rows]
    attention = first.config.attention
    near = attention["window"] + attention["sinks"]
    result = {"text": args.text, "rows": args.rows, "seq_len": args.seq_len, "near": near, "models": {}}
    nll = torch.stack([-lt.gather(-1, r[1:, None])[:, 0] for r, lt in zip(rows, teacher_logp)]).mean(0)
    result["teacher_nll"] = {"near": nll[:near].mean().item(), "far": nll[near:].mean().item(),
                             "all": nll.mean().item()}

    def score(name, model):
        result["models"][name] = split_scores(model.eval(), rows, teacher_logp, near)
        print(name, json.dumps(result["models"][name]), flush=True)
        write_json(result, Path(args.out))

    streaming = attention_preset("streaming", window=attention["window"], sinks=attention["sinks"])
    score(f"streaming-w{attention['window']}-s{attention['sinks']}",
          LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), streaming))
    for run in args.run:
        student = first if run == args.run[0] else load_student(run)[0]
        name = Path(run).name
        score(name, student)
        score(f"{name} memory off", without_memory(student))
        stage1 = Path(run) / CHECKPOINTS / "transfer" / "tensors.safetensors"
        if stage1.is_file():
            model = LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher),
                                                         LinearAttentionConfig(**student.config.attention))
            load_transfer_state(model.attention_modules(), load_tensors(stage1))
            score(f"{name} after stage 1", model)


if __name__ == "__main__":
    main()
