"""The training-free StreamingLLM baseline against converted models with the same window and sinks (issue 15).

    python scripts/baseline_table.py --out runs/baseline [--device cuda] [--windows 64,128,256] [--sinks 4]
                                     [--parallel 3] [--convert-args "..."] [--eval-args "..."]
    python scripts/baseline_table.py --out runs/baseline --speed        # decode tokens/s at 16k, this machine
    python scripts/baseline_table.py --out docs/results --add RUN --name NAME   # a finished run as one more row
    python scripts/baseline_table.py --out docs/results --retire NAME,...    # rows of an earlier default recipe

Rows, each `linearize convert` then `linearize eval` (ppl / KL / top-1 on the three texts, passkey 1k-4k):
    streaming W S      the teacher itself over S sinks + its last W tokens (`--attention streaming`: no training)
    lolcats W S        the default family with the same window and sinks, at the default budget
    streaming W' S     the baseline with the same decoding-state bytes as `lolcats W S` (W' > W: the converted
                       model also holds a linear memory)
    lolcats 64 0       with --reference: the conversion without sinks
Writes OUT/baseline.json (rows: attention, window, sinks, state_bytes, ppl_ratio, top1, kl, passkey, ...) and
OUT/baseline.md. `--speed` adds decode_tokens_per_s_16k to every row: speed does not depend on the weights, so it
is measured here on an untrained model of each row's shape (`convert --tokens 0 --lora-tokens 0`).
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

K = 1024


def sh(args: list[str], log: Path) -> float:
    """Run `python -m linearize.cli ARGS`, output appended to `log`; returns seconds. Raises on failure."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ linearize {shlex.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "linearize.cli", *args], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"linearize {args[0]} failed (exit {proc.returncode}); see {log}")
    return round(time.time() - t0, 1)


def run_state_bytes(run: Path, context: int, device: str, dtype=None) -> int:
    """Bytes of a converted model's decoding state after a `context`-token prompt (dtype: load it so, e.g.
    torch.bfloat16 to count a CPU run's state in the units of the GPU rows)."""
    import linearize
    from linearize.evaluate.baseline import state_bytes

    model, _ = linearize.load(run, dtype=dtype)
    return state_bytes(model.to(device), context)


def row_name(attention: str, window: int, sinks: int) -> str:
    return f"{attention}-w{window}-s{sinks}"


def run_row(out: Path, attention: str, window: int, sinks: int, args) -> dict:
    name = row_name(attention, window, sinks)
    run, log = out / name, out / f"{name}.log"
    convert = ["convert", "--attention", attention, "--window", str(window), "--sinks", str(sinks), "--out", str(run),
               "--device", args.device, "--no-progress", *shlex.split(args.convert_args)]
    if (run / "convert.json").is_file():
        convert.append("--resume")
    seconds = {"convert": sh(convert, log)}
    if not (run / "eval.json").is_file() or "passkey" not in json.loads((run / "eval.json").read_text()):
        seconds["eval"] = sh(["eval", str(run), "--device", args.device, "--skip", "mmlu,layers,long,realrecall",
                              "--no-progress",
                              "--passkey-lengths", args.passkey_lengths, "--passkey-trials", str(args.passkey_trials),
                              *shlex.split(args.eval_args)], log)
    return {**finished_row(run, name, args.device), "seconds": seconds}


def finished_row(run: Path, name: str, device: str = "auto") -> dict:
    """A row from a run folder with convert.json and eval.json (passkey included); its state bytes in bfloat16,
    as the rows measured on a GPU."""
    import torch

    from linearize.run_folder import student_ppl

    ev = json.loads((run / "eval.json").read_text())
    conv = json.loads((run / "convert.json").read_text())
    attention = json.loads((run / "config.json").read_text())["attention"]  # the resolved window and sinks
    texts = ev["texts"]
    pk = ev["passkey"]
    return {
        "name": name, "run": str(run), "attention": conv["settings"]["attention"], "window": attention.get("window"),
        "sinks": attention.get("sinks"), "lora_loss": conv["settings"].get("lora_loss", "ce"),
        "device": ev.get("device", {}).get("name") or device,
        "state_bytes": run_state_bytes(run, 4 * K, "cpu" if device == "auto" else device, torch.bfloat16),
        "state_dtype": "bfloat16",
        "ppl_ratio": {t: v["student_ppl"] / v["teacher_ppl"] for t, v in texts.items()},
        "top1": {t: v["top1"] for t, v in texts.items()},
        "kl": {t: v["kl"] for t, v in texts.items()},
        "ppl": {t: {"teacher": v["teacher_ppl"], "student": v["student_ppl"]} for t, v in texts.items()},
        "passkey": dict(zip(map(str, pk["lengths"]), pk["student"])),
        "teacher_passkey": dict(zip(map(str, pk["lengths"]), pk["teacher"])),
        "heldout_ppl": {"teacher": conv["teacher_ppl"], "student": student_ppl(conv)},
        "convert_seconds": conv.get("total_seconds"),
    }


def equal_state_window(attention: str, window: int, sinks: int, context: int = 2 * K) -> int:
    """The streaming window whose decoding state takes as many bytes as `attention` with this window and sinks
    (evaluate/baseline.py; the size depends on the shapes only: an untrained model of the bundled teacher, CPU)."""
    from linearize.evaluate.baseline import streaming_baseline
    from linearize.layers.linear_attention import attention_preset
    from linearize.loading.teacher import load_teacher
    from linearize.models.linearized import LinearizedForCausalLM

    teacher, _ = load_teacher(None)
    student = LinearizedForCausalLM.from_teacher(load_teacher(None)[0], attention_preset(attention, window=window,
                                                                                         sinks=sinks))
    return streaming_baseline(teacher, student, sinks, context)[1]


