"""The OpenAI-compatible HTTP API of `linearize serve` (FastAPI), over one Engine.

    GET  /v1/models                 the one model served
    POST /v1/completions            {model, prompt, max_tokens=16, temperature=1, top_p=1, stop, seed, stream,
                                     stream_options.include_usage, state}; prompt: a string or token ids (a list
                                     of ints), or a list of one of either
    POST /v1/chat/completions       {model, messages, max_tokens | max_completion_tokens, ... as above}
    GET  /v1/states                 the named states
    POST /v1/states                 {name, text, replace=false}: prefill `text` once and keep its decoding state
                                     as `name` (409 if that name exists, unless replace)

`state` (an extension; the openai client sends it with extra_body={"state": NAME}) starts a request from a named
state: the prompt (a chat's rendered template) continues the document the state holds, which is not read again;
usage.prompt_tokens_details.cached_tokens counts its tokens. Streaming is server-sent events ("data: {json}", then
"data: [DONE]"), as the OpenAI API sends them. Every error is a JSON {"error": {message, type, param, code}} with a
4xx status (5xx for a server fault), and the server goes on serving. A request whose client goes away is
cancelled: its job stops within a few tokens (a non-streaming one is checked every DISCONNECT_POLL_S seconds).
"""

import asyncio
import contextlib
import json
import time
import uuid
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..generate.decoding import chat_prompt
from .engine import Engine, Job, RequestError, Sampling

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
PROMPT_FORMS = "a string, a list of token ids, or a list of one of either"


class StreamOptions(BaseModel):
    include_usage: bool = False


