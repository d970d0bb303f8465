"""The families of issue 16 beyond the form matrix of test_attention.py: TransNormer's NormAttention (output
normalisation of the linear part) against its formula written out, its DiagAttention layers (local_layers), and
NaLaFormer's norm-aware feature map; every new preset decodes with a state that does not grow."""

import pytest
import torch
import torch.nn.functional as F

import linearize
from linearize.errors import LinearizeError
from linearize.layers.linear_attention import attention_preset
from linearize.models.linearized import LinearizedForCausalLM
from linearize.ops.feature_maps import make_feature_map
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants

from conftest import attention_inputs, decode_stepwise, norm_gain


@pytest.mark.parametrize("window,sinks", [(0, 0), (5, 0), (5, 3)])
def test_norm_attention_is_its_formula(window, sinks):
    """y_i = w_h * softmax over E_i + (1 - w_h) * g_h * RMSNorm(sum_{S <= j <= i - W} (phi(q_i) . phi(k_j)) v_j),
    with E_i = the window and the sinks; written out here with explicit masks, no shared normaliser anywhere."""
    B, H, Hkv, T, d = 1, 4, 2, 23, 8
    streams, mix, _, _ = attention_inputs(B, H, Hkv, T, d, "norm")
    gain = norm_gain("norm", H, d)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    fk, v = streams.fk.repeat_interleave(2, dim=1), streams.v.repeat_interleave(2, dim=1)
    a = (streams.fq @ fk.transpose(-1, -2)) * ((j >= sinks) & (j <= i - window))
    lin = F.rms_norm(a @ v, (d,), eps=1e-6) * gain[None, :, None, :]
    expected = lin
    if window or sinks:
        k = streams.k.repeat_interleave(2, dim=1)
        exact = (j <= i) & ((j > i - window) | (j < sinks))
        sm = F.scaled_dot_product_attention(streams.q, k, v, attn_mask=exact, scale=d**-0.5)
        w = mix[None, :, None, None]
        expected = w * sm + (1 - w) * lin
    y = attention_quadratic(streams, AttentionSpec(window, d**-0.5, sinks=sinks), LayerConstants(mix, norm_gain=gain))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_norm_aware_map():
    """Non-negative; the key map keeps the key's norm (degree 1) and drops opposite-sign dimensions; a larger query
    norm gives a spikier (lower-entropy) attention over the same keys, as softmax does."""
    d = 8
    fq, fk = make_feature_map("nala", 1, d, query=True).double(), make_feature_map("nala", 1, d).double()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, d, generator=g, dtype=torch.float64), torch.randn(1, 1, 50, d, generator=g,
                                                                                   dtype=torch.float64)
    with torch.no_grad():
        assert (fq(q) >= 0).all() and (fk(k) >= 0).all()
        torch.testing.assert_close(fk(3 * k), 3 * fk(k))
        e0, e1 = torch.eye(d, dtype=torch.float64)[:2]
        assert (fq(e0.view(1, 1, 1, d)) @ fk(-e0.view(1, 1, 1, d)).transpose(-1, -2)).item() == 0
        assert (fq(e0.view(1, 1, 1, d)) @ fk((e0 + e1).view(1, 1, 1, d)).transpose(-1, -2)).item() > 0

        def entropy(query):
            p = fq(query) @ fk(k).transpose(-1, -2)
            p = p / p.sum()
            return -(p * p.clamp_min(1e-300).log()).sum().item()

        assert entropy(0.2 * q) > entropy(q) > entropy(5 * q)
        assert entropy(q) == pytest.approx(entropy(q * (1 + 1e-12)))


def test_local_layers_keep_the_window_and_survive_saving(tiny_teacher, tmp_path, tiny_tokenizer):
    cfg = attention_preset("transnormer", window=6, chunk_size=8, local_layers=1)
    model = LinearizedForCausalLM.from_teacher(tiny_teacher, cfg)
    first, second = model.attention_modules()
    assert not first.config.linear and first.config.window == 6 and first.config.sinks == 4
    assert first.approximates_teacher and not first.trainable_transfer_parameters()
    assert second.config.linear and second.norm_gain.shape == (4, 16)
    model.save_pretrained(tmp_path)
    loaded = LinearizedForCausalLM.from_pretrained(tmp_path)
    assert [m.config for m in loaded.attention_modules()] == [first.config, second.config]
    x = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)
    with pytest.raises(LinearizeError, match="leaves no linearized layer"):
        LinearizedForCausalLM.from_teacher(tiny_teacher, attention_preset("transnormer", window=6))  # 15 >= 2
    with pytest.raises(LinearizeError, match="local_layers"):
        attention_preset("transnormer", window=0)


@pytest.mark.parametrize("name", ["transnormer", "transnormer-norm", "nalaformer"])
def test_new_presets_decode_with_a_constant_state(name, tiny_teacher):
    cfg = attention_preset(name, window=6, chunk_size=8, local_layers=min(attention_preset(name).local_layers, 1))
    model = LinearizedForCausalLM.from_teacher(tiny_teacher, cfg)
    x = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=x).logits
        _, short = decode_stepwise(model, x[:, :20], 10)
        stepwise, long = decode_stepwise(model, x, 10)
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-5)
    assert short.nbytes() == long.nbytes() > 0
    assert linearize.LinearAttentionConfig(**model.config.attention) == cfg
