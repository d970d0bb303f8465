"""`linearize compare`: parser, run and the terminal table."""

from ..options import add_placement, comma_ints, names, token_count
from ..training_free import add_arguments


def add(sub):
    from ..convert.settings import ConvertSettings
    from .run import PARTS, CompareSettings

    d, c = ConvertSettings(), CompareSettings()
    p = sub.add_parser("compare", help="convert with several attention families at one budget, one table",
                       description="Run `linearize convert` for each --attention (and --keep-softmax K) into "
                                   "OUT/NAME with the same token budget, then print held-out ppl, KL, top-1, the "
                                   "relative per-layer transfer error, passkey and decode speed side by side (ppl "
                                   "ratio, KL and top-1 per evaluation text in the JSON). Finished runs are reused. "
                                   "The families are compared without the sparse cache that `linearize convert` "
                                   "adds where it can (`linearize eval OUT/NAME --cache 64` adds it). "
                                   "Writes OUT/compare.json.")
    p.add_argument("--attention", type=names, default=c.attentions,
                   help=f"comma-separated families (default: {','.join(c.attentions)})")
    p.add_argument("--keep-softmax", type=comma_ints, default=c.keep_softmax, metavar="K[,K...]",
                   help="softmax layers to keep; several values compare the trade-off (default: 0)")
    p.add_argument("--softmax-layers", type=comma_ints, default=[], metavar="L1,L2,...",
                   help="keep exact softmax in exactly these layers (instead of --keep-softmax)")
    p.add_argument("--transfer-state", help="stage 1 result to load instead of training one (.safetensors: a "
                                            "run's checkpoints/transfer/tensors.safetensors or `blocks stitch`)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: %(default)s)")
    p.add_argument("--model", help="teacher (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="training text (default: bundled ShareGPT)")
    p.add_argument("--window", type=int, help="softmax window of the hybrid families (default: each preset's)")
    p.add_argument("--sinks", type=int, help="attention sinks of the hybrid families (default: each preset's)")
    add_arguments(p, ("heavy",), default="each preset's; in the hybrid families with a plain linear memory")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--tokens", type=int, default=d.transfer_tokens, help="stage 1 tokens per variant")
    p.add_argument("--lora-tokens", type=int, default=d.lora_tokens, help="stage 2 tokens per variant")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--kl-sequences", type=int, default=c.kl_sequences, help="rows of each text for ppl / KL / top-1")
    p.add_argument("--texts", type=names, default=c.texts, help=f"evaluation texts (default: {','.join(c.texts)})")
    p.add_argument("--layer-sequences", type=int, default=c.layer_sequences,
                   help="held-out rows for the per-layer relative transfer error")
    p.add_argument("--passkey-length", type=token_count, default=c.passkey_length)
    p.add_argument("--passkey-trials", type=int, default=c.passkey_trials)
    p.add_argument("--decode-context", type=token_count, default=c.decode_context)
    p.add_argument("--decode-tokens", type=int, default=c.decode_tokens)
    p.add_argument("--skip", type=names, default=(), help=f"parts to skip: {', '.join(PARTS)}")
    add_placement(p, "where every variant is converted and measured")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args):
    from rich.console import Console
    from rich.table import Table

    from ..convert.settings import ConvertSettings
    from .run import COLUMNS, CompareSettings, compare, table_rows

    # cache 0: the families as they are (a sparse cache, which only some take, would make those exact over the
    # last 64 + 64 keys that left the window and hide their memory; `linearize eval RUN --cache 64` adds it after)
    base = ConvertSettings(model=args.model, data=args.data, window=args.window, sinks=args.sinks, heavy=args.heavy,
                           cache=0, seq_len=args.seq_len,
                           transfer_tokens=args.tokens, lora_tokens=args.lora_tokens, eval_tokens=args.eval_tokens,
                           softmax_layers=args.softmax_layers, transfer_state=args.transfer_state,
                           device=args.device, dtype=args.dtype)
    cs = CompareSettings(attentions=args.attention, keep_softmax=args.keep_softmax, kl_sequences=args.kl_sequences,
                         texts=args.texts, layer_sequences=args.layer_sequences,
                         passkey_length=args.passkey_length, passkey_trials=args.passkey_trials,
                         decode_context=args.decode_context, decode_tokens=args.decode_tokens, skip=args.skip)
    res = compare(base, cs, args.out, progress=not args.no_progress)
    table = Table(title=f"linearize compare -> {args.out} ({args.tokens} + {args.lora_tokens} tokens each)")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for row in table_rows(res):
        table.add_row(*row)
    Console().print(table)
    print(f"results written to {args.out}/compare.json and compare.md")
