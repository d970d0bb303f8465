"""Recall in real text (evaluate/real_recall.py, `linearize eval` part "realrecall"): the haystacks, their scoring
through passkey.py's one path, and the unchanged repeated-filler prompts beside them."""

import json
import random
import re

import pytest

from linearize.cli import main
from linearize.evaluate import passkey
from linearize.evaluate.passkey import n_tokens
from linearize.evaluate.real_recall import (DEPTHS, FORMATS, REAL_INTRO, Corpus, real_haystacks, real_recall,
                                            segments)

from test_recall import reader

WORDS = ("the quick brown fox jumps over lazy dog hello world linear attention is fast tiny tokenizer river stone "
         "garden window lamp").split()


def write_text(path, paragraphs: int = 120):
    """A .txt of made-up prose: paragraphs of three sentences (one line break inside), blank lines between."""
    rng = random.Random(1)
    paras = []
    for _ in range(paragraphs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9))).capitalize() + rng.choice(".!?")
                     for _ in range(3)]
        paras.append(f"{sentences[0]} {sentences[1]}\n{sentences[2]}")
    path.write_text("\n\n".join(paras) + "\n")
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("recall") / "prose.txt")


@pytest.fixture(scope="module")
def corpus(text_file, tiny_tokenizer):
    return Corpus(str(text_file), tiny_tokenizer)


def needle_pattern(fmt: str) -> str:
    """A regex matching any needle of format `fmt`: (name, number)."""
    needle = re.escape(FORMATS[fmt][0].format(name="NAME", n="NUMBER"))
    return needle.replace("NAME", r"(\w+)").replace("NUMBER", r"(\d+)")


def read_fact(question: str, context: str) -> int:
    """What a perfect reader answers: the number of the needle the question asks for."""
    for fmt, (needle, asked) in FORMATS.items():
        found = re.search(re.escape(asked.format(name="NAME")).replace("NAME", r"(\w+)"), question)
        if found:
            name = found.group(1)
            return int(re.search(re.escape(needle.format(name=name, n="NUMBER")).replace("NUMBER", r"(\d+)"),
                                 context).group(1))
    raise AssertionError(f"no format asks {question!r}")


def test_segments_rejoin_to_the_text_and_cut_at_sentence_and_line_ends():
    text = "First one. Second one!\nA line\nthat goes on? Yes.  Done " + "word " * 200 + "end."
    parts = segments(text, most=100)
    assert "".join(parts) == text
    assert parts[:5] == ["First one.", " Second one!", "\nA line", "\nthat goes on?", " Yes."]
    assert all(len(p) <= 101 for p in parts) and all(p[0].isspace() for p in parts[1:])


@pytest.mark.parametrize("k", [1, 4, 16])
def test_haystacks_are_deterministic_and_about_the_asked_length(tiny_tokenizer, corpus, k):
    for length in (1000, 2000):  # (16 facts take ~500 tokens of this tokenizer)
        made = list(real_haystacks(tiny_tokenizer, corpus, k, length, 8))
        again = list(real_haystacks(tiny_tokenizer, corpus, k, length, 8))
        assert made == again and sum(len(h.questions) for h in made) == 8
        for h in made:
            n = n_tokens(tiny_tokenizer, h.context + h.questions[0][0])
            assert abs(n - length) <= 0.05 * length, (n, length)
            assert h.context.startswith(REAL_INTRO) and all(q.startswith("\n") for q, _ in h.questions)
        assert len({h.context[len(REAL_INTRO):][:80] for h in made}) == len(made)  # a different span each
    other = list(real_haystacks(tiny_tokenizer, corpus, k, 1000, 8, seed=1))
    assert other != list(real_haystacks(tiny_tokenizer, corpus, k, 1000, 8))


def test_formats_rotate_and_the_fact_sits_at_the_asked_depth(tiny_tokenizer, corpus):
    made = list(real_haystacks(tiny_tokenizer, corpus, 1, 1500, 20))
    assert [h.about[0]["format"] for h in made] == [list(FORMATS)[h % 4] for h in range(20)]
    assert {(h.about[0]["format"], h.about[0]["depth"]) for h in made} == {(f, d) for f in FORMATS for d in DEPTHS}
    intro = n_tokens(tiny_tokenizer, REAL_INTRO)
    for h in made:
        fmt, depth = h.about[0]["format"], h.about[0]["depth"]
        found = re.search(needle_pattern(fmt), h.context)
        assert int(found.group(2)) == h.questions[0][1]
        needle = n_tokens(tiny_tokenizer, found.group())
        span = n_tokens(tiny_tokenizer, h.context) - intro - needle
        at = (n_tokens(tiny_tokenizer, h.context[: found.start()]) - intro) / span
        assert abs(at - depth) < 0.04, (at, depth)


