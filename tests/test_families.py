"""Attention families as configurations of one mechanism: gated (Liger-style) and delta-rule linear memories,
alone and hybrid with the sliding window. Every family: reference == chunked == recurrent == prefill + decode."""

import pytest
import torch
import torch.nn.functional as F

from linearize.ops.hybrid_attention import (attention_chunked, attention_quadratic, attention_recurrent, empty_state,
                                             time_slice)
from linearize.ops.linear_memory import memory_chunked, memory_naive, memory_step

from conftest import decode_stepwise

CASES = [  # (B, H, Hkv, T, d, window, chunk)
    (2, 4, 2, 37, 8, 5, 8),  # GQA, odd length, window not a multiple of chunk
    (1, 2, 2, 10, 8, 16, 4),  # shorter than the window
    (2, 4, 4, 33, 8, 0, 8),  # pure linear
    (1, 6, 2, 29, 8, 8, 16),  # GQA groups of 3, longer than the window
    (1, 2, 1, 1, 8, 4, 4),  # a single token
]
FAMILIES = {"gated": dict(gate=True, delta=False), "delta": dict(gate=False, delta=True),
            "gated-delta": dict(gate=True, delta=True)}


def phi(delta: bool):
    """The key feature map of inputs(): fk = phi(k) (d -> 2d positive features; unit norm for the delta rule).
    A decoding state keeps its window keys, not their features: the ops recompute them with this map."""
    def key_features(k):
        d = k.shape[-1]
        fk = torch.softmax(k @ torch.randn(d, 2 * d, generator=torch.Generator().manual_seed(7)).to(k.dtype), -1)
        return F.normalize(fk, dim=-1) if delta else fk
    return key_features


