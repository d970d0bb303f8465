"""Converted model: forward forms agree, decoding equals the full forward with flat memory, save/load round-trips."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.layers.linear_attention import LinearAttentionConfig
from linearize.models.linearized import LinearizedForCausalLM

from conftest import decode_stepwise


def convert(teacher, **kw):
    return LinearizedForCausalLM.from_teacher(teacher, LinearAttentionConfig(**{"window": 8, "chunk_size": 8, **kw}))


def test_every_attention_is_replaced_and_projections_shared(tiny_teacher):
    q_weights = [layer.self_attn.q_proj.weight for layer in tiny_teacher.model.layers]
    model = convert(tiny_teacher)
    attn = model.attention_modules()
    assert len(attn) == 2
    assert all(a.q_proj.weight is w for a, w in zip(attn, q_weights))


def test_quadratic_and_chunked_model_forward_agree(tiny_teacher):
    model = convert(tiny_teacher)
    ids = torch.randint(0, 320, (2, 45))
    with torch.no_grad():
        chunked = model(input_ids=ids).logits
        for a in model.attention_modules():
            a.form = "quadratic"
        quadratic = model(input_ids=ids).logits
    torch.testing.assert_close(chunked, quadratic, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 8])
def test_step_by_step_decoding_equals_full_forward(tiny_teacher, window):
    model = convert(tiny_teacher, window=window)
    ids = torch.randint(0, 320, (1, 40))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        stepwise, state = decode_stepwise(model, ids, 13)
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-5)
    assert state.seen == 40


@pytest.mark.parametrize("keep_softmax", [(), (1,)])
@pytest.mark.parametrize("window", [0, 8])
def test_prefill_in_blocks_equals_full_forward(tiny_teacher, window, keep_softmax):
    """generate.prefill feeds a long prompt a block at a time; logits and the decoding after it are unchanged."""
    model = LinearizedForCausalLM.from_teacher(
        tiny_teacher, LinearAttentionConfig(window=window, chunk_size=8), keep_softmax=keep_softmax)
    ids = torch.randint(0, 320, (1, 50))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        logits, state = linearize.generate.decoding.prefill(model, ids[:, :45], block=16)  # blocks of 16, 16, 13
        after = model(input_ids=ids[:, 45:46], linear_state=state).logits
    torch.testing.assert_close(logits, full[:, 44], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after[:, 0], full[:, 45], rtol=1e-4, atol=1e-5)
    assert state.seen == 46
    assert len(state[0].win) == min(window, 46)  # the linear layer holds its window, not the prompt
    if keep_softmax:
        assert len(state[1].win) == 46  # the kept softmax layer holds a KV cache


def test_decoding_memory_is_flat_beyond_the_window(tiny_teacher):
    model = convert(tiny_teacher, window=8)
    sizes = []
    state = model.new_decoding_state()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 320, (1, 4)), linear_state=state)
        for _ in range(40):
            model(input_ids=torch.randint(0, 320, (1, 1)), linear_state=state)
            sizes.append(state.nbytes())
    assert sizes[-1] == sizes[10] == max(sizes)  # grows only until the window (8 tokens) is full
    assert sizes[0] < sizes[-1]


def test_save_load_roundtrip_and_transformers_auto_class(tiny_teacher, tiny_tokenizer, tmp_path):
    model = convert(tiny_teacher)
    with torch.no_grad():
        for p in model.attention_modules()[0].feature_map_q.parameters():
            p.add_(0.1)  # a trained-looking, non-initial feature map must survive the round trip
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    ids = torch.randint(0, 320, (1, 30))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded, tok = linearize.load(tmp_path)
        via_auto = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert isinstance(via_auto, LinearizedForCausalLM)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        torch.testing.assert_close(via_auto(input_ids=ids).logits, expected)
    assert tok is not None and tok.eos_token == "<eos>"


def test_load_is_not_shadowed_by_a_sub_package():
    import linearize.loading.teacher  # noqa: F401  (importing a sub-package sets an attribute on linearize)

    assert callable(linearize.load)


def test_load_rejects_corrupt_weights_and_plain_models(tiny_teacher, tmp_path):
    model = convert(tiny_teacher)
    model.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(linearize.LinearizeError, match="corrupt"):
        linearize.load(tmp_path / "ok")
    AutoModelForCausalLM.from_config(tiny_teacher.config).save_pretrained(tmp_path / "plain")
    with pytest.raises(linearize.LinearizeError, match="plain model"):
        linearize.load(tmp_path / "plain")
    with pytest.raises(linearize.LinearizeError, match="no config.json"):
        linearize.load(tmp_path / "missing")


def test_generate_ids_greedy_matches_argmax_of_full_forward(tiny_teacher):
    model = convert(tiny_teacher)
    prompt = torch.randint(0, 320, (1, 6))
    ids, state = linearize.generate_ids(model, prompt, max_new_tokens=12)
    assert ids.shape == (1, 18) and torch.equal(ids[:, :6], prompt)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits
    assert torch.equal(logits[0, 5:].argmax(-1), ids[0, 6:])
    assert state.seen == 17
