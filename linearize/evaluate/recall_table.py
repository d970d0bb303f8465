"""docs/results/recall.json and recall.md (issue 12): where a converted model loses recall, in one command
(scripts/recall_table.py runs it).

    python scripts/recall_table.py --run runs/w64-s4-kl [--device cuda --dtype bfloat16] [--keep 0,2,4,8,15,30]
        [--select transfer,recall] [--passkey-lengths 256,512,1k,2k,4k] [--multikey-lengths 1k,2k,4k,8k,16k]
        [--multikey-keys 4,16] [--trials 20] [--state-contexts 1k,32k] [--ppl-sequences 8] [--cache M] [--cache-every N]
        [--memory-cap C] [--resume]

Variants: the teacher; the converted run ("student", K = 0); the run with K of its linearized layers switched back
to the teacher's exact softmax attention, training free (evaluate/recall_layers.py; K = every layer is the
teacher again), the K layers chosen by
    transfer   the largest attention-transfer error (the run's convert.json layer_mse: what --keep-softmax keeps)
    recall     the largest gain of a retrieval probe when that layer alone is switched (rank_layers_for_recall;
               the probe's prompts are unlike the eval's)
    first, last   the first / last K linearized layers
A layer set already measured under another name is not measured again ("same_as").

Per variant: passkey {length: accuracy}, multikey {k: {length: accuracy}} (evaluate/passkey.py, --trials each),
ppl (held-out ShareGPT of the run's data: --ppl-sequences x 1024 tokens), softmax_layers, and state_bytes
{context: bytes}: for the converted variants measured after prefilling that many random token ids
(generate/decoding.py, in blocks of 2048); for the teacher computed from its config (keys and values of every
layer, what its KV cache holds; not prefilled). recall.json: {variant: row, ..., "about": {run, teacher, settings, device, ranking}},
written after every variant (atomically); --resume keeps the variants it has. --real-text EVAL_JSON and --cells
EVAL_JSON measure nothing: they merge `linearize eval`'s part realrecall ("real_text"), or its passkey and multi-key
cells (into the teacher and student rows, each with the command that measured it: long cells run on another core).
"""

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..device import device_name, placement
from ..errors import LinearizeError
from ..loading.student import load_student
from ..loading.teacher import load_teacher_of
from ..options import add_placement, comma_ints, fmt, names, token_count, token_counts
from ..run_folder import read_json, training_data, write_json, write_text
from ..training_free import TrainingFree, add_arguments

SELECTIONS = ("transfer", "recall", "first", "last")
ABOUT = "about"  # the recall.json entry that is not a variant: run, teacher, settings, device, layer rankings
REAL_TEXT = "real_text"  # nor this one: `linearize eval`'s part realrecall of a run, merged in by --real-text
NOT_VARIANTS = (ABOUT, REAL_TEXT)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a converted run folder (read only); required unless --real-text")
    p.add_argument("--real-text", metavar="EVAL_JSON",
                   help="measure nothing: merge this eval.json's part realrecall (facts in real text: teacher, "
                        "student and StreamingLLM of equal bytes on the same questions) into --out as 'real_text'")
    p.add_argument("--cells", metavar="EVAL_JSON",
                   help="measure nothing: add this eval.json's passkey and multi-key cells (lengths the table has not "
                        "asked, e.g. 32k, measured by `linearize eval` on another core) to --out's teacher and student "
                        "rows, each cell recorded with the command that measured it")
    p.add_argument("--keep", type=comma_ints, default=[0, 2, 4, 8, 15, 30],
                   help="K layers switched back to softmax (default: 0,2,4,8,15,30)")
    p.add_argument("--select", type=names, default=("transfer", "recall"),
                   help=f"how the K layers are chosen, among {', '.join(SELECTIONS)} (default: transfer,recall)")
    p.add_argument("--passkey-lengths", type=token_counts, default=(256, 512, 1024, 2048, 4096))
    p.add_argument("--multikey-lengths", type=token_counts, default=(1024, 2048, 4096, 8192, 16384))
    p.add_argument("--multikey-keys", type=comma_ints, default=[4, 16])
    p.add_argument("--trials", type=int, default=20, help="trials per (test, length) (default: %(default)s)")
    p.add_argument("--state-contexts", type=token_counts, default=(1024, 32768),
                   help="contexts at which the decoding state is measured (default: 1k,32k)")
    p.add_argument("--ppl-sequences", type=int, default=8, help="held-out rows of 1024 tokens (default: 8)")
    p.add_argument("--probes", type=int, default=4, help="retrieval probe prompts for the recall ranking")
    p.add_argument("--probe-length", type=token_count, default=1024, help="tokens per probe prompt (default: 1k)")
    add_arguments(p, ("cache", "cache_every", "cache_position", "memory_cap"))  # as `linearize eval`
    p.set_defaults(cache=0)  # recorded as 0 in the settings, read as "as converted"
    p.add_argument("--out", default="docs/results/recall.json", help="the JSON; the markdown table goes beside it")
    p.add_argument("--resume", action="store_true", help="keep the variants an earlier --out already has")
    add_placement(p, "both models")
    args = p.parse_args(argv)
    if not args.run and not args.real_text and not args.cells:
        p.error("give --run (measure a run), --real-text EVAL_JSON or --cells EVAL_JSON (merge one)")
    if unknown := set(args.select) - set(SELECTIONS):
        p.error(f"unknown --select {sorted(unknown)}; choose from {', '.join(SELECTIONS)}")
    if min(args.trials, args.ppl_sequences, args.probes) < 1 or min(args.keep) < 0:
        p.error("--trials, --ppl-sequences and --probes must be >= 1, --keep values >= 0")
    return args


