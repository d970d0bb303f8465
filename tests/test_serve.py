"""`linearize serve` against a real uvicorn server on localhost (tiny random converted model), through the `openai`
client: completions, chat, streaming, concurrent requests, named states reused token for token, and 4xx JSON errors
for bad requests after which the server keeps serving."""

import contextlib
import json
import os
import platform
import socket
import threading
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

DOC = ("the quick brown fox jumps over the lazy dog. hello world, this is a tiny tokenizer. linear attention is "
       "fast. ") * 3
QUESTION = " User: hi there\nAssistant:"
MAX_CONTEXT = 400


@pytest.fixture(scope="module")
def server(tiny_converted, tmp_path_factory):
    """(base url, states folder, run folder): `linearize serve` of the tiny model on a free localhost port."""
    from linearize.serve.cli import build

    run = tiny_converted[0]
    states = tmp_path_factory.mktemp("states")
    # mmap threshold 0: glibc's own. The fixed 1 MiB of a real server is process-wide and would slow every later
    # test in this pytest process (test_the_mmap_threshold_is_fixed_only_when_asked covers steady_heap)
    app, engine = build(run, name="tiny", states=states, max_context=MAX_CONTEXT, device="cpu", mmap_threshold_mib=0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        thread.join(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", states, run
    srv.should_exit = True
    thread.join(10)
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_converted):
    """greedy(prompt, n, state_text=None) -> the text the model itself continues with (in this process, the server's
    decoding linears): what the server must answer at temperature 0."""
    from linearize.generate.decoding import Decoder, prefill
    from linearize.ops.decode_linear import use_decode_linears
    from linearize.loading.student import load_student

    model, tok = load_student(tiny_converted[0])
    use_decode_linears(model)

    def greedy(prompt, n, state_text=None):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        state = logits = None
        if state_text is not None:
            logits, state = prefill(model, tok(state_text, return_tensors="pt", add_special_tokens=False).input_ids)
        new = Decoder(model).generate(ids, n, eos_token_id=tok.eos_token_id, state=state, state_logits=logits)
        return tok.decode(new, skip_special_tokens=True)

    return greedy


def post(url, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_completion_and_chat(client, reference):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0)
    assert out.choices[0].text == reference("hello world", 8)
    assert out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi there"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reference("User: hi there\nAssistant:", 6)  # no chat template
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 6
    sampled = [client.completions.create(model="tiny", prompt="the", max_tokens=6, temperature=1, seed=s).choices[0]
               .text for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable


def test_streaming_equals_the_whole_answer(client):
    whole = client.completions.create(model="tiny", prompt="linear attention", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="linear attention", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_ends_the_text(client):
    whole = client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=0).choices[0].text
    stop = whole[3:5]
    assert len(stop) == 2
    out = client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == whole[: whole.index(stop)] and out.choices[0].finish_reason == "stop"


def test_concurrent_requests_all_answered_like_alone(client):
    prompts = ["hello", "the lazy dog", "linear", "fox jumps over", "world, this", "tiny"]

    def ask(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == alone


def test_named_state_answers_like_prefilling_again(server, client, reference):
    url, states, run = server
    status, made = post(f"{url}/states", {"name": "doc", "text": DOC})
    assert status == 200 and made["tokens"] > 50 and (states / "doc.safetensors").is_file()
    assert {s.get("id") for s in client.get("/states", cast_to=object)["data"]} >= {"doc"}

    def ask(state):
        return client.completions.create(model="tiny", prompt=QUESTION, max_tokens=10, temperature=0,
                                         extra_body={"state": state})

    first, again = ask("doc"), ask("doc")  # the stored state is not changed by answering from it
    assert first.choices[0].text == again.choices[0].text == reference(QUESTION, 10, state_text=DOC)
    assert first.choices[0].text != reference(QUESTION, 10)  # the document mattered
    assert first.usage.prompt_tokens_details.cached_tokens == made["tokens"]
    assert post(f"{url}/states", {"name": "doc2", "text": DOC})[0] == 200  # prefill the document again
    assert ask("doc2").choices[0].text == first.choices[0].text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, extra_body={"state": "doc"})
    assert chat.choices[0].message.content == reference("User: hi\nAssistant:", 5, state_text=DOC)


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server, client):
    url = server[0]
    status, body = post(f"{url}/completions", b'{"model": "tiny", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(f"{url}/completions", {"model": "tiny"})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = post(f"{url}/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = post(f"{url}/states", {"name": "../escape", "text": "hi"})
    assert status == 400 and "bad state name" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' not found"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 400") as e:
        client.completions.create(model="tiny", prompt="hello world " * 200, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="state 'nope' not found"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"state": "nope"})
    from linearize.layers.linear_attention import DecodingState
    from linearize.generate.state_file import save_state

    save_state(server[1] / "alien.safetensors", DecodingState(2), torch.zeros(1, 300), "another", torch.float32)
    with pytest.raises(openai.ConflictError, match="made by another model"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body={"state": "alien"})
    status, body = post(f"{url}/nowhere", {})
    assert status == 404 and "error" in body
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_the_heap_is_trimmed_after_every_job(client, monkeypatch):
    """The engine hands the C heap's free pages back after each job (glibc's malloc_trim), so a server's memory does
    not keep the high-water mark of every prompt mix it has seen (test_trim_heap_hands_free_heap_pages_back: that
    trim_heap does so)."""
    from linearize.serve import engine

    calls = []
    monkeypatch.setattr(engine, "trim_heap", lambda: calls.append(1))

    def trims_after(n: int) -> int:
        """len(calls) once it reaches n or 10 s have passed (an answer can reach the client a moment before its
        job's end is handled)."""
        for _ in range(200):
            if len(calls) >= n:
                break
            threading.Event().wait(0.05)
        return len(calls)

    for _ in range(2):
        client.completions.create(model="tiny", prompt=QUESTION, max_tokens=3, temperature=0)
    assert trims_after(2) == 2

    calls.clear()  # a client that goes away mid-stream: its job is dropped, and that end trims too
    stream = client.completions.create(model="tiny", prompt=QUESTION, max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    assert trims_after(1) == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_hands_free_heap_pages_back():
    """trim_heap (the engine's call after every job: glibc's malloc_trim through engine.LIBC) returns the pages of
    freed heap blocks to the system: 200 MB of 4000-byte blocks (below any mmap threshold, so on the heap), written
    and then freed below one block that stays (so the heap's top cannot shrink on its own), are still resident
    before trim_heap and gone after it."""
    import ctypes

    from linearize.bench.measure import rss_bytes
    from linearize.serve import engine

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    size, n = 4000, 50_000
    blocks = [libc.malloc(size) for _ in range(n)]
    assert all(blocks)
    try:
        for block in blocks:
            ctypes.memset(block, 1, size)
        for block in blocks[:-1]:
            libc.free(block)
        before = rss_bytes()
        engine.trim_heap()
        released = before - rss_bytes()
    finally:
        libc.free(blocks[-1])
    assert released > 0.75 * size * (n - 1)


def test_serve_bench_writes_its_results(tiny_converted, tmp_path):
    """`linearize serve-bench` end to end at toy sizes: a child server process, 2 clients x 2 requests, a state."""
    from linearize.serve.load_test import ServeBenchSettings, serve_bench

    settings = ServeBenchSettings(clients=2, requests=2, min_prompt=16, max_prompt=32, max_tokens=3, doc_tokens=64,
                                  device="cpu", mmap_threshold=0)
    res = serve_bench(tiny_converted[0], settings, tmp_path / "serve.json")
    assert json.loads((tmp_path / "serve.json").read_text()) == res
    assert res["load"]["requests"] == 4 and res["load"]["errors"] == 0 and res["load"]["requests_per_s"] > 0
    assert [r["round"] for r in res["load"]["rounds"]] == [0, 1] and res["memory"]["rss_warmup_peak_mib"] > 0
    reuse = res["state_reuse"]
    assert reuse["doc_tokens"] > 40 and reuse["from_state_s"] > 0 and reuse["from_scratch_s"] > 0
    assert res["settings"]["mmap_threshold"] == 0 and "--mmap-threshold 0" in res["server_cmd"]


def test_the_mmap_threshold_is_fixed_only_when_asked(monkeypatch):
    """--mmap-threshold MIB fixes glibc's threshold at MIB MiB; 0 leaves glibc's dynamic one alone."""
    from linearize.serve import engine

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(engine, "LIBC", FakeLibc())
    engine.steady_heap(0)
    assert calls == []
    engine.steady_heap(8)
    assert calls == [(engine.M_MMAP_THRESHOLD, 8 << 20)]


def test_a_negative_mmap_threshold_is_refused(tiny_converted):
    from linearize.errors import LinearizeError
    from linearize.serve.cli import build

    with pytest.raises(LinearizeError, match="--mmap-threshold"):
        build(tiny_converted[0], mmap_threshold_mib=-1, device="cpu")


# --- issue 38: cancelled requests, shutdown, state overwrites, CLI errors, token-id prompts ---

def wait_until(condition, seconds: float) -> bool:
    """condition() once it holds or `seconds` have passed."""
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)
    return condition()


@contextlib.contextmanager
def own_server(run, step_s: float = 0.03):
    """A server of the test's own on a free localhost port (the module's `server` is shared), every forward pass of
    its model slowed by step_s so that a long request takes seconds. Yields a namespace: url, port, engine, srv (the
    uvicorn server), thread, forwards (one entry per forward pass) and jobs (those submitted to the engine)."""
    from linearize.serve.cli import build, server

    app, engine = build(run, name="tiny", max_context=MAX_CONTEXT, device="cpu", mmap_threshold_mib=0)
    forwards, jobs, forward, submit = [], [], engine.model.forward, engine.submit

    def slow_forward(*args, **kwargs):
        forwards.append(1)
        time.sleep(step_s)
        return forward(*args, **kwargs)

    def recorded_submit(job):
        jobs.append(job)
        submit(job)

    engine.model.forward, engine.submit = slow_forward, recorded_submit
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = server(app, engine)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: srv.started, 10)
        port = sock.getsockname()[1]
        yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}/v1", port=port, engine=engine, srv=srv,
                                    thread=thread, forwards=forwards, jobs=jobs)
    finally:
        srv.should_exit = True
        thread.join(30)
        engine.stop()


