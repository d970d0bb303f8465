"""`linearize eval DIR [--teacher M]`: parser, run and the terminal table."""

from pathlib import Path

from ..options import add_placement, comma_ints, fmt, mmlu_limit, names, token_count, token_counts
from ..training_free import TrainingFree, add_arguments


def add(sub):
    from .long import LONG_TEXTS
    from .real_recall import REAL_TEXTS
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
    p.add_argument("--recall-texts", default=",".join(d.recall_texts),
                   help="part realrecall: real texts to hide the facts in (passkey and multi-key recall beside the "
                        f"repeated filler's): {', '.join(REAL_TEXTS)} or your own .txt/.jsonl/.json files or folders "
                        "(as --data reads them), comma-separated (default: %(default)s)")
    p.add_argument("--recall-lengths", type=token_counts, default=d.recall_lengths,
                   help="part realrecall: prompt lengths in tokens (default: 1k,2k,4k; the full set: 1k,2k,4k,8k,16k)")
    p.add_argument("--recall-keys", type=comma_ints, default=d.recall_keys,
                   help="part realrecall: facts hidden per prompt, 1 = passkey (default: 1,4,16)")
    p.add_argument("--recall-trials", type=int, default=d.recall_trials,
                   help="part realrecall: questions per (text, keys, length) (default: %(default)s)")
    p.add_argument("--generation-prompts", type=int, default=d.generation_prompts,
                   help="held-out prompts both models answer greedily (default: %(default)s)")
    p.add_argument("--prompts", help="prompts for the generation comparison: a .txt file (one per line) or .jsonl "
                                     "({\"text\"} or chat records); default: held-out documents of the training data")
    p.add_argument("--generation-tokens", type=int, default=d.generation_tokens,
                   help="tokens per answer (default: %(default)s)")
    p.add_argument("--limit", type=mmlu_limit, default=d.limit,
                   help="MMLU questions per subject, or 'all' (default: %(default)s; x57 subjects, 5-shot)")
    p.add_argument("--long-texts", default=",".join(d.long_texts),
                   help=f"part long: long single documents, ppl by position band: {', '.join(LONG_TEXTS)} (prose, "
                        "code, technical text) or your own text files (each one document), comma-separated "
                        "(default: %(default)s)")
    p.add_argument("--long-length", type=token_count, default=d.long_length,
                   help="part long: tokens read of each long document; a shorter one is an error (default: 8k)")
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
                            multikey_trials=args.multikey_trials, recall_texts=names(args.recall_texts),
                            recall_lengths=args.recall_lengths, recall_keys=tuple(args.recall_keys),
                            recall_trials=args.recall_trials,
                            generation_prompts=args.generation_prompts, generation_tokens=args.generation_tokens,
                            prompts=args.prompts,
                            limit=args.limit, long_texts=names(args.long_texts), long_length=args.long_length,
                            skip=names(args.skip), device=args.device,
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
        t = Table(title=f"passkey retrieval, {pk.get('filler', 'repeated (easy)')} filler ({pk['trials']} trials per "
                        f"length{beyond(pk)})")
        t.add_column("prompt tokens", justify="right")
        t.add_column("teacher", justify="right")
        t.add_column("student", justify="right")
        for i, n in enumerate(pk["tokens"]):
            t.add_row(str(n), fmt(pk["teacher"][i], ".0%"), fmt(pk["student"][i], ".0%"))
        console.print(t)
    if "multikey" in res:
        mk = res["multikey"]
        t = Table(title=f"multi-key recall: k facts hidden, one asked, {mk.get('filler', 'repeated (easy)')} filler "
                        f"({mk['trials']} questions per cell{beyond(mk)})")
        for col in ("length (tokens)", *(f"{who} k={k}" for k in mk["keys"] for who in ("teacher", "student"))):
            t.add_column(col, justify="right")
        for i, n in enumerate(mk["lengths"]):
            t.add_row(str(n), *(fmt(mk[who][str(k)][i], ".0%") for k in mk["keys"] for who in ("teacher", "student")))
        console.print(t)
    if "realrecall" in res:
        print_realrecall(console, res["realrecall"])
    if "long" in res:
        print_long(console, res["long"])
    if "mmlu" in res:
        m = res["mmlu"]
        console.print(f"MMLU {m['num_fewshot']}-shot ({m['questions']} questions, limit {m['limit']} per subject): "
                      f"teacher {m['teacher']['acc']:.1%}, student {m['student']['acc']:.1%}")