class Generation(BaseModel):
    """What both completion endpoints take (fields of the OpenAI API this server does not use are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    state: str | None = None


class CompletionRequest(Generation):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(description=PROMPT_FORMS)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class StateRequest(BaseModel):
    name: str
    text: str = Field(min_length=1)
    model: str | None = None
    replace: bool = False  # overwrite a state of that name (else 409)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine: Engine, model_name: str, max_context: int, default_max_tokens: int = 256) -> FastAPI:
    """The API over `engine`. max_context: tokens a request may reach (state + prompt + max_tokens);
    default_max_tokens: a chat request's max_tokens when it sets none (a completion's is 16, as in the OpenAI API)."""
    app = FastAPI(title="linearize serve", docs_url=None, redoc_url=None)
    tokenizer, created = engine.tokenizer, int(time.time())

    @app.exception_handler(RequestError)
    async def refused(request, e: RequestError):
        return error_body(e.status, str(e), e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error_body(400, f"the request body is not valid JSON ({first.get('msg')})", "invalid_json")
        loc = first.get("loc", ())[1:]
        if loc[:1] == ("prompt",) and len(loc) > 1:  # a value none of the prompt's forms takes (pydantic names the
            return error_body(400, f"prompt: give {PROMPT_FORMS}", "invalid_value", "prompt")  # forms as fields)
        where = ".".join(str(x) for x in loc) or "body"
        return error_body(400, f"{where}: {first.get('msg')}", "invalid_value", where)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_body(e.status_code, f"{request.method} {request.url.path}: {e.detail}")

    def check_model(name: str | None):
        if name is not None and name != model_name:
            raise RequestError(404, f"model {name!r} not found; this server serves {model_name!r} (GET /v1/models)",
                               "model_not_found", "model")

    def tokens(text: str) -> torch.Tensor:
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids

    def prompt_ids(prompt: str | list[int]) -> torch.Tensor:
        """(1, T) token ids: a text tokenized, or ids used as given (checked against the model's vocabulary)."""
        if isinstance(prompt, str):
            return tokens(prompt)
        if bad := [i for i in prompt if not 0 <= i < engine.vocab_size]:
            raise RequestError(400, f"prompt: token id {bad[0]} is outside the model's vocabulary (ids 0 to "
                                    f"{engine.vocab_size - 1} of {engine.vocab_size}); give ids from this model's "
                                    "tokenizer, or the text", "invalid_value", "prompt")
        return torch.tensor([prompt], dtype=torch.long)

    def job_for(req: Generation, prompt: str | list[int], max_tokens: int) -> Job:
        check_model(req.model)
        start = None if req.state is None else engine.states.get(req.state)
        ids = prompt_ids(prompt)
        if ids.shape[1] == 0 and start is None:
            raise RequestError(400, "the prompt is empty; give at least one token (or a state to continue)",
                               param="prompt")
        cached = 0 if start is None else start.tokens
        if cached + ids.shape[1] + max_tokens > max_context:
            raise RequestError(400, f"this model's maximum context length is {max_context} tokens; the request "
                                    f"needs {cached + ids.shape[1] + max_tokens} ({cached} in the state, "
                                    f"{ids.shape[1]} in the prompt, {max_tokens} to generate): shorten the prompt "
                                    "or lower max_tokens", "context_length_exceeded", "prompt")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        sampling = Sampling(max_tokens, req.temperature, req.top_p, req.seed, stop)
        return Job(ids=ids, emit=None, sampling=sampling, start=start)

    async def run(job: Job, request: Request | None = None):
        """Submit the job; yield its events as they come (on this event loop). With `request`: its client is checked
        every DISCONNECT_POLL_S seconds, and once it has gone the job is cancelled, after a last event
        {"error", "status": 499}. (A streaming response needs no polling: its generator is closed when the client
        goes, which cancels the job below.)"""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is closed: the server is shutting down
                job.cancelled = True

        job.emit = emit
        engine.submit(job)
        check = loop.time() + DISCONNECT_POLL_S  # when to look at the client next (on time, events or not)
        try:
            while True:
                if request is None:
                    event = await events.get()
                else:
                    try:
                        event = await asyncio.wait_for(events.get(), max(0.0, check - loop.time()))
                    except asyncio.TimeoutError:  # (the queue keeps an event that came meanwhile)
                        event = None
                    if loop.time() >= check:
                        if await request.is_disconnected():
                            job.cancelled = True
                            yield {"error": "the client went away", "status": 499, "code": "client_disconnected"}
                            return
                        check = loop.time() + DISCONNECT_POLL_S
                    if event is None:
                        continue
                yield event
                if "done" in event or "error" in event:
                    return
        finally:
            job.cancelled = True  # a client that went away stops its job (no-op once it ended)

    async def respond(job: Job, req: Generation, kind: str, choice, request: Request):
        """The JSON response, or the SSE stream; choice(text, finish) -> one choice (finish None: a chunk)."""
        head = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
                "model": model_name}
        if not req.stream:
            text, finish, usage = [], None, None
            async with contextlib.aclosing(run(job, request)) as stream:  # a client that goes away cancels the job
                async for event in stream:
                    if "error" in event:
                        return error_body(event["status"], event["error"], event.get("code") or "generation_failed")
                    text.append(event.get("text", ""))
                    finish, usage = event.get("done", finish), event.get("usage", usage)
            return {**head, "choices": [choice("".join(text), finish)], "usage": usage}

        head = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            if kind == "chat":
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None, "logprobs": None}]})
            async with contextlib.aclosing(run(job)) as stream:  # closed with this stream: a client gone cancels
                async for event in stream:
                    if "error" in event:
                        yield sse({"error": {"message": event["error"], "type": "server_error", "param": None,
                                             "code": event.get("code") or "generation_failed"}})
                        break
                    if "text" in event:
                        yield sse({**head, "choices": [choice(event["text"], None)]})
                    else:
                        yield sse({**head, "choices": [choice("", event["done"])]})
                        if include_usage:
                            yield sse({**head, "choices": [], "usage": event["usage"]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "linearize"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        one = isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int))  # a text, or its ids
        prompts = [req.prompt] if one else req.prompt
        if len(prompts) != 1:
            raise RequestError(400, f"prompt: give one prompt ({PROMPT_FORMS}); this server answers one prompt per "
                                    f"request, this one has {len(prompts)}", param="prompt")
        job = job_for(req, prompts[0], req.max_tokens or 16)

        def choice(text, finish):
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        return await respond(job, req, "completion", choice, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = chat_prompt(tokenizer, messages)
        except Exception as e:  # a template that refuses the roles or their order raises its own errors
            raise RequestError(400, f"the model's chat template refused these messages ({e})", param="messages") from e
        job = job_for(req, prompt, req.max_completion_tokens or req.max_tokens or default_max_tokens)

        def choice(text, finish):
            if not req.stream:
                return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                        "logprobs": None}
            return {"index": 0, "delta": {"content": text} if finish is None else {}, "finish_reason": finish,
                    "logprobs": None}

        return await respond(job, req, "chat", choice, request)

    @app.get("/v1/states")
    async def states():
        data = []
        for name in engine.states.names():
            try:
                s = engine.states.get(name)
                data.append({"id": name, "object": "state", "tokens": s.tokens, "bytes": s.bytes})
            except RequestError as e:  # a file in the folder this model cannot use
                data.append({"id": name, "object": "state", "error": str(e)})
        return {"object": "list", "data": data}

    @app.post("/v1/states")
    async def new_state(req: StateRequest):
        check_model(req.model)
        engine.states.check_new(req.name, req.replace)  # before the prefill; the engine checks again when it saves
        ids = tokens(req.text)
        if not 0 < ids.shape[1] <= max_context:
            raise RequestError(400, f"text: {ids.shape[1]} tokens; a state holds 1 to {max_context} (the maximum "
                                    "context length)", "context_length_exceeded", "text")
        job = Job(ids=ids, emit=None, save_as=req.name, replace=req.replace)
        async with contextlib.aclosing(run(job)) as stream:  # kept on if the client goes: saved for later requests
            async for event in stream:
                if "error" in event:
                    return error_body(event["status"], event["error"], event.get("code") or "prefill_failed",
                                      "name" if event.get("code") == "state_exists" else None)
        return {"id": req.name, "object": "state", "tokens": event["tokens"], "bytes": event["bytes"],
                "seconds": round(event["seconds"], 3)}

    return app
