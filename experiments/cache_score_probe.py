"""Probe for issue 39: can a score fitted to the model's own far attention pick the keys a later query reads?

Fit (ridge, per layer and KV head) log(max over far queries and the group's heads of a_ij * |v_j|) from the key
(RoPE undone) and value, on the run's training text with look-up exercises; then rank the cache with it in place of
the self-recall error and ask real-text questions.

    python experiments/cache_score_probe.py runs/smollm2 --rows 8 --trials 2 --retrieval 1.0 --target question --skip-recall
    python experiments/cache_score_probe.py runs/smollm2 --rows 16 --trials 2 --retrieval 1.0 --target question \
        --floor 0.9 --skip-recall                      # (--floor 0: the same fit on 16 rows)
    python experiments/cache_score_probe.py runs/smollm2 --rows 16 --trials 4 --lengths 2048,4096 --retrieval 1.0 \
        --target question --skip-ranks                 # ask the questions with the fitted score

The package's form of the fit: linearize/transfer/cache_score.py (`linearize cache-score`).
"""

import argparse
import json
import time

import torch

import linearize.ops.sparse_cache.segment as segment
from linearize.data.packing import pack_sequences
from linearize.data.retrieval import mix_retrieval
from linearize.evaluate.real_recall import real_recall
from linearize.layers.linear_attention import LinearAttention
from linearize.loading.student import load_student
from linearize.ops.hybrid.terms import group
from linearize.ops.rotary import rotate
from linearize.ops.sparse_cache.selection import gather_time, keep_worst_recalled, pooled
from linearize.ops.hybrid.state import Streams
from linearize.ops.hybrid.terms import ones_column


def features(k_unrot, v):
    return torch.cat([k_unrot, v, torch.ones_like(v[..., :1])], dim=-1).float()


FLOOR = [0.0]


def collect(model, rows, window, sinks, target_kind, W=None, needles=None):
    """Fit W, or (W given) rank each row's needle positions needles[i] among the keys, by the fitted score and by
    the true target: {layer: [(pred_rank, true_rank) per head and row]}."""
    stats, ranks, current = {}, {}, [0]
    original = LinearAttention.attend

    def attend(self, streams, state=None):
        q, k, v = streams.q.float(), streams.k.float(), streams.v.float()
        B, Hkv, T, d = k.shape
        pos = torch.arange(T)
        ku = rotate(k, -pos.expand(B, Hkv, T), self.rope_frequencies)
        s = (group(q, Hkv) @ k.unsqueeze(2).transpose(-1, -2)) * self.scaling  # (B, Hkv, G, T, T)
        causal = pos[None, :] <= pos[:, None]
        a = s.masked_fill(~causal, float("-inf")).softmax(-1)
        far = (pos[:, None] - pos[None, :]) >= window
        af = a.masked_fill(~far, 0)
        if target_kind == "question":  # the last 8 queries (the question's end and the answer)
            got = af[..., -8:, :].amax(dim=(2, 3))
        elif target_kind == "max":
            got = af.amax(dim=(2, 3))  # (B, Hkv, T)
        else:
            got = af.sum(dim=(2, 3)) / far.sum(0).clamp_min(1)
        target = torch.log(got * v.norm(dim=-1) + 1e-6)
        has = (pos >= sinks) & (pos <= T - 1 - window)
        X = features(ku, v)[:, :, has]  # (B, Hkv, n, D)
        y = target[:, :, has]
        if FLOOR[0] and W is None:  # fit only the top: every key below the row's FLOOR quantile reads as that quantile
            y = torch.maximum(y, torch.quantile(y, FLOOR[0], dim=-1, keepdim=True))
        if W is not None:
            pred = (X @ W[self.layer_idx][None, :, :, None]).squeeze(-1)  # (B, Hkv, n)
            idx = torch.arange(T)[has]
            where = [i for i, p in enumerate(idx.tolist()) if p in needles[current[0]]]
            for h in range(Hkv):
                best_p, best_t = pred[0, h, where].max(), y[0, h, where].max()
                ranks.setdefault(self.layer_idx, []).append(((pred[0, h] > best_p).float().mean().item(),
                                                             (y[0, h] > best_t).float().mean().item()))
            return original(self, streams, state)
        XtX = torch.einsum("bhnd,bhne->hde", X, X)
        Xty = torch.einsum("bhnd,bhn->hd", X, y)
        st = stats.setdefault(self.layer_idx, [0, 0])
        st[0], st[1] = st[0] + XtX, st[1] + Xty
        return original(self, streams, state)

    LinearAttention.attend = attend
    for m in model.attention_modules():
        m.exact_softmax = True
    try:
        with torch.no_grad():
            for i, row in enumerate(rows):
                current[0] = i
                model(input_ids=row[None])
                print(f"collect row {i + 1}/{len(rows)}", flush=True)
    finally:
        LinearAttention.attend = original
        for m in model.attention_modules():
            m.exact_softmax = False
    if W is not None:
        return ranks
    W = {}
    for layer, (XtX, Xty) in stats.items():
        D = XtX.shape[-1]
        lam = 1e-2 * XtX.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
        W[layer] = torch.linalg.solve(XtX + lam * torch.eye(D), Xty)  # (Hkv, D)
    return W


