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
from linearize.ops.hybrid_attention import (attention_chunked, attention_quadratic, attention_recurrent, empty_state,
                                             time_slice)

from conftest import decode_stepwise
from test_families import FAMILIES, _blocks, inputs, phi

ALL = {"sum": dict(gate=False, delta=False), **FAMILIES}
CASES = [  # (B, H, Hkv, T, d, window, chunk, sinks)
    (2, 4, 2, 37, 8, 5, 8, 4),  # GQA, sinks leave the window early on
    (1, 2, 2, 10, 8, 16, 4, 3),  # shorter than the window: the sinks never leave it
    (2, 4, 4, 33, 8, 0, 8, 2),  # pure linear + sinks
    (1, 6, 2, 29, 8, 8, 16, 1),  # GQA groups of 3, one sink
    (1, 2, 1, 3, 8, 4, 4, 6),  # more sinks than tokens
]


def brute_force_sum_rule(q, k, v, fq, fk, mix, window, scale, sinks):
    """y_i = sum_j a_ij v_j / sum_j a_ij, one query and one key at a time (no gate, sum rule)."""
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
    args, _ = inputs(B, H, Hkv, T, d, gate=False, delta=False)
    if not linear:
        args = (*args[:3], None, None, args[5])
    ref = brute_force_sum_rule(*args, window, d**-0.5, sinks)
    torch.testing.assert_close(attention_quadratic(*args, window, d**-0.5, sinks=sinks), ref, rtol=1e-10, atol=1e-10)


def test_pure_linear_with_sinks_matches_brute_force():
    args, _ = inputs(2, 4, 4, 33, 8, gate=False, delta=False)
    ref = brute_force_sum_rule(*args, 0, 8**-0.5, 2)
    torch.testing.assert_close(attention_quadratic(*args, 0, 8**-0.5, sinks=2), ref, rtol=1e-10, atol=1e-10)


def test_sinks_change_the_result():
    """Guard against a test that cannot fail: sinks must make a difference once they leave the window."""
    args, kw = inputs(1, 4, 2, 30, 8, gate=False, delta=False)
    a = attention_quadratic(*args, 5, 8**-0.5, sinks=0)
    b = attention_quadratic(*args, 5, 8**-0.5, sinks=3)
    assert torch.equal(a[:, :, :5], b[:, :, :5])  # up to query 4 every key is inside the window
    assert (a[:, :, 5:] - b[:, :, 5:]).abs().amin(-1).amin(0).amin(0).min() > 1e-6  # from query 5 every output moves


@pytest.mark.parametrize("family", sorted(ALL))
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk,sinks", CASES)
def test_forms_agree_with_sinks(B, H, Hkv, T, d, window, chunk, sinks, family):
    args, kw = inputs(B, H, Hkv, T, d, **ALL[family])
    scale = d**-0.5
    ref = attention_quadratic(*args, window, scale, sinks=sinks, **kw)
    chunked = attention_chunked(*args, window, scale, chunk=chunk, sinks=sinks, **kw)
    state = empty_state(B, Hkv, d, args[3].shape[-1], torch.float64, "cpu", delta=ALL[family]["delta"])
    recurrent = attention_recurrent(*args, window, scale, state, sinks=sinks, key_features=phi(ALL[family]["delta"]),
                                    **kw)
    torch.testing.assert_close(chunked, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(recurrent, ref, rtol=1e-10, atol=1e-10)
    assert state.sink_k is None or state.sink_k.shape[2] == min(sinks, max(T - window, 0))


@pytest.mark.parametrize("family", sorted(ALL) + ["none"])  # "none": StreamingLLM (sinks + window, no memory)
@pytest.mark.parametrize("window,sinks", [(5, 4), (0, 3), (8, 1), (3, 12)])
def test_sinks_survive_prefill_blocks_and_ring_decoding(family, window, sinks):
    """Blocks (1, 3, 11, ... tokens) then decoding past several ring turns, then a block, then decoding."""
    if family == "none" and window == 0:
        pytest.skip("no attention to speak of")
    args, kw = inputs(1, 4, 2, 60, 8, **ALL.get(family, ALL["sum"]))
    if family == "none":
        args = (*args[:3], None, None, args[5])
    ref = attention_quadratic(*args, window, 8**-0.5, sinks=sinks, **kw)
    q, k, v, fq, fk, mix = args
    spans = [(s, "chunked") for s in _blocks(20)] + [(slice(20, 41), "recurrent"), (slice(41, 47), "chunked"),
                                                     (slice(47, 60), "recurrent")]
    state, ys = None, []
    for s, form in spans:
        parts = [time_slice(x, s) for x in (q, k, v, fq, fk)]
        kws = {n: time_slice(x, s) for n, x in kw.items()}
        if form == "chunked":
            y, state = attention_chunked(*parts, mix, window, 8**-0.5, chunk=4, return_state=True, state=state,
                                         sinks=sinks, key_features=phi(kw["beta"] is not None), **kws)
        else:
            y = attention_recurrent(*parts, mix, window, 8**-0.5, state, sinks=sinks,
                                    key_features=phi(kw["beta"] is not None), **kws)
        ys.append(y)
        assert state.seen == s.stop
        assert state.sink_k is None or state.sink_k.shape[2] <= sinks
    torch.testing.assert_close(torch.cat(ys, dim=2), ref, rtol=1e-10, atol=1e-10)


def test_state_bytes_do_not_grow_with_length():
    args, kw = inputs(1, 4, 2, 200, 8, gate=True, delta=False)
    sizes = []
    for T in (50, 200):
        parts = [time_slice(x, slice(0, T)) for x in args[:5]]
        _, state = attention_chunked(*parts, args[5], 8, 8**-0.5, chunk=16, return_state=True, sinks=4,
                                     log_gate=time_slice(kw["log_gate"], slice(0, T)))
        sizes.append(state.nbytes())
    assert sizes[0] == sizes[1] > 0


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
    assert all(s.sink_k.shape[2] == 3 and s.win_k.shape[2] == 6 for s in state)


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
