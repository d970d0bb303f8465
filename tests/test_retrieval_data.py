"""--retrieval-fraction: look-up rows (data/retrieval.py) mixed into the training rows; never the eval's prompts."""

import json
import random
import re

import pytest
import torch

from linearize.data.retrieval import FORMATS, asked_rows, lookup_pairs, lookup_row, mix_retrieval
from linearize.errors import LinearizeError
from linearize.evaluate import passkey, recall_layers
from linearize.convert.run_state import RunState
from linearize.convert.settings import ConvertSettings
from linearize.convert.stages import Conversion, load_inputs

from conftest import write_word_jsonl

T = 256


def word_rows(tokenizer, n: int) -> torch.Tensor:
    """n rows of T tokens of plain training-like text."""
    g = torch.Generator().manual_seed(0)
    words = "the quick brown fox jumps over the lazy dog hello world".split()
    text = " ".join(words[i] for i in torch.randint(0, len(words), (n * T,), generator=g))
    return torch.tensor(tokenizer(text).input_ids[: n * T]).view(n, T)


def is_lookup(text: str) -> bool:
    return "\n[lookup " in text or "\nQuestion: which box" in text


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_the_fraction_of_lookup_rows_is_honoured(tiny_tokenizer, fraction):
    rows = word_rows(tiny_tokenizer, 12)
    mixed = mix_retrieval(rows, tiny_tokenizer, fraction, tag="t")
    changed = [i for i in range(12) if not torch.equal(mixed[i], rows[i])]
    assert mixed.shape == rows.shape and len(changed) == round(12 * fraction)
    assert all(is_lookup(tiny_tokenizer.decode(mixed[i])) for i in changed)
    assert torch.equal(mixed, mix_retrieval(rows, tiny_tokenizer, fraction, tag="t"))  # the same on every run


def test_a_lookup_row_hides_the_asked_fact_and_ends_with_its_answer(tiny_tokenizer):
    rows = word_rows(tiny_tokenizer, 8)
    for i, row in enumerate(rows):
        out = lookup_row(row, tiny_tokenizer, random.Random(i))
        assert out.shape == (T,) and out[-1] == tiny_tokenizer.eos_token_id
        text = tiny_tokenizer.decode(out[:-1])
        ledger = re.search(r"\[lookup (\S+)\] => (\d+)$", text)
        aside = re.search(r"which box holds (\w+)'s spare key\?\nAnswer: box (\d+)$", text)
        key, value = (ledger or aside).groups()
        fact = f"[entry {key}] => {value}" if ledger else f"(Aside: {key} keeps the spare key in box {value}.)"
        assert fact in text[: text.rindex("\n")]  # stated before the question
        assert "quick" in text  # the training text is the filler


def test_asked_rows_ask_every_fact_and_say_where_each_answer_ends(tiny_tokenizer):
    """asked_rows (the cache score's fitting rows): every fact stated before the questions, each asked once, its
    answer ending where `ends` says; the same rows on every call."""
    rows = word_rows(tiny_tokenizer, 4)
    out, ends = asked_rows(rows, tiny_tokenizer, 2, tag="fit")
    assert out.shape == rows.shape and [len(e) for e in ends] == [2] * 4
    for row, row_ends in zip(out, ends):
        assert row_ends == sorted(row_ends) and row_ends[-1] == T - 1 and row[-1] == tiny_tokenizer.eos_token_id
        names = set()
        for end in row_ends:
            text = tiny_tokenizer.decode(row[:end])
            asked = list(re.finditer(r"(?:\[lookup (\S+)\] =>|which box holds (\w+)'s spare key\?\nAnswer: box) "
                                     r"(\d+)$", text))
            assert asked, text[-80:]  # the row up to `end` closes with a question and its answer
            name, value = asked[-1].group(1) or asked[-1].group(2), asked[-1].group(3)
            fact = f"[entry {name}] => {value}" if asked[-1].group(1) else \
                f"(Aside: {name} keeps the spare key in box {value}.)"
            assert 0 <= text.find(fact) < asked[-1].start()  # stated before it is asked
            names.add(name)
        assert len(names) == 2  # every fact asked once
    again, ends_again = asked_rows(rows, tiny_tokenizer, 2, tag="fit")
    assert torch.equal(out, again) and ends == ends_again


