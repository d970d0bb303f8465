"""Every supported architecture on a tiny random config built from transformers (no downloads): with the linear
part switched off the converted model reproduces the teacher's logits; a real conversion decodes step by step
exactly like its full forward and survives save/load."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import linearize
from linearize.errors import LinearizeError
from linearize.layers.linear_attention import FULL_SOFTMAX, LinearAttentionConfig
from linearize.loading.architectures import ARCHITECTURES, architecture_of
from linearize.models.linearized import LinearizedForCausalLM
from linearize.ops.rotary import rotate
from linearize.training_free import TrainingFree

from conftest import decode_stepwise

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
    # 2 sliding-window layers (window 8) around 2 global ones; query_pre_attn_scalar != head_dim
    "gemma3_text": lambda: Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, sliding_window=8,
                                            query_pre_attn_scalar=24, layer_types=["sliding_attention",
                                            "full_attention", "sliding_attention", "full_attention"]),
}
T = 40  # longer than Gemma's local window


def teacher_for(name):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def ids(vocab=128, n=T):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


def test_every_registered_architecture_is_tested():
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_linear_part_off_reproduces_teacher_logits(name):
    teacher = teacher_for(name)
    x = ids()
    with torch.no_grad():
        expected = teacher(x).logits
        model = LinearizedForCausalLM.from_teacher(teacher, FULL_SOFTMAX)
        got = model(input_ids=x).logits
        stepwise, _ = decode_stepwise(model, x, 11)  # the exact-softmax student decodes from a KV cache
    assert len(model.attention_modules()) == teacher.config.num_hidden_layers
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepwise, expected, rtol=1e-4, atol=1e-4)


def test_gemma3_local_layers_keep_the_teacher_window_and_global_layers_are_linearized():
    teacher = teacher_for("gemma3_text")
    model = LinearizedForCausalLM.from_teacher(teacher, LinearAttentionConfig(window=4, chunk_size=8, heavy=2))
    cfgs = [a.config for a in model.attention_modules()]
    assert [(c.linear, c.window, c.heavy) for c in cfgs] == [(False, 8, 0), (True, 4, 2), (False, 8, 0), (True, 4, 2)]
    assert [a.scaling for a in model.attention_modules()] == [24**-0.5] * 4
    # local layers add no parameters: transfer trains only the global ones
    assert [bool(a.trainable_transfer_parameters()) for a in model.attention_modules()] == [False, True, False, True]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("attention", ["lolcats", "gated-delta"])
def test_conversion_decodes_like_full_forward_and_round_trips(name, attention, tmp_path):
    teacher = teacher_for(name)
    cfg = linearize.attention_preset(attention, window=6 if attention == "lolcats" else 0, chunk_size=8)
    model = LinearizedForCausalLM.from_teacher(teacher, cfg)
    x = ids()[:1]
    with torch.no_grad():
        full = model(input_ids=x).logits
        stepwise, _ = decode_stepwise(model, x, 9)
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, LinearizedForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, full)


def test_unsupported_architecture_names_the_supported_ones():
    class Cfg:
        model_type = "gpt2"

    with pytest.raises(LinearizeError, match="llama.*qwen3"):
        architecture_of(Cfg())
    gemma = CONFIGS["gemma3_text"]()
    gemma.attn_logit_softcapping = 50.0
    with pytest.raises(LinearizeError, match="attn_logit_softcapping"):
        architecture_of(gemma)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rope_frequencies_reproduce_the_teacher_rotary(name):
    """Each layer reads the RoPE frequencies of its own rotary (Gemma 3: local and global layers differ): rotating by
    them is what the teacher's rotary embedding does (what a cache scored at a distance relies on)."""
    teacher = teacher_for(name)
    model = LinearizedForCausalLM.from_teacher(teacher, LinearAttentionConfig(window=4, chunk_size=8))
    rotary = teacher.model.rotary_emb
    head_dim = model.attention_modules()[0].head_dim
    x, pos = torch.randn(1, 2, 5, head_dim), torch.arange(3, 8)[None]
    for i, a in enumerate(model.attention_modules()):
        kw = {"layer_type": teacher.config.layer_types[i]} if name == "gemma3_text" else {}
        cos, sin = rotary(x, pos, **kw)
        expected, _ = a._apply_rotary(x, x, cos, sin)
        torch.testing.assert_close(rotate(x, pos[0], a.rope_frequencies), expected)
    if name == "gemma3_text":
        local, other = model.attention_modules()[0].rope_frequencies, model.attention_modules()[1].rope_frequencies
        assert not torch.equal(local, other)


def test_gemma3_saved_with_a_cache_keeps_its_local_layers_exact(tmp_path):
    """A saved config holds the global layers' sparse cache; loading gives it to them alone (the teacher's local
    layers stay its exact window: a cache there changed every output beyond the local window)."""
    teacher = teacher_for("gemma3_text")
    model = LinearizedForCausalLM.from_teacher(teacher, LinearAttentionConfig(window=4, sinks=1, chunk_size=8)).eval()
    TrainingFree(cache=2, cache_every=8).apply(model)
    x = ids()[:1]
    with torch.no_grad():
        before = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    loaded = LinearizedForCausalLM.from_pretrained(tmp_path).eval()
    assert [a.config.cache for a in loaded.attention_modules()] == [0, 2, 0, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, before)