LONG = {"model": "tiny", "prompt": "hello", "max_tokens": 350, "temperature": 0}  # 350 x 30 ms: over 10 s of work


def test_a_non_streaming_request_is_cancelled_when_its_client_goes_away(tiny_converted):
    """A client that gives up on a non-streaming request (curl -m 3) stops its job within a few tokens, as a
    streaming one does, rather than leaving the engine to decode all max_tokens for nobody."""
    with own_server(tiny_converted[0]) as s:
        body = json.dumps(LONG).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert wait_until(lambda: len(s.forwards) >= 5, 20)  # decoding has begun; now the client goes
        assert len(s.jobs) == 1
        assert wait_until(lambda: s.jobs[0].cancelled, 5), "the job of a client that went away was not cancelled"
        time.sleep(0.3)  # the engine's current step ends
        done = len(s.forwards)
        time.sleep(0.5)
        assert len(s.forwards) == done, "the engine kept decoding for a client that went away"
        assert done < LONG["max_tokens"] // 2


def test_shutdown_cancels_running_requests_instead_of_waiting_for_them(tiny_converted):
    """Ctrl-C (uvicorn's should_exit) ends the server within a moment although a long request is running: its job
    is cancelled and its client told 503, rather than the shutdown waiting for all its max_tokens."""
    with own_server(tiny_converted[0]) as s:
        answer = {}

        def ask():
            try:
                answer["reply"] = post(f"{s.url}/completions", LONG)
            except Exception as e:  # noqa: BLE001 (a connection the server dropped is reported below)
                answer["reply"] = e

        client_thread = threading.Thread(target=ask, daemon=True)
        client_thread.start()
        assert wait_until(lambda: len(s.forwards) >= 5, 20)
        t0 = time.monotonic()
        s.srv.should_exit = True
        s.thread.join(15)
        took = time.monotonic() - t0
        assert not s.thread.is_alive() and took < 4, f"shutdown took {took:.1f} s: it waited for the request"
        assert len(s.forwards) < LONG["max_tokens"] // 2
        client_thread.join(10)
        status, body = answer["reply"]
        assert status == 503 and "shutting down" in body["error"]["message"]


