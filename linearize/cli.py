"""The `linearize` command: convert, generate, prefill, serve, eval, bench, serve-bench, report, compare, blocks.

Every user error is one line on stderr and a non-zero exit code, never a traceback."""

import argparse
import os
import sys
from dataclasses import fields

from .bench import cli as bench_cli
from .bench import serve_load
from .bench import transfer_speed
from .compare import cli as compare_cli
from .errors import LinearizeError
from .evaluate import cli as evaluate_cli
from .options import add_placement, comma_ints, fmt
from .report import cli as report_cli
from .serve import cli as serve_cli
from .transfer import cli as blocks_cli


def _add_convert(sub):
    from .finetune.lora import LORA_LOSSES, LORA_TARGETS
    from .layers.linear_attention import ATTENTION_PRESETS, CACHE_POSITIONS
    from .pipeline import ConvertSettings
    from .transfer.distributed import DISTRIBUTED_MODES

    d = ConvertSettings()
    p = sub.add_parser("convert", help="linearize a model: attention transfer then LoRA",
                       description="Convert a causal LM to linear attention. With no options: the bundled "
                                   "SmolLM2-135M-Instruct on the bundled ShareGPT text.")
    p.add_argument("--model", help="HF model id, model folder or .gguf file (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="training text: .txt/.jsonl/.json file or folder, or a datasets name "
                                  "(default: bundled ShareGPT)")
    p.add_argument("--out", default="runs/smollm2", help="output folder (default: %(default)s)")
    p.add_argument("--attention", default=d.attention, choices=sorted(ATTENTION_PRESETS), help="attention family")
    p.add_argument("--window", type=int, help="softmax sliding window (0 = pure linear; default from --attention)")
    p.add_argument("--sinks", type=int, help="attention sinks: the first S tokens stay in exact softmax and out of the "
                                             "linear memory (default from --attention)")
    p.add_argument("--feature-map", help="hedgehog | t2r | elu | nala (default from --attention)")
    p.add_argument("--feature-dim", type=int, help="projection width of the feature map (Hedgehog's features are "
                                                   "twice it; default: head_dim); the linear memory holds "
                                                   "features x (head_dim + 1) numbers per KV head")
    p.add_argument("--cache", type=int, help="sparse cache: keep the M keys per KV head that the linear memory "
                                             "recalls worst in exact softmax (LoLA; default: 64 where the attention "
                                             "takes one, else 0). It has no parameters: switched on in the saved "
                                             "model after training")
    p.add_argument("--cache-position", choices=CACHE_POSITIONS,
                   help="score the sparse cache's keys at their own positions (own), as if each sat just beyond the "
                        "window (edge), or in a row from there back in their order (packed; training-free, default: "
                        "edge where there is a cache)")
    p.add_argument("--train-with-cache", action="store_true",
                   help="train stages 1 and 2 with the sparse cache in place (slow on the CPU; default: without)")
    p.add_argument("--heavy", type=int, metavar="M",
                   help="heavy hitters: of the keys that left the window, the M per KV head that drew the most window "
                        "attention stay in exact softmax instead of the linear memory (sinks that appear mid-text; "
                        "default from --attention: 0)")
    p.add_argument("--mix-init", type=float, help="initial mixing logit of every head: the window + sinks start at "
                                                  "weight sigmoid(M) against the linear memory (default from --attention: "
                                                  "4 for lolcats, the memory starts at about 2 %%; 0: half)")
    p.add_argument("--local-layers", type=int, metavar="K",
                   help="the first K layers keep the window + sinks alone, no linear memory (default from --attention: "
                        "0; after an attention-only stage 2 the memory of the first 11 of SmolLM2's 30 layers costs "
                        "agreement, README)")
    p.add_argument("--memory-cap", type=int, help="the linear memory weighs at most C keys: beyond, it is scaled by "
                                                   "C / n (default: seq-len - window - sinks, what it holds in "
                                                   "training: no change up to seq-len; with a sparse cache the saved "
                                                   "model's is then 256 at most; 0: none)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--tokens", "--transfer-tokens", dest="transfer_tokens", type=int, default=d.transfer_tokens,
                   help="stage 1 training tokens (default: %(default)s)")
    p.add_argument("--lora-tokens", type=int, default=d.lora_tokens, help="stage 2 training tokens (default: %(default)s)")
    p.add_argument("--minutes", type=float, help="a wall-clock budget for the whole run: plans --tokens and "
                                                 "--lora-tokens from a short throughput probe (replaces them)")
    p.add_argument("--transfer-share", type=float, help="with --minutes: the share of the training time that goes "
                                                        "to stage 1, the rest to stage 2 (default: 1/3)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens for perplexity")
    p.add_argument("--transfer-lr", type=float, default=d.transfer_lr)
    p.add_argument("--lora-lr", type=float, default=d.lora_lr)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-init", default=d.lora_init, help="default | pissa")
    p.add_argument("--lora-loss", default=d.lora_loss, choices=LORA_LOSSES,
                   help="stage 2 loss: kl (distil the teacher's logits; the teacher is the same model with adapters "
                        "off and exact softmax on), ce (next token), kl+ce (default: %(default)s)")
    p.add_argument("--lora-temperature", type=float, default=d.lora_temperature, help="of the kl loss (default: 1)")
    p.add_argument("--lora-targets", default=d.lora_targets, choices=sorted(LORA_TARGETS),
                   help="modules with LoRA adapters in stage 2 (default: %(default)s: no adapters, stage 2 trains "
                        "the feature maps and mixing factors alone, so the window and sinks stay the teacher's exact "
                        "attention; attention: q/k/v/o, the LoLCATs recipe)")
    p.add_argument("--lora-train-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 2 also trains the feature maps and mixing factors (default: only with --lora-targets "
                        "none, which leaves nothing else to train)")
    p.add_argument("--keep-softmax", type=int, default=d.keep_softmax, metavar="K",
                   help="keep exact softmax attention in the K layers with the largest transfer error (default: 0)")
    p.add_argument("--softmax-layers", type=comma_ints, default=[], metavar="L1,L2,...",
                   help="keep exact softmax attention in exactly these layers (instead of --keep-softmax K)")
    p.add_argument("--retrieval-fraction", type=float, default=d.retrieval_fraction, metavar="F",
                   help="make a share F of the stage 1 and 2 training rows look-up exercises: facts hidden in the "
                        "text, one asked at the end (data/retrieval.py; default: 0)")
    p.add_argument("--skip-transfer", action="store_true", help="LoRA only (baseline: shows what transfer buys)")
    p.add_argument("--transfer-state", help="stage 1 result from `linearize blocks stitch` (.safetensors): load it "
                                            "instead of running stage 1")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--distributed", nargs="?", const="layers", choices=DISTRIBUTED_MODES,
                   help="under `torchrun --nproc-per-node N -m linearize.cli convert ...`: layers (default): stage 1 "
                        "split over ranks by layers (same result as one process), stage 2 DDP; data: stage 1 split "
                        "by batch, stage 2 DDP; fsdp: stage 1 data-parallel, stage 2 sharded with FSDP")
    add_placement(p, "the teacher (trained parameters stay float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_convert)


def _quiet_libraries():
    """--no-progress: no bars from transformers either (loading weights, GGUF de-quantisation: loading/teacher.py)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run_convert(args):
    from .pipeline import ConvertSettings, convert

    names = {f.name for f in fields(ConvertSettings)}
    settings = ConvertSettings(**{k: v for k, v in vars(args).items() if k in names})
    res = convert(settings, args.out, resume=args.resume, progress=not args.no_progress, distributed=args.distributed)
    if os.environ.get("RANK", "0") == "0" or not args.distributed:  # one summary per run
        _print_summary(res, args.out, settings)


def _print_summary(res, out, settings):
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from .pipeline import stage_rows

    table = Table(title=f"linearize convert -> {out}")
    for col in ("", "tokens", "wall s", "tokens/s", "held-out ppl"):
        table.add_column(col, justify="right")
    for name, *counts, ppl in stage_rows(res, asdict(settings)):
        table.add_row(name, *(fmt(x, "") for x in counts), fmt(ppl, ".3f"))
    Console().print(table)
    print(f"model saved to {out} (load with linearize.load('{out}'); try `linearize generate {out} \"Hello\"`)")


def _add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt with a converted model (constant-memory decoding)")
    p.add_argument("path", help="converted model folder")
    p.add_argument("prompt", help="with --state: what follows the document (may be empty)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--state", help="start from this saved state (`linearize prefill --save`): the prompt continues "
                                   "the document it holds, which is not read again")
    add_placement(p, "the model")
    p.set_defaults(run=_run_generate)


def _load_for_decoding(args, state=None):
    """(model, tokenizer, the model's fingerprint) on --device in --dtype, with CPU decoding linears. state: a
    state file the model must be able to use (checked first: a wrong one fails before the model loads)."""
    from .device import placement
    from .ops.decode_linear import use_decode_linears
    from .run_folder import load_student
    from .state_file import check_state, model_fingerprint

    device, dtype = placement(args.device, args.dtype)
    if state is not None:
        check_state(state, model_fingerprint(args.path), dtype)
    model, tokenizer = load_student(args.path, device, dtype)
    use_decode_linears(model)  # one-token products on every CPU thread (CUDA layers are left alone)
    return model, tokenizer, model_fingerprint(args.path)


def _run_generate(args):
    import linearize

    from .decoding import Decoder, chat_prompt, has_chat_template
    from .state_file import load_state

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


def _add_prefill(sub):
    p = sub.add_parser("prefill", help="read a document once and save its fixed-size decoding state",
                       description="Prefill a text file and save the decoding state after it (safetensors): "
                                   "`linearize generate DIR --state FILE \"question\"` and `linearize serve --states` "
                                   "then answer prompts about the document without reading it again.")
    p.add_argument("path", help="converted model folder")
    p.add_argument("document", help="text file (UTF-8), fed as raw text")
    p.add_argument("--save", required=True, metavar="FILE", help="state file to write (.safetensors)")
    add_placement(p, "the model")
    p.set_defaults(run=_run_prefill)


def _run_prefill(args):
    import time
    from pathlib import Path

    from .decoding import prefill
    from .state_file import save_state

    doc = Path(args.document)
    if not doc.is_file():
        raise LinearizeError(f"document {doc} not found")
    try:
        text = doc.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LinearizeError(f"{doc} is not UTF-8 text ({e}); convert it to UTF-8 first") from e
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


COMMANDS = [_add_convert, _add_generate, _add_prefill, serve_cli.add, evaluate_cli.add, bench_cli.add,
            serve_load.add, transfer_speed.add, report_cli.add, compare_cli.add, blocks_cli.add]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if getattr(args, "no_progress", False):
            _quiet_libraries()
        import torch

        torch.set_flush_denormal(True)  # trained feature maps make subnormal floats, which are very slow on CPU
        args.run(args)
    except LinearizeError as e:
        print(f"linearize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlinearize: interrupted; finished work is checkpointed, continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
