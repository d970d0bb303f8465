"""Try the `linearize` commands with bad or unusual inputs, as a new user would, and tabulate what each does: exit
code, the first line of the message, whether a traceback was printed. Writes docs/results/bad_inputs.{json,md}.

    python scripts/bad_inputs.py                      # ~10 minutes on 2 cores (two tiny conversions first)
    python scripts/bad_inputs.py --only generate      # the cases whose command is `generate`

Tiny conversions of the bundled SmolLM2 (T = --seq-len 128 --window 32 --tokens 1024 --lora-tokens 512
--eval-tokens 512) are made in --work first: A, and B with another budget (for a state of another model).
A case passes when it exits non-zero with one `linearize: error:` (or argparse `error:`) line, no traceback and no
half-made --out folder left behind (W/out is removed before each case), or, for the cases marked ok, exits 0.
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T = ["--seq-len", "128", "--window", "32", "--tokens", "1024", "--lora-tokens", "512", "--eval-tokens", "512",
     "--no-progress"]


def run(argv: list[str], timeout: float = 300) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "linearize.cli", *argv], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        rc, err, out = p.returncode, p.stderr, p.stdout
    except subprocess.TimeoutExpired as e:
        rc, err, out = None, (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), ""
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("usage:", " "))
             and "Warning" not in x and not x.startswith("warnings.warn")]
    errors = [x for x in lines if "error:" in x]
    first = (errors or lines or [x for x in out.splitlines() if x.strip()] or [""])[0]
    return {"rc": rc, "first_line": first.strip()[:220], "traceback": "Traceback" in err,
            "seconds": round(time.perf_counter() - t0, 1)}


def gguf_copy(w: Path) -> str:
    """A copy of the bundled GGUF in its own folder W/teacher (the --out-is-the-model-folder case writes nowhere,
    but it should not be tried on the installed package)."""
    from linearize.loading.teacher import bundled_model_path

    copy = w / "teacher" / bundled_model_path().name
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundled_model_path(), copy)
    return str(copy)


def cases(w: Path) -> list[tuple[str, str, list[str], bool]]:
    """(command, what, argv, expected to succeed)."""
    a, b, doc = str(w / "A"), str(w / "B"), str(w / "doc.txt")
    out = str(w / "out")
    plain = w / "plain"
    return [
        # convert: where it writes
        ("convert", "--out an existing folder with a model file in it", ["convert", "--out", str(w / "u"), *T], False),
        ("convert", "--out the --model's own folder (with --overwrite)",
         ["convert", "--model", gguf_copy(w), "--out", str(w / "teacher"), *T, "--overwrite"], False),
        ("convert", "--out a file", ["convert", "--out", str(w / "FILE"), *T], False),
        ("convert", "--out a finished run, no --resume", ["convert", "--out", a, *T], False),
        ("convert", "--resume with other settings", ["convert", "--out", a, *T[:-1], "--lora-tokens", "256",
                                                      "--resume"], False),
        # convert: settings
        ("convert", "--seq-len equal to --window", ["convert", "--out", out, *T, "--seq-len", "32"], False),
        ("convert", "--seq-len 0", ["convert", "--out", out, *T, "--seq-len", "0"], False),
        ("convert", "--tokens -5", ["convert", "--out", out, *T, "--tokens", "-5"], False),
        ("convert", "--eval-tokens below one row", ["convert", "--out", out, *T, "--eval-tokens", "10"], False),
        ("convert", "--retrieval-fraction 2", ["convert", "--out", out, *T, "--retrieval-fraction", "2"], False),
        ("convert", "--softmax-layers 99", ["convert", "--out", out, *T, "--softmax-layers", "99"], False),
        ("convert", "--keep-softmax 100", ["convert", "--out", out, *T, "--keep-softmax", "100"], False),
        ("convert", "--keep-softmax with --softmax-layers",
         ["convert", "--out", out, *T, "--keep-softmax", "1", "--softmax-layers", "1"], False),
        ("convert", "--softmax-layers not numbers", ["convert", "--out", out, *T, "--softmax-layers", "a,b"], False),
        ("convert", "--minutes 0", ["convert", "--out", out, *T, "--minutes", "0"], False),
        ("convert", "--transfer-share without --minutes", ["convert", "--out", out, *T, "--transfer-share", "0.5"],
         False),
        ("convert", "--transfer-share 1.5", ["convert", "--out", out, *T, "--minutes", "1", "--transfer-share", "1.5"],
         False),
        ("convert", "--dtype float8", ["convert", "--out", out, *T, "--dtype", "float8"], False),
        ("convert", "--device gpu0", ["convert", "--out", out, *T, "--device", "gpu0"], False),
        ("convert", "--device mps", ["convert", "--out", out, *T, "--device", "mps"], False),
        ("convert", "--device cuda without a GPU", ["convert", "--out", out, *T, "--device", "cuda"], False),
        ("convert", "--attention unknown", ["convert", "--out", out, *T, "--attention", "nope"], False),
        ("convert", "--lora-targets unknown", ["convert", "--out", out, *T, "--lora-targets", "nope"], False),
        ("convert", "--lora-loss unknown", ["convert", "--out", out, *T, "--lora-loss", "nope"], False),
        ("convert", "--feature-map unknown", ["convert", "--out", out, *T, "--feature-map", "nope"], False),
        ("convert", "--window -1", ["convert", "--out", out, *T, "--window", "-1"], False),
        ("convert", "--cache -1", ["convert", "--out", out, *T, "--cache", "-1"], False),
        ("convert", "--memory-cap -5", ["convert", "--out", out, *T, "--memory-cap", "-5"], False),
        ("convert", "--cache-position unknown", ["convert", "--out", out, *T, "--cache-position", "far"], False),
        ("convert", "--model missing .gguf", ["convert", "--model", str(w / "nope.gguf"), "--out", out, *T], False),
        ("convert", "--model a file that is not GGUF", ["convert", "--model", str(w / "junk.gguf"), "--out", out, *T],
         False),
        ("convert", "--model a folder with no model", ["convert", "--model", str(w / "u"), "--out", out, *T], False),
        ("convert", "--data missing", ["convert", "--data", str(w / "missing.jsonl"), "--out", out, *T], False),
        ("convert", "--data an empty file", ["convert", "--data", str(w / "empty.txt"), "--out", out, *T], False),
        ("convert", "--data unsupported suffix", ["convert", "--data", str(w / "data.csv"), "--out", out, *T], False),
        ("convert", "--transfer-state missing", ["convert", "--out", out, *T, "--transfer-state",
                                                 str(w / "none.safetensors")], False),
        ("convert", "--distributed outside torchrun", ["convert", "--out", out, *T, "--distributed"], False),
        ("convert", "--data a 40 KB text file (split by rows)", ["convert", "--data", str(w / "small.txt"),
                                                                "--out", str(w / "small_run"), *T], True),
        # generate
        ("generate", "a folder that is not a model", ["generate", str(w / "u"), "hi"], False),
        ("generate", "a plain (unconverted) model folder", ["generate", str(plain), "hi"], False),
        ("generate", "empty prompt with --raw", ["generate", a, "", "--raw"], False),
        ("generate", "--temperature nan", ["generate", a, "hi", "--temperature", "nan"], False),
        ("generate", "--temperature -1", ["generate", a, "hi", "--temperature", "-1"], False),
        ("generate", "--max-new-tokens -1", ["generate", a, "hi", "--max-new-tokens", "-1"], False),
        ("generate", "--max-new-tokens 0", ["generate", a, "hi", "--max-new-tokens", "0"], False),
        ("generate", "--state missing", ["generate", a, "hi", "--state", str(w / "none.safetensors")], False),
        ("generate", "--state not a safetensors file", ["generate", a, "hi", "--state", doc], False),
        ("generate", "--state of another conversion (B)", ["generate", a, "hi", "--state", str(w / "B.state")],
         False),
        ("generate", "--state made in float32, --dtype bfloat16",
         ["generate", a, "hi", "--state", str(w / "A.state"), "--dtype", "bfloat16"], False),
        ("generate", "--state of its own model", ["generate", a, "hi", "--state", str(w / "A.state"),
                                                  "--max-new-tokens", "3"], True),
        ("generate", "--device cuda without a GPU", ["generate", a, "hi", "--device", "cuda"], False),
        # prefill
        ("prefill", "document missing", ["prefill", a, str(w / "none.txt"), "--save", str(w / "x.state")], False),
        ("prefill", "document not UTF-8", ["prefill", a, str(w / "binary.txt"), "--save", str(w / "x.state")], False),
        ("prefill", "document empty", ["prefill", a, str(w / "empty.txt"), "--save", str(w / "x.state")], False),
        ("prefill", "--save a folder", ["prefill", a, doc, "--save", str(w / "u")], False),
        ("prefill", "--save in a missing folder", ["prefill", a, doc, "--save", str(w / "no" / "x.state")], False),
        ("prefill", "--save without --save", ["prefill", a, doc], False),
        # serve
        ("serve", "--states a file", ["serve", a, "--states", doc, "--port", str(free_port())], False),
        ("serve", "a folder that is not a model", ["serve", str(w / "u"), "--port", str(free_port())], False),
        ("serve", "--port in use", ["serve", a, "--port", str(BUSY_PORT)], False),
        # eval / bench / report / compare / blocks
        ("eval", "a folder that is not a model", ["eval", str(w / "u")], False),
        ("eval", "--skip an unknown part", ["eval", a, "--skip", "nope"], False),
        ("eval", "--cache -1", ["eval", a, "--cache", "-1", "--skip", "baseline,layers,passkey,multikey,generation,"
                                                                      "mmlu"], False),
        ("bench", "a folder that is not a model", ["bench", str(w / "u")], False),
        ("bench", "--contexts not numbers", ["bench", a, "--contexts", "abc"], False),
        ("bench", "--repeats 0", ["bench", a, "--repeats", "0"], False),
        ("report", "a folder that is not a run", ["report", str(w / "u")], False),
        ("compare", "an unknown family", ["compare", "--attention", "nope", "--out", str(w / "cmp"), "--tokens", "256"],
         False),
        ("blocks", "no sub-command", ["blocks"], False),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BUSY_PORT = 0


def prepare(w: Path):
    """The inputs the cases read: two tiny conversions, their states, and broken files."""
    w.mkdir(parents=True, exist_ok=True)
    for name, extra in (("A", []), ("B", ["--lora-tokens", "256"])):
        if not (w / name / "convert.json").is_file():
            r = run(["convert", "--out", str(w / name), *T[:-1], *extra, "--no-progress", "--overwrite"], 1800)
            assert r["rc"] == 0, (name, r)
    (w / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    for name in ("A", "B"):
        if not (w / f"{name}.state").is_file():
            assert run(["prefill", str(w / name), str(w / "doc.txt"), "--save", str(w / f"{name}.state")])["rc"] == 0
    (w / "u").mkdir(exist_ok=True)
    (w / "u" / "model.safetensors").write_text("w")
    (w / "FILE").write_text("a file")
    (w / "junk.gguf").write_bytes(b"not a gguf file")
    (w / "empty.txt").write_text("")
    (w / "binary.txt").write_bytes(bytes(range(128, 256)) * 10)
    (w / "data.csv").write_text("a,b\n1,2\n")
    words = "the river runs past the old mill and the miller counts his sacks of grain each evening".split()
    (w / "small.txt").write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(120))
                                             for i in range(60)))  # ~40 KB
    shutil.rmtree(w / "small_run", ignore_errors=True)
    plain = w / "plain"
    if not (plain / "config.json").is_file():
        from transformers import LlamaConfig

        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1).save_pretrained(plain)


def main():
    global BUSY_PORT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/linearize_bad_inputs", help="folder for the tiny runs and inputs")
    p.add_argument("--only", help="only the cases of this command")
    p.add_argument("--out", default=str(ROOT / "docs/results/bad_inputs"), help="writes OUT.json and OUT.md")
    args = p.parse_args()
    w = Path(args.work)
    prepare(w)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    BUSY_PORT = busy.getsockname()[1]
    rows = []
    for command, what, argv, ok in cases(w):
        if args.only and command != args.only:
            continue
        shutil.rmtree(w / "out", ignore_errors=True)  # each case on its own: a failed start must leave nothing
        r = run(argv, timeout=120 if command == "serve" else 600)
        r.update(command=command, input=what, argv=" ".join(argv).replace(str(w), "W"), expect_ok=ok)
        r["pass"] = (r["rc"] == 0) if ok else (r["rc"] not in (0, None) and not r["traceback"] and
                                               "error:" in r["first_line"])
        r["left_behind"] = (w / "out").exists() and not ok
        r["pass"] = r["pass"] and not r["left_behind"]
        rows.append(r)
        print(f"{'pass' if r['pass'] else 'FAIL'} rc={r['rc']} {command}: {what}: {r['first_line'][:120]}", flush=True)
    busy.close()
    out = Path(args.out)
    passed = sum(r["pass"] for r in rows)
    meta = {"command": "python scripts/bad_inputs.py" + (f" --only {args.only}" if args.only else ""),
            "cases": len(rows), "passed": passed, "tracebacks": sum(r["traceback"] for r in rows), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    md = [f"# Bad and unusual inputs: {passed} of {len(rows)} as expected, {meta['tracebacks']} tracebacks", "",
          f"Written by `{meta['command']}` (W: its work folder with two tiny conversions A and B of the bundled "
          "SmolLM2; T: " + " ".join(T) + "). Expected: a non-zero exit with one error line and no traceback, or "
          "exit 0 where the input is valid (marked ok).", "",
          "| command | input | exit | first line of the message | traceback |", "|---|---|---|---|---|"]
    for r in rows:
        line = r["first_line"].replace("|", "\\|").replace(str(w), "W")
        md.append(f"| {r['command']} | {r['input']}{' (ok)' if r['expect_ok'] else ''} | {r['rc']} | {line} | "
                  f"{'yes' if r['traceback'] else 'no'} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"{passed} of {len(rows)} as expected; {meta['tracebacks']} tracebacks -> {out}.md")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
