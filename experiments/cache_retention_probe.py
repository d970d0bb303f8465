"""Which tokens does the sparse cache keep? Prefill one passkey prompt (without its question) into a converted run
with `--cache M` and report, per layer, in how many KV heads some of the key's digits (and every digit of one of
its two mentions) are still exact at the end (in the window, the sinks or the cache) and which tokens fill the
caches. A diagnosis for issue 12: at 8k the passkey is lost although the memory cap keeps the memory's weight at its
training level.

    python experiments/cache_retention_probe.py --run runs/default-w256 --cache 64 --memory-cap 764 --length 8k \\
        --depths 0.25,0.5 --out docs/results/cache_retention.json
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from linearize.generate.decoding import prefill  # noqa: E402
from linearize.evaluate.passkey import INTRO, NEEDLE, QUESTION, hide, token_ids  # noqa: E402
from linearize.loading.student import load_student  # noqa: E402
from linearize.options import token_count  # noqa: E402
from linearize.ops import sparse_cache  # noqa: E402
from linearize.models.linearized import reconfigure  # noqa: E402
from linearize.training_free import TrainingFree  # noqa: E402
from memory_weight_probe import SCORES  # noqa: E402 (the cache's ranking and its variants)


def record_keys(model):
    """Hook every attention module: keys[layer] fills with (position, k (Hkv, d)) of every prompt token."""
    keys = collections.defaultdict(dict)
    for m in model.attention_modules():
        attend = m.attend

        def wrapped(streams, state=None, m=m, attend=attend):
            seen = 0 if state is None or state[m.layer_idx] is None else state[m.layer_idx].seen
            for t in range(streams.k.shape[2]):
                keys[m.layer_idx][seen + t] = streams.k[0, :, t].clone()
            return attend(streams, state)
        m.attend = wrapped
    return keys


def held_positions(table: dict, held: torch.Tensor) -> list[int]:
    """Positions of the rows of held (n, d) (one KV head): table maps a key's values to its position."""
    return [table.get(tuple(row.tolist()), -1) for row in held]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--cache", type=int, default=64)
    p.add_argument("--memory-cap", type=int, default=None)
    p.add_argument("--length", type=token_count, default=8192)
    p.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    p.add_argument("--key", type=int, default=73914)
    p.add_argument("--score", choices=SCORES, default="cosine", help="how the cache ranks its keys (default: the "
                                                                     "package's cosine)")
    p.add_argument("--out", default="docs/results/cache_retention.json")
    args = p.parse_args(argv)
    sparse_cache.self_recall_error = SCORES[args.score]
    model, tokenizer = load_student(args.run, training_free=TrainingFree(cache=args.cache, memory_cap=args.memory_cap))
    reconfigure(model, cache_pool=0)  # the ranking is the score's alone (cosine-pooled pools itself)
    rows = []
    for depth in args.depths:
        text = hide(tokenizer, INTRO, [NEEDLE.format(key=args.key)], [depth], QUESTION, args.length)
        ids = token_ids(tokenizer, text)
        pieces = [tokenizer.decode([t]) for t in ids[0].tolist()]
        digits = [i for i, s in enumerate(pieces) if s.strip().isdigit()]
        needle = digits  # the digit tokens of both mentions ("The pass key is KEY. Remember it. KEY is ...")
        half = len(needle) // 2
        mentions = [needle[:half], needle[half:]]
        keys = record_keys(model)
        with torch.no_grad():
            _, state = prefill(model, ids)
        per_layer, whole, filling = [], [], collections.Counter()
        for layer, s in enumerate(state):
            exact = [s.win] + [x for x in (s.sinks, s.cache) if x is not None]
            heads, complete = 0, 0
            for h in range(s.win.k.shape[1]):
                table = {tuple(k[h].tolist()): pos for pos, k in keys[layer].items()}
                held = set()
                for part in exact:
                    held.update(held_positions(table, part.k[0, h]))
                heads += any(i in held for i in needle)
                complete += any(all(i in held for i in m) for m in mentions)  # every digit of one mention
                if s.cache is not None:
                    for pos in held_positions(table, s.cache.k[0, h]):
                        filling[pieces[pos] if pos >= 0 else "?"] += 1
            per_layer.append(heads)
            whole.append(complete)
        row = {"length": ids.shape[1], "depth": depth, "needle_positions": needle,
               "heads_holding_the_key_per_layer": per_layer,
               "heads_holding_a_whole_mention_per_layer": whole, "kv_heads": state[0].win.k.shape[1],
               "cached_tokens_top": filling.most_common(15)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"run": args.run, "cache": args.cache, "memory_cap": args.memory_cap,
                                          "score": args.score,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
