"""`linearize bench DIR`: parser, run and the terminal table."""

from pathlib import Path

from ..errors import LinearizeError
from ..options import add_placement, fmt, token_count, token_counts
from ..training_free import TrainingFree, add_arguments


def add(sub):
    from .linears import LINEARS
    from .run import BenchSettings

    d = BenchSettings()
    p = sub.add_parser("bench", help="speed and memory, teacher vs student, prefill and decode -> bench.json",
                       description="Benchmark teacher (HF KV cache, SDPA) vs student (chunked prefill, recurrent "
                                   "decode). On the CPU every point runs in a fresh process; the defaults take about "
                                   "15 minutes on a 2-core CPU with SmolLM2-135M. On CUDA both models are loaded once "
                                   "(bf16) and every point runs in one process. Writes DIR/bench.json.")
    p.add_argument("path", help="converted model folder")
    p.add_argument("--teacher", help="teacher model (default: the one in DIR/convert.json, else bundled SmolLM2)")
    p.add_argument("--contexts", type=token_counts, default=d.contexts, help="prefill lengths (default: 512,1k,...,32k; on CUDA 4k,8k,...,128k)")
    p.add_argument("--decode-contexts", type=token_counts, default=d.decode_contexts,
                   help="decode after a prefill of these lengths (default: 1k,2k,...,32k; on CUDA 4k,...,128k)")
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens,
                   help="decode steps timed per point (median; default: %(default)s)")
    p.add_argument("--teacher-max-context", type=token_count, default=d.teacher_max_context,
                   help="skip the teacher above this context (default: 16k; on CUDA 128k)")
    p.add_argument("--repeats", type=int, default=d.repeats,
                   help="measure every point R times, teacher and student in turn, and keep the medians (a noisy "
                        "machine: the ratios of one run can move by a third; default: %(default)s)")
    p.add_argument("--timeout", type=int, default=d.timeout, help="seconds per point in a fresh process (default: %(default)s)")
    p.add_argument("--linears", choices=LINEARS, default=d.linears,
                   help="linear layers of both models: decode (one-token products split over the CPU threads, "
                        "linearize/ops/decode_linear.py) or stock nn.Linear (default: decode on the CPU, stock on CUDA)")
    add_arguments(p)
    add_placement(p, "both models")
    p.add_argument("--eager-decode", action="store_true",
                   help="decode the student by its eager step on CUDA too, not the captured graph (for comparison)")
    p.add_argument("--in-process", action="store_true", default=None,
                   help="load both models once and run every point in this process (always so on CUDA)")
    p.set_defaults(run=run)


def run(args):
    from .run import BenchSettings, bench, bench_file

    settings = BenchSettings(contexts=args.contexts, decode_contexts=args.decode_contexts,
                             decode_tokens=args.decode_tokens, teacher_max_context=args.teacher_max_context,
                             timeout=args.timeout, repeats=args.repeats, linears=args.linears, device=args.device,
                             dtype=args.dtype, in_process=args.in_process, eager_decode=args.eager_decode,
                             student=TrainingFree.from_args(args))
    res = bench(args.path, settings, args.teacher)
    print_tables(res)
    print(f"results written to {Path(args.path) / bench_file(settings)}")
    student = [p for p in res["points"] if p["which"] == "student"]
    if student and all("error" in p for p in student):
        raise LinearizeError(f"every student point failed (first: {student[0]['error']}); see the messages above")


def print_tables(res: dict):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    machine = res["machine"]
    where = machine.get("device_name") or f"{machine['threads']} threads"
    t = Table(title=f"teacher vs student, {where}")
    for col in ("context", "model", "prefill tok/s", "prefill peak MiB", "decode ms/tok", "decode tok/s",
                "decode peak MiB", "cache MiB"):
        t.add_column(col, justify="right")
    for p in res["points"]:
        if "error" in p:
            continue
        mib = 1 / 2**20
        t.add_row(str(p["context"]), p["which"], fmt(p["prefill_tokens_per_s"], ".0f"),
                  fmt(p["prefill_peak_bytes"] * mib, ".0f"), fmt(p.get("decode_ms_per_token"), ".1f"),
                  fmt(p.get("decode_tokens_per_s"), ".1f"),
                  fmt(p.get("decode_peak_bytes") and p["decode_peak_bytes"] * mib, ".0f"),
                  fmt(p["cache_bytes"] * mib, ".2f"))
    console.print(t)
    for p in res["points"]:
        if "error" in p:
            console.print(f"{p['which']} at context {p['context']}: {p['error']}", markup=False)
    for name, r in res.get("targets", {}).items():
        mark = {True: "met", False: "MISSED", None: "not measured"}[r["met"]]
        console.print(f"{name}: {r['value']} (target {r['target']}): {mark}", markup=False)
