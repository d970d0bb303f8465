"""The exact part from one fused masked attention (ops/hybrid/composed.py, issue 37) against the quadratic reference.

On the CPU flex_attention runs eagerly (forward only) and the max score comes from the PyTorch stand-in
(composed.window_max); the CUDA test runs the compiled kernel, which returns the max itself (skips without CUDA)."""

import pytest
import torch

from linearize.ops.hybrid import composed
from linearize.ops.hybrid.chunked import attention_chunked
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants

from conftest import attention_inputs, norm_gain

CASES = [  # (B, H, Hkv, T, d, window, sinks)
    (2, 4, 2, 37, 8, 5, 0),  # GQA, odd length
    (1, 6, 2, 150, 8, 16, 4),  # groups of 3, sinks, longer than a 128-key block
    (1, 2, 2, 10, 8, 16, 2),  # shorter than the window
    (1, 3, 1, 300, 16, 64, 4),  # several blocks, the sinks far behind the window
]


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """The composed exact part on the CPU, every call into it counted."""
    monkeypatch.setenv(composed.FLEX_ENV, "1")
    monkeypatch.setattr(composed, "DEVICES", ("cuda", "cpu"))
    calls = []
    real = composed.exact_part
    monkeypatch.setattr(composed, "exact_part", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("family", ["sum", "gated", "delta", "norm"])
@pytest.mark.parametrize("B,H,Hkv,T,d,window,sinks", CASES)
def test_composed_exact_part_equals_reference(flex_on_cpu, monkeypatch, family, B, H, Hkv, T, d, window, sinks,
                                              dtype):
    streams, mix, key_features, rule = attention_inputs(B, H, Hkv, T, d, family, dtype)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, rule=rule)
    layer = LayerConstants(mix, key_features, norm_gain(family, H, d, dtype))
    ref = attention_quadratic(streams, spec, layer)
    y, state = attention_chunked(streams, spec, layer, output_final_state=True, chunk=16)
    assert flex_on_cpu == [(B, H, T, d)]  # the fused path ran, once
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    monkeypatch.delenv(composed.FLEX_ENV)  # the PyTorch form leaves the same state to decode from
    _, expected = attention_chunked(streams, spec, layer, output_final_state=True, chunk=16)
    assert len(flex_on_cpu) == 1 and state.seen == expected.seen == T
    torch.testing.assert_close(state.win.k, expected.win.k)
    torch.testing.assert_close(state.kv, expected.kv, rtol=tol, atol=tol)


def test_window_max_is_the_max_over_window_and_sinks():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, 70, 8, generator=g), torch.randn(1, 2, 70, 8, generator=g)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    i, j = torch.arange(70)[:, None], torch.arange(70)[None, :]
    exact = (j <= i) & ((j > i - 9) | (j < 3))
    torch.testing.assert_close(composed.window_max(q, k, 9, 3, 0.5, rows=16), s.masked_fill(~exact, -1e9).amax(-1))
    # a wrong set (no sinks) gives another max where the sinks score highest
    assert not torch.equal(composed.window_max(q, k, 9, 0, 0.5), composed.window_max(q, k, 9, 3, 0.5))


def test_fused_exact_part_is_opt_in_cuda_and_fresh_calls_only(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv(composed.FLEX_ENV, "1")
    assert not composed.usable(x, window=64)  # the CPU is not a kernel device
    monkeypatch.setattr(composed, "DEVICES", ("cpu",))
    assert composed.usable(x, window=64)
    assert not composed.usable(x, window=64, state=object())  # a continued prefill keeps the PyTorch form
    assert not composed.usable(x, window=0) and not composed.usable(x, window=None)
    assert not composed.usable(x, window=64, heavy=8)
    monkeypatch.delenv(composed.FLEX_ENV)
    assert not composed.usable(x, window=64)


def test_a_continued_prefill_does_not_take_the_fused_path(flex_on_cpu):
    streams, mix, key_features, rule = attention_inputs(1, 4, 2, 40, 8, "sum", torch.float64)
    spec = AttentionSpec(8, 8**-0.5, sinks=2, rule=rule)
    layer = LayerConstants(mix, key_features)
    ref = attention_quadratic(streams, spec, layer)
    first, state = attention_chunked(streams.slice(slice(0, 25)), spec, layer, output_final_state=True, chunk=8)
    second, _ = attention_chunked(streams.slice(slice(25, 40)), spec, layer, initial_state=state, chunk=8)
    assert len(flex_on_cpu) == 1  # the first block only
    torch.testing.assert_close(torch.cat([first, second], dim=2), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled flex_attention kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_kernel_matches_reference_on_cuda(monkeypatch, dtype):
    monkeypatch.setenv(composed.FLEX_ENV, "1")
    streams, mix, key_features, rule = attention_inputs(2, 6, 2, 1000, 64, "sum", torch.float32)
    spec = AttentionSpec(256, 64**-0.5, sinks=4, rule=rule)
    layer = LayerConstants(mix.cuda(), key_features)
    cuda = type(streams)(**{k: None if x is None else x.cuda().to(dtype)
                            for k, x in vars(streams).items()})
    ref = attention_quadratic(type(streams)(**{k: None if x is None else x.cuda().double()
                                               for k, x in vars(streams).items()}), spec,
                              LayerConstants(mix.cuda().double(), key_features))
    y, _ = attention_chunked(cuda, spec, layer, chunk=64)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # TF32 / bf16 matrix products
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)
