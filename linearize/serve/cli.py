"""`linearize serve DIR`: parser, model loading and the uvicorn server."""

import errno
import socket
from pathlib import Path

from ..options import add_placement, token_count
from .engine import MMAP_THRESHOLD_MIB


def add(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, named states)",
                       description="Serve a converted model over the OpenAI API (/v1/models, /v1/completions, "
                                   "/v1/chat/completions, streaming by server-sent events) on one worker thread that "
                                   "interleaves concurrent requests. Named states (/v1/states, and a request's "
                                   "\"state\": NAME) answer prompts about a prefilled document without reading it "
                                   "again.")
    p.add_argument("path", help="converted model folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--name", help="the model's id in the API (default: the folder's name)")
    p.add_argument("--states", metavar="DIR", help="folder of named states: NAME.safetensors files there (from "
                                                   "`linearize prefill --save`) can be named by requests, and POST "
                                                   "/v1/states saves there (default: kept in memory only)")
    p.add_argument("--max-context", type=token_count, default=32 * 1024,
                   help="tokens a request may reach: state + prompt + max_tokens (default: 32k)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="a chat request's max_tokens when it gives none (default: %(default)s)")
    p.add_argument("--max-active", type=int, default=16,
                   help="requests in progress at once, interleaved; more wait in a queue (default: %(default)s)")
    p.add_argument("--mmap-threshold", type=float, default=MMAP_THRESHOLD_MIB, metavar="MIB",
                   help="glibc: tensors of at least MIB MiB are mapped and unmapped, so the server's memory stays flat "
                        "under mixed prompt lengths; 0 keeps glibc's dynamic threshold: faster prefill (about 2x at "
                        "1 MiB on a 2-core CPU), memory may grow (README; default: %(default)s)")
    add_placement(p, "the model")
    p.set_defaults(run=run)


def build(path, name=None, states=None, max_context=32 * 1024, max_tokens=256, max_active=16, device="auto",
          dtype="auto", mmap_threshold_mib=MMAP_THRESHOLD_MIB):
    """(FastAPI app, started Engine) serving the converted model in `path` (stop the engine when done)."""
    from ..device import placement
    from ..errors import LinearizeError
    from ..ops.decode_linear import use_decode_linears
    from ..loading.student import load_student
    from ..generate.state_file import model_fingerprint
    from .app import create_app
    from .engine import Engine, StateStore, states_folder

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LinearizeError(f"linearize serve needs {e.name}: pip install 'linearize[serve]' (fastapi, uvicorn)"
                             ) from e
    if min(max_context, max_tokens, max_active) < 1:
        raise LinearizeError("--max-context, --max-tokens and --max-active must be >= 1")
    if mmap_threshold_mib < 0:
        raise LinearizeError(f"--mmap-threshold must be >= 0 MiB (0: glibc's own), got {mmap_threshold_mib}")
    if states:
        states_folder(states)  # a folder it cannot use is reported before the model loads
    where, dtype = placement(device, dtype)
    model, tokenizer = load_student(path, where, dtype)
    use_decode_linears(model)  # one-token products on every CPU thread (CUDA layers are left alone)
    store = StateStore(model_fingerprint(path), dtype, where, states)
    engine = Engine(model, tokenizer, store, max_active, mmap_threshold_mib).start()
    return create_app(engine, name or Path(path).resolve().name, max_context, max_tokens), engine


def server(app, engine, **config):
    """The uvicorn server of `app` over `engine`; run it with .run(sockets=[a bound socket]). Its shutdown (Ctrl-C)
    cancels the engine's jobs first, so requests in progress end at once (503) instead of being waited for."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            engine.cancel_all()
            await super().shutdown(sockets)

    return Server(uvicorn.Config(app, log_level="warning", **config))


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, as uvicorn would bind it; LinearizeError naming the fix if it cannot be."""
    from ..errors import LinearizeError

    if not 0 <= port <= 65535:
        raise LinearizeError(f"--port {port}: a port is 0 to 65535 (0: any free one)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog; listening now keeps the port ours while the model loads
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LinearizeError(f"port {port} on {host} is in use (another server?); stop it, or choose another "
                                 "port with --port") from e
        if e.errno == errno.EACCES:
            raise LinearizeError(f"no permission to listen on port {port} (ports below 1024 need root); choose "
                                 "another port with --port") from e
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            raise LinearizeError(f"--host {host}: not an address of this machine ({e.strerror or e}); give one, e.g. "
                                 "--host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)") from e
        raise LinearizeError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host or --port"
                             ) from e
    return sock


def run(args):
    sock = listen(args.host, args.port)  # a port in use is reported before the model loads
    try:
        app, engine = build(args.path, args.name, args.states, args.max_context, args.max_tokens, args.max_active,
                            args.device, args.dtype, args.mmap_threshold)
    except BaseException:
        sock.close()
        raise
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.path} on http://{host}:{sock.getsockname()[1]}/v1 (Ctrl-C stops)", flush=True)
    try:
        server(app, engine).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: a normal end of serving
        print("linearize serve: stopped", flush=True)
    finally:
        engine.stop()
        sock.close()