def inputs(B, H, Hkv, T, d, gate, delta, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g, dtype=dtype) for h in (H, Hkv, Hkv))
    fq, fk = torch.rand(B, H, T, 2 * d, generator=g, dtype=dtype), phi(delta)(k)
    if delta:
        fq = F.normalize(fq, dim=-1)
    log_gate = F.logsigmoid(torch.randn(B, Hkv, T, generator=g, dtype=dtype)) if gate else None
    beta = torch.rand(B, Hkv, T, generator=g, dtype=dtype) if delta else None
    mix = torch.rand(H, generator=g, dtype=dtype)
    return (q, k, v, fq, fk, mix), dict(log_gate=log_gate, beta=beta)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_family_forms_agree(B, H, Hkv, T, d, window, chunk, family, dtype):
    args, kw = inputs(B, H, Hkv, T, d, **FAMILIES[family], dtype=dtype)
    scale = d**-0.5
    ref = attention_quadratic(*args, window, scale, **kw)
    chunked = attention_chunked(*args, window, scale, chunk=chunk, **kw)
    state = empty_state(B, Hkv, d, args[3].shape[-1], dtype, "cpu", delta=FAMILIES[family]["delta"])
    recurrent = attention_recurrent(*args, window, scale, state, key_features=phi(FAMILIES[family]["delta"]), **kw)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert ref.shape == (B, H, T, d)
    torch.testing.assert_close(chunked, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(recurrent, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk", CASES)
def test_family_prefill_then_decode(B, H, Hkv, T, d, window, chunk, family):
    args, kw = inputs(B, H, Hkv, T, d, **FAMILIES[family])
    ref = attention_quadratic(*args, window, d**-0.5, **kw)
    P = max(1, T // 2)
    q, k, v, fq, fk, mix = args
    head = [time_slice(x, slice(0, P)) for x in (q, k, v, fq, fk)]
    tail = [time_slice(x, slice(P, None)) for x in (q, k, v, fq, fk)]
    y1, state = attention_chunked(*head, mix, window, d**-0.5, chunk=chunk, return_state=True,
                                  **{n: time_slice(x, slice(0, P)) for n, x in kw.items()})
    y2 = attention_recurrent(*tail, mix, window, d**-0.5, state, key_features=phi(FAMILIES[family]["delta"]),
                             **{n: time_slice(x, slice(P, None)) for n, x in kw.items()})
    torch.testing.assert_close(torch.cat([y1, y2], dim=2), ref, rtol=1e-10, atol=1e-10)


def _blocks(T: int) -> list[slice]:
    """Uneven blocks: 1 token, then 3, then blocks of 11 (some shorter and some longer than the test windows)."""
    cuts = sorted({0, *range(min(T, 4), T, 11), min(T, 1), min(T, 4), T})
    return [slice(a, b) for a, b in zip(cuts, cuts[1:])]


@pytest.mark.parametrize("family", ["sum", *sorted(FAMILIES)])
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk", CASES)
def test_family_prefill_in_blocks_matches_reference(B, H, Hkv, T, d, window, chunk, family):
    """attention_chunked(state=...) continues where the last block stopped: block-wise prefill == one pass."""
    args, kw = inputs(B, H, Hkv, T, d, **FAMILIES.get(family, dict(gate=False, delta=False)))
    ref = attention_quadratic(*args, window, d**-0.5, **kw)
    q, k, v, fq, fk, mix = args
    state, ys = None, []
    for s in _blocks(T):
        y, state = attention_chunked(*(time_slice(x, s) for x in (q, k, v, fq, fk)), mix, window, d**-0.5, chunk=chunk,
                                     return_state=True, state=state, key_features=phi(kw["beta"] is not None),
                                     **{n: time_slice(x, s) for n, x in kw.items()})
        ys.append(y)
        assert state.win_k.shape[2] == min(s.stop, window)  # only the window is kept, never the prompt
    torch.testing.assert_close(torch.cat(ys, dim=2), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["sum", "none", *sorted(FAMILIES)])  # "none": exact sliding-window softmax
@pytest.mark.parametrize("window", [None, 0, 5, 64])
def test_decode_and_prefill_blocks_interleaved(family, window):
    """Decoding writes the window in place as a ring (its oldest slot moves on); a prefill block after that must
    read the window in time order, and decoding after the block must go on from the block's state."""
    if (family == "none" and window == 0) or (family != "none" and window is None):
        pytest.skip("no attention to speak of")
    args, kw = inputs(1, 4, 2, 40, 8, **FAMILIES.get(family, dict(gate=False, delta=False)))
    if family == "none":
        args = (*args[:3], None, None, args[5])
    ref = attention_quadratic(*args, window, 8**-0.5, **kw)
    q, k, v, fq, fk, mix = args
    state, ys = None, []
    for s, form in ((slice(0, 7), "chunked"), (slice(7, 16), "recurrent"), (slice(16, 27), "chunked"),
                    (slice(27, 40), "recurrent")):
        parts = [time_slice(x, s) for x in (q, k, v, fq, fk)]
        kws = {n: time_slice(x, s) for n, x in kw.items()}
        if form == "chunked":
            y, state = attention_chunked(*parts, mix, window, 8**-0.5, chunk=4, return_state=True, state=state,
                                         key_features=phi(kw["beta"] is not None), **kws)
        else:
            y = attention_recurrent(*parts, mix, window, 8**-0.5, state, key_features=phi(kw["beta"] is not None),
                                    **kws)
            if window == 5:  # a full window: the ring has turned by the number of tokens decoded, mod 5
                assert state.start == {16: 9 % 5, 40: 13 % 5}[s.stop]
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=2), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 7, 30])
def test_no_linear_part_prefill_in_blocks(window):
    """Exact softmax layers (kept by --keep-softmax, or a teacher's local layers) also continue block by block."""
    (q, k, v, _, _, mix), _ = inputs(1, 4, 2, 40, 8, False, False)
    ref = attention_quadratic(q, k, v, None, None, mix, window, 8**-0.5)
    state, ys = None, []
    for s in _blocks(40):
        y, state = attention_chunked(q[:, :, s], k[:, :, s], v[:, :, s], None, None, mix, window, 8**-0.5, chunk=8,
                                     return_state=True, state=state)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, dim=2), ref, rtol=1e-12, atol=1e-12)
    assert state.win_k.shape[2] == min(40, window or 40)


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("gate", [False, True])
def test_memory_forms_agree_from_a_nonzero_state(gate, delta):
    (q, k, v, fq, fk, _), kw = inputs(2, 4, 2, 45, 6, gate, delta)
    fq = fq.view(2, 2, 2, 45, -1)
    S0 = torch.randn(2, 2, fk.shape[-1], 6, dtype=torch.float64)
    o_ref, S_ref = memory_naive(fq, fk, v, state=S0, **kw)
    o_chk, S_chk = memory_chunked(fq, fk, v, chunk=16, state=S0, **kw)
    S, outs = S0, []
    for t in range(45):
        step = lambda x: time_slice(x, slice(t, t + 1))  # noqa: E731
        S = memory_step(step(fk), step(v), step(kw["log_gate"]), step(kw["beta"]), S)
        outs.append(fq[:, :, :, t : t + 1] @ S.unsqueeze(2))
    for o, s in ((o_chk, S_chk), (torch.cat(outs, dim=3), S)):
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, S_ref, rtol=1e-10, atol=1e-10)


