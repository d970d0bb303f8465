"""Probe for issue 39: which fitting rows give the learned cache score (transfer/cache_score.py) the better ranking
of a real-text needle? Fits the package's score on one kind of rows, then ranks the needle's digits among each
head's keys in real-text haystacks (the eval's, evaluate/real_recall.py) by the fitted score.

    python experiments/cache_fit_probe.py runs/smollm2_ls --rows 32 --asked 1    # the first default: one fact asked
    python experiments/cache_fit_probe.py runs/smollm2_ls --rows 32 --asked 8    # every one of 8 facts asked
"""

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, "experiments")
from needle_trace import needle_positions  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402

from linearize.data.packing import pack_sequences  # noqa: E402
from linearize.data.retrieval import asked_rows, mix_retrieval  # noqa: E402
from linearize.evaluate.passkey import token_ids  # noqa: E402
from linearize.evaluate.real_recall import Corpus, real_haystacks  # noqa: E402
from linearize.layers.linear_attention import LinearAttention  # noqa: E402
from linearize.loading.student import load_student  # noqa: E402
from linearize.ops.rotary import rotate  # noqa: E402
from linearize.ops.sparse_cache.selection import learned_score, pooled, worst_recalled  # noqa: E402
from linearize.transfer.cache_score import fit_cache_score  # noqa: E402


def needle_ranks(model, rows, needles, window: int, sinks: int, kept=None) -> dict[int, list[float]]:
    """{layer: per row and KV head, the share of the keys a window or more before the row's end that the fitted score
    ranks above the needle's best digit} (the student's own forward). kept: {(M, r): {layer: [...]}} to fill with,
    per row and KV head, whether every digit is among the M keys of highest score pooled over r neighbours (all keys
    beyond the window at once: what a fixed score's selections keep, but for pooling over evicted neighbours)."""
    ranks, current = {}, [0]
    original = LinearAttention.attend

    def attend(self, streams, state=None):
        T = streams.k.shape[2]
        pos = torch.arange(T)
        score = learned_score(rotate(streams.k, -pos, self.rope_frequencies), streams.v, self.cache_scorer)[0]
        has = (pos >= sinks) & (pos <= T - 1 - window)
        where = torch.tensor(sorted(needles[current[0]]))
        for h in range(score.shape[0]):
            ranks.setdefault(self.layer_idx, []).append((score[h, has] > score[h, where].max()).float().mean().item())
        for (M, r), got in (kept or {}).items():
            candidates = score[None, :, has]
            top = worst_recalled(pooled(candidates, r), M)[0]  # (Hkv, n)
            index = where - sinks  # the candidates start at the first key after the sinks
            for h in range(score.shape[0]):
                got.setdefault(self.layer_idx, []).append(float(top[h, index].all()))
        return original(self, streams, state)

    LinearAttention.attend = attend
    try:
        with torch.no_grad():
            for i, row in enumerate(rows):
                current[0] = i
                model(input_ids=row[None])
    finally:
        LinearAttention.attend = original
    return ranks


def load_scorer(model, path: str):
    """Give every layer with a fitted cache score the weights --save wrote to `path`."""
    weights = load_file(path)
    for m in model.attention_modules():
        if getattr(m, "cache_scorer", None) is not None:
            m.cache_scorer.copy_(weights[str(m.layer_idx)])


def summary(ranks, layers):
    rr = [r for layer in ranks if layer in layers for r in ranks[layer]]
    return {"heads": len(rr), "median_rank": round(sorted(rr)[len(rr) // 2], 4),
            **{f"top{p}": round(sum(r < p / 100 for r in rr) / len(rr), 3) for p in (1.5, 3, 6, 10)}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--asked", type=int, default=1, help="0: the run's own fitted score; 1: the first default's rows; n: n facts, all asked")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--texts", default="python-docs,sharegpt,shakespeare")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--save", default=None, help="the fitted weights (safetensors)")
    ap.add_argument("--top", type=float, default=0.02, help="the share of a row's keys labelled as read (0: the "
                    "attention target itself, the fit before labels)")
    ap.add_argument("--load", default=None, help="rank with these weights instead of fitting")
    ap.add_argument("--kept", default="", help="M/r,...: the share of heads whose M keys of highest score, pooled over "
                    "r neighbours, hold every digit (e.g. 64/2,64/0,128/2)")
    args = ap.parse_args()
    model, tok = load_student(args.run, "cpu", torch.float32)
    cfg = model.attention_modules()[0].config
    t0 = time.time()
    if args.load:
        load_scorer(model, args.load)
    elif args.asked:
        text = pack_sequences(None, tok, args.seq_len, args.rows, split="train")
        if args.asked == 1:
            rows, ends = mix_retrieval(text, tok, 1.0, tag="cache-score-0"), None
        else:
            rows, ends = asked_rows(text, tok, args.asked, tag="cache-score-0")
        W = fit_cache_score(model, rows, ends, top=None if args.top == 0 else args.top)
        if args.save:
            save_file({str(k): v.contiguous() for k, v in W.items()}, args.save)
    fit_s = time.time() - t0
    hays = [h for t in args.texts.split(",") for n in map(int, args.lengths.split(","))
            for h in real_haystacks(tok, Corpus(t, tok), 1, n, args.trials)]
    kept = {(int(M), int(r)): {} for M, r in (c.split("/") for c in args.kept.split(",") if c)}
    ranks = needle_ranks(model, [token_ids(tok, h.context)[0] for h in hays], [needle_positions(tok, h)[1] for h in hays],
                         cfg.window, cfg.sinks, kept)
    n = len(model.attention_modules())
    out = {"args": vars(args), "fit_s": round(fit_s), "all": summary(ranks, range(n)),
           "upper": summary(ranks, range(n // 2, n)), "lower": summary(ranks, range(n // 2)),
           "every_digit_kept": {f"{M}/{r}": {part: round(sum(v for i in layers for v in got.get(i, [])) /
                                                       max(1, sum(len(got.get(i, [])) for i in layers)), 3)
                                             for part, layers in (("upper", range(n // 2, n)), ("lower", range(n // 2)))}
                                for (M, r), got in kept.items()}}
    print(json.dumps(out, indent=1))
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
