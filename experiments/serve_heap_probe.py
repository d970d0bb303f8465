#!/usr/bin/env python3
"""What `linearize serve --mmap-threshold` costs in prefill speed: the serving path's prefill (decoding.prefill_blocks,
the server's decode linears) of one prompt, in a fresh process per threshold, with glibc's mmap threshold fixed at
each value (serve/engine.steady_heap; 0: glibc's dynamic threshold), the heap trimmed after each prompt as the
server does.

    python3 experiments/serve_heap_probe.py --run runs/default-mix4 --tokens 8192 --thresholds 0,1,8,32 \
        --out docs/results/serve_heap_threshold.json

Per threshold: seconds of each of --repeats prefills (after a 2048-token warm-up), tokens/s of the fastest, and the
process's peak RSS (ru_maxrss). What the threshold does to memory under load is serve-bench's to measure.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(run: str, tokens: int, mib: float, repeats: int) -> dict:
    """Prefill timings in this process with the threshold at `mib` MiB."""
    import resource
    import time

    import torch

    import linearize
    from linearize.generate.decoding import prefill_blocks
    from linearize.ops.decode_linear import use_decode_linears
    from linearize.serve import engine

    engine.steady_heap(mib)
    model, _ = linearize.load(run)
    use_decode_linears(model)
    ids = torch.randint(100, 10000, (1, tokens), generator=torch.Generator().manual_seed(0))
    for _ in prefill_blocks(model, ids[:, :2048]):
        pass
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in prefill_blocks(model, ids):
            pass
        seconds.append(round(time.perf_counter() - t0, 2))
        engine.trim_heap()
    return {"mmap_threshold_mib": mib, "seconds": seconds, "tokens_per_s": round(tokens / min(seconds), 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,
            "threads": torch.get_num_threads()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default-mix4")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--thresholds", default="0,1,8,32", help="MiB, comma-separated (0: glibc's dynamic threshold)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="docs/results/serve_heap_threshold.json")
    p.add_argument("--one", type=float, help=argparse.SUPPRESS)  # internal: measure this threshold here
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.run, args.tokens, args.one, args.repeats)))
        return
    rows = []
    for mib in (float(x) for x in args.thresholds.split(",")):
        out = subprocess.run([sys.executable, __file__, "--run", args.run, "--tokens", str(args.tokens), "--repeats",
                              str(args.repeats), "--one", str(mib)], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": args.run, "tokens": args.tokens, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
