"""Why the repeated-filler passkey fails at 32k where it holds at 16k: is the needle still in the sparse cache after
the prefill (per layer, the share of KV heads holding each of the key's digit tokens), and is it answered?

The haystacks are eval's (evaluate/passkey.passkey_haystacks: same seed, depth (i + 0.5) / trials for trial i);
--only picks some trials. One JSON with, per trial: depth, correct, the needle's token positions, per layer the
fraction of heads holding all of them, and the cache's positions summary.

    python experiments/passkey_far_probe.py runs/smollm2_t2 --cache-position packed --length 32768 --trials 10 \
        --only 0,5 --out /tmp/pk32k_probe.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.evaluate.passkey import NEW_TOKENS, decided, first_number, passkey_haystacks, token_ids  # noqa: E402
from linearize.generate.decoding import Decoder  # noqa: E402
from linearize.loading.student import load_student  # noqa: E402
from linearize.run_folder import write_json  # noqa: E402
from linearize.training_free import TrainingFree, add_arguments  # noqa: E402


def needle_positions(tokenizer, context: str, key: int) -> list[int]:
    """Token positions of the key's first occurrence in the context's tokens (its digits, as the prompt tokenizes
    them)."""
    ids = token_ids(tokenizer, context)[0].tolist()
    digits = token_ids(tokenizer, f" {key}")[0].tolist()
    for start in range(len(ids) - len(digits) + 1):
        if ids[start : start + len(digits)] == digits:
            return list(range(start, start + len(digits)))
    return []


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--trials", type=int, default=10, help="eval's trials at this length (sets the depths)")
    p.add_argument("--only", default="", help="comma-separated trial indices to run (default: all)")
    p.add_argument("--out", required=True)
    add_arguments(p)
    args = p.parse_args()
    model, tokenizer = load_student(args.run, "cpu", None, TrainingFree.from_args(args))
    only = {int(i) for i in args.only.split(",")} if args.only else None
    rows = []
    for i, hay in enumerate(passkey_haystacks(tokenizer, args.length, args.trials)):
        if only is not None and i not in only:
            continue
        t0 = time.perf_counter()
        (question, key), = hay.questions
        needle = needle_positions(tokenizer, hay.context, key)
        dec = Decoder(model)
        dec.prefill(token_ids(tokenizer, hay.context))
        held = []
        for state in dec.cache:
            pos = state.cache.position[0] if state.cache is not None and state.cache.position is not None else None
            if pos is None:
                held.append(None)
                continue
            heads = [set(pos[h].tolist()) for h in range(pos.shape[0])]
            held.append(sum(all(n in h for n in needle) for h in heads) / len(heads))
        logits, new = dec.prefill(token_ids(tokenizer, question), state=dec.cache), []  # as answers_correct asks
        for token in dec.tokens(logits, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id):
            new.append(token)
            if decided(tokenizer.decode(new), str(key)):
                break
        answer = tokenizer.decode(new)
        correct = first_number(answer) == str(key)
        rows.append({"trial": i, "answer": answer, "depth": (i + 0.5) / args.trials, "key": key, "correct": correct,
                     "needle_positions": needle, "layers_share_of_heads_holding_the_key": held,
                     "layers_with_the_key_somewhere": sum(1 for h in held if h), "seconds": time.perf_counter() - t0})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "layers_share_of_heads_holding_the_key"}),
              flush=True)
        write_json({"command": "python " + " ".join(sys.argv), "length": args.length, "rows": rows}, Path(args.out))


if __name__ == "__main__":
    main()
