"""The serving engine: one model, one worker thread, many requests at once.

Every request is a Job in a queue. The worker thread keeps up to `max_active` jobs in progress and advances them
round-robin, one forward pass each: a prefill block (generate.decoding.PREFILL_BLOCK tokens) or one decoding step.
So concurrent requests share the model fairly (a short request is not held behind a 16k-token prompt, streams
advance together) and only one forward pass runs at a time: memory is one block's activations plus a fixed-size
decoding state per job, whatever the prompt lengths. The C heap is held to that too (glibc, see `steady_heap`): large
tensors are mapped and unmapped rather than carved from the heap, and free heap pages go back to the system after
each job, so the server's resident memory stays flat while prompts grow.

Named states (StateStore): a prefilled document's DecodingState, kept under a name, that a request starts from
instead of reading the document again (copied per request: decoding writes a state in place). With a folder, they
are saved there as NAME.safetensors (generate/state_file.py) and read from it on first use.

A job reports through its `emit(event)` callback, called from the worker thread with one of
    {"text": str}                                          new completion text (incomplete characters and
                                                           possible starts of a stop string held back)
    {"done": "stop" | "length", "usage": {...}}            the end (a prefill-only job: {"done": "state", ...})
    {"error": str, "status": int, "code": str | None}      the job failed or was cancelled (cancelled: status 499,
                                                           or 503 when the server is shutting down); the engine
                                                           goes on serving
A job whose `cancelled` is set (its client went away) is dropped at its next turn, within one forward pass;
cancel_all() (the server shutting down) drops them all, queued ones too, and any submitted later.
"""

import ctypes
import ctypes.util
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..generate.decoding import Decoder, prefill_blocks
from ..errors import LinearizeError
from ..generate.state_file import copy_state, load_state, save_state

log = logging.getLogger("linearize.serve")
STATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RequestError(LinearizeError):
    """A request the server refuses: HTTP `status` and an OpenAI-style error `code`."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class NamedState:
    """A prefilled state: DecodingState, the next-token logits (1, V) after it, tokens it holds, bytes."""

    state: object
    logits: torch.Tensor
    tokens: int
    bytes: int


@dataclass
class Job:
    """ids (1, T): the tokens to feed (after `start`, a named state, if any); sampling None: prefill only, the
    state is kept as `save_as`. emit(event): see the module docstring."""

    ids: torch.Tensor
    emit: Callable[[dict], None]
    sampling: Sampling | None = None
    start: NamedState | None = None
    save_as: str | None = None
    replace: bool = False  # save_as may overwrite a state of that name
    cancelled: bool = False  # set by the server when the client went away
    created: float = field(default_factory=time.perf_counter)


class TextStream:
    """Token ids in, completion text out, in pieces safe to send: the whole completion is decoded each time
    (byte-level tokens complete a character only together), an incomplete character at the end is held back, and
    so is any tail that could be the start of a stop string. A stop string ends the text before it."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids, self.text, self.sent, self.stopped = [], "", 0, False

    def push(self, token: int) -> str:
        """Add one token; the new text that can be sent."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped, self.text = True, self.text[: min(cuts)]
            return self.flush()
        safe = len(self.text) - (1 if self.text.endswith("\ufffd") else 0)
        held = max((n for s in self.stop for n in range(1, min(len(s) - 1, safe) + 1)
                    if self.text[safe - n : safe] == s[:n]), default=0)  # the longest tail that begins a stop string
        return self._send(max(safe - held, self.sent))

    def flush(self) -> str:
        """Everything not sent yet (at the end)."""
        return self._send(len(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], upto
        return out


def states_folder(folder: str | Path) -> Path:
    """The folder of named states (`--states`), made if missing; LinearizeError naming the fix if it is not a folder
    or cannot be read and written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LinearizeError(f"--states {folder}: is a file, not a folder; give a folder for the named states (it is "
                             "made if missing), e.g. --states states/")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LinearizeError(f"--states {folder}: cannot make the folder ({e.strerror or e}); give a folder that can "
                             "be made, e.g. --states states/") from e
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        raise LinearizeError(f"--states {folder}: no permission to read and write this folder; fix its permissions "
                             f"(chmod u+rwx {folder}) or give another folder")
    return folder


