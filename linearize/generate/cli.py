"""`linearize generate DIR PROMPT` and `linearize prefill DIR DOCUMENT --save FILE`: parsers and runs."""

from ..errors import LinearizeError
from ..options import add_placement, positive_int, temperature


def add(sub):
    """Both commands, generate then prefill."""
    add_generate(sub)
    add_prefill(sub)


def add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt with a converted model (constant-memory decoding)")
    p.add_argument("path", help="converted model folder")
    p.add_argument("prompt", help="with --state: what follows the document (may be empty)")
    p.add_argument("--max-new-tokens", type=positive_int, default=100)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--state", help="start from this saved state (`linearize prefill --save`): the prompt continues "
                                   "the document it holds, which is not read again")
    add_placement(p, "the model")
    p.set_defaults(run=run_generate)


def _load_for_decoding(args, state=None):
    """(model, tokenizer, the model's fingerprint) on --device in --dtype, with CPU decoding linears. state: a
    state file the model must be able to use (checked first: a wrong one fails before the model loads)."""
    from ..device import placement
    from ..ops.decode_linear import use_decode_linears
    from ..loading.student import load_student
    from .state_file import check_state, model_fingerprint

    device, dtype = placement(args.device, args.dtype)
    fingerprint = model_fingerprint(args.path)  # hashes the weights file unless its digest is kept: once
    if state is not None:
        check_state(state, fingerprint, dtype)
    model, tokenizer = load_student(args.path, device, dtype)
    use_decode_linears(model)  # one-token products on every CPU thread (CUDA layers are left alone)
    return model, tokenizer, fingerprint


def run_generate(args):
    import linearize

    from .decoding import Decoder, chat_prompt, has_chat_template
    from .state_file import load_state

    if args.state is None and args.raw and not args.prompt:
        raise LinearizeError("the prompt is empty and --raw adds no chat template: give some text to continue "
                             "(or a --state to continue)")
    model, tokenizer, fingerprint = _load_for_decoding(args, args.state)
    if args.state is None:
        linearize.generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                chat=not args.raw, stream=lambda s: print(s, end="", flush=True))
        print()
        return
    state, logits, _ = load_state(args.state, fingerprint, model.dtype, model.device)
    text = args.prompt
    if not args.raw and has_chat_template(tokenizer):
        text = chat_prompt(tokenizer, [{"role": "user", "content": args.prompt}])
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    new = Decoder(model).generate(ids, args.max_new_tokens, args.temperature, eos_token_id=tokenizer.eos_token_id,
                                  state=state, state_logits=logits)
    print(tokenizer.decode(new, skip_special_tokens=True))


def add_prefill(sub):
    p = sub.add_parser("prefill", help="read a document once and save its fixed-size decoding state",
                       description="Prefill a text file and save the decoding state after it (safetensors): "
                                   "`linearize generate DIR --state FILE \"question\"` and `linearize serve --states` "
                                   "then answer prompts about the document without reading it again.")
    p.add_argument("path", help="converted model folder")
    p.add_argument("document", help="text file (UTF-8), fed as raw text")
    p.add_argument("--save", required=True, metavar="FILE", help="state file to write (.safetensors)")
    add_placement(p, "the model")
    p.set_defaults(run=run_prefill)


def run_prefill(args):
    import time
    from pathlib import Path

    from .decoding import prefill
    from .state_file import check_writable, save_state

    doc = Path(args.document)
    if not doc.is_file():
        raise LinearizeError(f"document {doc} not found")
    try:
        text = doc.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LinearizeError(f"{doc} is not UTF-8 text ({e}); convert it to UTF-8 first") from e
    check_writable(args.save)  # before the prefill, not after it
    model, tokenizer, fingerprint = _load_for_decoding(args)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        raise LinearizeError(f"{doc} is empty; give a document with some text")
    t0 = time.perf_counter()
    logits, state = prefill(model, ids)
    seconds = time.perf_counter() - t0
    save_state(args.save, state, logits, fingerprint, model.dtype, document=str(doc))
    print(f"{ids.shape[1]} tokens prefilled in {seconds:.1f} s; state ({state.nbytes() / 2**20:.2f} MiB) saved to "
          f"{args.save}")
