"""Stage 1 (and optionally stage 2), end to end: how much the linear memory adds over the window + sinks.

    python experiments/stage1_probe.py --out probe.jsonl --tokens 32768 --window 64 --sinks 4 [--mix-init 3] [--load DIR]

Trains the feature maps (and mixing factors) on `--tokens` ShareGPT tokens as `linearize convert` stage 1 does, with
`--lora-tokens N` then a stage 2 (LoRA, KL) on the next N, and scores the student against its teacher (a copy of it
kept before the swap) on `--rows` held-out rows: ppl ratio, top-1 agreement, KL, and the stage-1 per-layer error
relative to each layer's output power. `--linear-off` scores the window + sinks alone (StreamingLLM).
Appends one JSON line per run to --out. A diagnosis tool for the stage-1 design, not a benchmark.
"""

import argparse
import copy
import json
import time

import torch

from linearize.checkpoint import load_checkpoint
from linearize.data import pack_sequences
from linearize.evaluate.agreement import agreement
from linearize.finetune.lora import LoraSettings, finetune_lora
from linearize.layers.linear_attention import attention_preset
from linearize.loading.teacher import load_teacher
from linearize.models.linearized import LinearizedForCausalLM, make_student_attention
from linearize.transfer.attention_transfer import attention_transfer, layer_transfer_errors, load_transfer_state


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--attention", default="lolcats")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--feature-dim", type=int, default=None)
    p.add_argument("--feature-map", default=None)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--mix-init", type=float, default=None, help="initial mix logit (weight of the exact part)")
    p.add_argument("--mix-lr", type=float, default=None, help="the mixing logits' stage-1 learning rate (default: --lr)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--load", default=None, help="a convert run's checkpoints/transfer folder: skip training")
    p.add_argument("--linear-off", action="store_true")
    p.add_argument("--lora-tokens", type=int, default=0, help="then stage 2 (LoRA, KL) on this many tokens")
    p.add_argument("--train-attention", action="store_true", help="stage 2 also trains the feature maps and mix")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    torch.manual_seed(0)
    teacher, tok = load_teacher(None)
    cfg = attention_preset("streaming" if a.linear_off else a.attention, window=a.window, sinks=a.sinks,
                           feature_dim=None if a.linear_off else a.feature_dim,
                           feature_map=None if a.linear_off else a.feature_map, mix_init=a.mix_init)
    students = make_student_attention(teacher, cfg)
    heldout = pack_sequences(None, tok, a.seq_len, a.rows, split="heldout")
    t0 = time.perf_counter()
    if a.load:
        load_transfer_state(students, load_checkpoint(a.load)[0])
    elif a.tokens and cfg.linear:
        rows = pack_sequences(None, tok, a.seq_len, a.tokens // a.seq_len)
        attention_transfer(teacher, students, rows, lr=a.lr, mix_lr=a.mix_lr, progress=True)
    train_s = time.perf_counter() - t0
    rel = layer_transfer_errors(teacher, students, heldout[:1], relative=True)
    reference = copy.deepcopy(teacher).eval()
    model = LinearizedForCausalLM.from_teacher(teacher, cfg, students).eval()
    if a.lora_tokens:
        t0 = time.perf_counter()
        rows2 = pack_sequences(None, tok, a.seq_len, a.lora_tokens // a.seq_len, skip_sequences=a.tokens // a.seq_len)
        model, _ = finetune_lora(model, rows2, LoraSettings(loss="kl", train_attention=a.train_attention), lr=1e-3)
        train_s += time.perf_counter() - t0
    r = agreement(reference, model, heldout)
    mix = [round(torch.sigmoid(s.mix_logit).mean().item(), 3) for s in students if s.mix_logit is not None]
    line = {"tag": a.tag, **{k: v for k, v in vars(a).items() if k not in ("out", "tag")}, "train_s": round(train_s, 1),
            "ppl_ratio": r["student_ppl"] / r["teacher_ppl"], **{k: v for k, v in r.items() if k != "tokens"},
            "rel_layer_error": [round(x, 3) for x in rel], "mean_rel_error": sum(rel) / len(rel),
            "mix_mean_per_layer": mix}
    print(json.dumps({k: v for k, v in line.items() if k not in ("rel_layer_error", "mix_mean_per_layer")}))
    with open(a.out, "a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
