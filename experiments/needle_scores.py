"""Where a fact hidden in real text ranks under candidate cache scores (issue 39 item 2): for real-text haystacks
(k = 1) the student prefills each prompt; every key is scored when it first reaches a cache selection, per layer and
KV head, by

    error     the selection's own score: the pooled self-recall error (ops/sparse_cache/selection.py)
    rarity    -log of the memory's density at the key, phi(k) . s / n (s the memory's normaliser, n its keys): keys
              in a region of key space the memory has seen little of (pooled the same way)
    surprise  the teacher's NLL of the token (pooled the same way): what the model could not predict

and the needle's best token (its sentence) is ranked among all keys of that head: the share of keys that score
higher. A cache of M keys over T tokens can only keep a key ranked in about the top M / T.

    python experiments/needle_scores.py RUN --lengths 2048 --trials 6
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import linearize.ops.sparse_cache.segment as segment
from linearize.evaluate.passkey import token_ids
from linearize.evaluate.real_recall import Corpus, real_haystacks
from linearize.generate.decoding import prefill
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of
from linearize.ops.sparse_cache.positions import rope_keys
from linearize.ops.sparse_cache.selection import pooled, self_recall_error

from needle_trace import needle_positions  # noqa: E402 (experiments/ is on sys.path when run as a script)

ORIGINAL_SELECT = segment.select


class Scores:
    def __init__(self, n_layers):
        self.n_layers, self.layer_of, self.seen = n_layers, {}, {}  # seen: (layer, head) -> {position: scores}
        self.nll = None  # (T,) teacher NLL per position

    def select(self, state, spec, layer):
        index = self.layer_of.setdefault(id(state), len(self.layer_of) % self.n_layers)
        cache = state.cache
        fk = layer.key_features(rope_keys(cache, layer.inv_freq))
        error = pooled(self_recall_error(fk, cache.v, state.kv), spec.cache_pool)
        n_mem = max(segment.cached_memory_size(state), 1)
        density = (fk.float() @ state.kv[..., -1:].float()).squeeze(-1) / n_mem  # (B, Hkv, n)
        rarity = pooled(-torch.log(density.clamp_min(1e-12)), spec.cache_pool)
        pos = cache.position[0]
        nll = pooled(self.nll[pos.long().clamp(max=len(self.nll) - 1)][None], spec.cache_pool)[0]
        for h in range(pos.shape[0]):
            got = self.seen.setdefault((index, h), {})
            for j, p in enumerate(pos[h].tolist()):
                if p not in got:
                    got[p] = (error[0, h, j].item(), rarity[0, h, j].item(), nll[h, j].item())
        ORIGINAL_SELECT(state, spec, layer)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--texts", default="python-docs,shakespeare,sharegpt")
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    student, tokenizer = load_student(args.run, "cpu", torch.float32)
    teacher, _ = load_teacher_of(args.run, None, "cpu", torch.float32)
    n_layers = len(student.attention_modules())
    names = ("error", "rarity", "surprise")
    rows = []
    for text in args.texts.split(","):
        corpus = Corpus(text, tokenizer)
        for length in [int(x) for x in args.lengths.split(",")]:
            for hay in real_haystacks(tokenizer, corpus, 1, length, args.trials):
                about = hay.about[0]
                needle = needle_positions(tokenizer, hay)[0]
                ids = token_ids(tokenizer, hay.context)
                with torch.no_grad():
                    logits = teacher(input_ids=ids).logits[0, :-1].float()
                nll = torch.cat([torch.zeros(1), F.cross_entropy(logits, ids[0, 1:], reduction="none")])
                watch = Scores(n_layers)
                watch.nll = nll
                segment.select = watch.select
                prefill(student, ids)
                segment.select = ORIGINAL_SELECT
                ranks = {name: [] for name in names}  # per (layer, head): share of keys above the needle's best
                for (layer, h), got in sorted(watch.seen.items()):
                    for i, name in enumerate(names):
                        best = max((got[p][i] for p in needle if p in got), default=None)
                        if best is None:
                            continue
                        ranks[name].append(sum(1 for s in got.values() if s[i] > best) / len(got))
                row = {"text": text, "length": length, **about, "tokens": ids.shape[1],
                       **{f"{n}_median_rank": sorted(r)[len(r) // 2] for n, r in ranks.items() if r},
                       **{f"{n}_heads_top3pct": sum(x < 0.03 for x in r) / len(r) for n, r in ranks.items() if r},
                       "ranks": ranks}
                rows.append(row)
                shown = {k: round(v, 3) for k, v in row.items() if k != "ranks" and ("rank" in k or "top" in k)}
                print(text, length, about, shown, flush=True)
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if "median_rank" in k or "top3" in k}
    print(json.dumps(summary, indent=1))
    if args.out:
        command = "python experiments/needle_scores.py " + " ".join(sys.argv[1:])
        Path(args.out).write_text(json.dumps({"command": command, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
