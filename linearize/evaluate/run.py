"""`linearize eval DIR`: how close a converted model is to its teacher. Writes DIR/eval.json:

    model, teacher             the folder evaluated and its teacher (None = bundled SmolLM2)
    settings                   the EvalSettings used
    texts.NAME                 per evaluation text (see texts.py; NAME: a built-in text or a file as given):
                               tokens, teacher_ppl, student_ppl,
                               kl (mean KL(teacher || student), nats/token), top1 (argmax agreement)
    layer_mse.NAME             per layer: attention output MSE of the student vs the teacher on that text
    passkey                    lengths, tokens (mean prompt length), trials, teacher / student: accuracy per length
    multikey                   keys (k facts per prompt), lengths, trials, tokens {k: mean prompt length per length},
                               teacher / student: {k: accuracy per length} (evaluate/passkey.py)
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
    seconds                    wall time of each part
    device                     where both models ran: {device, name, dtype}
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..device import device_name, placement
from ..errors import LinearizeError
from ..loading.student import load_student
from ..loading.teacher import load_teacher_of
from ..run_folder import EVAL, training_data, write_json
from ..training_free import TrainingFree
from .texts import EVAL_TEXTS, check_text, eval_sequences

PARTS = ("ppl", "baseline", "layers", "passkey", "multikey", "generation", "mmlu")


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
    generation_prompts: int = 50  # held-out prompts answered greedily by both models (evaluate/generation.py)
    prompts: str | None = None  # a prompts file instead of held-out ones (generation.file_prompts)
    generation_tokens: int = 64
    limit: int | None = 5  # MMLU questions per subject (None = all 14,042)
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

    def check(self):
        if unknown := set(self.skip) - set(PARTS):
            raise LinearizeError(f"unknown part(s) to skip {sorted(unknown)}; choose from {', '.join(PARTS)}")
        for name in self.texts:
            check_text(name)
        if self.prompts is not None:
            from .generation import check_prompts  # (imports transformers: not at `linearize --help` time)

            check_prompts(self.prompts)
        if min(self.seq_len, self.sequences, self.layer_sequences, self.passkey_trials, *self.passkey_lengths,
               self.multikey_trials, *self.multikey_keys, *self.multikey_lengths, self.generation_prompts,
               self.generation_tokens) < 1:
            raise LinearizeError("sizes and counts must be >= 1")
        from .passkey import NAMES  # (imports transformers: not at `linearize --help` time)

        if max(self.multikey_keys) > len(NAMES):
            raise LinearizeError(f"--multikey-keys takes at most {len(NAMES)} keys per prompt (the names there are); "
                                 f"got {max(self.multikey_keys)}")
        if self.limit is not None and self.limit < 1:
            raise LinearizeError(f"--limit must be >= 1 (got {self.limit})")


def evaluate(path: str | Path, settings: EvalSettings | None = None, teacher: str | None = None,
             progress: bool = True, log=print) -> dict:
    """Run every part not in settings.skip; returns the eval.json dict (also written to path/eval.json)."""
    from ..models.linearized import without_memory
    from ..transfer.attention_transfer import layer_transfer_errors
    from .agreement import agreement
    from .baseline import streaming_baseline
    from .generation import file_prompts, generation_agreement, heldout_prompts
    from .mmlu import mmlu_accuracy
    from .passkey import multikey_accuracy, passkey_accuracy

    settings = settings or EvalSettings()
    settings.check()
    device, dtype = placement(settings.device, settings.dtype)
    path = Path(path)
    student, tokenizer = load_student(path, device, dtype, settings.student)
    teacher_model, spec = load_teacher_of(path, teacher, device, dtype)
    res = {"model": str(path), "teacher": spec, "settings": settings.to_dict(), "seconds": {},
           "device": {"device": str(device), "name": device_name(device), "dtype": str(dtype).removeprefix("torch.")}}
    models = {"teacher": teacher_model, "student": student}

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

    def baseline():
        model, window, nbytes, target = streaming_baseline(teacher_model, student)
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

    def passkey():
        runs = {who: passkey_accuracy(m, tokenizer, list(settings.passkey_lengths), settings.passkey_trials)
                for who, m in models.items()}
        res["passkey"] = {k: runs["teacher"][k] for k in ("lengths", "tokens", "trials")}
        res["passkey"].update({who: r["accuracy"] for who, r in runs.items()})

    def multikey():
        runs = {who: multikey_accuracy(m, tokenizer, list(settings.multikey_keys), list(settings.multikey_lengths),
                                       settings.multikey_trials) for who, m in models.items()}
        res["multikey"] = {k: runs["teacher"][k] for k in ("keys", "lengths", "trials", "tokens")}
        res["multikey"].update({who: r["accuracy"] for who, r in runs.items()})

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

    for name, fn in (("ppl", ppl), ("baseline", baseline), ("layers", layers), ("passkey", passkey),
                     ("multikey", multikey), ("generation", generation), ("mmlu", mmlu)):
        part(name, fn)
    return res
