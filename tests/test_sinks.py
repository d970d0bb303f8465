"""Attention sinks: the first S tokens stay in exact softmax for ever and never enter the linear memory.
Every family with sinks: brute force == quadratic == chunked == recurrent == prefill in blocks + decoding; with
the linear part off, a whole model equals its teacher under the sink + window mask (StreamingLLM)."""

import json
from dataclasses import replace

import pytest
import torch

import linearize
from linearize import LinearAttentionConfig, LinearizedForCausalLM
from linearize.errors import LinearizeError
from linearize.layers.linear_attention import attention_preset
from linearize.ops.hybrid.chunked import attention_chunked
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.recurrent import attention_recurrent
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants

from conftest import attention_inputs, blocks, decode_stepwise, run_in_spans

FAMILIES = ["sum", "gated", "delta", "gated-delta"]
CASES = [  # (B, H, Hkv, T, d, window, chunk, sinks)
    (2, 4, 2, 37, 8, 5, 8, 4),  # GQA, sinks leave the window early on
    (1, 2, 2, 10, 8, 16, 4, 3),  # shorter than the window: the sinks never leave it
    (2, 4, 4, 33, 8, 0, 8, 2),  # pure linear + sinks
    (1, 6, 2, 29, 8, 8, 16, 1),  # GQA groups of 3, one sink
    (1, 2, 1, 3, 8, 4, 4, 6),  # more sinks than tokens
]


def brute_force_sum_rule(streams, mix, window, scale, sinks):
    """y_i = sum_j a_ij v_j / sum_j a_ij, one query and one key at a time (no gate, sum rule)."""
    q, k, v, fq, fk = streams.q, streams.k, streams.v, streams.fq, streams.fk
    B, H, T, d = q.shape
    G = H // k.shape[1]
    y = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kh = h // G
            for i in range(T):
                exact = [j for j in range(i + 1) if j > i - window or j < sinks]
                linear = [j for j in range(sinks, i - window + 1)]
                s = torch.stack([q[b, h, i] @ k[b, kh, j] * scale for j in exact]) if exact else None
                a = {}
                if exact:
                    e = torch.exp(s - s.max())
                    w = mix[h] if fq is not None and (window > 0 or sinks > 0) else 1.0
                    a.update({j: w * e[n] for n, j in enumerate(exact)})
                for j in linear if fq is not None else ():
                    a[j] = a.get(j, 0) + (1 - mix[h]) * (fq[b, h, i] @ fk[b, kh, j])
                den = sum(a.values())
                y[b, h, i] = sum(a[j] * v[b, kh, j] for j in a) / (den + (1e-6 if fq is not None else 0))
    return y


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk,sinks", CASES[:2] + CASES[3:])
def test_quadratic_form_with_sinks_matches_brute_force(B, H, Hkv, T, d, window, chunk, sinks, linear):
    streams, mix, _, _ = attention_inputs(B, H, Hkv, T, d, linear=linear)
    ref = brute_force_sum_rule(streams, mix, window, d**-0.5, sinks)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, linear=linear)
    torch.testing.assert_close(attention_quadratic(streams, spec, LayerConstants(mix)), ref, rtol=1e-10, atol=1e-10)


def test_pure_linear_with_sinks_matches_brute_force():
    streams, mix, _, _ = attention_inputs(2, 4, 4, 33, 8)
    ref = brute_force_sum_rule(streams, mix, 0, 8**-0.5, 2)
    torch.testing.assert_close(attention_quadratic(streams, AttentionSpec(0, 8**-0.5, sinks=2), LayerConstants(mix)),
                               ref, rtol=1e-10, atol=1e-10)


