#!/usr/bin/env python3
"""Where the teacher's attention beyond the window goes, and what the stage-1 student makes of it, per layer.

    python3 experiments/far_attention.py --run runs/default-mix4 --rows 2 --heavy 8,32 --out docs/results/far_attention.json

Teacher-forced (each layer on the teacher's own hidden states, as stage 1 trains), on --rows held-out ShareGPT rows:

- far_mass: the teacher's attention on keys older than the window that are not sinks (mean over the queries that
  have such keys); on_top8_per_query: the share of it on each query's 8 largest far keys; on_top8_keys: the share of
  all of it that lands on the 8 keys that draw the most (few keys: sinks that appear mid-text); top_tokens: those keys.
- memory_share: the share of the normaliser the stage-1 student (the run's transfer checkpoint) gives its memory.
- error: the student's attention output (after o_proj) against the teacher's, squared, relative to the power of the
  teacher's output: as trained; memory off (window + sinks alone); "teacher share" (the memory's read-out at the
  teacher's far mass: what a right-sized memory would give); with M heavy hitters (ops/heavy_hitters/, the
  student's own mechanism with heavy=M, training-free).
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from linearize.checkpoint import load_checkpoint
from linearize.evaluate.texts import eval_sequences
from linearize.loading.architectures import architecture_of
from linearize.loading.teacher import load_teacher_of
from linearize.models.linearized import make_student_attention
from linearize.convert.settings import ConvertSettings
from linearize.run_folder import training_data, write_json
from linearize.transfer.attention_transfer import load_transfer_state


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--heavy", default="8,32", help="heavy-hitter sizes to score (comma-separated)")
    p.add_argument("--out", default="docs/results/far_attention.json")
    args = p.parse_args()
    from transformers import AutoTokenizer

    t0, run = time.time(), Path(args.run)
    teacher = load_teacher_of(run)[0].eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run))
    config = ConvertSettings(**json.loads((run / "convert.json").read_text())["settings"]).attention_config()
    students = make_student_attention(teacher, config)
    load_transfer_state(students, load_checkpoint(run / "checkpoints" / "transfer")[0])
    heavy_sizes = [int(x) for x in args.heavy.split(",") if x]
    rows = eval_sequences("sharegpt", tokenizer, args.seq_len, args.rows, data=training_data(run))
    W, S = config.window, config.sinks
    sums: dict[int, dict[str, float]] = {}
    tokens: dict[int, list[str]] = {}

    def hook_for(i):
        def hook(module, _args, kwargs, output):
            st = students[i]
            streams = st.features(st.project(kwargs["hidden_states"], kwargs["position_embeddings"]))
            q, k, v, fq, fk = streams.q, streams.k, streams.v, streams.fq, streams.fk
            H, T = q.shape[1], q.shape[2]
            G = H // k.shape[1]
            k, v, fk = (x.repeat_interleave(G, 1) for x in (k, v, fk))
            pos = torch.arange(T)
            qi, kj = pos[:, None], pos[None, :]
            causal = kj <= qi
            exact = causal & ((kj > qi - W) | (kj < S))
            far = causal & ~exact
            s = (q @ k.transpose(-1, -2)) * st.scaling
            p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
            f_teacher = (p * far).sum(-1, keepdim=True)
            s_exact = s.masked_fill(~exact, float("-inf"))
            e = torch.exp(s_exact - s_exact.amax(-1, keepdim=True))
            y_exact = (e @ v) / e.sum(-1, keepdim=True)
            a = (fq @ fk.transpose(-1, -2)) * far
            y_memory = (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-12)
            w = torch.sigmoid(st.mix_logit).view(1, H, 1, 1)
            f_student = (1 - w) * a.sum(-1, keepdim=True) / ((1 - w) * a.sum(-1, keepdim=True) + w * e.sum(-1, keepdim=True))

            def out(y):
                return st.o_proj(y.transpose(1, 2).reshape(1, T, -1))

            teacher_out = output[0]
            power = teacher_out.square().mean()
            ys = {"student": st.attend(streams), "memory off": y_exact,
                  "teacher share": (1 - f_teacher) * y_exact + f_teacher * y_memory}
            for m in heavy_sizes:
                spec = st.spec
                st.spec = replace(spec, heavy=m)
                ys[f"heavy {m}"] = st.attend(streams)
                st.spec = spec
            has_memory = pos >= W + S
            pf = (p * far)[0][:, has_memory]  # (H, queries with far keys, T)
            fm = pf.sum(-1)
            received = pf.sum((0, 1))
            top = received.topk(8).indices
            r = {"far_mass": fm.mean(), "on_top8_per_query": (pf.topk(8, -1).values.sum(-1) / fm.clamp_min(1e-12)).mean(),
                 "on_top8_keys": received[top].sum() / received.sum(),
                 "memory_share": f_student[0, :, has_memory].mean(),
                 **{f"error {n}": (out(y) - teacher_out).square().mean() / power for n, y in ys.items()}}
            for n, x in r.items():
                sums.setdefault(i, {}).setdefault(n, 0.0)
                sums[i][n] += float(x) / len(rows)
            tokens[i] = [tokenizer.decode(row_ids[j : j + 1]) for j in top[:4].tolist()]

        return hook

    attn = architecture_of(teacher.config).attention_modules(teacher)
    handles = [a.register_forward_hook(hook_for(i), with_kwargs=True) for i, a in enumerate(attn)]
    with torch.no_grad():
        for row_ids in rows:
            teacher.get_decoder()(row_ids[None])
    for h in handles:
        h.remove()
    layers = [{"layer": i, **{n: round(x, 4) for n, x in d.items()}, "top_tokens": tokens[i]} for i, d in sums.items()]
    res = {"run": str(run), "rows": args.rows, "seq_len": args.seq_len, "window": W, "sinks": S,
           "text": "sharegpt (held-out)", "layers": layers, "seconds": round(time.time() - t0, 1)}
    write_json(res, Path(args.out))
    cols = [c for c in layers[0] if c not in ("layer", "top_tokens")]
    print("layer " + " ".join(f"{c:>14.14}" for c in cols))
    for r in layers:
        print(f"{r['layer']:5d} " + " ".join(f"{r[c]:14.4f}" for c in cols), r["top_tokens"])


if __name__ == "__main__":
    main()