def test_multikey_needles_are_spread_and_the_filler_is_a_span_of_the_document(tiny_tokenizer, corpus, text_file):
    document = text_file.read_text()
    for k in (1, 4, 16):
        for h in real_haystacks(tiny_tokenizer, corpus, k, 1200, 8):
            fmt = h.about[0]["format"]
            found = list(re.finditer(needle_pattern(fmt), h.context))
            assert len(found) == k and len({m.group(1) for m in found}) == k
            assert all(read_fact(q, h.context) == a for q, a in h.questions)
            pieces = re.split(needle_pattern(fmt), h.context[len(REAL_INTRO):])[::3]  # the text between needles
            assert len(pieces) == k + 1 and sum(map(len, pieces)) + sum(len(m.group()) for m in found) > len(
                h.context) - len(REAL_INTRO) - 3 * k  # all of it: filler, needles and their separators
            for piece in pieces:
                assert piece.strip() in document
            if k == 1:  # a needle goes between sentences: after a sentence's end, before a sentence's start
                before, after = pieces[0].rstrip(), pieces[1].lstrip()
                assert (not before or before[-1] in ".!?") and (not after or after[0].isupper())


def test_bundled_texts_give_spans_of_their_documents(tiny_tokenizer):
    from linearize.evaluate.texts import python_docs_documents

    docs = "\n\n".join(d.strip() for d in python_docs_documents())
    corpus = Corpus("python-docs", tiny_tokenizer)
    assert corpus.tokens > 16384 and "".join(corpus.segments) == docs
    for h in real_haystacks(tiny_tokenizer, corpus, 4, 2000, 8):
        pieces = re.split(needle_pattern(h.about[0]["format"]), h.context[len(REAL_INTRO):])[::3]
        assert len(pieces) == 5 and all(p.strip() in docs for p in pieces)


@pytest.mark.parametrize("shift, expected", [(0, 1.0), (1, 0.0)])
def test_every_format_is_scored_by_a_reader_that_reads_the_needle_back(tiny_tokenizer, corpus, monkeypatch, shift,
                                                                       expected):
    monkeypatch.setattr(passkey, "Decoder", reader(tiny_tokenizer, shift, read_fact))
    res = real_recall({"teacher": None, "student": None}, tiny_tokenizer, [corpus.name], [1, 4], [400, 900],
                      trials=10, corpora={corpus.name: corpus}, log=lambda *a: None)
    assert res["filler"] == "real text" and res["keys"] == [1, 4] and res["trials"] == 10
    assert res["tokens"][corpus.name]["1"][0] < res["tokens"][corpus.name]["1"][1]
    for who in ("teacher", "student"):
        r = res["models"][who]
        assert r["accuracy"] == {"1": [expected] * 2, "4": [expected] * 2} and r["by_length"] == [expected] * 2
        assert set(r["by_format"].values()) == {expected} and set(r["by_depth"].values()) == {expected}
        assert {c["format"] for c in r["cells"]} == set(FORMATS)
        assert sum(c["questions"] for c in r["cells"]) == 2 * 2 * 10
        assert all(c["accuracy"] == expected and c["correct"] == c["questions"] * expected for c in r["cells"])
    json.dumps(res)


def test_repeated_filler_prompts_are_unchanged(tiny_tokenizer):
    """The passkey and multikey haystacks after the refactor are the prompts built the old way."""
    from linearize.evaluate.passkey import (FILLER, INTRO, MULTIKEY_INTRO, MULTIKEY_NEEDLE, MULTIKEY_QUESTION, NAMES,
                                            NEEDLE, QUESTION, multikey_haystacks, passkey_haystacks)

    length, trials = 700, 4
    rng = random.Random(0 + length)
    keys = [rng.randint(10000, 99999) for _ in range(trials)]
    for i, (haystack, key) in enumerate(zip(passkey_haystacks(tiny_tokenizer, length, trials), keys)):
        fillers = round((length - n_tokens(tiny_tokenizer, INTRO + NEEDLE.format(key=key) + QUESTION))
                        / n_tokens(tiny_tokenizer, FILLER))
        before = round(fillers * (i + 0.5) / trials)
        old = (INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (fillers - before)).rstrip()
        assert haystack.context == old and haystack.questions == [(QUESTION, key)]
    rng = random.Random("multikey-0-4-600")
    pairs = list(zip(rng.sample(NAMES, 4), rng.sample(range(10000, 100000), 4)))
    fixed = n_tokens(tiny_tokenizer, MULTIKEY_INTRO + "".join(MULTIKEY_NEEDLE.format(name=n, value=v) for n, v in pairs)
                     + MULTIKEY_QUESTION.format(name=pairs[0][0]))
    fillers = round((600 - fixed) / n_tokens(tiny_tokenizer, FILLER))
    old, placed = MULTIKEY_INTRO, 0
    for j, (name, value) in enumerate(pairs):
        at = round(fillers * (j + 0.5) / 4)
        old += FILLER * (at - placed) + MULTIKEY_NEEDLE.format(name=name, value=value)
        placed = at
    first = next(multikey_haystacks(tiny_tokenizer, 4, 600, 20))
    assert first.context == (old + FILLER * (fillers - placed)).rstrip()
    assert first.questions == [(MULTIKEY_QUESTION.format(name=pairs[j][0]), pairs[j][1]) for j in range(4)]