def test_sinks_change_the_result():
    """Guard against a test that cannot fail: sinks must make a difference once they leave the window."""
    streams, mix, _, _ = attention_inputs(1, 4, 2, 30, 8)
    a = attention_quadratic(streams, AttentionSpec(5, 8**-0.5, sinks=0), LayerConstants(mix))
    b = attention_quadratic(streams, AttentionSpec(5, 8**-0.5, sinks=3), LayerConstants(mix))
    assert torch.equal(a[:, :, :5], b[:, :, :5])  # up to query 4 every key is inside the window
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().amin(-1).amin(0).amin(0).min() > 1e-6  # from query 5 every output moves


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk,sinks", CASES)
def test_forms_agree_with_sinks(B, H, Hkv, T, d, window, chunk, sinks, family):
    streams, mix, key_features, rule = attention_inputs(B, H, Hkv, T, d, family)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, rule=rule)
    ref = attention_quadratic(streams, spec, LayerConstants(mix))
    chunked, _ = attention_chunked(streams, spec, LayerConstants(mix), chunk=chunk)
    recurrent, state = attention_recurrent(streams, spec, LayerConstants(mix, key_features), output_final_state=True)
    torch.testing.assert_close(chunked, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(recurrent, ref, rtol=1e-10, atol=1e-10)
    assert state.sinks is None or len(state.sinks) == min(sinks, max(T - window, 0))


@pytest.mark.parametrize("family", FAMILIES + ["none"])  # "none": StreamingLLM (sinks + window, no memory)
@pytest.mark.parametrize("window,sinks", [(5, 4), (0, 3), (8, 1), (3, 12)])
def test_sinks_survive_prefill_blocks_and_ring_decoding(family, window, sinks):
    """Blocks (1, 3, 11, ... tokens) then decoding past several ring turns, then a block, then decoding."""
    if family == "none" and window == 0:
        pytest.skip("no attention to speak of")
    linear = family != "none"
    streams, mix, key_features, rule = attention_inputs(1, 4, 2, 60, 8, family if linear else "sum", linear=linear)
    spec = AttentionSpec(window, 8**-0.5, sinks=sinks, rule=rule, linear=linear)
    layer = LayerConstants(mix, key_features)
    ref = attention_quadratic(streams, spec, layer)
    spans = [(s, "chunked") for s in blocks(20)] + [(slice(20, 41), "recurrent"), (slice(41, 47), "chunked"),
                                                    (slice(47, 60), "recurrent")]

    def check(s, state):
        assert state.seen == s.stop
        assert state.sinks is None or len(state.sinks) <= sinks

    y, _ = run_in_spans(streams, spec, layer, spans, check=check)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_state_bytes_do_not_grow_with_length():
    """The decoding state of a bounded window has the same size after 50, 200 and 400 tokens."""
    streams, mix, _, _ = attention_inputs(1, 4, 2, 400, 8, "gated")
    spec = AttentionSpec(8, 8**-0.5, sinks=4)
    sizes = [attention_chunked(streams.slice(slice(0, T)), spec, LayerConstants(mix), None, True, chunk=16)[1].nbytes()
             for T in (50, 200, 400)]
    assert sizes[0] == sizes[1] == sizes[2] > 0


def sink_window_mask(T: int, window: int, sinks: int) -> torch.Tensor:
    """(1, 1, T, T) additive mask: query i sees keys j <= i that are among the first `sinks` or the last `window`."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & ((j > i - window) | (j < sinks))
    return torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None]


def test_streaming_preset_equals_teacher_under_sink_window_mask(tiny_teacher):
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny_teacher(input_ids=ids, attention_mask=sink_window_mask(40, 6, 3)).logits
        plain = tiny_teacher(input_ids=ids).logits
    cfg = attention_preset("streaming", window=6, sinks=3)
    assert not cfg.linear
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, replace(cfg, chunk_size=4)).eval()
    with torch.no_grad():
        got = student(input_ids=ids).logits
        stepwise, state = decode_stepwise(student, ids, prompt=9)
    assert (plain - expected).abs().max() > 1e-3  # the mask matters at this length
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepwise, expected, rtol=1e-4, atol=1e-4)
    assert all(len(s.sinks) == 3 and len(s.win) == 6 for s in state)


def test_sinks_saved_and_reloaded(tiny_teacher, tmp_path):
    cfg = LinearAttentionConfig(window=4, sinks=2, chunk_size=4)
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, cfg).eval()
    student.save_pretrained(tmp_path)
    again = LinearizedForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.attention["sinks"] == 2
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, student(input_ids=ids).logits)


def test_bad_sinks_are_refused():
    with pytest.raises(LinearizeError, match="sinks"):
        LinearAttentionConfig(window=None, sinks=4, linear=False)
    with pytest.raises(LinearizeError, match="sinks"):
        LinearAttentionConfig(sinks=-1)


def test_convert_streaming_trains_nothing_and_sinks_option(model_dir, data_file, tmp_path):
    """`--attention streaming` saves the teacher under the sink + window mask without training; `--sinks` sets the
    sinks of a hybrid family, and both survive saving."""
    from test_cli import SMALL

    from linearize.cli import main

    base = ["convert", "--model", str(model_dir), "--data", str(data_file), *SMALL]
    assert main([*base, "--out", str(tmp_path / "s"), "--attention", "streaming"]) == 0
    summary = json.loads((tmp_path / "s" / "convert.json").read_text())
    assert "transfer" not in summary and "lora" not in summary and summary["stage1_ppl"] > 1.0
    model, _ = linearize.load(tmp_path / "s")
    assert model.config.attention["sinks"] == 4 and not model.config.attention["linear"]
    assert main([*base, "--out", str(tmp_path / "h"), "--sinks", "2"]) == 0
    model, _ = linearize.load(tmp_path / "h")
    assert model.config.attention["sinks"] == 2 and model.config.attention["window"] == 8
    assert json.loads((tmp_path / "h" / "convert.json").read_text())["transfer"]["tokens"] == 256
