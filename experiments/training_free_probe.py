"""Probe for issues 39 / 36: training-free changes to the converted default's state, measured end to end.

--budgets: the sparse cache's keys spread unevenly over the layers at the same state bytes (a cache of M keys per KV
head costs M + cache_every - 1 key slots per layer; giving some layers none and the others more keeps the total).
--decay H: the memory forgets, multiplied by (1 - 1/H)^cache_every at every selection of the cache (the only time it
changes), so it weighs about H keys, the recent ones most (with --memory-cap 0: no cap beside it).
--scorer FILE: the cache score's weights from experiments/cache_fit_probe.py --save.
Asks the real-text questions (evaluate/real_recall.py), reads the texts at 1k and the long documents
(evaluate/long.py) with the student so changed; the teacher's rows are in docs/results (recall.json "real_text",
long.json). Results: docs/results/training_free_probe.json.

    python experiments/training_free_probe.py runs/smollm2_ls --scorer W_a8.safetensors --budgets 0-14:0,15-29:191 \
        --skip long
    python experiments/training_free_probe.py runs/smollm2_ls --scorer W_a8.safetensors --decay 256 --memory-cap 0 \
        --skip recall
"""

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

import linearize.ops.sparse_cache.segment as segment
from linearize.evaluate.baseline import state_bytes
from linearize.evaluate.long import band_sums, long_documents, token_nll
from linearize.evaluate.perplexity import perplexity
from linearize.evaluate.real_recall import real_recall
from linearize.evaluate.texts import eval_sequences
from linearize.loading.student import load_student
from linearize.models.linearized import memory_layers
from linearize.training_free import TrainingFree

sys.path.insert(0, "experiments")
from cache_fit_probe import load_scorer  # noqa: E402


def set_budgets(model, budgets: str):
    """budgets "a-b:M,c-d:N": layers a..b keep M cached keys per KV head, c..d N."""
    for part in budgets.split(","):
        span, size = part.split(":")
        lo, hi = map(int, span.split("-"))
        for m in memory_layers(model):
            if lo <= m.layer_idx <= hi:
                m.config = replace(m.config, cache=int(size))
                m.spec = m.make_spec()


def forgetting(horizon: float):
    original = segment.select

    def select(state, spec, layer):
        if spec.memory:
            state.kv = state.kv * (1 - 1 / horizon) ** spec.cache_every
        original(state, spec, layer)
    segment.select = select


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--budgets", default="")
    ap.add_argument("--texts", default="python-docs,sharegpt,shakespeare")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--long-texts", default="hamlet,argparse,stdtypes")
    ap.add_argument("--long-length", type=int, default=8192)
    ap.add_argument("--scorer", default=None, help="cache score weights saved by experiments/cache_fit_probe.py --save")
    ap.add_argument("--decay", type=float, default=0)
    ap.add_argument("--memory-cap", type=int, default=None)
    ap.add_argument("--skip", default="")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_student(args.run, "cpu", torch.float32)
    if args.scorer:
        load_scorer(model, args.scorer)
    if args.budgets:
        set_budgets(model, args.budgets)
    if args.memory_cap is not None:
        TrainingFree(memory_cap=args.memory_cap).apply(model)
    if args.decay:
        forgetting(args.decay)
    out = {"args": vars(args), "state_bytes": state_bytes(model, 2048)}
    print("state bytes", out["state_bytes"], flush=True)
    t0 = time.time()
    if "recall" not in args.skip:
        res = real_recall({"student": model}, tok, args.texts.split(","), [1], list(map(int, args.lengths.split(","))),
                          args.trials)
        out["recall"] = res["models"]["student"]
        out["recall_s"] = round(time.time() - t0)
        print(json.dumps(out["recall"])[:1500], flush=True)
    if "texts" not in args.skip:  # the 1k texts of `linearize eval` (8 x 1024 tokens each)
        out["texts"] = {name: perplexity(model, eval_sequences(name, tok, 1024, 8), progress=False)
                        for name in ("sharegpt", "shakespeare", "python-docs")}
        print("texts ppl", out["texts"], flush=True)
    if "long" not in args.skip:
        docs = long_documents(args.long_texts.split(","), tok, args.long_length)
        total = count = 0
        out["long"] = {}
        for name, doc in docs.items():
            t, c = band_sums(token_nll(model, doc["ids"]), [(1024, args.long_length)])[0]
            out["long"][name] = t / c
            total, count = total + t, count + c
        out["long_from_1k_ppl"] = float(torch.tensor(total / count).exp())
        print("long ppl >= 1k", out["long_from_1k_ppl"], flush=True)
    if args.out:
        json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
