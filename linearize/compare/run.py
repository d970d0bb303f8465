"""Run `linearize convert` once per variant into OUT/NAME (resumable), then measure every model the same way:

    ppl          held-out perplexity of teacher and student (from each run's convert.json: the same rows)
    kl           per evaluation text (evaluate/texts.py; "sharegpt" is the held-out split of the training data) on
                 its first `kl_sequences` rows: teacher and student perplexity, their ratio, mean KL(teacher ||
                 student) per token and top-1 agreement (evaluate.agreement); the KL column is sharegpt's
    layers       per layer: the attention output MSE of the student vs the teacher on `layer_sequences` held-out rows
                 divided by the mean square of the teacher's output (transfer.attention_transfer.layer_transfer_errors,
                 relative)
    passkey      accuracy at `passkey_length` tokens (evaluate.passkey), teacher and student
    decode       tokens/s of greedy decoding after a `decode_context`-token prefill (bench.measure, in-process;
                 `linearize bench` runs each point in a fresh process for publishable numbers)
Teacher and students are measured on the conversion's --device / --dtype (ConvertSettings.placement).

Variants of one family with several --keep-softmax values share stage 1: it is trained in the first of them and
loaded by the others (`--transfer-state`), whose convert time then counts stage 2 only.
Writes OUT/compare.json and OUT/compare.md.
"""

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..device import device_name
from ..errors import LinearizeError
from ..evaluate.texts import EVAL_TEXTS
from ..layers.linear_attention import ATTENTION_PRESETS
from ..loading.student import load
from ..options import fmt as f
from ..convert.settings import ConvertSettings
from ..convert.stages import convert
from ..run_folder import COMPARE, COMPARE_TABLE, student_ppl, transfer_tensors, write_json, write_text

PARTS = ("kl", "layers", "passkey", "decode")
COLUMNS = ("variant", "teacher ppl", "student ppl", "KL", "top-1", "layer err", "passkey", "decode tok/s", "state MiB",
           "convert s")


@dataclass
class CompareSettings:
    # "streaming" is the training-free baseline (the teacher over 4 sinks + its window): every table shows it
    attentions: tuple[str, ...] = ("streaming", "lolcats", "hedgehog", "t2r", "liger", "liger-swa", "gated-delta")
    keep_softmax: tuple[int, ...] = (0,)
    kl_sequences: int = 4
    texts: tuple[str, ...] = EVAL_TEXTS
    layer_sequences: int = 2
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
        if unknown := set(self.texts) - set(EVAL_TEXTS):
            raise LinearizeError(f"unknown text(s) {sorted(unknown)}; choose from {', '.join(EVAL_TEXTS)}")
        if min(self.keep_softmax) < 0 or min(self.kl_sequences, self.layer_sequences, self.passkey_trials,
                                             self.decode_tokens) < 1:
            raise LinearizeError("--keep-softmax values must be >= 0 and counts >= 1")

    def variants(self) -> list[tuple[str, str, int]]:
        """(folder name, attention, K) for every combination."""
        return [(a if len(self.keep_softmax) == 1 else f"{a}-k{k}", a, k)
                for a in self.attentions for k in self.keep_softmax]


def _measure(model, tokenizer, teacher, texts: dict, cs: CompareSettings) -> dict:
    """The parts of one model (the teacher itself when `teacher` is None); texts: name -> token rows (N, T)."""
    from ..bench.measure import measure_point
    from ..evaluate.agreement import agreement
    from ..evaluate.passkey import passkey_accuracy
    from ..transfer.attention_transfer import layer_transfer_errors

    row = {}
    if "kl" not in cs.skip and teacher is not None:
        row["texts"] = {}
        for name, rows in texts.items():
            r = agreement(teacher, model, rows[: cs.kl_sequences], progress=False)
            row["texts"][name] = {**r, "ppl_ratio": r["student_ppl"] / r["teacher_ppl"]}
        row["kl"] = row["texts"].get("sharegpt", {}).get("kl")
        row["top1"] = row["texts"].get("sharegpt", {}).get("top1")
    if "layers" not in cs.skip and teacher is not None and "sharegpt" in texts:
        row["layer_relative_error"] = layer_transfer_errors(teacher, model.attention_modules(),
                                                            texts["sharegpt"][: cs.layer_sequences], relative=True)
    if "passkey" not in cs.skip:
        row["passkey"] = passkey_accuracy(model, tokenizer, [cs.passkey_length], cs.passkey_trials)["accuracy"][0]
    if "decode" not in cs.skip:
        point = measure_point(model, cs.decode_context, cs.decode_tokens)
        row["decode_tokens_per_s"], row["state_bytes"] = point["decode_tokens_per_s"], point["cache_bytes"]
    return row


