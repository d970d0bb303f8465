"""Recall: facts hidden in long filler text, asked for at the end. Raw text, no chat template, greedy decoding; a
trial passes when the first number the model writes is the hidden one.

passkey (one fact), a prompt of about `length` tokens:

    INTRO  FILLER * a  "The pass key is 12345. Remember it. 12345 is the pass key."  FILLER * b  QUESTION

    The key sits at depth a / (a + b); trial i of n uses depth (i + 0.5) / n and a key drawn from
    random.Random(seed + length).

multikey (k facts, one asked), about `length` tokens:

    MULTIKEY_INTRO  FILLER ...  "The code for Alice is 48213."  FILLER ...  (k such needles)  ...
    "\\nWhat is the code for Carol? The code for Carol is"

    Needle j of k sits at depth (j + 0.5) / k; names (NAMES) and 5-digit codes are drawn per haystack from
    random.Random("multikey-{seed}-{k}-{length}"). One haystack is prefilled once and answers up to
    QUESTIONS_PER_HAYSTACK questions, each continuing a copy of its decoding state (the same numbers as one prompt
    per question at a fraction of the cost); haystack h asks needles h, h + k/Q, h + 2k/Q, ... (mod k), so the
    asked depths cover the context.

Both are the easy case: in a repeated filler the needle is the one surprising span. real_recall.py hides facts in
spans of real text instead, with the same scoring: every test is a stream of Haystacks (a context prefilled once and
the questions asked after it), built by passkey_haystacks, multikey_haystacks or real_recall.real_haystacks, and
answered by ask_haystacks.

Linear attention compresses the past into a fixed-size state, so recall beyond its softmax window is expected to
drop. The training data of `--retrieval-fraction` (data/retrieval.py) uses other formats, names and fillers.
"""

import copy
import math
import random
import re
from dataclasses import dataclass, field

from ..generate.decoding import Decoder

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"

MULTIKEY_INTRO = ("Several codes are hidden inside a lot of irrelevant text. Find them and memorize them. "
                  "I will quiz you about one of them.\n")
MULTIKEY_NEEDLE = "The code for {name} is {value}. "
MULTIKEY_QUESTION = "\nWhat is the code for {name}? The code for {name} is"
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Louis",
         "Maria", "Nathan", "Olivia", "Peter", "Rachel", "Simon", "Tina", "Victor", "Wendy", "Xavier", "Yvonne",
         "Zach")
