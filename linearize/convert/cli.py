"""`linearize convert`: parser, run and the summary table."""

import argparse
import os
from dataclasses import fields

from ..options import add_placement, comma_ints, fmt
from ..training_free import CONVERT_HELP, add_arguments


def add(sub):
    from ..finetune.lora import LORA_LOSSES, LORA_TARGETS
    from ..layers.linear_attention import ATTENTION_PRESETS
    from ..transfer.distributed import DISTRIBUTED_MODES
    from .settings import ConvertSettings

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
    add_arguments(p, ("cache", "cache_every", "cache_position", "cache_score", "memory_cap", "heavy"), CONVERT_HELP)
    p.add_argument("--train-with-cache", action="store_true",
                   help="train stages 1 and 2 with the sparse cache in place (slow on the CPU; default: without)")
    p.add_argument("--mix-init", type=float, help="initial mixing logit of every head: the window + sinks start at "
                                                  "weight sigmoid(M) against the linear memory (default from --attention: "
                                                  "4 for lolcats, the memory starts at about 2 %%; 0: half)")
    p.add_argument("--local-layers", type=int, metavar="K",
                   help="the first K layers keep the window + sinks alone, no linear memory (default from --attention: "
                        "0; after an attention-only stage 2 the memory of the first 11 of SmolLM2's 30 layers costs "
                        "agreement, README)")
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
    p.add_argument("--window-dropout", type=float, default=d.window_dropout, metavar="P",
                   help="scheduled sliding-window dropout in stage 1: each layer trains a step without its window (the "
                        "current token and the sinks stay exact) with probability P at the first step, falling to 0 "
                        "at the last, so the linear memory cannot leave the work to the window (default: 0)")
    p.add_argument("--retrieval-fraction", type=float, default=d.retrieval_fraction, metavar="F",
                   help="make a share F of the stage 1 and 2 training rows look-up exercises: facts hidden in the "
                        "text, one asked at the end (data/retrieval.py; default: 0)")
    p.add_argument("--skip-transfer", action="store_true", help="LoRA only (baseline: shows what transfer buys)")
    p.add_argument("--transfer-state", help="stage 1 result from `linearize blocks stitch` (.safetensors): load it "
                                            "instead of running stage 1")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in an --out that holds a run (its progress and checkpoints are dropped), or "
                        "write into a folder that holds other files (the --model folder is always refused)")
    p.add_argument("--distributed", nargs="?", const="layers", choices=DISTRIBUTED_MODES,
                   help="under `torchrun --nproc-per-node N -m linearize.cli convert ...`: layers (default): stage 1 "
                        "split over ranks by layers (same result as one process), stage 2 DDP; data: stage 1 split "
                        "by batch, stage 2 DDP; fsdp: stage 1 data-parallel, stage 2 sharded with FSDP")
    add_placement(p, "the teacher (trained parameters stay float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args):
    from .settings import ConvertSettings
    from .stages import convert

    names = {f.name for f in fields(ConvertSettings)}
    settings = ConvertSettings(**{k: v for k, v in vars(args).items() if k in names})
    res = convert(settings, args.out, resume=args.resume, progress=not args.no_progress, distributed=args.distributed,
                  overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0" or not args.distributed:  # one summary per run
        print_summary(res, args.out, settings)


def print_summary(res, out, settings):
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from .stages import stage_rows

    table = Table(title=f"linearize convert -> {out}")
    for col in ("", "tokens", "wall s", "tokens/s", "held-out ppl"):
        table.add_column(col, justify="right")
    for name, *counts, ppl in stage_rows(res, asdict(settings)):
        table.add_row(name, *(fmt(x, "") for x in counts), fmt(ppl, ".3f"))
    Console().print(table)
    print(f"model saved to {out} (load with linearize.load('{out}'); try `linearize generate {out} \"Hello\"`)")
