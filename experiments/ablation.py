#!/usr/bin/env python3
"""The issue-11 ablation at one fixed wall-clock budget: one `linearize convert --minutes M` per setting on the
bundled SmolLM2 and data, each followed by a short `linearize eval`, then one table.

    python3 experiments/ablation.py --minutes 6 --out runs/ablation-6min --table docs/results/ablation_6min.json

Rows (ROWS below): the default (when it started the memory at half the window's weight); the memory starting
at 2 % / 0.03 % of it (--mix-init 4 / 8; 4 is the default now); a quarter-size linear memory (--feature-dim 16);
stage-2 loss CE; LoRA only (no attention transfer); stage 2 also training the feature maps and mixing factors end to
end (--lora-train-attention); then, on the mix-init 4 default, LoRA on attention + MLP and a bfloat16 teacher
(--dtype bfloat16; trained parameters stay float32; this CPU emulates bfloat16 matmuls), and mix-init 4 once more
beside those two (mix4-reference: a budget in minutes buys fewer tokens on a slower machine), and the budget split
otherwise: stage 1 on 17 % or 67 % of the training time instead of a third (--transfer-share). The eval measures
ppl ratio, top-1 and KL on ShareGPT / Shakespeare / Python docs (8 rows each), the repetition rate of greedy answers
to --prompts prompts, and the StreamingLLM baseline of equal state bytes; passkey, multi-key, per-layer error and
MMLU are skipped (minutes each on 2 cores). The rows of TABLE that --rows does not name are kept as they are; a named
row whose run folder is finished is only read again. Rows are scripts/quality_table.run_row's, plus `setting`,
`minutes` and `machine` (a budget in minutes buys tokens by the machine's speed); TABLE.md has them as markdown.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # baseline_table, quality_table
from baseline_table import sh as cli  # noqa: E402 (runs `linearize ARGS`, output appended to a log)
from quality_table import read, run_row  # noqa: E402

import torch  # noqa: E402

from linearize.run_folder import write_json, write_text  # noqa: E402

ROWS = {  # name -> extra convert arguments
    "default": [],
    "mix-init-4": ["--mix-init", "4"],
    "mix-init-8": ["--mix-init", "8"],
    "feature-dim-16": ["--feature-dim", "16"],
    "ce": ["--lora-loss", "ce"],
    "lora-only": ["--skip-transfer"],
    "train-attention": ["--lora-train-attention"],
    # rows added after the default became mix-init 4: pinned to it, so they compare with the mix-init-4 row
    "lora-mlp-mix4": ["--mix-init", "4", "--lora-targets", "attention+mlp"],
    "bf16-mix4": ["--mix-init", "4", "--dtype", "bfloat16"],
    # mix-init-4 again, beside the two rows above on the same machine: a --minutes budget buys fewer tokens on a
    # slower CPU, so rows from different sessions compare only through their token counts
    "mix4-reference": ["--mix-init", "4"],
    # how the budget is split: stage 1 gets 1/3 of the training time by default (budget.TRANSFER_SHARE)
    "share-0.17-mix4": ["--mix-init", "4", "--transfer-share", "0.17"],
    "share-0.67-mix4": ["--mix-init", "4", "--transfer-share", "0.67"],
}


def markdown(rows: list[dict]) -> str:
    """The table as markdown: one line per row (ratios student / teacher, top-1 and KL on ShareGPT, repetition)."""
    head = ("| setting | stage-1 + stage-2 tokens | wall s | held-out ratio | ShareGPT | Shakespeare | Python docs "
            "| top-1 ShareGPT | KL ShareGPT | repeated 4-grams student / teacher | equal-bytes streaming ShareGPT / top-1 "
            "| memory off ShareGPT / top-1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed: {r['error'][:80]} |")
            continue
        ratio, rep, b = r["ppl_ratio"], r.get("repetition") or {}, r.get("streaming_baseline")
        base = (f"{b['ppl_ratio']['sharegpt']:.3f} / {b['top1']['sharegpt']:.1%} (4 + {b['window']})" if b else "")
        off = r.get("memory_off")
        off = f"{off['ppl_ratio']['sharegpt']:.3f} / {off['top1']['sharegpt']:.1%}" if off else "not measured"
        name = r["setting"] + (" ¹" if r.get("stage2_replanned") else "")
        lines.append(
            f"| {name} | {r['transfer_tokens'] or 0:,} + {r['lora_tokens'] or 0:,} | {r['convert_s']:.0f} "
            f"| {r['heldout_ppl_ratio']:.3f} | {ratio['sharegpt']:.3f} | {ratio['shakespeare']:.3f} "
            f"| {ratio['python-docs']:.3f} | {r['top1']['sharegpt']:.1%} | {r['kl']['sharegpt']:.3f} "
            f"| {rep.get('student', float('nan')):.3f} / {rep.get('teacher', float('nan')):.3f} | {base} | {off} |")
    if any(r.get("stage2_replanned") for r in rows):
        lines.append("\n¹ stage 2 re-planned from a real stage-2 step (`--minutes`, linearize/convert/budget.py); the "
                     "other rows priced it from the stage-1 probe.")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=6.0, help="the budget of every conversion")
    p.add_argument("--out", default="runs/ablation", help="folder of the run folders and logs")
    p.add_argument("--table", default="docs/results/ablation.json")
    p.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated")
    p.add_argument("--eval-tokens", type=int, default=8192, help="convert's held-out tokens (fewer: less overhead)")
    p.add_argument("--prompts", type=int, default=12, help="greedy-answer prompts for the repetition rate")
    p.add_argument("--answer-tokens", type=int, default=48, help="tokens per greedy answer")
    args = p.parse_args()
    out, table = Path(args.out), Path(args.table)
    out.mkdir(parents=True, exist_ok=True)
    asked = args.rows.split(",")
    if unknown := [name for name in asked if name not in ROWS]:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    # rows of the table that this call does not run are kept as they are (measured in earlier sessions)
    kept = read(table)["rows"] if table.is_file() else []
    rows = {r["setting"]: r for r in kept if r["setting"] not in asked}
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    machine = f"{os.cpu_count()} CPU cores, {torch.backends.cpu.get_cpu_capability()}, native bfloat16: {native_bf16}"
    for name in asked:
        run, log = out / name, out / f"{name}.log"
        t0 = time.time()
        try:
            if not (run / "convert.json").is_file():
                cli(["convert", "--out", str(run), "--minutes", str(args.minutes), "--eval-tokens",
                     str(args.eval_tokens), "--no-progress", *ROWS[name],
                     *(["--resume"] if (run / "progress.json").is_file() else [])], log)
            if not (run / "eval.json").is_file():
                cli(["eval", str(run), "--skip", "passkey,multikey,layers,mmlu", "--generation-prompts",
                     str(args.prompts), "--generation-tokens", str(args.answer_tokens), "--no-progress"], log)
            row = {"setting": name, "minutes": args.minutes, "machine": machine, **run_row(run)}
        except RuntimeError as e:
            row = {"setting": name, "minutes": args.minutes, "machine": machine, "error": str(e)}
        print(f"{name}: {time.time() - t0:.0f} s; {json.dumps(row)[:300]}", flush=True)
        rows[name] = row
        ordered = [rows[n] for n in ROWS if n in rows]
        write_json({"minutes": args.minutes, "rows": ordered}, table)
        write_text(markdown(ordered), table.with_suffix(".md"))


if __name__ == "__main__":
    main()
