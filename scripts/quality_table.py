"""docs/results/quality.json (issue 11) from finished runs: the default run's numbers and one ablation row per run.

    python scripts/quality_table.py --default runs/w64-s4-kl [--row runs/other ...] [--baseline docs/results/baseline.json]
                                    [--wall-s SECONDS] --out docs/results/quality.json

Each run folder needs convert.json and eval.json (`linearize eval RUN`, with its generation part for the
repetition rates). Rows of a baseline.json (scripts/baseline_table.py) are added as ablation rows too, marked with
the device they ran on. Ratios are student / teacher perplexity. The file as it stands:

    python scripts/quality_table.py --default runs/default-mix4 --row runs/default-heavy32 --row runs/default-w256 \
        --row runs/w64-s4-kl $(for r in default mix-init-4 mix-init-8 feature-dim-16 ce train-attention lora-only; \
        do echo --row runs/ablation-6min/$r; done) --baseline docs/results/baseline.json --wall-s 1380

A new default joins the rows already in the file (whose run folders a fresh machine no longer has) with
`--keep-rows`:

    python scripts/quality_table.py --default runs/smollm2 --keep-rows --out docs/results/quality.json

Rows measured later join it without the earlier run folders (which a fresh machine no longer has): `--add TABLE`
adds the rows of an ablation table (experiments/ablation.py) whose run is not in the file yet, keeping everything else:

    python scripts/quality_table.py --add docs/results/ablation_6min.json
"""

import argparse
import json
from pathlib import Path

from linearize.convert.settings import resolve_train_attention
from linearize.run_folder import student_ppl, write_json


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def stage_tokens(conv: dict, stage: str) -> int | None:
    """Tokens a stage trained on, resumed steps included (None: the stage did not run)."""
    summary = conv.get(stage)
    return summary["steps"] * conv["settings"]["seq_len"] if summary else None


def run_row(run: Path) -> dict:
    conv, ev = read(run / "convert.json"), read(run / "eval.json")
    s = conv["settings"]
    texts = ev.get("texts", {})
    row = {
        "run": str(run), "device": ev.get("device", {}).get("name") or "cpu",
        "attention": s["attention"], "window": s.get("window"), "sinks": s.get("sinks"),
        "lora_loss": s.get("lora_loss", "ce"), "lora_targets": s.get("lora_targets", "attention"),
        "lora_train_attention": resolve_train_attention(s.get("lora_targets", "attention"),
                                                        s.get("lora_train_attention", False)), "dtype": s.get("dtype"),
        # steps count the whole stage (a resumed run's summary counts only its own tokens)
        "transfer_tokens": stage_tokens(conv, "transfer"), "lora_tokens": stage_tokens(conv, "lora"),
        "convert_s": conv.get("total_seconds"),
        "heldout_ppl_ratio": student_ppl(conv) / conv["teacher_ppl"],
        "ppl_ratio": {t: v["student_ppl"] / v["teacher_ppl"] for t, v in texts.items()},
        "top1": {t: v["top1"] for t, v in texts.items()}, "kl": {t: v["kl"] for t, v in texts.items()},
    }
    if "generation" in ev:
        row["repetition"] = ev["generation"]["repetition"]
        row["prefix_match"] = ev["generation"]["prefix_match"]
    if "baseline" in ev:
        b = ev["baseline"]
        row["streaming_baseline"] = {"window": b["window"], "sinks": b["sinks"], "state_bytes": b["state_bytes"],
                                     "ppl_ratio": {t: v["student_ppl"] / v["teacher_ppl"] for t, v in b["texts"].items()},
                                     "top1": {t: v["top1"] for t, v in b["texts"].items()}}
        if off := b.get("memory_off"):  # the student with its linear memory switched off
            row["memory_off"] = {"ppl_ratio": {t: v["student_ppl"] / v["teacher_ppl"] for t, v in off["texts"].items()},
                                 "top1": {t: v["top1"] for t, v in off["texts"].items()},
                                 "kl": {t: v["kl"] for t, v in off["texts"].items()}}
    if "stage2_plan" in conv:
        row["stage2_replanned"] = True  # stage 2's rows re-planned from a real step (--minutes, since 2026-11-27)
    return row


def add_rows(table: Path, out: Path):
    """The rows of an ablation table whose run folder is not an ablation row of `out` yet join it, in the table's
    order (setting, minutes and machine included); everything else in `out` stays as it is."""
    result = read(out)
    have = {r["run"] for r in result["ablation"]}
    new = [r for r in read(table)["rows"] if "error" not in r and r["run"] not in have]
    result["ablation"] += new
    write_json(result, out)
    print(f"written {out}: {len(new)} rows added ({', '.join(r['run'] for r in new) or 'none'})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--default", help="the default conversion's run folder (required unless --add)")
    p.add_argument("--add", help="an ablation table (experiments/ablation.py) whose new rows join --out as it is")
    p.add_argument("--row", action="append", default=[], help="another run folder (an ablation row)")
    p.add_argument("--baseline", help="a baseline.json whose converted rows become ablation rows")
    p.add_argument("--wall-s", type=float, help="wall time of the whole default `linearize convert` process")
    p.add_argument("--out", default="docs/results/quality.json")
    p.add_argument("--keep-rows", action="store_true",
                   help="keep the ablation rows of the existing --out after the new ones (their run folders may be "
                        "gone): a new default joins the rows measured before it")
    args = p.parse_args()
    if args.add:
        add_rows(Path(args.add), Path(args.out))
        return
    if not args.default:
        p.error("--default is required (or --add TABLE)")
    run = Path(args.default)
    conv, ev = read(run / "convert.json"), read(run / "eval.json")
    texts = ev["texts"]
    result = {
        "default_run": str(run), "settings": conv["settings"],
        "teacher_ppl": conv["teacher_ppl"], "student_ppl": student_ppl(conv),
        "heldout_tokens": conv.get("heldout_tokens"),
        "top1": texts["sharegpt"]["top1"], "kl": texts["sharegpt"]["kl"],
        "ood": {t: {"teacher_ppl": v["teacher_ppl"], "student_ppl": v["student_ppl"]}
                for t, v in texts.items() if t != "sharegpt"},
        "repetition": ev.get("generation", {}).get("repetition"),
        "wall_s": args.wall_s or conv.get("total_seconds"),
        "ablation": [run_row(run)] + [run_row(Path(r)) for r in args.row],
    }
    if args.baseline:
        b = read(Path(args.baseline))
        for r in b["rows"]:  # the GPU rows of scripts/baseline_table.py; a row with "run" is a run folder (--row)
            if r["attention"] != "streaming" and "run" not in r:
                result["ablation"].append({"run": r["name"], "device": "H200 (bf16), scripts/baseline_table.py",
                                           "attention": r["attention"], "window": r["window"], "sinks": r["sinks"],
                                           "lora_loss": "ce", "convert_s": r.get("convert_seconds"),
                                           "heldout_ppl_ratio": r["heldout_ppl"]["student"] / r["heldout_ppl"]["teacher"],
                                           "ppl_ratio": r["ppl_ratio"], "top1": r["top1"], "kl": r["kl"]})
    out = Path(args.out)
    if args.keep_rows and out.is_file():
        have = {r["run"] for r in result["ablation"]}
        result["ablation"] += [r for r in read(out)["ablation"] if r["run"] not in have]
    write_json(result, out)
    print(f"written {out}: ShareGPT held-out ratio {result['student_ppl'] / result['teacher_ppl']:.3f}, "
          f"top-1 {result['top1']:.1%}, {len(result['ablation'])} ablation rows")


if __name__ == "__main__":
    main()
