"""Probe for issue 39: would the learned cache score rank a real-text needle better from the layer's input (the
hidden state each key and value are projected from) than from [k, v, 1]? Fits both on the package's look-up rows
(transfer/cache_score.fit_rows, the same targets), then ranks the needle's best digit among each head's keys in the
eval's real-text haystacks (as experiments/cache_fit_probe.py does).

    python experiments/score_features_probe.py runs/smollm2_a8 --rows 32 --trials 4 --out docs/results/score_features_probe.json
"""

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, "experiments")
from cache_fit_probe import summary  # noqa: E402
from needle_trace import needle_positions  # noqa: E402

from linearize.evaluate.passkey import token_ids  # noqa: E402
from linearize.evaluate.real_recall import Corpus, real_haystacks  # noqa: E402
from linearize.layers.linear_attention import LinearAttention  # noqa: E402
from linearize.loading.student import load_student  # noqa: E402
from linearize.ops.rotary import rotate  # noqa: E402
from linearize.ops.sparse_cache.selection import pooled, score_features, worst_recalled  # noqa: E402
from linearize.transfer.cache_score import RIDGE, answer_queries, fit_rows, question_targets  # noqa: E402
from linearize.transfer.cache_score import labels as cache_score_labels  # noqa: E402


def features(kind, m, streams, hidden):
    """(B, Hkv or 1, T, D) float32."""
    T = streams.k.shape[2]
    if kind == "kv":
        return score_features(rotate(streams.k, -torch.arange(T), m.rope_frequencies), streams.v)
    h = hidden.float()[:, None]  # (B, 1, T, D)
    parts = [h, torch.ones_like(h[..., :1])]
    if kind == "hidden+kv":
        kv = score_features(rotate(streams.k, -torch.arange(T), m.rope_frequencies), streams.v)
        parts = [h.expand(-1, kv.shape[1], -1, -1), kv]
    return torch.cat(parts, -1)


def labels(name: str, target: torch.Tensor) -> torch.Tensor:
    """What the ridge fits, from question_targets' log attention (B, Hkv, n): "attn" itself, "topP" 1 for the keys
    in the top P % of each row and head, else 0."""
    return cache_score_labels(target, None if name == "attn" else float(name.removeprefix("top")) / 100)


def solve(xtx, xty):
    eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype)
    lam = RIDGE * xtx.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return torch.linalg.solve(xtx + lam * eye, xty[..., None]).squeeze(-1).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--kinds", default="kv,hidden")
    ap.add_argument("--targets", default="attn,top1,top5", help="what the ridge fits (labels)")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--texts", default="python-docs,sharegpt,shakespeare")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    model, tok = load_student(args.run, "cpu", torch.float32)
    layers = [m for m in model.attention_modules() if getattr(m, "cache_scorer", None) is not None]
    cfg = layers[0].config
    window, sinks = cfg.window, cfg.sinks
    targets = args.targets.split(",")
    sums = {(kind, m.layer_idx): [0, {}] for kind in kinds for m in layers}
    probe = {"hidden": None, "queries": None, "mode": "fit", "needle": None}
    ranks = {f"{kind}:{name}": {} for kind in kinds for name in args.targets.split(",")}
    kept = {name: {} for name in ranks}
    weights = {}
    project, attend = LinearAttention.project, LinearAttention.attend

    def projecting(self, hidden_states, *a, **kw):
        probe["hidden"] = hidden_states
        return project(self, hidden_states, *a, **kw)

    def attending(self, streams, state=None):
        st = state
        if self in layers:
            T = streams.k.shape[2]
            if probe["mode"] == "fit":
                target, reached = question_targets(streams, self.scaling, window, sinks, probe["queries"])
                ys = {name: labels(name, target[:, :, reached]) for name in targets}
                for kind in kinds:
                    x = features(kind, self, streams, probe["hidden"])[:, :, reached]
                    s = sums[(kind, self.layer_idx)]
                    s[0] = s[0] + torch.einsum("bhnd,bhne->hde", x, x).double()
                    for name, y in ys.items():
                        s[1][name] = s[1].get(name, 0) + (torch.einsum("bhnd,bkn->kd", x, y) if x.shape[1] == 1
                                                          else torch.einsum("bhnd,bhn->hd", x, y)).double()
            else:
                pos = torch.arange(T)
                has = (pos >= sinks) & (pos <= T - 1 - window)
                where = torch.tensor(sorted(probe["needle"]))
                for kind in kinds:
                    x = features(kind, self, streams, probe["hidden"])[0]  # (Hkv or 1, T, D)
                    for name in targets:
                        w = weights[(f"{kind}:{name}", self.layer_idx)]
                        score = torch.einsum("htd,kd->kt", x, w) if x.shape[0] == 1 else torch.einsum("htd,hd->ht", x, w)
                        top = worst_recalled(pooled(score[None, :, has], 2), 64)[0]
                        for h in range(score.shape[0]):
                            ranks[f"{kind}:{name}"].setdefault(self.layer_idx, []).append(
                                (score[h, has] > score[h, where].max()).float().mean().item())
                            kept[f"{kind}:{name}"].setdefault(self.layer_idx, []).append(
                                float(top[h, where - sinks].all()))
        return attend(self, streams, st)

    LinearAttention.project, LinearAttention.attend = projecting, attending
    modules = model.attention_modules()
    t0 = time.time()
    try:
        rows, ends = fit_rows(tok, None, args.rows)
        for m in modules:
            m.exact_softmax = True
        with torch.no_grad():
            for i, row in enumerate(rows):
                probe["queries"] = answer_queries(ends[i], rows.shape[1])
                model(input_ids=row[None])
                print(f"fit row {i + 1}/{len(rows)} {time.time() - t0:.0f}s", flush=True)
        for m in modules:
            m.exact_softmax = False
        for (kind, layer), (xtx, xtys) in sums.items():
            for name, xty in xtys.items():
                weights[(f"{kind}:{name}", layer)] = solve(
                    xtx if xtx.shape[0] == xty.shape[0] else xtx.expand(xty.shape[0], -1, -1), xty)
        fit_s = time.time() - t0
        probe["mode"] = "rank"
        hays = [h for t in args.texts.split(",") for n in map(int, args.lengths.split(","))
                for h in real_haystacks(tok, Corpus(t, tok), 1, n, args.trials)]
        with torch.no_grad():
            for i, h in enumerate(hays):
                probe["needle"] = needle_positions(tok, h)[1]
                model(input_ids=token_ids(tok, h.context)[0][None])
                print(f"haystack {i + 1}/{len(hays)} {time.time() - t0:.0f}s", flush=True)
    finally:
        LinearAttention.project, LinearAttention.attend = project, attend
    n = len(modules)
    def share(got, layers):
        vals = [v for i in layers for v in got.get(i, [])]
        return round(sum(vals) / max(1, len(vals)), 3)

    out = {"args": vars(args), "fit_s": round(fit_s), **{kind: {
        "upper": summary(ranks[kind], range(n // 2, n)), "lower": summary(ranks[kind], range(n // 2)),
        "every_digit_kept_64_2": {"upper": share(kept[kind], range(n // 2, n)), "lower": share(kept[kind], range(n // 2))}}
        for kind in ranks}}
    print(json.dumps(out, indent=1))
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
