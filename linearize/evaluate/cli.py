"""`linearize eval DIR [--teacher M]`: parser, run and the terminal table."""

from pathlib import Path

from ..options import add_placement, comma_ints, mmlu_limit, names, token_counts
from ..training_free import TrainingFree, add_arguments


def add(sub):
    from .run import PARTS, EvalSettings
    from .texts import EVAL_TEXTS

    d = EvalSettings()
    p = sub.add_parser("eval", help="quality vs the teacher: ppl, KL, top-1, layer error, passkey, multi-key recall, MMLU -> eval.json",
                       description="Compare a converted model with its teacher. Writes DIR/eval.json (keys documented "
                                   "in linearize/evaluate/run.py) and prints a table.")
    p.add_argument("path", help="converted model folder")
    p.add_argument("--teacher", help="teacher model (default: the one in DIR/convert.json, else bundled SmolLM2)")
    p.add_argument("--texts", default=",".join(d.texts),
                   help=f"texts for ppl/KL/top-1: {', '.join(EVAL_TEXTS)} or your own .txt/.jsonl/.json files or "
                        "folders (as --data reads them), comma-separated (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per row (default: %(default)s)")
    p.add_argument("--sequences", type=int, default=d.sequences, help="rows per text (default: %(default)s)")
    p.add_argument("--layer-sequences", type=int, default=d.layer_sequences,
                   help="rows per text for per-layer error (default: %(default)s)")
    p.add_argument("--passkey-lengths", type=token_counts, default=d.passkey_lengths,
                   help="passkey prompt lengths in tokens (default: 256,512,1k,2k,4k)")
    p.add_argument("--passkey-trials", type=int, default=d.passkey_trials,
                   help="trials per length (default: %(default)s)")
    p.add_argument("--multikey-keys", type=comma_ints, default=d.multikey_keys,
                   help="multi-key recall: facts hidden per prompt, one asked (default: 4,16)")
    p.add_argument("--multikey-lengths", type=token_counts, default=d.multikey_lengths,
                   help="multi-key prompt lengths in tokens (default: 1k,2k,4k; the issue's full set: 1k,2k,4k,8k,16k)")
    p.add_argument("--multikey-trials", type=int, default=d.multikey_trials,
                   help="questions per (keys, length) (default: %(default)s)")
    p.add_argument("--generation-prompts", type=int, default=d.generation_prompts,
                   help="held-out prompts both models answer greedily (default: %(default)s)")
    p.add_argument("--prompts", help="prompts for the generation comparison: a .txt file (one per line) or .jsonl "
                                     "({\"text\"} or chat records); default: held-out documents of the training data")
    p.add_argument("--generation-tokens", type=int, default=d.generation_tokens,
                   help="tokens per answer (default: %(default)s)")
    p.add_argument("--limit", type=mmlu_limit, default=d.limit,
                   help="MMLU questions per subject, or 'all' (default: %(default)s; x57 subjects, 5-shot)")
    add_arguments(p)
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip among {', '.join(PARTS)}")
    add_placement(p, "both models")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args):
    from ..run_folder import EVAL
    from .run import EvalSettings, evaluate

    settings = EvalSettings(texts=names(args.texts), seq_len=args.seq_len,
                            sequences=args.sequences, layer_sequences=args.layer_sequences,
                            passkey_lengths=args.passkey_lengths, passkey_trials=args.passkey_trials,
                            multikey_keys=tuple(args.multikey_keys), multikey_lengths=args.multikey_lengths,
                            multikey_trials=args.multikey_trials,
                            generation_prompts=args.generation_prompts, generation_tokens=args.generation_tokens,
                            prompts=args.prompts,
                            limit=args.limit, skip=names(args.skip), device=args.device,
                            dtype=args.dtype, student=TrainingFree.from_args(args))
    res = evaluate(args.path, settings, args.teacher, progress=not args.no_progress)
    print_tables(res)
    print(f"results written to {Path(args.path) / EVAL}")


def print_tables(res: dict):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "texts" in res:
        t = Table(title="teacher vs student on held-out text")
        t.caption = ("KL = mean KL(teacher || student) per token; top-1 = argmax agreement; MSE = mean layer error; "
                     "a file by its name (eval.json: its path)")
        for col in ("text", "tokens", "ppl teacher", "ppl student", "KL", "top-1", "MSE"):
            t.add_column(col, justify="right", no_wrap=True)
        base = res.get("baseline")
        for name, r in res["texts"].items():
            mse = res.get("layer_mse", {}).get(name)
            t.add_row(Path(name).name, str(r["tokens"]), f"{r['teacher_ppl']:.2f}", f"{r['student_ppl']:.2f}", f"{r['kl']:.3f}",
                      f"{r['top1']:.1%}", f"{sum(mse) / len(mse):.2e}" if mse else "-")
            if base and name in base["texts"]:
                b = base["texts"][name]
                t.add_row(f"  streaming {base['sinks']}+{base['window']}", "", "", f"{b['student_ppl']:.2f}",
                          f"{b['kl']:.3f}", f"{b['top1']:.1%}", "")
            if base and (off := base.get("memory_off", {}).get("texts", {}).get(name)):
                t.add_row("  student, memory off", "", "", f"{off['student_ppl']:.2f}", f"{off['kl']:.3f}",
                          f"{off['top1']:.1%}", "")
        if base:
            t.caption += (f"; streaming S+W: the teacher untrained over S sinks + its last W tokens, a decoding "
                          f"state of {base['state_bytes'] / 2**20:.2f} MiB (student: "
                          f"{base['student_state_bytes'] / 2**20:.2f} MiB); memory off: the student reading its window "
                          "and sinks only (what the linear memory adds is the difference)")
        console.print(t)
    if "generation" in res:
        g = res["generation"]
        source = g.get("source", "held-out")
        console.print(f"generation ({g['prompts']} {source} prompts, {g['max_new_tokens']} greedy tokens): repeated "
                      f"4-grams teacher {g['repetition']['teacher']:.1%}, student {g['repetition']['student']:.1%}; "
                      f"the student's first {g['prefix']} tokens match the teacher's for {g['prefix_match']:.1f} "
                      f"tokens on average ({g['prefix_equal']:.0%} all equal)", markup=False)
    if "passkey" in res:
        pk = res["passkey"]
        t = Table(title=f"passkey retrieval ({pk['trials']} trials per length)")
        t.add_column("prompt tokens", justify="right")
        t.add_column("teacher", justify="right")
        t.add_column("student", justify="right")
        for i, n in enumerate(pk["tokens"]):
            t.add_row(str(n), f"{pk['teacher'][i]:.0%}", f"{pk['student'][i]:.0%}")
        console.print(t)
    if "multikey" in res:
        mk = res["multikey"]
        t = Table(title=f"multi-key recall: k facts hidden, one asked ({mk['trials']} questions per cell)")
        for col in ("length (tokens)", *(f"{who} k={k}" for k in mk["keys"] for who in ("teacher", "student"))):
            t.add_column(col, justify="right")
        for i, n in enumerate(mk["lengths"]):
            t.add_row(str(n), *(f"{mk[who][str(k)][i]:.0%}" for k in mk["keys"] for who in ("teacher", "student")))
        console.print(t)
    if "mmlu" in res:
        m = res["mmlu"]
        console.print(f"MMLU {m['num_fewshot']}-shot ({m['questions']} questions, limit {m['limit']} per subject): "
                      f"teacher {m['teacher']['acc']:.1%}, student {m['student']['acc']:.1%}")
