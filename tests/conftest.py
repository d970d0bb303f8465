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


def write_tiny_gguf(path, tokenizer, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    ffn: int = 128):
    """A random float32 Llama in GGUF (the format of the bundled model) with `tokenizer`'s BPE vocabulary, written
    with the gguf package; transformers loads it like the bundled file. Returns path."""
    import json

    import gguf
    import numpy as np

    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = sorted(bpe["vocab"], key=bpe["vocab"].get)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_bos_token_id(tokenizer.eos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    g = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd": (len(vocab), hidden), "output_norm": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in (
            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
            ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn)))})
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (0.02 * g.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
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


# ---- shared attention-op inputs: one family x form matrix (test_attention.py) and the sinks tests ----

FAMILIES = {  # family -> (forget gate, delta rule, output normalisation); "sum:<map>" uses a real feature map, the
    # others random features; "norm" families normalise the linear part's output (norm_gain) instead of sharing the
    # normaliser (TransNormer's NormAttention)
    "sum": (False, False, False), "gated": (True, False, False), "delta": (False, True, False),
    "gated-delta": (True, True, False), "sum:hedgehog": (False, False, False), "sum:t2r": (False, False, False),
    "sum:elu": (False, False, False), "sum:nala": (False, False, False), "norm": (False, False, True),
    "gated-delta-norm": (True, True, True),
}


def norm_gain(family, H, d, dtype=None, seed=1):
    """The output normalisation's gain (H, d) of a "norm" family (random, positive); None for the others."""
    import torch

    if not FAMILIES[family][2]:
        return None
    return 0.5 + torch.rand(H, d, generator=torch.Generator().manual_seed(seed), dtype=dtype or torch.float64)


def phi(delta: bool):
    """The key feature map of attention_inputs(): fk = phi(k) (d -> 2d positive features; unit norm for the delta
    rule). A decoding state keeps its window keys, not their features: the ops recompute them with this map."""
    import torch
    import torch.nn.functional as F

    def key_features(k):
        d = k.shape[-1]
        fk = torch.softmax(k @ torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(7)).to(k.dtype), -1)
        return F.normalize(fk, dim=-1) if delta else fk
    return key_features


def attention_inputs(B, H, Hkv, T, d, family="sum", dtype=None, seed=0, linear=True):
    """Random streams for one attention family. Returns (Streams, mix (H,), key_features, rule); linear=False:
    q, k, v only (exact softmax)."""
    import torch
    import torch.nn.functional as F

    from linearize.ops.feature_maps import make_feature_map
    from linearize.ops.hybrid.state import Streams

    dtype = dtype or torch.float64
    gate, delta, _ = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g, dtype=dtype) for h in (H, Hkv, Hkv))
    if family.startswith("sum:"):  # a learnable feature map moved away from its identity init
        fmq = make_feature_map(family[4:], H, d, query=True).to(dtype)
        fmk = make_feature_map(family[4:], Hkv, d).to(dtype)
        with torch.no_grad():
            for p in list(fmq.parameters()) + list(fmk.parameters()):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
            fq, fk = fmq(q), fmk(k)
        key_features = fmk
    else:
        key_features = phi(delta)
        fq, fk = torch.rand(B, H, T, 2 * d, generator=g, dtype=dtype), key_features(k)
        if delta:
            fq = F.normalize(fq, dim=-1)
    log_gate = F.logsigmoid(torch.randn(B, Hkv, T, generator=g, dtype=dtype)) if gate else None
    beta = torch.rand(B, Hkv, T, generator=g, dtype=dtype) if delta else None
    mix = torch.rand(H, generator=g, dtype=dtype)
    if not linear:
        return Streams(k, v, q=q), mix, None, "sum"
    return Streams(k, v, q=q, fq=fq, fk=fk, log_gate=log_gate, beta=beta), mix, key_features, "delta" if delta else "sum"


def blocks(T: int) -> list:
    """Uneven blocks: 1 token, then 3, then blocks of 11 (some shorter and some longer than the test windows)."""
    cuts = sorted({0, *range(min(T, 4), T, 11), min(T, 1), min(T, 4), T})
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


def run_in_spans(streams, spec, layer, spans, chunk=4, check=None):
    """Feed `streams` span by span, each span as (slice, "chunked" | "recurrent"), every call continuing the state
    of the last one; layer: the LayerConstants. check(span, state) runs after each span. Returns (y over all spans,
    the final state)."""
    import torch

    from linearize.ops.hybrid.chunked import attention_chunked
    from linearize.ops.hybrid.recurrent import attention_recurrent

    state, ys = None, []
    for s, form in spans:
        kw = dict(chunk=chunk) if form == "chunked" else {}
        run = attention_chunked if form == "chunked" else attention_recurrent
        y, state = run(streams.slice(s), spec, layer, state, True, **kw)
        ys.append(y)
        if check:
            check(s, state)
    return torch.cat(ys, dim=2), state
