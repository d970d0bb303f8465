"""`linearize bench DIR`: teacher (HF, SDPA, KV cache) vs student (chunked prefill, recurrent decode) on this machine.

On the CPU each (model, context) point runs in its own process (bench/measure.py), so peak memory (resident set)
is that point's alone. On CUDA (or with --in-process) both models are loaded once and every point runs in this
process: clocks are read after torch.cuda.synchronize() and memory is the peak of allocated tensor memory per
phase. Both models run the same nn.Linear kernel (settings.linears), so the ratios measure the attention.
Writes DIR/bench.json (with --cache M: DIR/bench_cacheM.json; bench_file) after every context:

    model, teacher, machine {cpus, torch, threads, device, dtype; on CUDA also device_name, cuda}, settings
    points      [{which, context, prefill_s, prefill_tokens_per_s, prefill_peak_bytes, cache_bytes,
                  decode_ms_per_token, decode_tokens_per_s, decode_peak_bytes, linear_layers_ms, model_rss_bytes,
                  and with --repeats R > 1: repeats [{the TIMED fields of each measurement}], the TIMED fields
                  their medians} or {which, context, error}]  (see measure.py)
    targets     the issue's targets, each {value, target, met} (None where a point is missing)
"""

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..device import device_name, placement
from ..errors import LinearizeError
from ..run_folder import BENCH, check_converted, teacher_spec, write_json
from ..training_free import TrainingFree
from .linears import LINEARS

K = 1024
TIMED = ("prefill_s", "prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s")


CPU_DEFAULTS = dict(contexts=(512, 1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K),  # prefill
                    decode_contexts=(1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K),  # decode after a prefill this long
                    teacher_max_context=16 * K,  # teacher prefill at 32k takes many minutes on 2 cores
                    linears="decode")
CUDA_CONTEXTS = (4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 128 * K)
CUDA_DEFAULTS = dict(contexts=CUDA_CONTEXTS, decode_contexts=CUDA_CONTEXTS, teacher_max_context=128 * K,
                     linears="stock")


@dataclass
class BenchSettings:
    """None: the default of the device (CPU_DEFAULTS or CUDA_DEFAULTS), filled in by resolved()."""

    contexts: tuple[int, ...] | None = None  # prefill
    decode_contexts: tuple[int, ...] | None = None  # decode after a prefill this long
    decode_tokens: int = 32
    teacher_max_context: int | None = None
    timeout: int = 900  # seconds per point (fresh-process points only)
    repeats: int = 1  # measurements per point, teacher and student in turn; the point keeps their medians
    linears: str | None = None  # both models' nn.Linear: "decode" (ops/decode_linear.py, CPU) | "stock"
    device: str = "auto"  # "auto" (CUDA when torch sees one) | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    in_process: bool | None = None  # load both models once and measure here (default: on CUDA only)
    eager_decode: bool = False  # the student decodes by the eager step even on CUDA (no captured graph)
    student: TrainingFree = field(default_factory=TrainingFree)  # the student's training-free settings (`--cache 64
    # --cache-position edge` ...; None: as converted)
    # the targets (issue: SmolLM2-135M on a 2-core CPU), judged at context target_at
    target_at: int = 16 * K
    flat_band: tuple[float, float] = (0.85, 1.15)  # student decode tokens/s vs the shortest context
    decode_speedup: float = 3.0  # student / teacher decode tokens/s
    prefill_speedup: float = 2.0  # student / teacher prefill tokens/s

    def resolved(self, device_type: str) -> "BenchSettings":
        """A copy with every None replaced by the default for a `device_type` ("cpu" | "cuda") machine."""
        defaults = {**(CUDA_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS), "in_process": device_type == "cuda"}
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def check(self):
        sizes = (*(self.contexts or ()), *(self.decode_contexts or ()), self.decode_tokens,
                 self.teacher_max_context or 1, self.timeout, self.repeats)
        if min(sizes) < 1:
            raise LinearizeError("contexts, --decode-tokens, --teacher-max-context, --timeout and --repeats must be "
                                 ">= 1")
        if self.linears not in (None, *LINEARS):
            raise LinearizeError(f"unknown --linears {self.linears!r}; choose one of {LINEARS}")


def run_point(path, which: str, context: int, decode_tokens: int, teacher: str | None, timeout: int,
              linears: str = "decode", dtype: str = "float32", student: TrainingFree | None = None) -> dict:
    """One measurement on the CPU in a fresh Python process; errors and timeouts come back as {"error": ...}.
    student: its training-free settings (BenchSettings.student), passed on as their flags."""
    cmd = [sys.executable, "-m", "linearize.bench.measure", str(path), "--which", which, "--context", str(context),
           "--decode-tokens", str(decode_tokens), "--linears", linears, "--dtype", dtype]
    cmd += ["--teacher", teacher] if teacher else []
    cmd += student.flags() if student else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"which": which, "context": context, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"which": which, "context": context, "error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_point(measurements: list[dict]) -> dict:
    """One point from its repeated measurements: the first one's fields with the TIMED ones replaced by their
    medians, and each measurement's TIMED fields under "repeats" (one measurement: itself; any error: that error)."""
    failed = [m for m in measurements if "error" in m]
    if failed or len(measurements) == 1:
        return (failed or measurements)[0]
    point = dict(measurements[0])
    for key in TIMED:
        if key in point:
            point[key] = statistics.median(m[key] for m in measurements)
    point["repeats"] = [{key: m[key] for key in TIMED if key in m} for m in measurements]
    return point


def _point(points, which, context, key):
    return next((p.get(key) for p in points if p["which"] == which and p["context"] == context), None)