QUESTIONS_PER_HAYSTACK = 4
NEW_TOKENS = 8


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def token_ids(tokenizer, text: str):
    """text -> ids (1, T), no special tokens."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def first_number(text: str) -> str | None:
    """The first run of digits in `text` (what a trial's answer is scored on), None if there is none."""
    found = re.search(r"\d+", text)
    return found.group() if found else None


def decided(text: str, answer: str) -> bool:
    """True once more tokens cannot change whether the first number of `text` is `answer`: that number is followed
    by another character, or its digits so far are not the start of `answer` (decoding stops there: a wrong answer
    costs a step or two, not NEW_TOKENS)."""
    found = re.search(r"\d+", text)
    return found is not None and (found.end() < len(text) or not answer.startswith(found.group()))


def hide(tokenizer, intro: str, needles: list[str], depths: list[float], question: str, length: int,
         filler: str = FILLER) -> str:
    """intro + filler sentences with needles[j] at depths[j] (increasing, in [0, 1]) of them, no trailing space:
    about `length` tokens once `question` is appended (never less than one filler sentence)."""
    fixed = n_tokens(tokenizer, intro + "".join(needles) + question)
    fillers = max(1, round((length - fixed) / n_tokens(tokenizer, filler)))
    text, placed = intro, 0
    for needle, depth in zip(needles, depths):
        before = round(fillers * depth)
        text += filler * (before - placed) + needle
        placed = before
    return (text + filler * (fillers - placed)).rstrip()


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> str:
    """A prompt of about `length` tokens hiding `key` at `depth` in [0, 1], ending with QUESTION."""
    return hide(tokenizer, INTRO, [NEEDLE.format(key=key)], [depth], QUESTION, length) + QUESTION


def multikey_haystack(tokenizer, length: int, k: int, rng: random.Random) -> tuple[str, list[tuple[str, int]]]:
    """(haystack text without the question, [(name, code)] in depth order): k needles at depths (j + 0.5) / k, the
    whole prompt about `length` tokens once a question is appended."""
    pairs = list(zip(rng.sample(NAMES, k), rng.sample(range(10000, 100000), k)))
    needles = [MULTIKEY_NEEDLE.format(name=n, value=v) for n, v in pairs]
    depths = [(j + 0.5) / k for j in range(k)]
    return hide(tokenizer, MULTIKEY_INTRO, needles, depths, MULTIKEY_QUESTION.format(name=pairs[0][0]), length), pairs


def asked_needles(haystack: int, k: int, questions: int) -> list[int]:
    """Indices (depth order) of the needles haystack number `haystack` asks: distinct, spread over the depths."""
    return [(haystack + q * (k // questions)) % k for q in range(questions)]


def answers_correct(decoder, tokenizer, context: str, questions: list[tuple[str, int]]) -> list[bool]:
    """Prefill `context` once; for each (question, answer): greedy tokens after context + question (a copy of the
    context's decoding state each), correct when their first number is `answer`."""
    decoder.prefill(token_ids(tokenizer, context))
    cache, hits = decoder.cache, []
    for question, answer in questions:
        logits, new = decoder.prefill(token_ids(tokenizer, question), state=copy.deepcopy(cache)), []
        for token in decoder.tokens(logits, NEW_TOKENS, eos_token_id=tokenizer.eos_token_id):
            new.append(token)
            if decided(tokenizer.decode(new), str(answer)):
                break
        hits.append(first_number(tokenizer.decode(new)) == str(answer))
    return hits


@dataclass
class Haystack:
    """One prefill and the questions asked after it: what every recall test here is made of. The haystack builders
    differ (repeated filler: passkey_haystacks, multikey_haystacks; real text: real_recall.real_haystacks), the
    scoring is one path (ask_haystacks)."""

    context: str  # the text prefilled once
    questions: list[tuple[str, int]]  # (question appended to the context, the number that answers it)
    about: list[dict] = field(default_factory=list)  # per question, what its result is grouped by ({} if empty)


def ask_haystacks(model, tokenizer, haystacks) -> list[dict]:
    """Each haystack's questions answered greedily (answers_correct: one prefill, a state copy per question);
    per question {"correct": bool, "tokens": prompt tokens (context + question), **its about}."""
    decoder = Decoder(model)
    asked = []
    for haystack in haystacks:
        hits = answers_correct(decoder, tokenizer, haystack.context, haystack.questions)
        context = n_tokens(tokenizer, haystack.context)
        for i, ((question, _), hit) in enumerate(zip(haystack.questions, hits)):
            about = haystack.about[i] if haystack.about else {}
            asked.append({"correct": hit, "tokens": context + n_tokens(tokenizer, question), **about})
    return asked


def passkey_haystacks(tokenizer, length: int, trials: int, seed: int = 0):
    """The passkey trials at one length (module docstring): one Haystack each, asking QUESTION."""
    rng = random.Random(seed + length)
    for i in range(trials):
        key = rng.randint(10000, 99999)
        prompt = passkey_prompt(tokenizer, length, (i + 0.5) / trials, key)
        yield Haystack(prompt.removesuffix(QUESTION), [(QUESTION, key)])


def multikey_haystacks(tokenizer, k: int, length: int, trials: int, seed: int = 0, rewrite=None):
    """The multikey haystacks of one (k, length) cell (module docstring), `trials` questions in all."""
    questions = min(QUESTIONS_PER_HAYSTACK, k)
    rng = random.Random(f"multikey-{seed}-{k}-{length}")
    for h in range(math.ceil(trials / questions)):
        haystack, pairs = multikey_haystack(tokenizer, length, k, rng)
        haystack = haystack if rewrite is None else rewrite(haystack, pairs)
        asked = asked_needles(h, k, questions)[: trials - h * questions]
        yield Haystack(haystack, [(MULTIKEY_QUESTION.format(name=pairs[j][0]), pairs[j][1]) for j in asked])


def mean_tokens_and_accuracy(asked: list[dict]) -> tuple[int, float]:
    """(mean prompt tokens, fraction correct) of ask_haystacks' answers."""
    return round(sum(a["tokens"] for a in asked) / len(asked)), sum(a["correct"] for a in asked) / len(asked)


def context_limit(model) -> int | None:
    """The longest prompt a model of full softmax attention was made to read (max_position_embeddings); None for a
    linearized model, whose state does not grow (it is asked at any length)."""
    from ..models.linearized import LinearizedForCausalLM

    if isinstance(model, LinearizedForCausalLM):
        return None
    return getattr(model.config, "max_position_embeddings", None)


def passkey_accuracy(model, tokenizer, lengths: list[int], trials: int = 20, seed: int = 0,
                     limit: int | None = None) -> dict:
    """{"lengths": [...], "tokens": [mean prompt tokens per length], "accuracy": [fraction correct per length]};
    a length above `limit` (context_limit: a teacher beyond its context) is not asked, its tokens and accuracy None."""
    tokens, accuracy = [], []
    for length in lengths:
        if limit is not None and length > limit:
            tokens.append(None)
            accuracy.append(None)
            continue
        n, acc = mean_tokens_and_accuracy(ask_haystacks(model, tokenizer,
                                                        passkey_haystacks(tokenizer, length, trials, seed)))
        tokens.append(n)
        accuracy.append(acc)
    return {"lengths": list(lengths), "tokens": tokens, "accuracy": accuracy, "trials": trials}


def multikey_accuracy(model, tokenizer, keys: list[int], lengths: list[int], trials: int = 20, seed: int = 0,
                      rewrite=None, limit: int | None = None) -> dict:
    """{"keys", "lengths", "trials", "tokens": {k: [mean prompt tokens per length]}, "accuracy": {k: [fraction
    correct per length]}} (k as a string: JSON keys). rewrite(haystack, pairs) -> the text prefilled instead of each
    haystack (the same questions; experiments/multikey_ceiling.py shortens them), None: the haystacks as drawn. A
    length above `limit` is not asked (None), as in passkey_accuracy."""
    tokens, accuracy = {}, {}
    for k in keys:
        for length in lengths:
            if limit is not None and length > limit:
                tokens.setdefault(str(k), []).append(None)
                accuracy.setdefault(str(k), []).append(None)
                continue
            n, acc = mean_tokens_and_accuracy(ask_haystacks(
                model, tokenizer, multikey_haystacks(tokenizer, k, length, trials, seed, rewrite)))
            tokens.setdefault(str(k), []).append(n)
            accuracy.setdefault(str(k), []).append(acc)
    return {"keys": list(keys), "lengths": list(lengths), "trials": trials, "tokens": tokens, "accuracy": accuracy}
