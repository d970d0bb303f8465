"""The student alone on `linearize eval`'s real-text questions, beside the teacher's and StreamingLLM's answers an
earlier record already holds for the same questions: for a training-free change of the student (--cache,
--cache-position, ...) that leaves the teacher and the equal-bytes StreamingLLM as they were, at a third of the cost.
The questions are seeded (texts, formats, depths, numbers), so the same settings ask the same ones; the script
refuses a record whose prompt sizes differ from the new run's, or whose StreamingLLM was matched to other state bytes.

    python experiments/student_real_recall.py --run runs/smollm2_t2 --cache-position packed \
        --record docs/results/archive/recall_edge_labels_default.json --keys 1 --lengths 1024,2048,4096 --trials 10 --out /tmp/rr_packed.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.evaluate.real_recall import load_corpora, real_recall  # noqa: E402
from linearize.evaluate.baseline import state_bytes  # noqa: E402
from linearize.loading.student import load  # noqa: E402
from linearize.run_folder import write_json  # noqa: E402
from linearize.training_free import TrainingFree, add_arguments  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--record", required=True, help="a JSON with the teacher's and StreamingLLM's answers: an "
                   "eval.json (its 'realrecall'), recall.json (its 'real_text') or one of these parts itself")
    p.add_argument("--texts", default="python-docs,shakespeare,sharegpt")
    p.add_argument("--keys", default="1")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--out", required=True)
    add_arguments(p)
    args = p.parse_args(argv)
    record = json.loads(Path(args.record).read_text())
    record = record.get("realrecall") or record.get("real_text") or record
    texts = args.texts.split(",")
    keys, lengths = [int(x) for x in args.keys.split(",")], [int(x) for x in args.lengths.split(",")]
    model, tokenizer = load(args.run)
    settings = TrainingFree.from_args(args)
    settings.apply(model)
    with torch.no_grad():
        student_bytes = state_bytes(model, 2048)  # as eval counts it (baseline.streaming_baseline)
    if record.get("state_bytes", {}).get("student") != student_bytes:
        sys.exit(f"the student's state is {student_bytes} bytes; the record's StreamingLLM was matched to "
                 f"{record.get('state_bytes')}: rerun eval for a StreamingLLM of equal bytes")
    with torch.no_grad():
        new = real_recall({"student": model}, tokenizer, texts, keys, lengths, args.trials,
                          corpora=load_corpora(texts, tokenizer, lengths))
    if new["tokens"] != {t: record["tokens"][t] for t in texts} or new["trials"] != record["trials"]:
        sys.exit(f"the record {args.record} asked other questions (prompt sizes or trials differ): rerun eval")
    merged = {**record, "models": {**record["models"], "student": new["models"]["student"]},
              "state_bytes": {**record.get("state_bytes", {}), "student": student_bytes},
              "student_settings": settings.given(),
              "command": "python " + " ".join(sys.argv), "teacher_and_streaming_from": args.record}
    write_json({"realrecall": merged}, Path(args.out))
    print({who: m["by_length"] for who, m in merged["models"].items()})


if __name__ == "__main__":
    main()