def choose(selection: str, k: int, candidates: list[int], ranking: dict) -> list[int]:
    """The K layers a selection switches, sorted."""
    if k > len(candidates):
        raise LinearizeError(f"K = {k} exceeds the {len(candidates)} linearized layers of the run; lower --keep")
    order = {"first": candidates, "last": candidates[::-1]}[selection] if selection in ("first", "last") else \
        ranking[selection]["order"]
    return sorted(order[:k])


def measure(model, tokenizer, args, rows) -> dict:
    """passkey, multikey and ppl of one model (the state bytes are added by the caller)."""
    from linearize.evaluate.passkey import context_limit, multikey_accuracy, passkey_accuracy
    from linearize.evaluate.perplexity import perplexity

    limit = context_limit(model)  # the teacher is not asked beyond its context: None there
    pk = passkey_accuracy(model, tokenizer, list(args.passkey_lengths), args.trials, limit=limit)
    mk = multikey_accuracy(model, tokenizer, list(args.multikey_keys), list(args.multikey_lengths), args.trials,
                           limit=limit)
    return {"passkey": dict(zip(map(str, pk["lengths"]), pk["accuracy"])),
            "multikey": {k: dict(zip(map(str, mk["lengths"]), acc)) for k, acc in mk["accuracy"].items()},
            "ppl": perplexity(model, rows, progress=False)}