class StateStore:
    """Named prefilled states of one model, in memory and (with `folder`) as NAME.safetensors files there."""

    def __init__(self, fingerprint: str, dtype: torch.dtype, device, folder: str | Path | None = None):
        self.fingerprint, self.dtype, self.device = fingerprint, dtype, device
        self.folder = states_folder(folder) if folder else None
        self.states: dict[str, NamedState] = {}
        self.lock = threading.Lock()

    @staticmethod
    def check_name(name: str) -> str:
        if not isinstance(name, str) or not STATE_NAME.fullmatch(name):
            raise RequestError(400, f"bad state name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                                    "not starting with '.', '_' or '-')", param="state")
        return name

    def _path(self, name: str) -> Path | None:
        return self.folder / f"{name}.safetensors" if self.folder else None

    def exists(self, name: str) -> bool:
        """Whether a state is kept as `name` (in memory, or as a file in the folder not read yet)."""
        path = self._path(name)
        return name in self.states or (path is not None and path.is_file())

    def check_new(self, name: str, replace: bool = False) -> str:
        """`name` for a new state; RequestError 409 if one exists and `replace` is not set."""
        if not replace and self.exists(self.check_name(name)):
            raise RequestError(409, f"state {name!r} exists; send \"replace\": true to overwrite it, or choose "
                                    "another name", code="state_exists", param="name")
        return name

    def names(self) -> list[str]:
        on_disk = {p.stem for p in self.folder.glob("*.safetensors")} if self.folder else set()
        return sorted(set(self.states) | {n for n in on_disk if STATE_NAME.fullmatch(n)})

    def get(self, name: str) -> NamedState:
        """The named state (loaded from the folder on first use); RequestError 404 if there is none."""
        self.check_name(name)
        with self.lock:
            if name not in self.states:
                path = self._path(name)
                if path is None or not path.is_file():
                    raise RequestError(404, f"state {name!r} not found; create it with POST /v1/states "
                                            '{"name": ..., "text": ...}', code="state_not_found", param="state")
                try:
                    state, logits, meta = load_state(path, self.fingerprint, self.dtype, self.device)
                except LinearizeError as e:
                    raise RequestError(409, str(e), code="state_mismatch", param="state") from e
                self.states[name] = NamedState(state, logits, meta["seen"], state.nbytes())
            return self.states[name]

    def put(self, name: str, state, logits: torch.Tensor, replace: bool = False, **info) -> NamedState:
        """Keep `state` as `name` (RequestError 409 if one exists and `replace` is not set: checked again here, on
        the worker thread, for two requests that asked for the same new name at once)."""
        self.check_new(name, replace)
        named = NamedState(state, logits, state.seen, state.nbytes())
        if self.folder:
            try:
                save_state(self._path(name), state, logits, self.fingerprint, self.dtype, **info)
            except OSError as e:
                raise RequestError(500, f"could not save state {name!r} in {self.folder} ({e}); check the folder "
                                        "(space, permissions)", code="state_not_saved", param="name") from e
        with self.lock:
            self.states[name] = named
        return named


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_MIB = 1  # the server's default (--mmap-threshold): larger blocks are mapped, and unmapped when freed


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


LIBC = _glibc()


def steady_heap(mib: float = MMAP_THRESHOLD_MIB):
    """Fix glibc's mmap threshold at `mib` MiB (0: leave glibc's dynamic threshold). By default glibc raises it (up
    to 32 MiB) each time a mapped block is freed, after which the tensors of one prefill block come from the heap,
    whose freed holes a different mix of sizes cannot reuse: a server interleaving prefill blocks and decoding steps
    then grows (seen: +1.7 GiB over the warm-up peak in `linearize serve-bench` at 1k-16k prompts; with 1 MiB:
    +41 MiB, docs/results/serve.json). The price is speed: every large tensor is freshly mapped, so its pages are
    faulted in again (8k-token prefill on the 2-core CPU: 398 tok/s with glibc's threshold, 315 with 8 MiB, 207
    with 1 MiB: docs/results/serve_heap_threshold.json). Process-wide; no-op without glibc."""
    if LIBC is not None and mib > 0:
        LIBC.mallopt(M_MMAP_THRESHOLD, int(mib * 2**20))