def test_delta_rule_retrieves_a_stored_value():
    """With beta = 1 and orthonormal keys the delta memory returns exactly the value stored under a key."""
    F_, D = 8, 3
    keys = torch.eye(F_, dtype=torch.float64)[:5].view(1, 1, 5, F_)
    vals = torch.randn(1, 1, 5, D, dtype=torch.float64)
    o, _ = memory_chunked(keys.unsqueeze(2), keys, vals, beta=torch.ones(1, 1, 5, dtype=torch.float64), chunk=4)
    torch.testing.assert_close(o[0, 0, 0], vals[0, 0])


def test_gate_forgets():
    (q, k, v, fq, fk, mix), _ = inputs(1, 2, 2, 30, 8, False, False)
    strong = torch.full((1, 2, 30), -12.0, dtype=torch.float64)
    y_plain = attention_chunked(q, k, v, fq, fk, mix, 0, 8**-0.5, chunk=8)
    y_gated = attention_chunked(q, k, v, fq, fk, mix, 0, 8**-0.5, chunk=8, log_gate=strong)
    # a near-zero gate leaves (almost) only the current token: y_i ~ v_i
    torch.testing.assert_close(y_gated, v, rtol=1e-3, atol=1e-3)
    assert (y_plain - y_gated).abs().max() > 0.1


@pytest.mark.parametrize("window", [None, 7, 30])
def test_no_linear_part_is_exact_softmax(window):
    """fq = fk = None switches the linear part off: (sliding-window) causal softmax attention, all three forms."""
    (q, k, v, _, _, mix), _ = inputs(1, 4, 2, 21, 8, False, False)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    i, j = torch.arange(21)[:, None], torch.arange(21)[None, :]
    allowed = (j <= i) & (j > i - (window or 21))
    expected = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
    args = (q, k, v, None, None, mix, window, 8**-0.5)
    state = empty_state(1, 2, 8, 16, torch.float64, "cpu")
    state.kv = None
    for y in (attention_quadratic(*args), attention_chunked(*args, chunk=8), attention_recurrent(*args, state=state)):
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    if window is None:
        assert state.win_k.shape[2] == 21  # unbounded window: the state is a KV cache


# ---- the presets behind `--attention NAME`, as layers of a converted tiny Llama ----

from linearize.layers.linear_attention import ATTENTION_PRESETS, attention_preset  # noqa: E402
from linearize.models.linearized import LinearizedForCausalLM  # noqa: E402


def converted(teacher, name):
    cfg = attention_preset(name, window=6 if ATTENTION_PRESETS[name].window else None, chunk_size=8)
    return LinearizedForCausalLM.from_teacher(teacher, cfg)


@pytest.mark.parametrize("name", sorted(ATTENTION_PRESETS))
def test_preset_forms_agree_and_decode(name, tiny_teacher):
    model = converted(tiny_teacher, name)
    x = torch.randint(0, 320, (1, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        chunked = model(input_ids=x).logits
        for a in model.attention_modules():
            a.form = "quadratic"
        quadratic = model(input_ids=x).logits
        stepwise, _ = decode_stepwise(model, x, 7)
    torch.testing.assert_close(chunked, quadratic, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stepwise, chunked, rtol=1e-4, atol=1e-5)


def test_key_gate_adds_no_parameters_and_delta_adds_one_per_kv_head(tiny_teacher):
    names = lambda m: {n for n, _ in m.named_parameters()}  # noqa: E731
    plain = names(converted(tiny_teacher, "hedgehog"))
    gated = names(converted(tiny_teacher, "liger"))
    assert gated == plain
    delta = converted(tiny_teacher, "gated-delta")
    extra = names(delta) - plain
    assert extra == {f"model.model.layers.{i}.self_attn.beta_logit" for i in range(2)}
    assert delta.attention_modules()[0].beta_logit.shape == (2,)


@pytest.mark.parametrize("name", ["liger-swa", "gated-delta-swa"])
def test_transfer_reaches_every_family_parameter(name, tiny_teacher):
    from linearize.models.linearized import make_student_attention
    from linearize.transfer.attention_transfer import attention_transfer

    students = make_student_attention(tiny_teacher, attention_preset(name, window=6, chunk_size=8))
    params = dict(students[0].named_parameters())
    trained = {n for n in params if n.startswith(("feature_map_", "mix_logit", "beta_logit"))}
    assert {"mix_logit"} | ({"beta_logit"} if "delta" in name else set()) <= trained
    before = {n: params[n].detach().clone() for n in trained}
    attention_transfer(tiny_teacher, students, torch.randint(0, 320, (4, 24)), lr=1e-2, progress=False)
    assert all(not torch.equal(before[n], params[n]) for n in trained)
