"""What a model answers on `linearize eval`'s multi-key questions (the same seeds: the same names, codes and
questions), each answer classed: correct, another needle's code (the needle was read, the wrong one), another number,
or no number. Tells a cache that loses needles (other numbers) from one that keeps them but reads the wrong one.

    python experiments/multikey_answers.py --run runs/smollm2_t2 --caches 64,128 --length 4k --trials 20 \
        --out docs/results/multikey_answers.json
    python experiments/multikey_answers.py --run runs/smollm2_t2 --caches 64,128 --position packed --teacher \
        --length 4k --trials 20 --out docs/results/multikey_answers_packed.json
"""

import argparse
import copy
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.evaluate import passkey as P  # noqa: E402
from linearize.generate.decoding import Decoder  # noqa: E402
from linearize.loading.student import load  # noqa: E402
from linearize.loading.teacher import load_teacher  # noqa: E402
from linearize.options import token_counts  # noqa: E402
from linearize.run_folder import write_json  # noqa: E402
from linearize.training_free import TrainingFree  # noqa: E402


KINDS = ("correct", "other needle", "other number", "no number")


def answers(model, tokenizer, k: int, length: int, trials: int) -> list[dict]:
    """Per question: its haystack, the right answer, what the model said and its class (KINDS)."""
    decoder, out = Decoder(model), []
    for h, haystack in enumerate(P.multikey_haystacks(tokenizer, k, length, trials)):
        codes = {str(code) for _, code in _pairs(haystack.context)}
        decoder.prefill(P.token_ids(tokenizer, haystack.context))
        cache = decoder.cache
        for question, answer in haystack.questions:
            logits, new = decoder.prefill(P.token_ids(tokenizer, question), state=copy.deepcopy(cache)), []
            for token in decoder.tokens(logits, P.NEW_TOKENS, eos_token_id=tokenizer.eos_token_id):
                new.append(token)
            text = tokenizer.decode(new)
            number = P.first_number(text)
            kind = ("correct" if number == str(answer) else "other needle" if number in codes
                    else "no number" if number is None else "other number")
            out.append({"haystack": h, "answer": str(answer), "said": text.strip(), "kind": kind})
    return out


def tally(rows: list[dict]) -> dict:
    """How many answers fall in each class."""
    return {kind: sum(a["kind"] == kind for a in rows) for kind in KINDS}


def _pairs(context: str):
    """The (name, code) needles written into a haystack, read back from its text."""
    return re.findall(r"The code for (\w+) is (\d+)\.", context)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a converted run folder")
    p.add_argument("--caches", default="64,128", help="the student's cache sizes to ask (default: %(default)s)")
    p.add_argument("--position", default=None, help="the cache's position (edge | packed; default: as converted)")
    p.add_argument("--teacher", action="store_true", help="ask the teacher too")
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--length", type=token_counts, default=(4096,))
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--out", default="docs/results/multikey_answers.json")
    args = p.parse_args(argv)
    rows = {}
    torch.set_grad_enabled(False)
    length = args.length[0]
    for m in [int(x) for x in args.caches.split(",") if x]:
        model, tokenizer = load(args.run)
        TrainingFree(cache=m, cache_position=args.position).apply(model)
        rows[f"cache {m}"] = answers(model, tokenizer, args.keys, length, args.trials)
        print(m, tally(rows[f"cache {m}"]), flush=True)
    if args.teacher:
        model, tokenizer = load_teacher(None)
        rows["teacher"] = answers(model, tokenizer, args.keys, length, args.trials)
    summary = {name: tally(rows[name]) for name in rows}
    write_json({"run": args.run, "position": args.position or "as converted", "keys": args.keys, "length": length,
                "trials": args.trials, "summary": summary, "answers": rows, "command": "python " + " ".join(sys.argv)},
               Path(args.out))
    print(summary)


if __name__ == "__main__":
    main()
