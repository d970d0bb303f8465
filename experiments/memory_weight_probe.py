"""Is recall beyond the window lost in the linear memory's mass? Passkey accuracy of a converted run (with a sparse
cache) when every mixing factor's logit is shifted by +s: the window, sinks and cache weigh w' = sigmoid(logit + s),
the memory 1 - w'. s = 3 takes the default's w ~ 0.53 to ~ 0.96, the memory's share relative to the exact part ~20x
smaller. A diagnosis, not a mechanism: it changes the trained model. --caps C,...: the same with the memory capped at
C keys (LinearAttentionConfig.memory_cap: training-free, no change within the training length; 0: no cap), the
mechanism this diagnosis led to.

    python experiments/memory_weight_probe.py --run runs/w64-s4-kl --cache 64 --shifts 0,3 --lengths 4k --trials 3 \\
        --out docs/results/memory_weight_probe.json
    python experiments/memory_weight_probe.py --run runs/default-w256 --cache 64 --shifts 0 --caps 0,764 \
        --lengths 1k,2k,4k,8k --trials 10 --out docs/results/memory_cap_probe.json
    python experiments/memory_weight_probe.py --run runs/default-mix4 --cache 64 --shifts 0 --caps 764 \
        --scores squared,cosine --lengths 1k,2k,4k --trials 10 --out docs/results/cache_selection.json
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.evaluate.passkey import multikey_accuracy, passkey_accuracy  # noqa: E402
from linearize.loading.student import load_student  # noqa: E402
from linearize.models.linearized import reconfigure  # noqa: E402
from linearize.ops import sparse_cache  # noqa: E402
from linearize.options import token_counts  # noqa: E402
from linearize.training_free import TrainingFree, add_arguments  # noqa: E402
from linearize.run_folder import write_json  # noqa: E402


cosine_error = sparse_cache.self_recall_error  # the package's ranking (main() swaps the module's name)


def squared_error(fk, v, memory):
    """LoLA's self-recall error || v - read-out ||^2 (|| v ||^2 with no memory, as the package), the cache's ranking
    before the cosine: kept here as the ablation."""
    if memory is None:
        return cosine_error(fk, v, None)
    return (v.float() - sparse_cache.read_out(fk, memory)).pow(2).sum(-1)


def pooled_error(fk, v, memory, radius=2):
    """The cosine error pooled over `radius` cached keys on either side (sparse_cache.pooled): the package's ranking
    since LinearAttentionConfig.cache_pool = 2; the probe sets the model's own pooling to 0 and pools here."""
    return sparse_cache.pooled(cosine_error(fk, v, memory), radius)


SCORES = {"cosine": cosine_error, "squared": squared_error, "cosine-pooled": pooled_error}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a converted run folder (read only)")
    p.add_argument("--cache", type=int, default=64, help="sparse cache size per KV head (default: %(default)s)")
    p.add_argument("--shifts", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 3.0])
    p.add_argument("--caps", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="memory caps in keys (0: none; default: 0)")
    p.add_argument("--scores", type=lambda s: s.split(","), default=["cosine"],
                   help="how the cache ranks its keys: cosine (each key's own error), squared and/or cosine-pooled (the "
                        "package's default ranking) (default: cosine)")
    p.add_argument("--lengths", type=token_counts, default=(4096,))
    p.add_argument("--multikey-lengths", type=token_counts, default=(),
                   help="also the multi-key test (k = 4) at these lengths (default: none)")
    p.add_argument("--trials", type=int, default=3)
    add_arguments(p, ("cache_position",))
    p.add_argument("--out", default="docs/results/memory_weight_probe.json")
    args = p.parse_args(argv)
    model, tokenizer = load_student(args.run, training_free=TrainingFree(cache=args.cache,
                                                                         cache_position=args.cache_position))
    reconfigure(model, cache_pool=0)  # the ranking is the score's alone (cosine-pooled pools itself)
    mixed = [m for m in model.attention_modules() if m.mix_logit is not None]
    trained = [m.mix_logit.detach().clone() for m in mixed]
    rows = []
    for score, cap in [(score, cap) for score in args.scores for cap in args.caps]:
        sparse_cache.self_recall_error = SCORES[score]
        TrainingFree(memory_cap=cap).apply(model)
        for shift in args.shifts:
            for m, logit in zip(mixed, trained):
                m.mix_logit.data = logit + shift
            with torch.no_grad():
                r = passkey_accuracy(model, tokenizer, list(args.lengths), args.trials)
                row = {"score": score, "shift": shift, "memory_cap": cap,
                       "passkey": dict(zip(map(str, r["lengths"]), r["accuracy"]))}
                if args.multikey_lengths:
                    mk = multikey_accuracy(model, tokenizer, [4], list(args.multikey_lengths), args.trials)
                    row["multikey_k4"] = dict(zip(map(str, mk["lengths"]), mk["accuracy"]["4"]))
            row["mean_exact_weight"] = torch.sigmoid(torch.cat([m.mix_logit.detach() for m in mixed])).mean().item()
            rows.append(row)
            print(rows[-1], flush=True)
            write_json({"run": args.run, "cache": args.cache, "cache_position": model.config.attention.get(
                "cache_position", "own"), "trials": args.trials, "rows": rows}, Path(args.out))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