def markdown(rows: list[dict]) -> str:
    texts = list(rows[0]["ppl_ratio"])
    lengths = list(rows[0]["passkey"])
    head = ["row", "state MiB", *[f"{t} ppl ratio" for t in texts], *[f"{t} top-1" for t in texts],
            *[f"passkey {int(n) // K}k" for n in lengths], "decode tok/s 16k"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tps = r.get("decode_tokens_per_s_16k")
        lines.append("| " + " | ".join([r["name"], f"{r['state_bytes'] / 2**20:.2f}",
                                        *[f"{r['ppl_ratio'][t]:.3f}" for t in texts],
                                        *[f"{r['top1'][t]:.1%}" for t in texts],
                                        *[f"{r['passkey'][n]:.0%}" for n in lengths],
                                        "-" if tps is None else f"{tps:.1f}"]) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, result: dict):
    tmp = out / "baseline.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out / "baseline.json")
    if result["rows"]:
        (out / "baseline.md").write_text(markdown(result["rows"]))


def measure_speed(out: Path, result: dict, context: int):
    """decode tokens/s after a `context` prefill for every row (untrained model of the row's shape) and the teacher."""
    speed = out / "speed"
    speed.mkdir(exist_ok=True)

    def point(run: Path, which: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "linearize.bench.measure", str(run), "--which", which, "--context",
                               str(context), "--decode-tokens", "32"], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for r in result["rows"]:
        run = speed / r["name"]
        if not (run / "config.json").is_file():
            sh(["convert", "--attention", r["attention"], "--window", str(r["window"]), "--sinks", str(r["sinks"]),
                "--tokens", "0", "--lora-tokens", "0", "--eval-tokens", str(K), "--out", str(run), "--device", "cpu",
                "--no-progress"], out / "speed.log")
        p = point(run, "student")
        r["decode_tokens_per_s_16k"], r["decode_state_bytes_cpu"] = p["decode_tokens_per_s"], p["cache_bytes"]
        print(f"{r['name']}: {p['decode_tokens_per_s']:.1f} tok/s at {context}", flush=True)
        write(out, result)
    p = point(speed / result["rows"][0]["name"], "teacher")
    result["teacher_decode_tokens_per_s_16k"] = p["decode_tokens_per_s"]
    result["speed_context"] = context
    write(out, result)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/baseline")
    p.add_argument("--device", default="auto")
    p.add_argument("--windows", default="64,128,256")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--parallel", type=int, default=1, help="rows converted at once (a GPU has room for several)")
    p.add_argument("--convert-args", default="", help="extra arguments for every `linearize convert`")
    p.add_argument("--eval-args", default="", help="extra arguments for every `linearize eval`")
    p.add_argument("--reference", action="store_true", help="add the default conversion without sinks (lolcats 64 0)")
    p.add_argument("--passkey-lengths", default="1024,2048,4096")
    p.add_argument("--passkey-trials", type=int, default=10)
    p.add_argument("--speed", action="store_true", help="add decode tokens/s at --speed-context to baseline.json")
    p.add_argument("--speed-context", type=int, default=16 * K)
    p.add_argument("--add", metavar="RUN", help="append the finished run RUN (convert.json + eval.json with passkey) "
                                                "to OUT/baseline.json as a row named --name")
    p.add_argument("--name", help="the row name for --add")
    p.add_argument("--retire", metavar="NAMES", help="move these rows (comma-separated names) from `rows` to "
                                                     "`earlier_recipes`: conversions by a recipe that is no longer "
                                                     "the default, kept for the record")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.retire:
        result = json.loads((out / "baseline.json").read_text())
        names = set(args.retire.split(","))
        if missing := names - {r["name"] for r in result["rows"]}:
            sys.exit(f"error: no row named {', '.join(sorted(missing))} in {out / 'baseline.json'}")
        retired = [r for r in result["rows"] if r["name"] in names]
        result["earlier_recipes"] = result.get("earlier_recipes", []) + retired
        result["rows"] = [r for r in result["rows"] if r["name"] not in names]
        write(out, result)
        print(markdown(result["rows"]))
        return
    if args.add:
        result = json.loads((out / "baseline.json").read_text())
        row = finished_row(Path(args.add), args.name or Path(args.add).name, args.device)
        result["rows"] = [r for r in result["rows"] if r["name"] != row["name"]] + [row]
        result["rows"].sort(key=lambda r: (r["attention"] != "streaming", r["window"], r["sinks"]))
        write(out, result)
        print(markdown(result["rows"]))
        return
    if args.speed:
        measure_speed(out, json.loads((out / "baseline.json").read_text()), args.speed_context)
        return
    windows = [int(w) for w in args.windows.split(",")]
    S = args.sinks
    specs = [("streaming", W, S) for W in windows] + [("lolcats", W, S) for W in windows]
    equal = {W: equal_state_window("lolcats", W, S) for W in windows}
    specs += [("streaming", W_eq, S) for W_eq in equal.values() if W_eq not in windows]
    if args.reference:
        specs.append(("lolcats", 64, 0))
    result = {"settings": vars(args), "equal_state_streaming_window": {str(W): v for W, v in equal.items()}, "rows": []}
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(run_row, out, *spec, args): spec for spec in specs}
        for future in as_completed(futures):
            try:
                result["rows"].append(future.result())
            except Exception as e:  # noqa: BLE001 - record the failed row, keep the others
                result.setdefault("failed", {})[row_name(*futures[future])] = str(e)
            result["rows"].sort(key=lambda r: (r["attention"] != "streaming", r["window"], r["sinks"]))
            write(out, result)
            print(f"{len(result['rows'])}/{len(specs)} rows done", flush=True)
    print(markdown(result["rows"]) if result["rows"] else "no row finished")


if __name__ == "__main__":
    main()
