#!/usr/bin/env python3
"""Speed of the linear memory and of whole attention calls with the flash-linear-attention kernels vs the PyTorch
chunked form, forward + backward, on CUDA (SmolLM2-135M's shapes: 9 query heads over 3 key heads, head_dim 64,
Hedgehog features F = 128). Random inputs: speed does not depend on trained weights.

    python3 scripts/gpu/gpu_kernel_speed.py --out docs/results/gpu_kernels_speed.json        # on a GPU with fla
    python3 scripts/gpu/gpu_kernel_speed.py --device cpu --lengths 256 --repeats 1 --out /tmp/k.json  # a dry run

--no-grad: forward only, without gradients (prefill / inference): the kernels also serve there on Hopper GPUs
whose Triton miscompiles their backward (linearize/ops/fla_kernels.py).

Rows: {case, T, form (pytorch | fla), grad, ms (forward + backward, or forward with --no-grad, median of --repeats after 2 warm-up calls that include
Triton's compilation and autotuning), tokens_per_s, peak_mb (peak allocated CUDA memory in the timed calls)}.
Cases: memory-sum (the sum rule with the ones column), memory-delta (gated delta rule), and attention calls through
ops/hybrid attention_chunked: default (window 256, 4 sinks, memory cap 764, the convert default), liger (pure
linear, key gate), gated-delta (pure linear).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from linearize.ops import fla_kernels  # noqa: E402
from linearize.ops.hybrid.chunked import attention_chunked  # noqa: E402
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants  # noqa: E402
from linearize.ops.hybrid.state import Streams  # noqa: E402
from linearize.ops.linear_memory import memory_chunked  # noqa: E402

H, HKV, D, FD = 9, 3, 64, 128


def streams(T, rule, gated, device, dtype, B=1):
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()

    q, k, v = r(B, H, T, D), r(B, HKV, T, D), r(B, HKV, T, D)
    fq, fk = r(B, H, T, FD), r(B, HKV, T, FD)
    norm = (lambda x: x.softmax(-1)) if rule == "sum" else (lambda x: F.normalize(x, dim=-1))
    leaves = [q, k, v, fq, fk]
    log_gate = beta = None
    if gated:
        lg = r(B, HKV, T)
        leaves.append(lg)
        log_gate = F.logsigmoid(lg + 2)
    if rule == "delta":
        bl = r(B, HKV, T)
        leaves.append(bl)
        beta = torch.sigmoid(bl)
    s = Streams(k=k, v=v, q=q, fq=norm(fq), fk=norm(fk), log_gate=log_gate, beta=beta)
    return s, leaves


def case_fn(case, T, device, dtype, grad=True):
    """A closure running forward + backward once (forward only without grad), and the list of leaves."""
    if case.startswith("memory"):
        rule = case.split("-")[1]
        s, leaves = streams(T, rule, True, device, dtype)
        fq = s.fq.view(1, HKV, H // HKV, T, FD)
        v = s.v if rule == "delta" else torch.cat([s.v, torch.ones_like(s.v[..., :1])], -1)

        def run():
            with torch.set_grad_enabled(grad):
                chunked = fla_kernels.memory_fla if fla_kernels.fla_usable(v) else memory_chunked
                o, _ = chunked(fq, s.fk, v, s.log_gate, s.beta, chunk=64)
                if grad:
                    o.float().sum().backward(retain_graph=True)
        return run, leaves
    rule, gated, spec = {
        "default": ("sum", False, AttentionSpec(window=256, scale=D ** -0.5, sinks=4, memory_cap=764)),
        "liger": ("sum", True, AttentionSpec(window=0, scale=D ** -0.5)),
        "gated-delta": ("delta", True, AttentionSpec(window=0, scale=D ** -0.5, rule="delta")),
    }[case]
    s, leaves = streams(T, rule, gated, device, dtype)
    mix = torch.full((H,), 0.5, device=device)

    def run():
        with torch.set_grad_enabled(grad):
            y, _ = attention_chunked(s, spec, LayerConstants(mix), chunk=64)
            if grad:
                y.float().sum().backward(retain_graph=True)
    return run, leaves


def timed(run, leaves, device, repeats):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up: compilation and autotuning
        run()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        for x in leaves:
            x.grad = None
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--cases", default="memory-sum,memory-delta,default,liger,gated-delta")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-grad", action="store_true", help="forward only, no gradients (prefill / inference)")
    p.add_argument("--out", default="gpu_kernels_speed.json")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    out = Path(args.out)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
              "torch": torch.__version__, "grad": not args.no_grad, "rows": rows}
    for case in args.cases.split(","):
        for T in (int(t) for t in args.lengths.split(",")):
            for form in ("pytorch", "fla"):
                if form == "fla" and device.type != "cuda":
                    continue
                os.environ[fla_kernels.FLA_ENV] = "1" if form == "fla" else "0"
                try:
                    run, leaves = case_fn(case, T, device, dtype, grad=not args.no_grad)
                    sec, peak = timed(run, leaves, device, args.repeats)
                    row = {"case": case, "T": T, "form": form, "ms": round(sec * 1e3, 2),
                           "tokens_per_s": round(T / sec), "peak_mb": None if peak is None else round(peak, 1)}
                except Exception as e:  # noqa: BLE001 - record and go on: one failing case must not lose the rest
                    row = {"case": case, "T": T, "form": form, "error": f"{type(e).__name__}: {e}"[:500]}
                rows.append(row)
                print(json.dumps(row), flush=True)
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_text(json.dumps(record, indent=1))
                os.replace(tmp, out)
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
