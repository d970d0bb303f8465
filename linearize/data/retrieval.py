"""Look-up exercises mixed into training (`linearize convert --retrieval-fraction F`): a share F of the stage 1 and
stage 2 training rows become rows that need recall. A chosen row keeps its own training text as filler; 1 to 16
facts are inserted at random depths, and the row ends with a question about one of them, its answer and EOS:

    ledger  "\\n[entry QX-4821] => 730418\\n" ... "\\n[lookup QX-4821] =>" " 730418"
    aside   "\\n(Aside: Tavrino keeps the spare key in box 317.)\\n" ... "\\nQuestion: which box holds Tavrino's
            spare key?\\nAnswer: box" " 317"

Ids, made-up names, numbers of 3 or 6 digits and the sentences differ from the eval's recall prompts
(evaluate/passkey.py: real first names, 5-digit codes, its own filler and questions), and the filler is the run's
own training split, so no eval prompt is trained on (tests/test_retrieval_data.py checks it). Every row is drawn
from random.Random(f"retrieval-{tag}-{row}"): the same rows on every run and on --resume.
"""

import random
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LinearizeError

FACTS = (1, 2, 4, 8, 16)  # facts per row, one of them asked
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def ledger_id(rng: random.Random) -> str:
    return f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randint(1000, 9999)}"


def made_up_name(rng: random.Random) -> str:
    """Three consonant-vowel syllables and a closing consonant: "Tavrinok"-like, never a common first name."""
    syllables = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(3))
    return (syllables + rng.choice(CONSONANTS)).capitalize()


@dataclass(frozen=True)
class LookupFormat:
    """One kind of exercise: fact, question and answer templates over {key} and {value}, and how to draw them."""

    fact: str
    question: str
    answer: str
    key: Callable[[random.Random], str]
    value: Callable[[random.Random], str]


FORMATS = (
    LookupFormat("\n[entry {key}] => {value}\n", "\n[lookup {key}] =>", " {value}", ledger_id,
                 lambda rng: str(rng.randint(100000, 999999))),
    LookupFormat("\n(Aside: {key} keeps the spare key in box {value}.)\n",
                 "\nQuestion: which box holds {key}'s spare key?\nAnswer: box", " {value}", made_up_name,
                 lambda rng: str(rng.randint(100, 999))),
)


def lookup_pairs(rng: random.Random, facts: int, asked: int) -> tuple[list[str], list[tuple[str, str]]]:
    """(fact texts, [(question, answer)] of the first `asked` facts) of one exercise: `facts` distinct keys."""
    form = rng.choice(FORMATS)
    keys = []
    while len(keys) < facts:
        if (key := form.key(rng)) not in keys:
            keys.append(key)
    values = [form.value(rng) for _ in keys]
    texts = [form.fact.format(key=k, value=v) for k, v in zip(keys, values)]
    return texts, [(form.question.format(key=k), form.answer.format(value=v)) for k, v in zip(keys, values)][:asked]


def lookup_row(row: torch.Tensor, tokenizer, rng: random.Random) -> torch.Tensor:
    """A training row (T,) -> a look-up row (T,): its first tokens as filler, the facts inserted at random depths
    (the asked one anywhere among them), then question, answer and EOS."""
    return asking_row(row, tokenizer, rng, rng.choice(FACTS), 1)[0]


def asking_row(row: torch.Tensor, tokenizer, rng: random.Random, facts: int,
               asked: int) -> tuple[torch.Tensor, list[int]]:
    """(look-up row (T,), where each answer ends (exclusive)): `facts` facts inserted at random depths in the row's
    first tokens, then question and answer for each of the first `asked` facts (their order is not the facts' order)
    and EOS."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False).input_ids

    T = row.numel()
    facts, pairs = lookup_pairs(rng, facts, asked)
    tail, ends = [], []
    for question, answer in pairs:
        tail += ids(question) + ids(answer)
        ends.append(len(tail))
    tail += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    fact_ids = [ids(f) for f in facts]
    while len(fact_ids) > asked and sum(map(len, fact_ids)) + len(tail) > T // 2:  # keep at least half as filler
        fact_ids.pop()
    room = T - sum(map(len, fact_ids)) - len(tail)
    if room < 0:
        raise LinearizeError(f"--seq-len {T} is too short for a look-up row ({T - room} tokens); use a longer "
                             "--seq-len (in convert, or leave --retrieval-fraction out)")
    rng.shuffle(fact_ids)
    cuts = sorted(rng.randint(0, room) for _ in fact_ids)
    filler, out, at = row[:room].tolist(), [], 0
    for cut, fact in zip(cuts, fact_ids):
        out += filler[at:cut] + fact
        at = cut
    return torch.tensor(out + filler[at:] + tail, dtype=row.dtype), [T - len(tail) + end for end in ends]


def asked_rows(rows: torch.Tensor, tokenizer, facts: int, tag: str) -> tuple[torch.Tensor, list[list[int]]]:
    """rows (N, T) -> (look-up rows (N, T) that ask each of their `facts` facts at the end, where each row's answers
    end): what the cache score is fitted on (transfer/cache_score.py)."""
    out, ends = rows.clone(), []
    for i in range(len(rows)):
        out[i], row_ends = asking_row(rows[i], tokenizer, random.Random(f"retrieval-{tag}-{i}"), facts, facts)
        ends.append(row_ends)
    return out, ends


def mix_retrieval(rows: torch.Tensor, tokenizer, fraction: float, tag: str) -> torch.Tensor:
    """rows (N, T) with round(N * fraction) of them, spread evenly, replaced by look-up rows (a new tensor)."""
    n = round(len(rows) * fraction)
    out = rows.clone()
    for i in (int(j * len(rows) / n) for j in range(n)):
        out[i] = lookup_row(rows[i], tokenizer, random.Random(f"retrieval-{tag}-{i}"))
    return out
