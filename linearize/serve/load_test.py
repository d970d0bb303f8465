"""`linearize serve-bench DIR`: a bounded load test of `linearize serve`, and the time a saved state saves.

Starts `linearize serve DIR` in a child process on a free localhost port, then
    warm-up     one request per client at once, each with the longest prompt (the allocator sees the largest
                prefill block and the most requests in progress)
    load        `clients` threads x `requests` completions each through the openai client, greedy, `max_tokens` new
                tokens; request r of every client has a prompt of min_prompt * (max_prompt / min_prompt) ** (r / (R-1))
                tokens (Python tutorial text, each client at its own offset), so prompts grow from min to max
    memory      the server's resident set (/proc/PID/status VmRSS) sampled every 0.2 s: its peak while each round
                of requests was in flight, against its peak during warm-up
    state reuse a passkey document of doc_tokens tokens: POST /v1/states (prefill once), then the question from the
                state vs the document + question from scratch, each timed end to end by the client
Writes OUT (default docs/results/serve.json):

    model, machine, settings, server_cmd
    load        {requests, errors, seconds, requests_per_s, completion_tokens_per_s, prompt_tokens_per_s,
                 latency_s {p50, p95, max}, rounds: [{round, prompt_tokens, latency_s, rss_peak_mib}]}
    memory      {rss_warmup_peak_mib, rss_peak_mib (under load), growth_after_warmup_mib}
    state_reuse {doc_tokens, state_bytes, prefill_s, from_state_s, from_scratch_s, speedup, answers, key}
"""

import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import LinearizeError
from ..options import add_placement, token_count
from ..run_folder import check_converted, write_json
from .engine import MMAP_THRESHOLD_MIB

MODEL_NAME = "bench"


@dataclass
class ServeBenchSettings:
    clients: int = 8
    requests: int = 20  # per client
    min_prompt: int = 1024
    max_prompt: int = 16 * 1024
    max_tokens: int = 32
    doc_tokens: int = 16 * 1024  # the state-reuse document (0: skip)
    device: str = "auto"
    dtype: str = "auto"
    mmap_threshold: float = MMAP_THRESHOLD_MIB  # the server's --mmap-threshold (MiB; 0: glibc's dynamic one)
    start_timeout: int = 600  # seconds for the server to come up
    request_timeout: int = 3600

    def check(self):
        if min(self.clients, self.requests, self.min_prompt, self.max_tokens) < 1 or self.doc_tokens < 0:
            raise LinearizeError("--clients, --requests, --min-prompt and --max-tokens must be >= 1, --doc-tokens >= 0")
        if self.max_prompt < self.min_prompt:
            raise LinearizeError(f"--max-prompt ({self.max_prompt}) must be >= --min-prompt ({self.min_prompt})")

    def prompt_tokens(self, r: int) -> int:
        """The prompt length of round r (geometric from min_prompt to max_prompt)."""
        if self.requests == 1:
            return self.max_prompt
        return round(self.min_prompt * (self.max_prompt / self.min_prompt) ** (r / (self.requests - 1)))


