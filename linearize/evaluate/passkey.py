"""Passkey retrieval: a 5-digit number hidden in long filler text, asked for at the end.

Prompt (raw text, no chat template), about `length` tokens:

    INTRO  FILLER * a  "The pass key is 12345. Remember it. 12345 is the pass key."  FILLER * b  QUESTION

The key sits at depth a / (a + b); trial i of n uses depth (i + 0.5) / n and a key drawn from
random.Random(seed + length). Greedy decoding; a trial passes when the first number the model writes is the key.
Linear attention compresses the past into a fixed-size state, so recall beyond its softmax window is expected to drop.
"""

import random
import re

from ..decoding import Decoder

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
NEW_TOKENS = 8


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> str:
    """A prompt of about `length` tokens (never less than one filler sentence) hiding `key` at `depth` in [0, 1]."""
    def n_tokens(text):
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    fixed = n_tokens(INTRO + NEEDLE.format(key=key) + QUESTION)
    fillers = max(1, round((length - fixed) / n_tokens(FILLER)))
    before = round(fillers * depth)
    return INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (fillers - before) + QUESTION


def passkey_accuracy(model, tokenizer, lengths: list[int], trials: int = 5, seed: int = 0) -> dict:
    """{"lengths": [...], "tokens": [mean prompt tokens per length], "accuracy": [fraction correct per length]}."""
    decoder = Decoder(model)
    tokens, accuracy = [], []
    for length in lengths:
        rng = random.Random(seed + length)
        hits, total = 0, 0
        for i in range(trials):
            key = rng.randint(10000, 99999)
            ids = tokenizer(passkey_prompt(tokenizer, length, (i + 0.5) / trials, key), return_tensors="pt",
                            add_special_tokens=False).input_ids
            answer = tokenizer.decode(decoder.generate(ids, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id))
            hits += re.findall(r"\d+", answer)[:1] == [str(key)]
            total += ids.shape[1]
        tokens.append(round(total / trials))
        accuracy.append(hits / trials)
    return {"lengths": list(lengths), "tokens": tokens, "accuracy": accuracy, "trials": trials}