def markdown(result: dict) -> str:
    variants = result["variants"]
    any_row = next(iter(variants.values()))
    lengths = sorted({n for r in variants.values() for n in r["passkey"]}, key=int)  # a teacher may lack the longest
    keys = {k: sorted({n for r in variants.values() for n in r["multikey"].get(k, {})}, key=int)
            for k in any_row["multikey"]}
    contexts = list(any_row["state_bytes"])
    head = ["variant", "softmax layers", "ppl", *[f"passkey {n}" for n in lengths],
            *[f"{k} keys {n}" for k, ns in keys.items() for n in ns], *[f"state MiB {c}" for c in contexts]]
    lines = [f"Recall of {result['run']} vs its teacher ({result['device']['name']}, {result['device']['dtype']}; "
             f"{result['settings']['trials']} trials per cell; `python scripts/recall_table.py`, settings in "
             "recall.json). Teacher state: its KV cache computed from the config.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in variants.items():
        layers = r["softmax_layers"]
        shown = "all" if name == "teacher" else ",".join(map(str, layers)) or "-"
        lines.append("| " + " | ".join([
            name, shown + (f" (= {r['same_as']})" if "same_as" in r else ""), f"{r['ppl']:.3f}",
            *[fmt(r["passkey"].get(n), ".0%") for n in lengths],
            *[fmt(r["multikey"].get(k, {}).get(n), ".0%") for k, ns in keys.items() for n in ns],
            *[f"{r['state_bytes'][c] / 2**20:.2f}" for c in contexts]]) + " |")
    added = {}  # cell -> (command, trials): the cells --cells added, with who they were measured for
    for name, r in variants.items():
        for cell, source in r.get("cells_from", {}).items():
            added.setdefault((cell, source["command"], source["trials"]), []).append(name)
    if added:
        lines += ["", "Cells added from `linearize eval` (`--cells`):", ""]
        lines += [f"- {cell} ({', '.join(who)}; {trials} trials): `{command}`"
                  for (cell, command, trials), who in added.items()]
    return "\n".join(lines) + "\n"


def merge_real_text(eval_json: Path, out: Path) -> dict:
    """recall.json (out) with entry REAL_TEXT set from eval_json's part realrecall; written with its markdown."""
    from .run import EvalSettings, part_command

    ev = read_json(eval_json)
    if not ev or "realrecall" not in ev:
        raise LinearizeError(f"{eval_json} has no part realrecall; run `linearize eval RUN` without --skip realrecall")
    recall = read_json(out) or {}
    command = part_command(ev["model"], EvalSettings.from_dict(ev.get("settings", {})), "realrecall")
    recall[REAL_TEXT] = {"run": ev["model"], "command": command, "from": str(eval_json), "device": ev.get("device"),
                         **ev["realrecall"]}
    write_recall(recall, out)
    return recall


def merge_cells(eval_json: Path, out: Path) -> dict:
    """recall.json (out) with eval_json's passkey and multi-key cells put into its "teacher" and "student" rows (a
    teacher's None, a length beyond its context, is left out); each cell's command, trials and source file under the
    row's "cells_from". Refused where the eval's student settings differ from the table's."""
    from .run import EvalSettings, part_command

    ev, recall = read_json(eval_json), read_json(out)
    if not ev or not {"passkey", "multikey"} & set(ev):
        raise LinearizeError(f"{eval_json} has no part passkey or multikey; run `linearize eval RUN` with them")
    if not recall or not {"teacher", "student"} <= set(recall):
        raise LinearizeError(f"{out} has no teacher and student rows to add cells to; run "
                             "`python scripts/recall_table.py --run RUN` first")
    settings = EvalSettings.from_dict(ev.get("settings", {}))
    table_given = student_settings(recall[ABOUT]["settings"]).given()
    if settings.student.given() != table_given:
        raise LinearizeError(f"{eval_json} measured the student with {settings.student.given() or 'its own settings'}, "
                             f"{out} with {table_given or 'its own settings'}: rerun eval with the table's flags")
    for part in ("passkey", "multikey"):
        if part not in ev:
            continue
        res, source = ev[part], {"from": str(eval_json), "command": part_command(ev["model"], settings, part),
                                 "trials": ev[part]["trials"]}
        for who in ("teacher", "student"):
            row = recall[who]
            by_keys = {None: res[who]} if part == "passkey" else res[who]  # k -> accuracy per length
            for k, accuracies in by_keys.items():
                target = row[part] if k is None else row[part].setdefault(k, {})
                for n, acc in zip(res["lengths"], accuracies):
                    if acc is not None:
                        target[str(n)] = acc
                        cell = f"{part} {n}" if k is None else f"{part} {k} {n}"
                        row.setdefault("cells_from", {})[cell] = source
    write_recall(recall, out)
    return recall


def student_settings(settings: dict) -> TrainingFree:
    """The student's training-free settings of the table's settings (parsed flags as a dict, or about.settings):
    a cache of 0 reads as "as converted"."""
    return TrainingFree(cache=settings.get("cache") or None, cache_every=settings.get("cache_every"),
                        memory_cap=settings.get("memory_cap"), cache_position=settings.get("cache_position"))


def write_recall(recall: dict, out: Path) -> None:
    """recall.json's entries (variants, ABOUT, REAL_TEXT) to `out`, and their tables to its .md beside it."""
    write_json(recall, out)
    variants = {k: v for k, v in recall.items() if k not in NOT_VARIANTS}
    tables = [markdown({**recall[ABOUT], "variants": variants})] if variants else []
    if REAL_TEXT in recall:
        tables.append(real_text_markdown(recall[REAL_TEXT]))
    write_text("\n".join(tables), out.with_suffix(".md"))


def real_text_markdown(rr: dict) -> str:
    """The real-text rows: accuracy per k and length for each model, all texts pooled."""
    lengths, models = rr["lengths"], list(rr["models"])
    lines = ["## Facts in real text", "", f"`{rr['command']}` ({rr['trials']} questions per text, k and length; texts: "
             f"{', '.join(rr['texts'])}; StreamingLLM of equal state bytes: {rr.get('sinks')} sinks + "
             f"{rr.get('window')} tokens). Per format and depth: the JSON beside this file.", "",
             "| model | " + " | ".join(f"k = {k}, {n}" for k in rr["keys"] for n in lengths) + " |",
             "|---|" + "---|" * (len(rr["keys"]) * len(lengths))]
    for who in models:
        acc = rr["models"][who]["accuracy"]
        lines.append(f"| {who} | " + " | ".join(f"{acc[str(k)][i]:.0%}" for k in rr["keys"]
                                                for i in range(len(lengths))) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from ..models.linearized import linearized_layers
    from .baseline import kv_cache_bytes, state_bytes
    from .recall_layers import rank_layers_for_recall, teacher_attention
    from .texts import eval_sequences

    args = parse(argv)
    out = Path(args.out)
    if args.real_text:
        merge_real_text(Path(args.real_text), out)
        print(f"written {out} ('{REAL_TEXT}') and {out.with_suffix('.md')}")
        return
    if args.cells:
        merge_cells(Path(args.cells), out)
        print(f"written {out} (cells of {args.cells}) and {out.with_suffix('.md')}")
        return
    device, dtype = placement(args.device, args.dtype)
    student, tokenizer = load_student(args.run, device, dtype, student_settings(vars(args)))
    teacher, spec = load_teacher_of(args.run, None, device, dtype)
    rows = eval_sequences("sharegpt", tokenizer, 1024, args.ppl_sequences, data=training_data(args.run))
    candidates = linearized_layers(student.attention_modules())
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    earlier = (read_json(out) or {}) if args.resume else {}
    result = {"run": args.run, "teacher": spec, "settings": settings,
              "device": {"device": str(device), "name": device_name(device), "dtype": str(dtype).removeprefix("torch.")},
              "ranking": earlier.get(ABOUT, {}).get("ranking", {}),
              "variants": {k: v for k, v in earlier.items() if k not in NOT_VARIANTS}}
    real_text = {REAL_TEXT: earlier[REAL_TEXT]} if REAL_TEXT in earlier else {}

    def save():  # the file: one entry per variant, what was measured how under ABOUT, and an earlier REAL_TEXT
        write_recall({**result["variants"], ABOUT: {k: v for k, v in result.items() if k != "variants"}, **real_text},
                     out)

    if "transfer" in args.select and "transfer" not in result["ranking"]:
        mse = read_json(Path(args.run) / "convert.json").get("layer_mse")
        if not mse:
            raise LinearizeError(f"{args.run}/convert.json has no layer_mse to rank layers by; drop 'transfer' "
                                 "from --select")
        result["ranking"]["transfer"] = {"order": sorted(candidates, key=lambda i: -mse[i]), "layer_mse": mse}
    if "recall" in args.select and "recall" not in result["ranking"]:
        order, gains = rank_layers_for_recall(student, teacher, tokenizer, args.probes, args.probe_length)
        result["ranking"]["recall"] = {"order": order, "gain_nats": {str(i): g for i, g in gains.items()},
                                       "probes": args.probes, "probe_length": args.probe_length}

    plan = {"teacher": None, "student": []}
    for selection in args.select:
        for k in args.keep:
            if k:
                plan[f"{selection}-k{k}"] = choose(selection, k, candidates, result["ranking"])
    bar = tqdm(plan.items(), desc="recall variants", unit="variant")
    for name, layers in bar:
        bar.set_postfix_str(name)
        if name in result["variants"]:
            continue
        t0 = time.perf_counter()
        same = next((n for n, r in result["variants"].items() if layers is not None and n != "teacher"
                     and r["softmax_layers"] == layers and "same_as" not in r), None)
        if same:
            row = {**result["variants"][same], "same_as": same}
        elif layers is None:
            row = measure(teacher, tokenizer, args, rows)
            row["state_bytes"] = {str(c): kv_cache_bytes(teacher.config, c, dtype.itemsize) for c in args.state_contexts}
            row["state_bytes_from"] = "config (KV cache of every layer)"
        else:
            with teacher_attention(student, teacher, layers):
                row = measure(student, tokenizer, args, rows)
                row["state_bytes"] = {str(c): state_bytes(student, c) for c in args.state_contexts}
                row["state_bytes_from"] = ("measured: the largest over a cache selection cycle after a prefill of "
                                           "random token ids")
        row["softmax_layers"] = list(range(teacher.config.num_hidden_layers)) if layers is None else layers
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["variants"][name] = row
        save()
    save()
    print(markdown(result))
    print(f"written {out} and {out.with_suffix('.md')}")