def add(sub):
    d = ServeBenchSettings()
    p = sub.add_parser("serve-bench", help="load test of `linearize serve` (concurrent clients, growing prompts, "
                                           "server memory) and the time a saved state saves -> serve.json",
                       description=__doc__.splitlines()[0] + " The defaults are the issue's test (8 clients x 20 "
                                   "requests, prompts 1k..16k, a 16k document): hours on a 2-core CPU; lower the "
                                   "sizes there.")
    p.add_argument("path", help="converted model folder")
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent clients (default: %(default)s)")
    p.add_argument("--requests", type=int, default=d.requests, help="requests per client (default: %(default)s)")
    p.add_argument("--min-prompt", type=token_count, default=d.min_prompt, help="first prompt length (default: 1k)")
    p.add_argument("--max-prompt", type=token_count, default=d.max_prompt, help="last prompt length (default: 16k)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="new tokens per request (default: %(default)s)")
    p.add_argument("--doc-tokens", type=token_count, default=d.doc_tokens,
                   help="document length of the state-reuse timing; 0 skips it (default: 16k)")
    p.add_argument("--mmap-threshold", type=float, default=d.mmap_threshold, metavar="MIB",
                   help="the server's --mmap-threshold (default: %(default)s)")
    p.add_argument("--out", default="docs/results/serve.json", help="results file (default: %(default)s)")
    add_placement(p, "the served model")
    p.set_defaults(run=run)


def run(args):
    settings = ServeBenchSettings(clients=args.clients, requests=args.requests, min_prompt=args.min_prompt,
                                  max_prompt=args.max_prompt, max_tokens=args.max_tokens, doc_tokens=args.doc_tokens,
                                  device=args.device, dtype=args.dtype, mmap_threshold=args.mmap_threshold)
    res = serve_bench(args.path, settings, args.out)
    load, mem = res["load"], res["memory"]
    print(f"{load['requests']} requests, {load['errors']} errors, {load['requests_per_s']:.3f} requests/s, "
          f"{load['completion_tokens_per_s']:.1f} new tokens/s, {load['prompt_tokens_per_s']:.0f} prompt tokens/s")
    print(f"server RSS peak during warm-up {mem['rss_warmup_peak_mib']:.0f} MiB, under load {mem['rss_peak_mib']:.0f} "
          f"MiB ({mem['growth_after_warmup_mib']:+.0f})")
    for r in load["rounds"]:
        print(f"  round {r['round']}: prompts of {r['prompt_tokens']} tokens, RSS peak {r['rss_peak_mib']:.0f} MiB")
    if s := res.get("state_reuse"):
        print(f"{s['doc_tokens']}-token document: answer from its saved state {s['from_state_s']:.2f} s, from scratch "
              f"{s['from_scratch_s']:.2f} s ({s['speedup']:.0f}x); prefilling the state took {s['prefill_s']:.1f} s")
    print(f"results written to {args.out}")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not in /proc/PID/status")


class RssSampler(threading.Thread):
    """(time, MiB) samples of a process's resident set every `every` seconds until stop()."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.done = pid, every, [], threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                self.samples.append((time.perf_counter(), rss_mib(self.pid)))
            except (OSError, RuntimeError):
                return
            self.done.wait(self.every)

    def peak(self, t0: float = 0.0, t1: float = float("inf")) -> float | None:
        """The largest sample in [t0, t1] and of the two that bracket it (an interval shorter than the sampling
        period still gets a value); None before any sample."""
        before = [m for t, m in self.samples if t < t0][-1:]
        after = [m for t, m in self.samples if t > t1][:1]
        inside = [m for t, m in self.samples if t0 <= t <= t1] + before + after
        return max(inside) if inside else None

    def stop(self):
        self.done.set()
        self.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path, settings: ServeBenchSettings, max_context: int, log) -> tuple[subprocess.Popen, str, list]:
    """`linearize serve` in a child process; (process, base url, its command) once it answers /v1/models."""
    port = free_port()
    cmd = [sys.executable, "-m", "linearize.cli", "serve", str(path), "--port", str(port), "--name", MODEL_NAME,
           "--max-context", str(max_context), "--max-active", str(settings.clients), "--device", settings.device,
           "--dtype", settings.dtype, "--mmap-threshold", str(settings.mmap_threshold)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + settings.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise LinearizeError(f"the server exited ({proc.returncode}): {log.read().decode()[-500:].strip()}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return proc, url, cmd
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise LinearizeError(f"the server did not answer within {settings.start_timeout} s")


def text_tokens(tokenizer) -> list[int]:
    """Natural text to cut prompts from: the Python tutorial (eval's python-docs), else the passkey filler."""
    from ..evaluate.passkey import FILLER
    from ..evaluate.texts import python_docs_documents

    try:
        text = "\n\n".join(python_docs_documents())
    except LinearizeError:
        text = FILLER * 2000
    return tokenizer(text, add_special_tokens=False).input_ids


def prompt_text(tokenizer, tokens: list[int], n: int, offset: int) -> str:
    """About n tokens of the text starting at token `offset` (wrapping around)."""
    ids = (tokens * (1 + (offset + n) // len(tokens)))[offset : offset + n]
    return tokenizer.decode(ids)


def serve_bench(path, settings: ServeBenchSettings, out: str | Path) -> dict:
    import openai
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    settings.check()
    path = check_converted(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = text_tokens(tokenizer)
    max_context = int(1.2 * max(settings.max_prompt, settings.doc_tokens)) + settings.max_tokens + 256
    with tempfile.TemporaryFile() as log:
        t_start = time.perf_counter()
        proc, url, cmd = start_server(path, settings, max_context, log)
        print(f"server up at {url} after {time.perf_counter() - t_start:.0f} s; warm-up: {settings.clients} requests "
              f"of {settings.max_prompt} tokens", flush=True)
        total = settings.clients * settings.requests
        bar = tqdm(total=total, desc="serve-bench", unit="req", mininterval=5)
        try:
            client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=settings.request_timeout)
            sampler = RssSampler(proc.pid)
            sampler.start()

            def ask(client_id: int, r: int) -> dict:
                n = settings.prompt_tokens(r)
                prompt = prompt_text(tokenizer, tokens, n, offset=client_id * 997 + r * 131)
                t0 = time.perf_counter()
                try:
                    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=settings.max_tokens,
                                                    temperature=0)
                except openai.OpenAIError as e:
                    return {"round": r, "start": t0, "end": time.perf_counter(), "error": str(e)[:300]}
                return {"round": r, "start": t0, "end": time.perf_counter(), "prompt_tokens": out.usage.prompt_tokens,
                        "completion_tokens": out.usage.completion_tokens}

            def client_loop(c):
                done = []
                for r in range(settings.requests):
                    done.append(ask(c, r))
                    bar.update()
                return done

            with ThreadPoolExecutor(settings.clients) as pool:
                warm = list(pool.map(lambda c: ask(c, settings.requests - 1), range(settings.clients)))
                if failed := [x["error"] for x in warm if "error" in x]:
                    raise LinearizeError(f"a warm-up request failed: {failed[0]}")
                rss_warm = sampler.peak(min(x["start"] for x in warm), max(x["end"] for x in warm))
                t0 = time.perf_counter()
                results = [x for xs in pool.map(client_loop, range(settings.clients)) for x in xs]
            seconds = time.perf_counter() - t0
            bar.close()
            if settings.doc_tokens:
                print(f"state reuse: a {settings.doc_tokens}-token document", flush=True)
            state = state_reuse(client, url, tokenizer, settings) if settings.doc_tokens else None
            sampler.stop()
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ok = [x for x in results if "error" not in x]
    latencies = sorted(x["end"] - x["start"] for x in ok)
    rounds = []
    for r in range(settings.requests):
        mine = [x for x in ok if x["round"] == r]
        if mine:
            rounds.append({"round": r, "prompt_tokens": round(statistics.mean(x["prompt_tokens"] for x in mine)),
                           "latency_s": round(statistics.mean(x["end"] - x["start"] for x in mine), 3),
                           "rss_peak_mib": sampler.peak(min(x["start"] for x in mine), max(x["end"] for x in mine))})
    peak = sampler.peak(t0, t0 + seconds)
    res = {
        "model": str(path),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": asdict(settings), "server_cmd": " ".join(cmd[1:]),
        "load": {"requests": len(results), "errors": len(results) - len(ok),
                 "error_samples": [x["error"] for x in results if "error" in x][:3], "seconds": round(seconds, 2),
                 "requests_per_s": len(ok) / seconds,
                 "completion_tokens_per_s": sum(x["completion_tokens"] for x in ok) / seconds,
                 "prompt_tokens_per_s": sum(x["prompt_tokens"] for x in ok) / seconds,
                 "latency_s": None if not latencies else {
                     "p50": latencies[len(latencies) // 2], "p95": latencies[int(0.95 * (len(latencies) - 1))],
                     "max": latencies[-1]},
                 "rounds": rounds},
        "memory": {"rss_warmup_peak_mib": rss_warm, "rss_peak_mib": peak,
                   "growth_after_warmup_mib": None if peak is None else peak - rss_warm},
    }
    if state:
        res["state_reuse"] = state
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json(res, out)
    return res


def state_reuse(client, url: str, tokenizer, settings: ServeBenchSettings) -> dict:
    """A passkey document prefilled once into a named state; the question answered from it vs from scratch."""
    from ..evaluate.passkey import QUESTION, passkey_prompt

    key = random.Random(settings.doc_tokens).randint(10000, 99999)
    document = passkey_prompt(tokenizer, settings.doc_tokens, 0.5, key)[: -len(QUESTION)]
    req = urllib.request.Request(f"{url}/states", data=json.dumps({"name": "doc", "text": document}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=settings.request_timeout) as r:
        made = json.loads(r.read())

    def answer(prompt, **extra):
        t0 = time.perf_counter()
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, **extra)
        return time.perf_counter() - t0, out.choices[0].text

    from_state, answer_state = answer(QUESTION, extra_body={"state": "doc"})
    from_scratch, answer_scratch = answer(document + QUESTION)
    return {"doc_tokens": made["tokens"], "state_bytes": made["bytes"], "prefill_s": made["seconds"],
            "from_state_s": from_state, "from_scratch_s": from_scratch, "speedup": from_scratch / from_state,
            "key": key, "answers": {"from_state": answer_state, "from_scratch": answer_scratch}}
