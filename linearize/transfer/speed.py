"""`linearize bench-transfer`: attention-transfer throughput vs the teacher's forward pass, in one process.

Both are measured on the same random token batches (content does not change the cost), after one warm-up
step each, on --device (clocks read after the device has finished: CUDA runs asynchronously); the result goes
to a JSON file."""

import json

import torch

from ..device import device_name, now, placement
from ..layers.linear_attention import attention_preset
from ..loading.teacher import load_teacher
from ..models.linearized import make_student_attention
from ..options import add_placement
from ..run_folder import write_json
from .attention_transfer import attention_transfer


def measure_transfer(model: str | None, seq_len: int, steps: int, attention: str, threads: int | None = None,
            device: str = "cpu", dtype: str = "auto") -> dict:
    if threads:
        torch.set_num_threads(threads)
    where, precision = placement(device, dtype)
    teacher, _ = load_teacher(model, dtype=precision)
    teacher.to(where)
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, teacher.config.vocab_size, (steps + 1, seq_len), generator=g).to(where)
    with torch.no_grad():
        teacher(batches[:1])  # warm-up
        t0 = now(where)
        for row in batches[1:]:
            teacher(row[None])
        teacher_s = now(where) - t0
    students = make_student_attention(teacher, attention_preset(attention))
    attention_transfer(teacher, students, batches[:1], progress=False)  # warm-up step
    t0 = now(where)
    attention_transfer(teacher, students, batches[1:], progress=False)
    transfer_s = now(where) - t0
    tokens = steps * seq_len
    result = {
        "model": model or "bundled SmolLM2-135M-Instruct", "attention": attention, "seq_len": seq_len,
        "steps": steps, "threads": torch.get_num_threads(), "device": str(where), "device_name": device_name(where),
        "dtype": str(precision).removeprefix("torch."),
        "teacher_forward_tokens_per_s": round(tokens / teacher_s, 1),
        "transfer_tokens_per_s": round(tokens / transfer_s, 1),
    }
    result["ratio"] = round(result["transfer_tokens_per_s"] / result["teacher_forward_tokens_per_s"], 3)
    return result


def add(sub):
    p = sub.add_parser("bench-transfer", help="attention-transfer tokens/s vs teacher forward tokens/s")
    p.add_argument("--model", help="teacher (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--attention", default="lolcats")
    p.add_argument("--out", default="bench_transfer.json", help="JSON result file (default: %(default)s)")
    add_placement(p, "the teacher")
    p.set_defaults(run=_run)


def _run(args):
    result = measure_transfer(args.model, args.seq_len, args.steps, args.attention, device=args.device, dtype=args.dtype)
    write_json(result, args.out)
    print(json.dumps(result, indent=2))
    print(f"transfer runs at {result['ratio']:.2f}x the teacher's forward tokens/s (written to {args.out})")
