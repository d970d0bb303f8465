"""Smoke tests on the real bundled SmolLM2-135M-Instruct (minutes on CPU): `python -m pytest -m smoke`."""

import json

import pytest
import torch

import linearize
from linearize.cli import main

pytestmark = pytest.mark.smoke


def test_tiny_budget_conversion_reloads_and_generates(tmp_path):
    """A conversion on 1024 + 512 tokens: the teacher's held-out perplexity is the known one, the student's stays
    within 10 % of it, the saved folder reloads into the model that was measured, and it answers a question whose
    answer is known. Measured (CPU, float32): teacher 46.769 on the 2 held-out rows of 128 tokens, student 50.728
    after stage 1, 50.778 after stage 2, 47.104 as saved (with the sparse cache); the answer 'The capital of France
    is Paris.' (the chat prompt fits the 64-token window)."""
    from linearize.evaluate.texts import eval_sequences
    from linearize.run_folder import student_ppl

    out = tmp_path / "smol"
    argv = ["convert", "--out", str(out), "--seq-len", "128", "--window", "64", "--tokens", "1024",
            "--lora-tokens", "512", "--eval-tokens", "256", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "convert.json").read_text())
    assert summary["teacher_ppl"] == pytest.approx(46.77, rel=0.01)
    ppl = student_ppl(summary)
    assert ppl < 1.10 * summary["teacher_ppl"]  # an untrained or broken student is far above
    model, tokenizer = linearize.load(out)
    assert model.config.num_hidden_layers == 30
    rows = eval_sequences("sharegpt", tokenizer, 128, 2)  # the conversion's held-out rows (--eval-tokens 256)
    with torch.no_grad():
        nll = torch.stack([model(input_ids=row[None], labels=row[None]).loss for row in rows]).mean()
    assert nll.exp().item() == pytest.approx(ppl, rel=1e-3)
    text = linearize.generate_text(model, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in text


def test_generate_answers_a_question_with_a_known_answer():
    """generate_text on the teacher: the chat template, greedy decoding and detokenisation give the known answer."""
    from linearize.loading.teacher import load_teacher

    teacher, tokenizer = load_teacher()
    text = linearize.generate_text(teacher, tokenizer, "What is the capital of France?", max_new_tokens=20)
    assert "Paris" in text  # 'The capital of France is Paris.' (bundled SmolLM2-135M-Instruct, CPU)


def test_teacher_is_reproduced_when_the_linear_part_is_off():
    """Window >= sequence and all weight on the window: the student is exactly the softmax teacher."""
    from linearize.loading.teacher import load_teacher
    from linearize.layers.linear_attention import LinearAttentionConfig
    from linearize.models.linearized import LinearizedForCausalLM

    teacher, tokenizer = load_teacher()
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = teacher(ids).logits
        student = LinearizedForCausalLM.from_teacher(teacher, LinearAttentionConfig(window=ids.shape[1]))
        for attn in student.attention_modules():
            attn.mix_logit.fill_(float("inf"))
        got = student(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
