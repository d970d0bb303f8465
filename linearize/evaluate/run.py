"""`linearize eval DIR`: how close a converted model is to its teacher. Writes DIR/eval.json:

    model, teacher             the folder evaluated and its teacher (None = bundled SmolLM2)
    settings                   the EvalSettings used
    texts.NAME                 per evaluation text (see texts.py; NAME: a built-in text or a file as given):
                               tokens, teacher_ppl, student_ppl,
                               kl (mean KL(teacher || student), nats/token), top1 (argmax agreement)
    layer_mse.NAME             per layer: attention output MSE of the student vs the teacher on that text
    passkey                    lengths, tokens (mean prompt length), trials, teacher / student: accuracy per length,
                               filler: "repeated (easy)" (the needle is the one surprising span of a repeated text)
    multikey                   keys (k facts per prompt), lengths, trials, tokens {k: mean prompt length per length},
                               teacher / student: {k: accuracy per length}, filler (evaluate/passkey.py)
    realrecall                 passkey (k = 1) and multi-key (k = 4, 16) recall with the facts hidden in spans of
                               real text (settings.recall_texts), several fact formats, at several depths: teacher,
                               student and StreamingLLM of equal bytes on the same questions; per model accuracy
                               {k: per length}, by_length, by_text, by_format, by_depth, cells per (text, format,
                               length, depth); window, sinks, state_bytes (evaluate/real_recall.py)
    baseline                   the teacher as StreamingLLM (4 sinks + the window W whose state has the student's
                               bytes; evaluate/baseline.py): attention, window, sinks, state_bytes,
                               student_state_bytes, texts.NAME as above (teacher vs baseline);
                               memory_off.texts.NAME: the student with its linear memory switched off (window +
                               sinks alone, models/linearized.without_memory): what the memory is worth
    generation                 greedy answers to held-out prompts (or settings.prompts, a file): source,
                               repetition {teacher, student} (repeated 4-gram
                               share), prefix_match (first 32 tokens shared with the teacher), examples
    mmlu                       limit (questions per subject), num_fewshot, questions, teacher / student:
                               {acc, acc_stderr, subjects: {subject: acc}}
    long                       perplexity by position band on long single documents (settings.long_texts cut to
                               long_length tokens): teacher, student, memory off (window + sinks + cache),
                               StreamingLLM of equal bytes; per model and band ppl and ratio to the teacher, state
                               bytes, command (evaluate/long.py; docs/results copies this dict)
    seconds                    wall time of each part
    device                     where both models ran: {device, name, dtype}
"""

import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..device import device_name, placement
from ..errors import LinearizeError
from ..loading.student import load_student
from ..loading.teacher import load_teacher_of
from ..run_folder import EVAL, training_data, write_json
from ..training_free import TrainingFree
from .long import LONG_LENGTH, LONG_TEXTS, check_long_text
from .real_recall import RECALL_KEYS, RECALL_LENGTHS, RECALL_TRIALS, REAL_TEXTS, check_recall_text
from .texts import EVAL_TEXTS, check_text, eval_sequences

PARTS = ("ppl", "baseline", "layers", "passkey", "multikey", "realrecall", "generation", "mmlu",
         "long")


