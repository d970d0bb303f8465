"""One benchmark point: prefill `context` random tokens, then decode (measure_point(), on the model's device).

On the CPU each point runs in a fresh process, so its peak resident set is its own:

    python -m linearize.bench.measure DIR --which student --context 4096 --decode-tokens 32 [--teacher M]
                                          [--linears decode|stock] [--dtype float32|bfloat16]

prints one JSON line (keys below). Memory is the process's peak resident set (Linux VmHWM), reset before each
phase and counted above the resident set after loading the model, so each number is what that phase added.
On CUDA (bench --in-process) it is the peak of allocated tensor memory above what was allocated before the
phase (torch.cuda.max_memory_allocated), in the same fields.
"""

import argparse
import json
import statistics
import sys

import torch

from ..generate.decoding import Decoder
from ..device import model_device, now, placement
from ..training_free import TrainingFree, add_arguments
from .linears import LINEARS

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


class PeakMemory:
    """Peak memory of one phase above what was in use when it started: the process's resident set on the CPU
    (VmHWM), allocated tensor memory on CUDA (torch.cuda.max_memory_allocated).
    mem = PeakMemory(device); mem.start(); ...; mem.peak() -> bytes above mem.base."""

    def __init__(self, device: torch.device):
        self.device, self.base = device, 0

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else rss_bytes()

    def start(self, base: int | None = None):
        """Reset the peak; count from `base` (default: what is in use now)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak()
        self.base = self.current() if base is None else base

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return rss_bytes("VmHWM") - self.base


@torch.no_grad()
def linear_layers_ms(model, repeats: int = 8) -> float:
    """Median time of one token (batch 1) through every nn.Linear of the model (its own forward, so DecodeLinear
    when --linears decode), lm_head included: the cost of streaming the weights, a floor under any decode step
    that teacher and student share."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    device = model_device(model)
    xs = [torch.randn(1, m.in_features, dtype=m.weight.dtype, device=m.weight.device) for m in linears]
    times = []
    for _ in range(repeats + 1):
        t0 = now(device)
        for m, x in zip(linears, xs):
            m(x)
        times.append(now(device) - t0)
    return statistics.median(times[1:]) * 1000


@torch.no_grad()
def measure_point(model, context: int, decode_tokens: int, seed: int = 0, captured: bool | None = None) -> dict:
    """Prefill `context` random tokens, then `decode_tokens` timed greedy steps after DECODE_WARMUP_STEPS untimed
    ones (0 = prefill only), on the model's device (CUDA: clocks read after synchronising).
    Returns {context, prefill_s, prefill_tokens_per_s, prefill_peak_bytes, cache_bytes, decode_ms_per_token
    (median), decode_tokens_per_s, decode_peak_bytes (incl. the cache), linear_layers_ms (the
    weight-streaming floor of one step), threads, decode_step (how the student decoded: "captured graph", "fixed
    buffers" or "eager"; generate/captured.py) and model_rss_bytes (CPU) or model_allocated_bytes (CUDA)}.
    captured: Decoder's (None: its default, on CUDA)."""
    device = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(vocab, (1, context), generator=torch.Generator().manual_seed(seed)).to(device)
    dec = Decoder(model, captured)
    dec.step(dec.prefill(ids[:, :WARMUP_TOKENS]).argmax(-1, keepdim=True))  # warm-up: first-call costs
    dec = Decoder(model, captured)
    mem = PeakMemory(device)
    mem.start()
    base = mem.base
    t0 = now(device)
    logits = dec.prefill(ids)
    prefill_s = now(device) - t0
    out = {"context": context, "prefill_s": prefill_s, "prefill_tokens_per_s": context / prefill_s,
           "prefill_peak_bytes": mem.peak(), "threads": torch.get_num_threads(), "cache_bytes": dec.cache_bytes(),
           "model_allocated_bytes" if device.type == "cuda" else "model_rss_bytes": base}
    if decode_tokens > 0:
        mem.start(base)  # the decode peak counts the cache, as the resident set does
        for _ in range(DECODE_WARMUP_STEPS):  # untimed: the first steps after a long prefill run cold
            logits = dec.step(logits.argmax(-1, keepdim=True))
        times = []
        for _ in range(decode_tokens):
            token = logits.argmax(-1, keepdim=True)
            t0 = now(device)
            logits = dec.step(token)
            times.append(now(device) - t0)
        ms = statistics.median(times) * 1000
        out.update(decode_ms_per_token=ms, decode_tokens_per_s=1000 / ms, decode_peak_bytes=mem.peak(),
                   cache_bytes_after_decode=dec.cache_bytes(), linear_layers_ms=linear_layers_ms(model),
                   decode_step=dec.step_kind)
    return out


def load_model(path, which: str, teacher: str | None, device, dtype, linears: str,
               training_free: TrainingFree | None = None):
    """The teacher or the student of a converted folder, on `device` in `dtype`, with `linears` applied;
    training_free: the student's settings changed without training (loading.student.load_student; None: as
    converted)."""
    from ..loading.student import load_student
    from ..loading.teacher import load_teacher_of
    from ..ops.decode_linear import use_decode_linears

    if which == "student":
        model = load_student(path, device, dtype, training_free)[0]
    else:
        model = load_teacher_of(path, teacher, device, dtype)[0]
    if linears == "decode":
        use_decode_linears(model)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--which", choices=("teacher", "student"), required=True)
    p.add_argument("--teacher")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--linears", choices=LINEARS, default="decode")
    p.add_argument("--dtype", default="auto")
    add_arguments(p)  # the student's, as BenchSettings.student passes them (TrainingFree.flags)
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from ..errors import LinearizeError

    hf_logging.set_verbosity_error()
    torch.set_flush_denormal(True)  # as the `linearize` command does: subnormal floats are very slow on CPU
    try:
        model = load_model(args.path, args.which, args.teacher, *placement("cpu", args.dtype), args.linears,
                           TrainingFree.from_args(args))
    except LinearizeError as e:
        sys.exit(f"linearize: error: {e}")
    print(json.dumps({"which": args.which, "linears": args.linears, **measure_point(model, args.context, args.decode_tokens)}))


if __name__ == "__main__":
    main()
