"""`linearize bench DIR`: teacher (HF, SDPA, KV cache) vs student (chunked prefill, recurrent decode) on this machine.

Each (model, context) point runs in its own process (bench/measure.py), so peak memory is that point's alone.
Both models run the same nn.Linear kernel (settings.linears), so the ratios measure the attention.
Writes DIR/bench.json after every point:

    model, teacher, machine {cpus, torch, threads}, settings
    points      [{which, context, prefill_s, prefill_tokens_per_s, prefill_peak_bytes, cache_bytes,
                  decode_ms_per_token, decode_tokens_per_s, decode_peak_bytes, linear_layers_ms, model_rss_bytes}
                 or {which, context, error}]  (see measure.py)
    targets     the issue's targets, each {value, target, met} (None where a point is missing)
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checkpoint import write_json_atomic
from ..errors import LinearizeError
from ..evaluate.models import teacher_spec

K = 1024
LINEARS = ("decode", "stock")


@dataclass
class BenchSettings:
    contexts: tuple[int, ...] = (512, 1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K)  # prefill
    decode_contexts: tuple[int, ...] = (1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K)  # decode after a prefill this long
    decode_tokens: int = 32
    teacher_max_context: int = 16 * K  # teacher prefill at 32k takes many minutes on 2 cores
    timeout: int = 900  # seconds per point
    linears: str = "decode"  # both models' nn.Linear: "decode" (ops/decode_linear.py) | "stock"

    def check(self):
        if min(*self.contexts, *self.decode_contexts, self.decode_tokens, self.teacher_max_context, self.timeout) < 1:
            raise LinearizeError("contexts, --decode-tokens, --teacher-max-context and --timeout must be >= 1")
        if self.linears not in LINEARS:
            raise LinearizeError(f"unknown --linears {self.linears!r}; choose one of {LINEARS}")


def run_point(path, which: str, context: int, decode_tokens: int, teacher: str | None, timeout: int,
              linears: str = "decode") -> dict:
    """One measurement in a fresh Python process; errors and timeouts come back as {"error": ...}."""
    cmd = [sys.executable, "-m", "linearize.bench.measure", str(path), "--which", which, "--context", str(context),
           "--decode-tokens", str(decode_tokens), "--linears", linears] + (["--teacher", teacher] if teacher else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"which": which, "context": context, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"which": which, "context": context, "error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _point(points, which, context, key):
    return next((p.get(key) for p in points if p["which"] == which and p["context"] == context), None)


def targets(points: list[dict], decode_contexts, at: int = 16 * K) -> dict:
    """The issue's targets for SmolLM2-135M on a 2-core CPU, from the measured points."""
    def ratio(key):
        s, t = _point(points, "student", at, key), _point(points, "teacher", at, key)
        return s / t if s and t else None

    def check(value, target, met):
        return {"value": value, "target": target, "met": None if value is None else bool(met(value))}

    tps = [_point(points, "student", c, "decode_tokens_per_s") for c in decode_contexts]
    tps = [t for t in tps if t]
    spread = [t / tps[0] for t in tps] if len(tps) > 1 else None
    caches = {_point(points, "student", c, "cache_bytes") for c in decode_contexts} - {None}
    return {
        "student_decode_flat": check(spread and [min(spread), max(spread)], "tokens/s vs the shortest context in "
                                     "[0.85, 1.15]", lambda v: 0.85 <= v[0] and v[1] <= 1.15),
        f"decode_speedup_{at // K}k": check(ratio("decode_tokens_per_s"), ">= 3", lambda v: v >= 3),
        f"prefill_speedup_{at // K}k": check(ratio("prefill_tokens_per_s"), ">= 2", lambda v: v >= 2),
        "student_cache_constant": check(sorted(caches) or None, "one value for all contexts", lambda v: len(v) == 1),
    }


def bench(path: str | Path, settings: BenchSettings | None = None, teacher: str | None = None, log=print) -> dict:
    import torch

    settings = settings or BenchSettings()
    settings.check()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LinearizeError(f"{path} is not a converted model folder (no config.json); run `linearize convert` first")
    spec = teacher_spec(path, teacher)
    res = {"model": str(path), "teacher": spec, "settings": asdict(settings), "points": [],
           "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}}
    for context in sorted(set(settings.contexts) | set(settings.decode_contexts)):
        n_decode = settings.decode_tokens if context in settings.decode_contexts else 0
        for which in ("student", "teacher"):
            if which == "teacher" and context > settings.teacher_max_context:
                continue
            log(f"bench: {which} at context {context} ({'prefill + decode' if n_decode else 'prefill'}) ...")
            res["points"].append(run_point(path, which, context, n_decode, spec, settings.timeout, settings.linears))
            if "error" in res["points"][-1]:
                log(f"bench: {which} at {context}: {res['points'][-1]['error']}")
            res["targets"] = targets(res["points"], settings.decode_contexts)
            write_json_atomic(res, path / "bench.json")
    return res
