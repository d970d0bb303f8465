"""The three forms of hybrid attention (quadratic reference, chunked, recurrent) compute the same function."""

import pytest
import torch

from linearize.ops.feature_maps import FEATURE_MAPS, make_feature_map
from linearize.ops.hybrid_attention import attention_chunked, attention_quadratic, attention_recurrent, empty_state

CASES = [  # (B, H, Hkv, T, d, window, chunk)
    (2, 4, 2, 37, 8, 5, 8),  # GQA, odd length, window not a multiple of chunk
    (1, 3, 1, 70, 16, 64, 64),  # length just above the window
    (1, 2, 2, 10, 8, 16, 4),  # length shorter than the window
    (2, 4, 4, 33, 8, 0, 8),  # pure linear
    (1, 6, 2, 129, 8, 8, 16),  # GQA groups of 3, many chunks
    (1, 2, 1, 1, 8, 4, 4),  # a single token
]


def random_inputs(B, H, Hkv, T, d, feature_map="hedgehog", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g, dtype=dtype) for h in (H, Hkv, Hkv))
    fmq, fmk = make_feature_map(feature_map, H, d).to(dtype), make_feature_map(feature_map, Hkv, d).to(dtype)
    with torch.no_grad():  # move away from the identity init so the maps are generic
        for p in list(fmq.parameters()) + list(fmk.parameters()):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
    mix = torch.rand(H, generator=g, dtype=dtype)
    return q, k, v, fmq(q), fmk(k), mix, fmk


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk", CASES)
def test_chunked_and_recurrent_match_quadratic(B, H, Hkv, T, d, window, chunk, feature_map):
    q, k, v, fq, fk, mix, phi = random_inputs(B, H, Hkv, T, d, feature_map)
    scale = d**-0.5
    ref = attention_quadratic(q, k, v, fq, fk, mix, window, scale)
    chunked = attention_chunked(q, k, v, fq, fk, mix, window, scale, chunk=chunk)
    state = empty_state(B, Hkv, d, fq.shape[-1], q.dtype, q.device)
    recurrent = attention_recurrent(q, k, v, fq, fk, mix, window, scale, state, key_features=phi)
    assert ref.shape == (B, H, T, d)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recurrent, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk", CASES)
def test_chunked_prefill_then_recurrent_decode_matches_quadratic(B, H, Hkv, T, d, window, chunk):
    q, k, v, fq, fk, mix, phi = random_inputs(B, H, Hkv, T, d, dtype=torch.float64)
    scale = d**-0.5
    ref = attention_quadratic(q, k, v, fq, fk, mix, window, scale)
    P = max(1, T // 2)
    head = lambda x: x[:, :, :P]  # noqa: E731
    tail = lambda x: x[:, :, P:]  # noqa: E731
    y1, state = attention_chunked(*map(head, (q, k, v, fq, fk)), mix, window, scale, chunk=chunk, return_state=True)
    assert state.win_k.shape[2] == min(P, window)
    y2 = attention_recurrent(*map(tail, (q, k, v, fq, fk)), mix, window, scale, state, key_features=phi)
    torch.testing.assert_close(torch.cat([y1, y2], dim=2), ref, rtol=1e-10, atol=1e-10)


def test_window_mixing_matters_and_sliding_window_is_exact_softmax():
    """With all weight on the window and window >= T, the hybrid is plain causal softmax attention."""
    B, H, Hkv, T, d = 1, 4, 2, 20, 8
    q, k, v, fq, fk, _, _ = random_inputs(B, H, Hkv, T, d, dtype=torch.float64)
    ones = torch.ones(H, dtype=torch.float64)
    y = attention_chunked(q, k, v, fq, fk, ones, T, d**-0.5, chunk=8)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)  # up to the normaliser's epsilon
    half = attention_chunked(q, k, v, fq, fk, ones / 2, 4, d**-0.5, chunk=8)
    assert (half - y).abs().max() > 1e-3  # the linear term does contribute


def test_chunked_gradients_match_quadratic():
    q, k, v, _, _, mix, _ = random_inputs(1, 4, 2, 23, 8, dtype=torch.float64)
    fmq, fmk = make_feature_map("hedgehog", 4, 8).double(), make_feature_map("hedgehog", 2, 8).double()
    grads = []
    for form in (attention_quadratic, lambda *a: attention_chunked(*a, chunk=8)):
        fmq.zero_grad(), fmk.zero_grad()
        form(q, k, v, fmq(q), fmk(k), mix, 5, 8**-0.5).square().sum().backward()
        grads.append(torch.cat([fmq.weight.grad.flatten(), fmk.weight.grad.flatten()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


def test_hedgehog_features_are_positive_and_normalised():
    x = torch.randn(2, 3, 5, 8)
    phi = make_feature_map("hedgehog", 3, 8)(x)
    assert phi.shape == (2, 3, 5, 16)
    assert (phi > 0).all()
    torch.testing.assert_close(phi.sum(-1), torch.full((2, 3, 5), 2.0))
