"""One benchmark point in a fresh process: load one model, prefill `context` random tokens, then decode.

    python -m linearize.bench.measure DIR --which student --context 4096 --decode-tokens 32 [--teacher M]
                                          [--linears decode|stock]

prints one JSON line (keys below). Memory is the process's peak resident set (Linux VmHWM), reset before each
phase and counted above the resident set after loading the model, so each number is what that phase added.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from .decoding import Decoder
from .run import LINEARS

WARMUP_TOKENS = 16
DECODE_WARMUP_STEPS = 4


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident set of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    """Make VmHWM start again from the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@torch.no_grad()
def linear_layers_ms(model, repeats: int = 8) -> float:
    """Median time of one token (batch 1) through every nn.Linear of the model (its own forward, so DecodeLinear
    when --linears decode), lm_head included: the cost of streaming the weights, a floor under any decode step
    that teacher and student share."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for m, x in zip(linears, xs):
            m(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


@torch.no_grad()
def measure(model, context: int, decode_tokens: int, seed: int = 0) -> dict:
    """Prefill `context` random tokens, then `decode_tokens` timed greedy steps after DECODE_WARMUP_STEPS untimed
    ones (0 = prefill only).
    Returns {context, prefill_s, prefill_tokens_per_s, prefill_peak_bytes, cache_bytes, decode_ms_per_token
    (median), decode_tokens_per_s, decode_peak_bytes (incl. the cache), linear_layers_ms (the
    weight-streaming floor of one step), model_rss_bytes, threads}."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (1, context), generator=torch.Generator().manual_seed(seed))
    dec = Decoder(model)
    dec.step(dec.prefill(ids[:, :WARMUP_TOKENS]).argmax(-1, keepdim=True))  # warm-up: first-call costs
    dec = Decoder(model)
    base = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    logits = dec.prefill(ids)
    prefill_s = time.perf_counter() - t0
    out = {"context": context, "prefill_s": prefill_s, "prefill_tokens_per_s": context / prefill_s,
           "prefill_peak_bytes": rss_bytes("VmHWM") - base, "model_rss_bytes": base,
           "threads": torch.get_num_threads(), "cache_bytes": dec.cache_bytes()}
    if decode_tokens > 0:
        reset_peak()
        for _ in range(DECODE_WARMUP_STEPS):  # untimed: the first steps after a long prefill run cold
            logits = dec.step(logits.argmax(-1, keepdim=True))
        times = []
        for _ in range(decode_tokens):
            token = logits.argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            logits = dec.step(token)
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1000
        out.update(decode_ms_per_token=ms, decode_tokens_per_s=1000 / ms, decode_peak_bytes=rss_bytes("VmHWM") - base,
                   cache_bytes_after_decode=dec.cache_bytes(), linear_layers_ms=linear_layers_ms(model))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--which", choices=("teacher", "student"), required=True)
    p.add_argument("--teacher")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--linears", choices=LINEARS, default="decode")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from ..errors import LinearizeError
    from ..evaluate.models import load_student, load_teacher_of
    from ..ops.decode_linear import use_decode_linears

    hf_logging.set_verbosity_error()
    torch.set_flush_denormal(True)  # as the `linearize` command does: subnormal floats are very slow on CPU
    try:
        model = load_student(args.path)[0] if args.which == "student" else load_teacher_of(args.path, args.teacher)[0]
    except LinearizeError as e:
        sys.exit(f"linearize: error: {e}")
    if args.linears == "decode":
        use_decode_linears(model)
    print(json.dumps({"which": args.which, "linears": args.linears, **measure(model, args.context, args.decode_tokens)}))


if __name__ == "__main__":
    main()
