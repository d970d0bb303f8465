"""Shared pytest fixtures. Keep each fixture small, offline and fast."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens, eos "<eos>") trained in memory: no downloads, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sentences = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny tokenizer",
                 "User: hi there\nAssistant: hello, how can I help?", "linear attention is fast"]
    tok.train_from_iterator(sentences, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama_config(**overrides):
    """A 2-layer Llama with grouped-query attention (4 query heads, 2 KV heads); vocab fits tiny_tokenizer."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def tiny_teacher():
    """A random tiny Llama teacher in eval mode (fresh per test: conversion modifies it in place)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def tiny_converted(tmp_path_factory, tiny_tokenizer):
    """A converted tiny model folder (random Llama teacher, 2 layers): returns (student_dir, teacher_dir).
    convert.json names the teacher folder, as `linearize convert --model DIR` would."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from linearize.layers.linear_attention import LinearAttentionConfig
    from linearize.models.linearized import LinearizedForCausalLM

    root = tmp_path_factory.mktemp("tiny_converted")
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(cfg).eval()
    teacher_dir, student_dir = root / "teacher", root / "student"
    teacher.save_pretrained(teacher_dir)
    tiny_tokenizer.save_pretrained(teacher_dir)
    student = LinearizedForCausalLM.from_teacher(AutoModelForCausalLM.from_pretrained(teacher_dir).eval(),
                                                 LinearAttentionConfig(window=8, chunk_size=8))
    student.save_pretrained(student_dir)
    tiny_tokenizer.save_pretrained(student_dir)
    (student_dir / "convert.json").write_text(json.dumps({"settings": {"model": str(teacher_dir)}}))
    return student_dir, teacher_dir


def decode_stepwise(model, ids, prompt: int):
    """Feed a linearized model ids[:, :prompt] as one prompt, then the rest one token at a time.
    Returns (logits (B, T, V), the DecodingState it ends with): what the full forward must equal."""
    import torch

    state = model.new_decoding_state()
    steps = [model(input_ids=ids[:, :prompt], linear_state=state).logits]
    steps += [model(input_ids=ids[:, t : t + 1], linear_state=state).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1), state


def write_word_jsonl(path, lines: int = 1500):
    """A .jsonl of `lines` random 12-word documents over a small vocabulary (fits tiny_tokenizer); returns path."""
    import json

    import torch

    words = "the quick brown fox jumps over the lazy dog hello world linear attention is fast".split()
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(lines)]
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return path


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny Llama teacher folder (config.json, model.safetensors, tokenizer) for CLI tests."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data_file(tmp_path):
    return write_word_jsonl(tmp_path / "data.jsonl")


def interrupted_at_step(monkeypatch, n: int, run):
    """Call run() with the n-th optimizer step raising KeyboardInterrupt (as Ctrl-C would); afterwards the optimizer
    steps normally again. Fails if run() was not interrupted."""
    import pytest
    import torch

    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_interrupt(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