def compare(base: ConvertSettings, cs: CompareSettings, out: str | Path, progress: bool = True, log=print) -> dict:
    """Convert and measure every variant; returns the compare.json dict."""
    from ..evaluate.texts import eval_sequences
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
        preset = ATTENTION_PRESETS[attention]
        hybrid = bool(preset.window)  # --window / --sinks: the families with a window only
        heavy_ok = hybrid and preset.linear and preset.plain_sum_memory  # --heavy: a window and a plain sum memory
        settings = replace(base, attention=attention, keep_softmax=k, window=base.window if hybrid else None,
                           sinks=base.sinks if hybrid else None, heavy=base.heavy if heavy_ok else None,
                           transfer_state=shared or base.transfer_state)
        res = convert(settings, out / name, resume=True, progress=progress, log=log)
        if shared is None and "transfer" in res:
            stage1[attention] = str(transfer_tensors(out / name))
        runs[name] = {"attention": attention, "config": settings.attention_config().to_dict(),
                      "keep_softmax": res.get("keep_softmax", []),
                      "teacher_ppl": res["teacher_ppl"], "student_ppl": student_ppl(res),
                      "convert_seconds": res.get("total_seconds", round(time.perf_counter() - t0, 1)),
                      "stage1_from": shared}
    device, dtype = base.placement()
    teacher, tokenizer = load_teacher(base.model, dtype=dtype)
    teacher = teacher.to(device)
    n = max(cs.kl_sequences, cs.layer_sequences)
    texts = {t: eval_sequences(t, tokenizer, base.seq_len, n, data=base.data) for t in cs.texts}
    result = {"settings": {"convert": asdict(base), "compare": asdict(cs)}, "teacher": {}, "variants": runs,
              "device": {"device": str(device), "name": device_name(device), "dtype": str(dtype).removeprefix("torch.")}}
    log("measuring the teacher")
    result["teacher"] = {"ppl": next(iter(runs.values()))["teacher_ppl"],
                         **_measure(teacher, tokenizer, None, texts, cs)}
    for name in runs:
        log(f"measuring {name}")
        model = load(out / name, dtype=dtype)[0].to(device)
        runs[name].update(_measure(model, tokenizer, teacher, texts, cs))
        del model
    write_json(result, out / COMPARE)
    write_text(markdown_table(result), out / COMPARE_TABLE)
    return result


def table_rows(result: dict) -> list[list[str]]:
    t = result["teacher"]
    mib = lambda r: r.get("state_bytes") and r["state_bytes"] / 2**20  # noqa: E731
    rows = [["teacher (softmax)", f(t["ppl"], ".3f"), "", "", "", "", f(t.get("passkey"), ".0%"),
             f(t.get("decode_tokens_per_s"), ".1f"), f(mib(t), ".2f"), ""]]
    for name, r in result["variants"].items():
        kept = f" (softmax in {r['keep_softmax']})" if r["keep_softmax"] else ""
        errors = r.get("layer_relative_error")
        rows.append([name + kept, f(r["teacher_ppl"], ".3f"), f(r["student_ppl"], ".3f"), f(r.get("kl"), ".4f"),
                     f(r.get("top1"), ".1%"), f(errors and sum(errors) / len(errors), ".3f"),
                     f(r.get("passkey"), ".0%"), f(r.get("decode_tokens_per_s"), ".1f"), f(mib(r), ".2f"),
                     f(r["convert_seconds"], ".0f")])
    return rows


def markdown_table(result: dict) -> str:
    cs = result["settings"]["compare"]
    head = (f"passkey at {cs['passkey_length']} tokens ({cs['passkey_trials']} trials); decode after a "
            f"{cs['decode_context']}-token prefill (median of {cs['decode_tokens']} steps); KL and top-1 on "
            f"{cs['kl_sequences']} held-out rows; layer err: mean over layers of the attention output MSE / the "
            f"teacher output's mean square ({cs['layer_sequences']} held-out rows)\n")
    if shared := sorted({r["attention"] for r in result["variants"].values() if r.get("stage1_from")}):
        head += (f"{', '.join(shared)}: the --keep-softmax variants reuse the stage 1 of the first one; their "
                 "convert time is stage 2 only\n")
    head += "\n"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(result)]
    return head + "\n".join(lines) + "\n"