def test_eval_command_writes_realrecall_for_teacher_student_and_baseline(tiny_converted, text_file, capsys):
    from linearize.evaluate.run import PARTS

    student_dir = tiny_converted[0]
    others = ",".join(p for p in PARTS if p != "realrecall")
    assert main(["eval", str(student_dir), "--skip", others, "--recall-texts", str(text_file), "--recall-lengths",
                 "128", "--recall-trials", "2", "--no-progress"]) == 0
    res = json.loads((student_dir / "eval.json").read_text())
    rr = res["realrecall"]
    assert not {"texts", "passkey", "multikey", "long"} & set(res)
    assert rr["keys"] == [1, 4, 16] and rr["lengths"] == [128] and rr["trials"] == 2
    assert set(rr["models"]) == {"teacher", "student", "streaming"} and rr["window"] >= 1
    for r in rr["models"].values():
        assert set(r["accuracy"]) == {"1", "4", "16"} and all(0 <= a[0] <= 1 for a in r["accuracy"].values())
        assert sum(c["questions"] for c in r["cells"]) == 3 * 2
    assert res["settings"]["recall_texts"] == [str(text_file)]
    out = capsys.readouterr().out
    assert "recall in real text" in out and "prose.txt" in out
    assert main(["eval", str(student_dir), "--recall-texts", "nope.txt"]) == 2
    assert "'nope.txt' is neither one of" in capsys.readouterr().err
    assert main(["eval", str(student_dir), "--skip", others, "--recall-texts", str(text_file), "--recall-lengths",
                 "64k"]) == 2
    assert "exceeds the teacher's context" in capsys.readouterr().err


def test_training_lookups_never_write_the_real_text_facts_or_questions():
    """--retrieval-fraction's exercises (data/retrieval.py) share no sentence, name or 5-digit number with these
    prompts (as tests/test_retrieval_data.py checks for the repeated-filler ones)."""
    from linearize.data.retrieval import lookup_pairs
    from linearize.evaluate.passkey import NAMES

    ours = [REAL_INTRO] + [t.format(name="", n="") for pair in FORMATS.values() for t in pair]
    sentences = {s.strip() for t in ours for s in re.split(r"[.?:\n]", t) if len(s.strip()) > 8}
    rng = random.Random(0)
    text = "\n".join("".join(facts) + question + answer
                     for facts, [(question, answer)] in (lookup_pairs(rng, rng.choice([1, 4, 16]), 1)
                                                         for _ in range(400)))
    assert sentences and not [s for s in sentences if s in text]
    assert not set(re.findall(r"[A-Z][a-z]+", text)) & set(NAMES) and not re.search(r"(?<!\d)\d{5}(?!\d)", text)


def test_report_lists_real_text_recall_beside_the_easy_case():
    from linearize.report.page import summary_tables

    models = {who: {"accuracy": {"1": [a, a], "4": [a / 2, 0.0]}} for who, a in (("teacher", 1.0), ("student", 0.5),
                                                                                    ("streaming", 0.25))}
    html = summary_tables(None, {"passkey": {"filler": "repeated (easy)", "lengths": [1024], "tokens": [1000],
                                             "trials": 2, "teacher": [1.0], "student": [1.0]},
                                 "realrecall": {"keys": [1, 4], "lengths": [1024, 2048], "models": models}}, None)
    assert "<td>real text, 1 key</td><td>2048</td><td>100%</td><td>50%</td>" in html
    assert "<td>real text, 4 keys, one asked</td><td>2048</td><td>0%</td><td>0%</td>" in html
    assert "repeated filler (the easy case)" in html