class LearnedSelect:
    def __init__(self, W, n_layers):
        self.W, self.n_layers, self.layer_of = W, n_layers, {}

    def __call__(self, state, spec, layer):
        index = layer.key_features.__self__.layer_idx
        cache = state.cache
        score = (features(cache.k, cache.v) @ self.W[index][None, :, :, None]).squeeze(-1)
        score = pooled(score, spec.cache_pool)
        kept, evicted = keep_worst_recalled(score, spec.cache)
        fk = layer.key_features(cache.k if cache.position is None else rotate(cache.k, cache.position,
                                                                             layer.inv_freq))
        fk_out, v_out = gather_time(fk, evicted), gather_time(cache.v, evicted)
        state.kv = state.kv + fk_out.transpose(-1, -2) @ ones_column(v_out)
        state.cache = Streams(gather_time(cache.k, kept), gather_time(cache.v, kept),
                              position=torch.take_along_dim(cache.position, kept, 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--retrieval", type=float, default=0.5)
    ap.add_argument("--target", default="max")
    ap.add_argument("--floor", type=float, default=0.0, help="fit log-targets floored at this quantile per row and head")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--texts", default="python-docs,sharegpt,shakespeare")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-recall", action="store_true")
    ap.add_argument("--skip-ranks", action="store_true")
    ap.add_argument("--save", default=None)
    ap.add_argument("--load", default=None)
    args = ap.parse_args()
    FLOOR[0] = args.floor
    model, tok = load_student(args.run, "cpu", torch.float32)
    cfg = model.attention_modules()[0].config
    t0 = time.time()
    if args.load:
        from safetensors.torch import load_file
        W = {int(k): v for k, v in load_file(args.load).items()}
    else:
        rows = pack_sequences(None, tok, args.seq_len, args.rows, split="train")
        rows = mix_retrieval(rows, tok, args.retrieval, "cache-score")
        W = collect(model, rows, cfg.window, cfg.sinks, args.target)
    print(f"fit in {time.time() - t0:.0f}s", flush=True)
    if args.save:
        from safetensors.torch import save_file
        save_file({str(k): v.contiguous() for k, v in W.items()}, args.save)
    lengths = [int(x) for x in args.lengths.split(",")]
    texts = args.texts.split(",")
    import sys; sys.path.insert(0, "experiments")
    from needle_trace import needle_positions
    from linearize.evaluate.passkey import token_ids
    from linearize.evaluate.real_recall import Corpus, real_haystacks
    hays = [h for t in texts for n in lengths for h in real_haystacks(tok, Corpus(t, tok), 1, n, args.trials)]
    rows_h = [token_ids(tok, h.context)[0] for h in hays]
    needles = [needle_positions(tok, h)[1] for h in hays]
    ranks = {} if args.skip_ranks else collect(model, rows_h, cfg.window, cfg.sinks, args.target, W, needles)
    allr = [r for l in ranks for r in ranks[l]]
    upper = [r for l in ranks if l >= 15 for r in ranks[l]]
    med = lambda xs: sorted(xs)[len(xs) // 2]
    for name, rr in (("all", allr), ("upper", upper)) if ranks else ():
        print(name, "pred median rank", round(med([r[0] for r in rr]), 3), "top3%", round(sum(r[0] < .03 for r in rr) / len(rr), 3),
              "| true median", round(med([r[1] for r in rr]), 3), "top3%", round(sum(r[1] < .03 for r in rr) / len(rr), 3), flush=True)
    if args.skip_recall:
        return
    original = segment.select
    segment.select = LearnedSelect(W, len(model.attention_modules()))
    try:
        res = real_recall({"learned": model}, tok, texts, [1], lengths, args.trials)
    finally:
        segment.select = original
    print(json.dumps(res["models"], indent=1)[:3000])
    if args.out:
        json.dump({"args": vars(args), "result": res}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
