"""Run `linearize convert` once per variant into OUT/NAME (resumable), then measure every model the same way:

    ppl          held-out perplexity of teacher and student (from each run's convert.json: the same rows)
    kl           mean KL(teacher || student) per token on the first `kl_sequences` held-out rows (evaluate.agreement)
    passkey      accuracy at `passkey_length` tokens (evaluate.passkey), teacher and student
    decode       tokens/s of greedy decoding after a `decode_context`-token prefill (bench.measure, in-process;
                 `linearize bench` runs each point in a fresh process for publishable numbers)

Variants of one family with several --keep-softmax values share stage 1: it is trained in the first of them and
loaded by the others (`--transfer-state`), whose convert time then counts stage 2 only.
Writes OUT/compare.json and OUT/compare.md.
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import LinearizeError
from ..layers.linear_attention import ATTENTION_PRESETS
from ..options import fmt as f
from ..pipeline import ConvertSettings, convert
from ..run_folder import COMPARE, COMPARE_TABLE, load, transfer_tensors, write_json, write_text

PARTS = ("kl", "passkey", "decode")
COLUMNS = ("variant", "teacher ppl", "student ppl", "KL", "passkey", "decode tok/s", "state MiB", "convert s")


@dataclass
class CompareSettings:
    # "streaming" is the training-free baseline (the teacher over 4 sinks + its window): every table shows it
    attentions: tuple[str, ...] = ("streaming", "lolcats", "hedgehog", "t2r", "liger", "liger-swa", "gated-delta")
    keep_softmax: tuple[int, ...] = (0,)
    kl_sequences: int = 4
    passkey_length: int = 2048
    passkey_trials: int = 5
    decode_context: int = 8192
    decode_tokens: int = 16
    skip: tuple[str, ...] = ()

    def check(self):
        if unknown := [a for a in self.attentions if a not in ATTENTION_PRESETS]:
            raise LinearizeError(f"unknown attention {unknown[0]!r}; choose from {', '.join(sorted(ATTENTION_PRESETS))}")
        if unknown := set(self.skip) - set(PARTS):
            raise LinearizeError(f"unknown part(s) to skip {sorted(unknown)}; choose from {', '.join(PARTS)}")
        if min(self.keep_softmax) < 0 or min(self.kl_sequences, self.passkey_trials, self.decode_tokens) < 1:
            raise LinearizeError("--keep-softmax values must be >= 0 and counts >= 1")

    def variants(self) -> list[tuple[str, str, int]]:
        """(folder name, attention, K) for every combination."""
        return [(a if len(self.keep_softmax) == 1 else f"{a}-k{k}", a, k)
                for a in self.attentions for k in self.keep_softmax]


def _measure(model, tokenizer, teacher, heldout, cs: CompareSettings) -> dict:
    from ..bench.measure import measure_point
    from ..evaluate.agreement import agreement
    from ..evaluate.passkey import passkey_accuracy

    row = {}
    if "kl" not in cs.skip and teacher is not None:
        row["kl"] = agreement(teacher, model, heldout[: cs.kl_sequences], progress=False)["kl"]
    if "passkey" not in cs.skip:
        row["passkey"] = passkey_accuracy(model, tokenizer, [cs.passkey_length], cs.passkey_trials)["accuracy"][0]
    if "decode" not in cs.skip:
        point = measure_point(model, cs.decode_context, cs.decode_tokens)
        row["decode_tokens_per_s"], row["state_bytes"] = point["decode_tokens_per_s"], point["cache_bytes"]
    return row


def compare(base: ConvertSettings, cs: CompareSettings, out: str | Path, progress: bool = True, log=print) -> dict:
    """Convert and measure every variant; returns the compare.json dict."""
    from ..data import pack_sequences
    from ..loading.teacher import load_teacher

    cs.check()
    out = Path(out)
    runs = {}
    stage1 = {}  # attention -> the transfer result of its first variant: the --keep-softmax variants share stage 1
    for name, attention, k in cs.variants():
        shared = stage1.get(attention)
        kept = (f"--softmax-layers {','.join(map(str, base.softmax_layers))}" if base.softmax_layers
                else f"--keep-softmax {k}")
        log(f"== {name}: linearize convert --attention {attention} {kept} --out {out / name}"
            + (f" --transfer-state {shared}" if shared else ""))
        t0 = time.perf_counter()
        hybrid = bool(ATTENTION_PRESETS[attention].window)  # --window / --sinks: the families with a window only
        settings = replace(base, attention=attention, keep_softmax=k, window=base.window if hybrid else None,
                           sinks=base.sinks if hybrid else None,
                           transfer_state=shared or base.transfer_state)
        res = convert(settings, out / name, resume=True, progress=progress, log=log)
        if shared is None and "transfer" in res:
            stage1[attention] = str(transfer_tensors(out / name))
        runs[name] = {"attention": attention, "keep_softmax": res.get("keep_softmax", []),
                      "teacher_ppl": res["teacher_ppl"], "student_ppl": res.get("stage2_ppl", res["stage1_ppl"]),
                      "convert_seconds": res.get("total_seconds", round(time.perf_counter() - t0, 1)),
                      "stage1_from": shared}
    teacher, tokenizer = load_teacher(base.model)
    heldout = pack_sequences(base.data, tokenizer, base.seq_len, base.eval_tokens // base.seq_len, split="heldout")
    result = {"settings": {"convert": asdict(base), "compare": asdict(cs)}, "teacher": {}, "variants": runs}
    log("measuring the teacher")
    result["teacher"] = {"ppl": next(iter(runs.values()))["teacher_ppl"],
                         **_measure(teacher, tokenizer, None, heldout, cs)}
    for name in runs:
        log(f"measuring {name}")
        model, _ = load(out / name)
        runs[name].update(_measure(model, tokenizer, teacher, heldout, cs))
        del model
    write_json(result, out / COMPARE)
    write_text(markdown_table(result), out / COMPARE_TABLE)
    return result


def table_rows(result: dict) -> list[list[str]]:
    t = result["teacher"]
    mib = lambda r: r.get("state_bytes") and r["state_bytes"] / 2**20  # noqa: E731
    rows = [["teacher (softmax)", f(t["ppl"], ".3f"), "", "", f(t.get("passkey"), ".0%"),
             f(t.get("decode_tokens_per_s"), ".1f"), f(mib(t), ".2f"), ""]]
    for name, r in result["variants"].items():
        kept = f" (softmax in {r['keep_softmax']})" if r["keep_softmax"] else ""
        rows.append([name + kept, f(r["teacher_ppl"], ".3f"), f(r["student_ppl"], ".3f"), f(r.get("kl"), ".4f"),
                     f(r.get("passkey"), ".0%"), f(r.get("decode_tokens_per_s"), ".1f"), f(mib(r), ".2f"),
                     f(r["convert_seconds"], ".0f")])
    return rows


def markdown_table(result: dict) -> str:
    cs = result["settings"]["compare"]
    head = (f"passkey at {cs['passkey_length']} tokens ({cs['passkey_trials']} trials); decode after a "
            f"{cs['decode_context']}-token prefill (median of {cs['decode_tokens']} steps); KL on "
            f"{cs['kl_sequences']} held-out rows\n")
    if shared := sorted({r["attention"] for r in result["variants"].values() if r.get("stage1_from")}):
        head += (f"{', '.join(shared)}: the --keep-softmax variants reuse the stage 1 of the first one; their "
                 "convert time is stage 2 only\n")
    head += "\n"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return head + "\n".join(lines) + "\n"