def trim_heap():
    """Give the free pages of the C heap back to the system (glibc's malloc_trim); no-op without glibc."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


class Engine:
    """Serves one model: submit(job) from any thread; a worker thread runs the jobs (see the module docstring)."""

    def __init__(self, model, tokenizer, states: StateStore, max_active: int = 16,
                 mmap_threshold_mib: float = MMAP_THRESHOLD_MIB):
        self.model, self.tokenizer, self.states, self.max_active = model.eval(), tokenizer, states, max_active
        self.mmap_threshold_mib = mmap_threshold_mib
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_input_embeddings().num_embeddings  # token ids a prompt may hold: 0 to this - 1
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = False  # set by cancel_all: every job is dropped, new ones too
        self.worker = threading.Thread(target=self._work, name="linearize-serve-worker", daemon=True)

    def start(self) -> "Engine":
        steady_heap(self.mmap_threshold_mib)
        self.worker.start()
        return self

    def cancel_all(self):
        """The server is shutting down: drop every job, running or queued, at its next turn (each gets a 503 error
        event), and refuse any submitted from now on. Any thread."""
        self.stopping = True

    def stop(self):
        """Cancel all jobs and end the worker thread."""
        self.cancel_all()
        self.jobs.put(None)
        self.worker.join(timeout=30)

    def submit(self, job: Job):
        if self.stopping:
            self._cancelled(job)
        else:
            self.jobs.put(job)

    def _cancelled(self, job: Job):
        if self.stopping:
            job.emit({"error": "the server is shutting down; send the request again once it is back", "status": 503,
                      "code": "server_shutting_down"})
        else:
            job.emit({"error": "the request was cancelled", "status": 499, "code": "cancelled"})

    def _work(self):
        active, closing = deque(), False  # (job, its steps); closing: stop() was called, admit no more
        while True:
            try:
                while not closing and len(active) < self.max_active:
                    job = self.jobs.get(block=not active)
                    if job is None:
                        closing = True
                    else:
                        active.append((job, self._steps(job)))
            except queue.Empty:
                pass
            if not active:  # only once closing: otherwise the get above waits for a job
                break
            job, steps = active.popleft()
            try:
                if job.cancelled or self.stopping:  # client gone, or shutting down: drop the job within one step
                    steps.close()  # (its end trims the heap like any other)
                    self._cancelled(job)
                else:
                    next(steps)
                    active.append((job, steps))
                    continue
            except StopIteration:
                pass
            except LinearizeError as e:
                job.emit({"error": str(e), "status": getattr(e, "status", 400), "code": getattr(e, "code", None)})
            except Exception as e:  # a bug or out of memory: this request fails, the server keeps serving
                log.exception("request failed")
                job.emit({"error": f"internal error: {type(e).__name__}: {e}", "status": 500, "code": None})
            trim_heap()  # a job ended
        while True:  # jobs queued behind stop(): tell their waiting requests
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._cancelled(job)

    def _steps(self, job: Job):
        """The work of one job, one forward pass per next()."""
        state = None if job.start is None else copy_state(job.start.state)
        logits = None if job.start is None else job.start.logits
        for logits, state in prefill_blocks(self.model, job.ids, state):
            yield
        cached = 0 if job.start is None else job.start.tokens
        usage = {"prompt_tokens": cached + job.ids.shape[1], "prompt_tokens_details": {"cached_tokens": cached}}
        if job.sampling is None:
            named = self.states.put(job.save_as, state, logits, job.replace)
            job.emit({"done": "state", "usage": usage, "tokens": named.tokens, "bytes": named.bytes,
                      "seconds": time.perf_counter() - job.created})
            return
        s, dec, text = job.sampling, Decoder(self.model), TextStream(self.tokenizer, job.sampling.stop)
        dec.cache = state
        generator = None if s.seed is None else torch.Generator(self.device).manual_seed(s.seed)
        finish = "length"
        for token in dec.tokens(logits, s.max_tokens, s.temperature, s.top_p, self.tokenizer.eos_token_id, generator):
            piece = text.push(token)
            if piece:
                job.emit({"text": piece})
            if text.stopped or token == self.tokenizer.eos_token_id:
                finish = "stop"
                break
            yield
        if piece := text.flush():
            job.emit({"text": piece})
        n = len(text.ids)
        usage.update(completion_tokens=n, total_tokens=usage["prompt_tokens"] + n)
        job.emit({"done": finish, "usage": usage})