@dataclass
class EvalSettings:
    texts: tuple[str, ...] = EVAL_TEXTS
    seq_len: int = 1024
    sequences: int = 8  # rows per text for ppl / KL / top-1
    layer_sequences: int = 2  # rows per text for the per-layer error
    passkey_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    passkey_trials: int = 20
    multikey_keys: tuple[int, ...] = (4, 16)  # facts hidden per prompt (one is asked)
    multikey_lengths: tuple[int, ...] = (1024, 2048, 4096)  # 8k, 16k by option: minutes per length on a CPU
    multikey_trials: int = 20
    recall_texts: tuple[str, ...] = REAL_TEXTS  # part realrecall: real texts the facts are hidden in (or files)
    recall_keys: tuple[int, ...] = RECALL_KEYS  # facts hidden per prompt
    recall_lengths: tuple[int, ...] = RECALL_LENGTHS  # prompt tokens (8k, 16k by option)
    recall_trials: int = RECALL_TRIALS  # questions per (text, keys, length)
    generation_prompts: int = 50  # held-out prompts answered greedily by both models (evaluate/generation.py)
    prompts: str | None = None  # a prompts file instead of held-out ones (generation.file_prompts)
    generation_tokens: int = 64
    limit: int | None = 5  # MMLU questions per subject (None = all 14,042)
    long_texts: tuple[str, ...] = LONG_TEXTS  # long single documents (evaluate/long.py) or files, one each
    long_length: int = LONG_LENGTH  # tokens read of each long document (a shorter one is an error)
    skip: tuple[str, ...] = ()
    device: str = "auto"  # both models: "auto" (CUDA when torch sees one, else CPU) | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    student: TrainingFree = field(default_factory=TrainingFree)  # the student's training-free settings (--cache,
    # --cache-every, --memory-cap, --heavy, --cache-position; None: as converted)

    def to_dict(self) -> dict:
        """eval.json's "settings": the student's training-free settings flat beside the others."""
        settings = asdict(self)
        student = settings.pop("student")
        return {**settings, **student}

    @classmethod
    def from_dict(cls, settings: dict) -> "EvalSettings":
        """The settings of eval.json's "settings" (to_dict); fields it lacks (an older file) at their defaults."""
        own = {f.name for f in fields(cls)} - {"student"}
        student = TrainingFree(**{f.name: settings.get(f.name) for f in fields(TrainingFree)})
        return cls(**{k: v for k, v in settings.items() if k in own}, student=student)

    def check(self):
        if unknown := set(self.skip) - set(PARTS):
            raise LinearizeError(f"unknown part(s) to skip {sorted(unknown)}; choose from {', '.join(PARTS)}")
        for name in self.texts:
            check_text(name)
        for name in self.long_texts:
            check_long_text(name)
        for name in self.recall_texts:
            check_recall_text(name)
        if self.prompts is not None:
            from .generation import check_prompts  # (imports transformers: not at `linearize --help` time)

            check_prompts(self.prompts)
        if min(self.seq_len, self.sequences, self.layer_sequences, self.passkey_trials, *self.passkey_lengths,
               self.multikey_trials, *self.multikey_keys, *self.multikey_lengths, self.recall_trials,
               *self.recall_keys, *self.recall_lengths, self.generation_prompts,
               self.generation_tokens) < 1:
            raise LinearizeError("sizes and counts must be >= 1")
        from .passkey import NAMES  # (imports transformers: not at `linearize --help` time)

        for flag, keys in (("--multikey-keys", self.multikey_keys), ("--recall-keys", self.recall_keys)):
            if max(keys) > len(NAMES):
                raise LinearizeError(f"{flag} takes at most {len(NAMES)} keys per prompt (the names there are); "
                                     f"got {max(keys)}")
        if self.long_length < 2:
            raise LinearizeError(f"--long-length must be at least 2 tokens (got {self.long_length})")
        if self.limit is not None and self.limit < 1:
            raise LinearizeError(f"--limit must be >= 1 (got {self.limit})")


# the flags of a part's own settings, for part_command
PART_FLAGS = {
    "long": lambda s: ["--long-texts", ",".join(s.long_texts), "--long-length", str(s.long_length)],
    "passkey": lambda s: ["--passkey-lengths", ",".join(map(str, s.passkey_lengths)),
                          "--passkey-trials", str(s.passkey_trials)],
    "multikey": lambda s: ["--multikey-keys", ",".join(map(str, s.multikey_keys)),
                           "--multikey-lengths", ",".join(map(str, s.multikey_lengths)),
                           "--multikey-trials", str(s.multikey_trials)],
    "realrecall": lambda s: ["--recall-texts", ",".join(s.recall_texts),
                             "--recall-lengths", ",".join(map(str, s.recall_lengths)),
                             "--recall-keys", ",".join(map(str, s.recall_keys)),
                             "--recall-trials", str(s.recall_trials)],
}


def part_command(path, settings: EvalSettings, part: str) -> str:
    """The `linearize eval` command that runs one part (with PART_FLAGS) alone, with these settings: what
    docs/results copies beside a part's numbers."""
    args = ["linearize", "eval", str(path), "--skip", ",".join(p for p in PARTS if p != part),
            *PART_FLAGS[part](settings), *settings.student.flags()]
    if settings.dtype != "auto":
        args += ["--dtype", settings.dtype]
    return shlex.join(args)


