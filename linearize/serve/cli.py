"""`linearize serve DIR`: parser, model loading and the uvicorn server."""

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
    from ..run_folder import load_student
    from ..state_file import model_fingerprint
    from .app import create_app
    from .engine import Engine, StateStore

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
    where, dtype = placement(device, dtype)
    model, tokenizer = load_student(path, where, dtype)
    use_decode_linears(model)  # one-token products on every CPU thread (CUDA layers are left alone)
    store = StateStore(model_fingerprint(path), dtype, where, states)
    engine = Engine(model, tokenizer, store, max_active, mmap_threshold_mib).start()
    return create_app(engine, name or Path(path).resolve().name, max_context, max_tokens), engine


def run(args):
    import uvicorn

    app, engine = build(args.path, args.name, args.states, args.max_context, args.max_tokens, args.max_active,
                        args.device, args.dtype, args.mmap_threshold)
    print(f"serving {args.path} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