def beyond(part: dict) -> str:
    """A recall table's note on lengths the teacher was not asked (beyond its context: "-")."""
    limit = part.get("teacher_context")
    return "" if limit is None or max(part["lengths"]) <= limit else f"; teacher: - beyond its {limit}-token context"


def print_realrecall(console, rr: dict):
    """The part "realrecall": accuracy per (text, length) and k for each model, then pooled per format and depth."""
    from rich.table import Table

    short = {"teacher": "T", "student": "S", "streaming": "B"}
    whos = list(rr["models"])
    t = Table(title=f"recall in real text: k facts hidden, one asked ({rr['trials']} questions per text, k and length)")
    for col in ("text", "length", *(f"k={k} {short.get(w, w)}" for k in rr["keys"] for w in whos),
                *(f"all {short.get(w, w)}" for w in whos)):
        t.add_column(col, justify="right", no_wrap=True)

    def pct(x):
        return "-" if x is None else f"{x:.0%}"

    for name in rr["tokens"]:
        for i, n in enumerate(rr["lengths"]):
            t.add_row(Path(name).name if i == 0 else "", str(n),
                      *(pct(rr["models"][w]["by_text"][name][str(k)][i]) for k in rr["keys"] for w in whos), "")
    for i, n in enumerate(rr["lengths"]):
        t.add_row("all texts" if i == 0 else "", str(n),
                  *(pct(rr["models"][w]["accuracy"][str(k)][i]) for k in rr["keys"] for w in whos),
                  *(pct(rr["models"][w]["by_length"][i]) for w in whos))
    t.caption = (f"T = teacher, S = student, B = the teacher as StreamingLLM ({rr.get('sinks', 4)} sinks + its last "
                 f"{rr.get('window', '?')} tokens, the student's state bytes); length: the prompt tokens asked for; "
                 "the passkey / multi-key tables above hide the facts in a repeated filler (the easy case)")
    console.print(t)
    t = Table(title="recall in real text by fact format and by depth (all texts, k and lengths)")
    for col in ("", *whos):
        t.add_column(col, justify="right", no_wrap=True)
    for fmt, needle in rr["formats"].items():
        t.add_row(needle.format(name="NAME", n="N"), *(pct(rr["models"][w]["by_format"][fmt]) for w in whos))
    for depth in rr["depths"]:
        t.add_row(f"depth {depth:.0%}", *(pct(rr["models"][w]["by_depth"][str(depth)]) for w in whos))
    console.print(t)


def band_name(start: int, end: int) -> str:
    """(1024, 2048) -> "1k-2k"."""
    def short(n):
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
    return f"{short(start)}-{short(end)}"


def print_long(console, long: dict):
    """The part "long": per document and pooled, per position band, each model's ppl and its ratio to the
    teacher's."""
    from rich.table import Table

    t = Table(title=f"perplexity by position on long documents ({long['length']} tokens each): ppl x its ratio "
                    "to the teacher's; all: the documents pooled")
    models = list(long["all"])
    for col in ("text", "band", *(who.replace("_", " ") for who in models)):
        t.add_column(col, justify="right", no_wrap=True)
    bands = [band_name(*b) for b in long["bands"]]

    def cell(r, who, i):
        ppl, ratio = r[who]["ppl"][i], r[who]["ratio"][i]
        if ppl is None:
            return "-"
        text = f"{ppl:.2f}" if ppl < 100 else f"{ppl:.1f}"
        return text if who == "teacher" else f"{text} x{ratio:.2f}"

    for name, r in [*((Path(n).name, v["models"]) for n, v in long["texts"].items()), ("all", long["all"])]:
        for i, band in enumerate(bands):
            t.add_row(name if i == 0 else "", band, *(cell(r, who, i) for who in models))
    if from_1k := long.get("from_1k"):
        t.add_row("", ">= 1k", *(cell({w: {k: [v] for k, v in from_1k[w].items()} for w in models}, who, 0)
                                 for who in models))
    nbytes = ", ".join(f"{who.replace('_', ' ')} {b / 2**20:.2f} MiB" for who, b in long["state_bytes"].items())
    t.caption = (f"state bytes: {nbytes} (the teacher's: its KV cache after {long['length']} tokens); memory off: "
                 f"the student's window + sinks + cache; streaming: the teacher over {long['sinks']} sinks + its "
                 f"last {long['window']} tokens")
    console.print(t)