def targets(points: list[dict], settings: BenchSettings) -> dict:
    """The targets of `settings` (target_at, flat_band, decode_speedup, prefill_speedup) from the measured points."""
    at, (low, high) = settings.target_at, settings.flat_band

    def ratio(key):
        s, t = _point(points, "student", at, key), _point(points, "teacher", at, key)
        return s / t if s and t else None

    def check(value, target, met):
        return {"value": value, "target": target, "met": None if value is None else bool(met(value))}

    tps = [_point(points, "student", c, "decode_tokens_per_s") for c in settings.decode_contexts]
    tps = [t for t in tps if t]
    spread = [t / tps[0] for t in tps] if len(tps) > 1 else None
    caches = [c for c in (_point(points, "student", c, "cache_bytes") for c in settings.decode_contexts) if c is not None]
    return {
        "student_decode_flat": check(spread and [min(spread), max(spread)], f"tokens/s vs the shortest context in "
                                     f"[{low}, {high}]", lambda v: low <= v[0] and v[1] <= high),
        f"decode_speedup_{at // K}k": check(ratio("decode_tokens_per_s"), f">= {settings.decode_speedup:g}",
                                            lambda v: v >= settings.decode_speedup),
        f"prefill_speedup_{at // K}k": check(ratio("prefill_tokens_per_s"), f">= {settings.prefill_speedup:g}",
                                             lambda v: v >= settings.prefill_speedup),
        "student_cache_constant": check(sorted(set(caches)) if len(caches) > 1 else None,
                                        "one value for all (>= 2) contexts", lambda v: len(v) == 1),
    }


class InProcess:
    """Both models loaded once on `device`; point() measures one in this process (errors come back as
    {"error": ...}, a CUDA out-of-memory included, with the cache emptied after it)."""

    def __init__(self, path, teacher: str | None, device, dtype, linears: str, student: TrainingFree | None = None):
        from .measure import load_model

        self.device = device
        self.models = {which: load_model(path, which, teacher, device, dtype, linears, student)
                       for which in ("student", "teacher")}

    def point(self, which: str, context: int, decode_tokens: int, linears: str, captured: bool | None = None) -> dict:
        """captured: the student's decoding step on fixed buffers, captured as a graph on CUDA (None: the
        Decoder's default, so on CUDA; generate/captured.py)."""
        import torch

        from .measure import measure_point

        try:
            return {"which": which, "linears": linears,
                    **measure_point(self.models[which], context, decode_tokens, captured=captured)}
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            return {"which": which, "context": context, "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


BENCH_FILE_TAGS = {"heavy": "_heavy{}", "cache": "_cache{}", "cache_every": "_every{}", "memory_cap": "_cap{}",
                   "cache_position": "_{}"}


def bench_file(settings: BenchSettings) -> str:
    """bench.json, or for a student given training-free settings a name that says which: bench_cache64_edge.json
    for --cache 64 --cache-position edge, _every / _cap / _heavy for --cache-every / --memory-cap / --heavy."""
    tags = "".join(BENCH_FILE_TAGS[name].format(value) for name, value in settings.student.given().items())
    tags += "_eager_decode" if settings.eager_decode else ""
    return f"bench{tags}.json" if tags else BENCH


def bench(path: str | Path, settings: BenchSettings | None = None, teacher: str | None = None, log=print) -> dict:
    import torch

    settings = settings or BenchSettings()
    device, dtype = placement(settings.device, settings.dtype)
    settings = settings.resolved(device.type)
    settings.check()
    if device.type == "cuda" and settings.linears == "decode":
        raise LinearizeError("--linears decode is a CPU kernel; on CUDA both models use stock nn.Linear (--linears stock)")
    if device.type == "cuda" and not settings.in_process:
        raise LinearizeError("on CUDA the bench runs in one process (fresh processes only matter for CPU memory)")
    path = check_converted(path)
    spec = teacher_spec(path, teacher)
    dtype_name = str(dtype).removeprefix("torch.")
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "device": str(device), "dtype": dtype_name}
    if device.type == "cuda":
        machine.update(device_name=device_name(device), cuda=torch.version.cuda)
    res = {"model": str(path), "teacher": spec, "settings": {**asdict(settings), "student": settings.student.given()},
           "points": [], "machine": machine}
    here = InProcess(path, spec, device, dtype, settings.linears, settings.student) if settings.in_process else None
    for context in sorted(set(settings.contexts) | set(settings.decode_contexts)):
        n_decode = settings.decode_tokens if context in settings.decode_contexts else 0
        models = [w for w in ("student", "teacher") if w == "student" or context <= settings.teacher_max_context]
        measured = {which: [] for which in models}
        for r in range(settings.repeats):  # in turn, so that a slow spell of the machine hits both
            for which in models:
                turn = f" ({r + 1} of {settings.repeats})" if settings.repeats > 1 else ""
                log(f"bench: {which} at context {context} ({'prefill + decode' if n_decode else 'prefill'}){turn} ...")
                if here is not None:
                    measured[which].append(here.point(which, context, n_decode, settings.linears,
                                                      False if settings.eager_decode else None))
                else:
                    measured[which].append(run_point(path, which, context, n_decode, spec, settings.timeout,
                                                     settings.linears, dtype_name, settings.student))
        for which in models:
            res["points"].append(median_point(measured[which]))
            if "error" in res["points"][-1]:
                log(f"bench: {which} at {context}: {res['points'][-1]['error']}")
        res["targets"] = targets(res["points"], settings)
        write_json(res, path / bench_file(settings))
    return res