def test_a_state_is_not_overwritten_unless_asked(server):
    url, states, _ = server
    status, first = post(f"{url}/states", {"name": "once", "text": "hello world"})
    assert status == 200
    status, body = post(f"{url}/states", {"name": "once", "text": DOC})
    assert status == 409 and body["error"]["code"] == "state_exists" and body["error"]["param"] == "name"
    assert "replace" in body["error"]["message"]
    listed = {s["id"]: s for s in post_get(f"{url}/states")["data"]}
    assert listed["once"]["tokens"] == first["tokens"]  # the refused request changed nothing
    status, second = post(f"{url}/states", {"name": "once", "text": DOC, "replace": True})
    assert status == 200 and second["tokens"] > first["tokens"]
    assert {s["id"]: s for s in post_get(f"{url}/states")["data"]}["once"]["tokens"] == second["tokens"]

    from linearize.layers.linear_attention import DecodingState
    from linearize.generate.state_file import save_state

    save_state(states / "on-disk.safetensors", DecodingState(2), torch.zeros(1, 300), "another", torch.float32)
    status, body = post(f"{url}/states", {"name": "on-disk", "text": "hello"})  # a file not loaded yet counts too
    assert status == 409 and body["error"]["code"] == "state_exists"


def post_get(url) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def test_a_prompt_of_token_ids_answers_like_its_text(server, client, tiny_tokenizer):
    """prompt as token ids (a list of ints, or a list of one), as the OpenAI API takes it: the ids are used as
    given; ids outside the vocabulary get a clear 400."""
    url = server[0]
    ids = tiny_tokenizer("hello world", add_special_tokens=False).input_ids
    text = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0)
    for prompt in (ids, [ids]):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert out.choices[0].text == text.choices[0].text
        assert out.usage.prompt_tokens == len(ids) == text.usage.prompt_tokens
    for bad in ([5, 300], [-1], [[7, 1000]]):  # the tiny model's vocabulary: 300 tokens
        status, body = post(f"{url}/completions", {"model": "tiny", "prompt": bad, "max_tokens": 2})
        assert status == 400 and body["error"]["param"] == "prompt", body
        assert "vocabulary" in body["error"]["message"] and "300" in body["error"]["message"]
    status, body = post(f"{url}/completions", {"model": "tiny", "prompt": [ids, ids], "max_tokens": 2})
    assert status == 400 and "one prompt" in body["error"]["message"]
    status, body = post(f"{url}/completions", {"model": "tiny", "prompt": 3.5, "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt" and "token ids" in body["error"]["message"]
    assert "prompt.str" not in body["error"]["message"]


@pytest.fixture
def never_serve(monkeypatch):
    """The CLI tests below must fail before serving: a server that would start raises instead of running forever."""
    def refuse(*args, **kwargs):
        raise AssertionError("linearize serve started serving")

    monkeypatch.setattr(uvicorn.Server, "run", refuse)


def test_serve_refuses_a_states_path_it_cannot_use_in_one_line(tiny_converted, tmp_path, capsys, monkeypatch,
                                                               never_serve):
    from linearize.cli import main

    run = str(tiny_converted[0])
    a_file = tmp_path / "states.txt"
    a_file.write_text("not a folder")
    for states in (a_file, a_file / "below"):
        assert main(["serve", run, "--states", str(states), "--device", "cpu", "--port", "0"]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("linearize: error: --states") and str(a_file) in err and "folder" in err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "serving" not in out

    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access  # root reads and writes everywhere: the folder's permissions are simulated
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(locked)
                        else access(path, mode, **kw))
    assert main(["serve", run, "--states", str(locked), "--device", "cpu", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("linearize: error: --states") and "permission" in err and len(err.strip().splitlines()) == 1


def test_serve_reports_a_port_in_use_before_loading(tiny_converted, capsys, never_serve):
    from linearize.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tiny_converted[0]), "--host", "127.0.0.1", "--port", str(port),
                     "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "serving" not in out
    assert f"port {port}" in err and "in use" in err and "--port" in err and len(err.strip().splitlines()) == 1
