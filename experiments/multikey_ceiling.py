"""What multi-key recall a perfect cache could give: the teacher itself on `linearize eval`'s multi-key questions
(the same seeds, hence the same names, codes and questions), each haystack shortened to what a student's exact
part would hold if its cache kept the intro and the needles and nothing else: the intro, the k needles in their
order, then `--window` tokens of filler before the question (cache_position "packed": the text between them read as
if cut out). The teacher's score there bounds what a student distilled from it can be expected to reach.

    python experiments/multikey_ceiling.py --lengths 4k --trials 20 --window 256 --out docs/results/multikey_ceiling.json
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.evaluate import passkey as P  # noqa: E402
from linearize.loading.teacher import load_teacher  # noqa: E402
from linearize.options import token_counts  # noqa: E402
from linearize.run_folder import write_json  # noqa: E402


def shortened(tokenizer, pairs, window: int) -> str:
    """The intro, the needles of `pairs` in order, then about `window` tokens of filler (no trailing space)."""
    needles = "".join(P.MULTIKEY_NEEDLE.format(name=name, value=value) for name, value in pairs)
    fillers = max(1, round(window / P.n_tokens(tokenizer, P.FILLER)))
    return (P.MULTIKEY_INTRO + needles + P.FILLER * fillers).rstrip()


def accuracy(model, tokenizer, k: int, length: int, trials: int, window: int | None) -> float:
    """passkey.multikey_accuracy at (k, length); window None: the haystacks as they are, else shortened."""
    rewrite = None if window is None else (lambda haystack, pairs: shortened(tokenizer, pairs, window))
    return P.multikey_accuracy(model, tokenizer, [k], [length], trials, rewrite=rewrite)["accuracy"][str(k)][0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the teacher (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--keys", type=int, default=4, help="needles per haystack (default: %(default)s)")
    p.add_argument("--lengths", type=token_counts, default=(4096,), help="haystack lengths (default: 4k)")
    p.add_argument("--trials", type=int, default=20, help="questions per length (default: %(default)s)")
    p.add_argument("--window", type=int, default=256, help="filler tokens kept before the question (default: 256)")
    p.add_argument("--out", default="docs/results/multikey_ceiling.json")
    args = p.parse_args(argv)
    model, tokenizer = load_teacher(args.model)
    rows = {}
    with torch.no_grad():
        for length in args.lengths:
            rows[str(length)] = {"as_is": accuracy(model, tokenizer, args.keys, length, args.trials, None),
                                 "shortened": accuracy(model, tokenizer, args.keys, length, args.trials, args.window)}
            print(length, rows[str(length)], flush=True)
    write_json({"model": args.model or "bundled SmolLM2-135M-Instruct", "keys": args.keys, "trials": args.trials,
                "window": args.window, "accuracy": rows}, Path(args.out))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