def test_rows_too_short_for_a_lookup_are_a_clear_error(tiny_tokenizer):
    with pytest.raises(LinearizeError, match="--seq-len 16 is too short"):
        lookup_row(torch.zeros(16, dtype=torch.long), tiny_tokenizer, random.Random(0))


def test_training_lookups_never_contain_the_eval_prompts(tiny_tokenizer):
    """Names, sentences, questions and filler of the eval's recall prompts (and of the layer probe) never appear in
    what the generator writes, and the generator's words never in theirs."""
    eval_texts = [passkey.INTRO, passkey.FILLER, passkey.NEEDLE, passkey.QUESTION, passkey.MULTIKEY_INTRO,
                  passkey.MULTIKEY_NEEDLE, passkey.MULTIKEY_QUESTION, recall_layers.PROBE_FILLER,
                  recall_layers.PROBE_NEEDLE, recall_layers.PROBE_QUESTION]
    eval_sentences = {s.strip() for t in eval_texts for s in re.split(r"[.?\n]", t.replace("{key}", "").replace(
        "{name}", "").replace("{value}", "")) if len(s.strip()) > 8}
    rng = random.Random(0)
    generated = []
    for _ in range(400):
        facts, [(question, answer)] = lookup_pairs(rng, rng.choice([1, 4, 16]), 1)
        generated.append("".join(facts) + question + answer)
    text = "\n".join(generated)
    assert not [s for s in eval_sentences if s in text]
    assert not set(re.findall(r"[A-Z][a-z]+", text)) & set(passkey.NAMES)
    assert not re.search(r"(?<!\d)\d{5}(?!\d)", text)  # the eval's codes have 5 digits, these 3 or 6
    for form in FORMATS:
        assert not any(part in t for t in eval_texts for part in (form.fact.split("{")[0].strip(),
                                                                   form.question.split("{")[0].strip()) if part)
    rows = mix_retrieval(word_rows(tiny_tokenizer, 10), tiny_tokenizer, 1.0, tag="0-stage1")
    decoded = "\n".join(tiny_tokenizer.decode(r) for r in rows)
    assert not [s for s in eval_sentences if s in decoded]


def test_convert_mixes_lookups_into_both_stages_and_resume_keeps_the_fraction(model_dir, tmp_path, tiny_tokenizer):
    data = write_word_jsonl(tmp_path / "data.jsonl", lines=3000)
    settings = ConvertSettings(model=str(model_dir), data=str(data), seq_len=T, transfer_tokens=8 * T,
                               lora_tokens=4 * T, eval_tokens=T, retrieval_fraction=0.25, device="cpu")
    out = tmp_path / "run"
    c = Conversion(settings, out, RunState(out, settings, resume=False), None, None, False, lambda *a: None)
    load_inputs(c)
    assert sum(is_lookup(tiny_tokenizer.decode(r)) for r in c.train1) == 2
    assert sum(is_lookup(tiny_tokenizer.decode(r)) for r in c.train2) == 1
    assert not any(is_lookup(tiny_tokenizer.decode(r)) for r in c.heldout)
    assert json.loads((out / "progress.json").read_text())["settings"]["retrieval_fraction"] == 0.25
    other = ConvertSettings(**{**settings.__dict__, "retrieval_fraction": 0.5})
    with pytest.raises(LinearizeError, match="retrieval_fraction"):
        RunState(out, other, resume=True)
    with pytest.raises(LinearizeError, match="between 0 and 1"):
        ConvertSettings(retrieval_fraction=1.5).check()