def evaluate(path: str | Path, settings: EvalSettings | None = None, teacher: str | None = None,
             progress: bool = True, log=print) -> dict:
    """Run every part not in settings.skip; returns the eval.json dict (also written to path/eval.json)."""
    from ..models.linearized import without_memory
    from ..transfer.attention_transfer import layer_transfer_errors
    from .agreement import agreement
    from .baseline import streaming_baseline
    from .generation import file_prompts, generation_agreement, heldout_prompts
    from .long import check_teacher_context, long_documents, long_eval
    from .mmlu import mmlu_accuracy
    from .passkey import context_limit, multikey_accuracy, passkey_accuracy
    from .real_recall import check_recall_lengths, load_corpora, real_recall

    settings = settings or EvalSettings()
    settings.check()
    device, dtype = placement(settings.device, settings.dtype)
    path = Path(path)
    student, tokenizer = load_student(path, device, dtype, settings.student)
    teacher_model, spec = load_teacher_of(path, teacher, device, dtype)
    res = {"model": str(path), "teacher": spec, "settings": settings.to_dict(), "seconds": {},
           "device": {"device": str(device), "name": device_name(device), "dtype": str(dtype).removeprefix("torch.")}}
    models = {"teacher": teacher_model, "student": student}
    if "long" not in settings.skip:  # a document too short, or too long for the teacher, fails before any part
        check_teacher_context(teacher_model, settings.long_length)
        long_docs = long_documents(settings.long_texts, tokenizer, settings.long_length)
    if "realrecall" not in settings.skip:  # the same for a recall text too short, or a length too long
        check_recall_lengths(teacher_model, settings.recall_lengths)
        corpora = load_corpora(settings.recall_texts, tokenizer, settings.recall_lengths)

    def part(name, fn):
        if name in settings.skip:
            return
        log(f"eval: {name} ...")
        t0 = time.time()
        fn()
        res["seconds"][name] = round(time.time() - t0, 1)
        write_json(res, path / EVAL)  # finished parts survive an interrupted run

    rows = {}

    def sequences(name, n):
        if name not in rows:
            rows[name] = eval_sequences(name, tokenizer, settings.seq_len, max(settings.sequences, n),
                                        data=training_data(path))
        return rows[name][:n]

    def ppl():
        res["texts"] = {name: agreement(teacher_model, student, sequences(name, settings.sequences), progress, name)
                        for name in settings.texts}

    equal_bytes = []  # streaming_baseline's result, made once for the parts "baseline" and "long"

    def streaming():
        if not equal_bytes:
            equal_bytes.append(streaming_baseline(teacher_model, student))
        return equal_bytes[0]

    def baseline():
        model, window, nbytes, target = streaming()
        res["baseline"] = {"attention": "streaming", "window": window, "sinks": 4, "state_bytes": nbytes,
                           "student_state_bytes": target,
                           "texts": {name: agreement(teacher_model, model, sequences(name, settings.sequences),
                                                     progress, f"{name}: streaming baseline")
                                     for name in settings.texts}}
        try:
            off = without_memory(student)
        except LinearizeError as e:  # nothing to switch off (no memory, or nothing but the memory)
            log(f"eval: no memory-off row ({e})")
            return
        res["baseline"]["memory_off"] = {
            "texts": {name: agreement(teacher_model, off, sequences(name, settings.sequences), progress,
                                      f"{name}: student, memory off") for name in settings.texts}}

    def layers():
        students = student.attention_modules()
        if len(students) != teacher_model.config.num_hidden_layers:
            log("eval: skipping layer errors (some layers kept softmax attention)")
            return
        res["layer_mse"] = {name: layer_transfer_errors(teacher_model, students,
                                                        sequences(name, settings.layer_sequences))
                            for name in settings.texts}

    def beyond_teacher() -> dict:
        """What a recall part says of lengths the teacher was not made to read (it is not asked there: None)."""
        limit = context_limit(teacher_model)
        return {} if limit is None else {"teacher_context": limit}

    def passkey():
        runs = {who: passkey_accuracy(m, tokenizer, list(settings.passkey_lengths), settings.passkey_trials,
                                      limit=context_limit(m)) for who, m in models.items()}
        res["passkey"] = {"filler": "repeated (easy)", **beyond_teacher(),
                          **{k: runs["student"][k] for k in ("lengths", "tokens", "trials")}}
        res["passkey"].update({who: r["accuracy"] for who, r in runs.items()})

    def multikey():
        runs = {who: multikey_accuracy(m, tokenizer, list(settings.multikey_keys), list(settings.multikey_lengths),
                                       settings.multikey_trials, limit=context_limit(m)) for who, m in models.items()}
        res["multikey"] = {"filler": "repeated (easy)", **beyond_teacher(),
                           **{k: runs["student"][k] for k in ("keys", "lengths", "trials", "tokens")}}
        res["multikey"].update({who: r["accuracy"] for who, r in runs.items()})

    def realrecall():
        model, window, nbytes, target = streaming()
        res["realrecall"] = real_recall({"teacher": teacher_model, "student": student, "streaming": model},
                                        tokenizer, settings.recall_texts, settings.recall_keys,
                                        settings.recall_lengths, settings.recall_trials, corpora=corpora, log=log)
        res["realrecall"].update(window=window, sinks=4, state_bytes={"student": target, "streaming": nbytes})

    def mmlu():
        max_length = getattr(teacher_model.config, "max_position_embeddings", 2048)
        res["mmlu"] = mmlu_accuracy(models, tokenizer, settings.limit, max_length=max_length)

    def generation():
        if settings.prompts:
            prompts = file_prompts(settings.prompts, tokenizer, settings.generation_prompts)
        else:
            prompts = heldout_prompts(training_data(path), tokenizer, settings.generation_prompts)
        res["generation"] = {"source": settings.prompts or "held-out",
                             **generation_agreement(teacher_model, student, tokenizer, prompts,
                                                    settings.generation_tokens)}

    def long():
        res["long"] = {**long_eval(teacher_model, student, long_docs, settings.long_length, streaming(),
                                   progress=progress, log=log), "command": part_command(path, settings, "long")}

    for name, fn in (("ppl", ppl), ("baseline", baseline), ("layers", layers), ("passkey", passkey),
                     ("multikey", multikey), ("realrecall", realrecall), ("generation", generation), ("mmlu", mmlu),
                     ("long", long)):
        part(name, fn)
    return res
