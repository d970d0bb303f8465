"""Hybrid attention as one matrix: every family (sum rule with each learnable feature map or random features,
gated, delta, gated delta, output normalisation) x every form (chunked, recurrent, chunked prefill then recurrent decoding, prefill in
uneven blocks) equals the quadratic reference; then the special cases (no linear part, the gate, the delta rule,
the linear memories alone, gradients) and the presets behind `--attention NAME` as layers of a tiny model."""

import pytest
import torch
import torch.nn.functional as F

from linearize.layers.linear_attention import ATTENTION_PRESETS, attention_preset
from linearize.models.linearized import LinearizedForCausalLM, make_student_attention
from linearize.ops.feature_maps import make_feature_map
from linearize.ops.hybrid.chunked import attention_chunked
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.recurrent import attention_recurrent
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants
from linearize.ops.hybrid.state import Streams
from linearize.ops.linear_memory import memory_chunked, memory_naive, memory_step

from conftest import FAMILIES, attention_inputs, blocks, decode_stepwise, norm_gain, run_in_spans

CASES = [  # (B, H, Hkv, T, d, window, chunk)
    (2, 4, 2, 37, 8, 5, 8),  # GQA, odd length, window not a multiple of chunk
    (1, 3, 1, 70, 16, 64, 64),  # length just above the window
    (1, 2, 2, 10, 8, 16, 4),  # length shorter than the window
    (2, 4, 4, 33, 8, 0, 8),  # pure linear
    (1, 6, 2, 29, 8, 8, 16),  # GQA groups of 3, longer than the window
    (1, 6, 2, 129, 8, 8, 16),  # GQA groups of 3, many chunks
    (1, 2, 1, 1, 8, 4, 4),  # a single token
]
FORMS = [  # (form, dtype): the single-call forms in both precisions, the continuing ones in float64
    ("chunked", torch.float32), ("chunked", torch.float64), ("recurrent", torch.float32),
    ("recurrent", torch.float64), ("prefill+decode", torch.float64), ("prefill-blocks", torch.float64),
]


def spans_of(form: str, T: int) -> list:
    if form in ("chunked", "recurrent"):
        return [(slice(0, T), form)]
    if form == "prefill+decode":
        P = max(1, T // 2)
        return [(slice(0, P), "chunked"), (slice(P, T), "recurrent")]
    return [(s, "chunked") for s in blocks(T)]


@pytest.mark.parametrize("form,dtype", FORMS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk", CASES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_form_matches_reference(family, B, H, Hkv, T, d, window, chunk, form, dtype):
    streams, mix, key_features, rule = attention_inputs(B, H, Hkv, T, d, family, dtype)
    spec = AttentionSpec(window, d**-0.5, rule=rule)
    layer = LayerConstants(mix, key_features, norm_gain(family, H, d, dtype))
    ref = attention_quadratic(streams, spec, layer)
    assert ref.shape == (B, H, T, d)

    def only_the_window_is_kept(s, state):  # never the prompt
        if form != "recurrent":
            assert len(state.win) == min(s.stop, window)

    y, state = run_in_spans(streams, spec, layer, spans_of(form, T), chunk, only_the_window_is_kept)
    assert state.seen == T
    tol = 1e-10 if dtype == torch.float64 else 1e-5 if family.startswith("sum:") else 2e-5
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("family", ["sum", "none", "gated", "delta", "gated-delta", "norm"])  # "none": exact softmax
@pytest.mark.parametrize("window", [None, 0, 5, 64])
def test_decode_and_prefill_blocks_interleaved(family, window):
    """Decoding writes the window in place as a ring (its oldest slot moves on); a prefill block after that must
    read the window in time order, and decoding after the block must go on from the block's state."""
    if (family == "none" and window == 0) or (family != "none" and window is None):
        pytest.skip("no attention to speak of")
    streams, mix, key_features, rule = attention_inputs(1, 4, 2, 40, 8, "sum" if family == "none" else family,
                                                        linear=family != "none")
    spec = AttentionSpec(window, 8**-0.5, rule=rule, linear=family != "none")
    layer = LayerConstants(mix, key_features, norm_gain(family, 4, 8) if family != "none" else None)
    ref = attention_quadratic(streams, spec, layer)
    spans = [(slice(0, 7), "chunked"), (slice(7, 16), "recurrent"), (slice(16, 27), "chunked"),
             (slice(27, 40), "recurrent")]

    def ring_turns(s, state):  # a full window: the ring has turned by the number of tokens decoded, mod 5
        if window == 5 and s.stop in (16, 40):
            assert state.start == {16: 9 % 5, 40: 13 % 5}[s.stop]

    y, _ = run_in_spans(streams, spec, layer, spans, check=ring_turns)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 7, 30])
def test_no_linear_part_prefill_in_blocks(window):
    """Exact softmax layers (kept by --keep-softmax, or a teacher's local layers) also continue block by block."""
    streams, mix, _, _ = attention_inputs(1, 4, 2, 40, 8, linear=False)
    spec, layer = AttentionSpec(window, 8**-0.5, linear=False), LayerConstants(mix)
    ref = attention_quadratic(streams, spec, layer)
    y, state = run_in_spans(streams, spec, layer, [(s, "chunked") for s in blocks(40)], chunk=8)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert len(state.win) == min(40, window or 40)


@pytest.mark.parametrize("window", [None, 7, 30])
def test_no_linear_part_is_exact_softmax(window):
    """linear=False switches the linear part off: (sliding-window) causal softmax attention, all three forms."""
    streams, mix, _, _ = attention_inputs(1, 4, 2, 21, 8, linear=False)
    q, k, v = streams.q, streams.k, streams.v
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    i, j = torch.arange(21)[:, None], torch.arange(21)[None, :]
    allowed = (j <= i) & (j > i - (window or 21))
    expected = F.scaled_dot_product_attention(q, kk, vv, attn_mask=allowed)
    spec, layer = AttentionSpec(window, 8**-0.5, linear=False), LayerConstants(mix)
    recurrent, state = attention_recurrent(streams, spec, layer, output_final_state=True)
    for y in (attention_quadratic(streams, spec, layer), attention_chunked(streams, spec, layer, chunk=8)[0],
              recurrent):
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert state.kv is None
    if window is None:
        assert len(state.win) == 21  # unbounded window: the state is a KV cache


def test_window_mixing_matters_and_sliding_window_is_exact_softmax():
    """With all weight on the window and window >= T, the hybrid is plain causal softmax attention."""
    B, H, Hkv, T, d = 1, 4, 2, 20, 8
    streams, _, _, _ = attention_inputs(B, H, Hkv, T, d, "sum:hedgehog")
    ones = torch.ones(H, dtype=torch.float64)
    y, _ = attention_chunked(streams, AttentionSpec(T, d**-0.5), LayerConstants(ones), chunk=8)
    kk, vv = streams.k.repeat_interleave(2, dim=1), streams.v.repeat_interleave(2, dim=1)
    expected = F.scaled_dot_product_attention(streams.q, kk, vv, is_causal=True)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)  # up to the normaliser's epsilon
    half, _ = attention_chunked(streams, AttentionSpec(4, d**-0.5), LayerConstants(ones / 2), chunk=8)
    assert (half - y).abs().max() > 1e-3  # the linear term does contribute


def test_chunked_gradients_match_quadratic():
    streams, mix, _, _ = attention_inputs(1, 4, 2, 23, 8, "sum:hedgehog")
    fmq, fmk = make_feature_map("hedgehog", 4, 8).double(), make_feature_map("hedgehog", 2, 8).double()
    spec = AttentionSpec(5, 8**-0.5)
    grads = []
    for form in (attention_quadratic, lambda *a: attention_chunked(*a, chunk=8)[0]):
        fmq.zero_grad(), fmk.zero_grad()
        s = Streams(streams.k, streams.v, q=streams.q, fq=fmq(streams.q), fk=fmk(streams.k))
        form(s, spec, LayerConstants(mix)).square().sum().backward()
        grads.append(torch.cat([fmq.weight.grad.flatten(), fmk.weight.grad.flatten()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


def test_hedgehog_features_are_positive_and_normalised():
    x = torch.randn(2, 3, 5, 8)
    phi = make_feature_map("hedgehog", 3, 8)(x)
    assert phi.shape == (2, 3, 5, 16)
    assert (phi > 0).all()
    torch.testing.assert_close(phi.sum(-1), torch.full((2, 3, 5), 2.0))


def test_gate_forgets():
    streams, mix, _, _ = attention_inputs(1, 2, 2, 30, 8)
    strong = torch.full((1, 2, 30), -12.0, dtype=torch.float64)
    spec = AttentionSpec(0, 8**-0.5)
    y_plain, _ = attention_chunked(streams, spec, LayerConstants(mix), chunk=8)
    y_gated, _ = attention_chunked(Streams(**{**vars(streams), "log_gate": strong}), spec, LayerConstants(mix), chunk=8)
    # a near-zero gate leaves (almost) only the current token: y_i ~ v_i
    torch.testing.assert_close(y_gated, streams.v, rtol=1e-3, atol=1e-3)
    assert (y_plain - y_gated).abs().max() > 0.1


def test_streams_travel_together():
    streams, _, _, _ = attention_inputs(1, 4, 2, 12, 8, "gated")
    head, tail = streams.slice(slice(0, 5)), streams.slice(slice(5, None))
    assert len(head) == 5 and len(tail) == 7
    joined = head.append(tail)
    assert all(torch.equal(a, b) for a, b in zip(joined.tensors(), streams.tensors()))
    assert streams.nbytes() == sum(t.numel() * 8 for t in streams.tensors())
    assert streams.keys().q is None and streams.keys().fk is None and streams.keys().log_gate is not None
    with pytest.raises(ValueError):
        head.append(tail.keys())  # a stream present on one side only


# ---- the linear memories alone ----

@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("gate", [False, True])
def test_memory_forms_agree_from_a_nonzero_state(gate, delta):
    family = {(False, False): "sum", (True, False): "gated", (False, True): "delta", (True, True): "gated-delta"}
    s, _, _, _ = attention_inputs(2, 4, 2, 45, 6, family[gate, delta])
    fq, fk, v, kw = s.fq.view(2, 2, 2, 45, -1), s.fk, s.v, dict(log_gate=s.log_gate, beta=s.beta)
    S0 = torch.randn(2, 2, fk.shape[-1], 6, dtype=torch.float64)
    o_ref, S_ref = memory_naive(fq, fk, v, state=S0, **kw)
    o_chk, S_chk = memory_chunked(fq, fk, v, chunk=16, state=S0, **kw)
    S, outs = S0, []
    for t in range(45):
        step = s.slice(slice(t, t + 1))
        S = memory_step(step.fk, step.v, step.log_gate, step.beta, S)
        outs.append(fq[:, :, :, t : t + 1] @ S.unsqueeze(2))
    for o, s_ in ((o_chk, S_chk), (torch.cat(outs, dim=3), S)):
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s_, S_ref, rtol=1e-10, atol=1e-10)


def test_delta_rule_retrieves_a_stored_value():
    """With beta = 1 and orthonormal keys the delta memory returns exactly the value stored under a key."""
    F_, D = 8, 3
    keys = torch.eye(F_, dtype=torch.float64)[:5].view(1, 1, 5, F_)
    vals = torch.randn(1, 1, 5, D, dtype=torch.float64)
    o, _ = memory_chunked(keys.unsqueeze(2), keys, vals, beta=torch.ones(1, 1, 5, dtype=torch.float64), chunk=4)
    torch.testing.assert_close(o[0, 0, 0], vals[0, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_delta_rule_chunked_runs_in_half_precision(dtype):
    """torch has no triangular solve in bfloat16 / float16: the chunked delta rule solves in float32 and keeps the
    caller's dtype (a --dtype bfloat16 run of a delta-rule family would otherwise fail)."""
    g = torch.Generator().manual_seed(0)
    fq = torch.nn.functional.normalize(torch.randn(1, 2, 2, 40, 8, generator=g), dim=-1)
    fk = torch.nn.functional.normalize(torch.randn(1, 2, 40, 8, generator=g), dim=-1)
    v, beta = torch.randn(1, 2, 40, 4, generator=g), torch.rand(1, 2, 40, generator=g)
    o_ref, _ = memory_naive(fq, fk, v, beta=beta)
    o, S = memory_chunked(*(x.to(dtype) for x in (fq, fk, v)), beta=beta.to(dtype), chunk=16)
    assert o.dtype == S.dtype == dtype
    torch.testing.assert_close(o.float(), o_ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("rule", ["sum", "delta"])
def test_gated_memory_in_bfloat16_keeps_the_gates_in_float32(rule):
    """Cumulative log gates summed in bfloat16 lose ~0.05 at -10, i.e. 5 % in exp(b): the chunked form sums them
    in float32 and rounds exp() once. Output within 2 % (of its largest value) of the float64 reference."""
    g = torch.Generator().manual_seed(0)
    norm = (lambda x: x.softmax(-1)) if rule == "sum" else (lambda x: torch.nn.functional.normalize(x, dim=-1))
    fq, fk = norm(torch.randn(1, 2, 2, 300, 32, generator=g)), norm(torch.randn(1, 2, 300, 32, generator=g))
    v = torch.randn(1, 2, 300, 8, generator=g)
    log_gate = torch.nn.functional.logsigmoid(2 + torch.randn(1, 2, 300, generator=g))
    beta = torch.rand(1, 2, 300, generator=g) if rule == "delta" else None
    o_ref, _ = memory_naive(*(x.double() for x in (fq, fk, v)), log_gate=log_gate.double(),
                            beta=None if beta is None else beta.double())
    o, _ = memory_chunked(*(x.bfloat16() for x in (fq, fk, v)), log_gate=log_gate.bfloat16(),
                          beta=None if beta is None else beta.bfloat16(), chunk=64)
    assert ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item() < 0.02


# ---- the presets behind `--attention NAME`, as layers of a converted tiny Llama ----

def converted(teacher, name):
    preset = ATTENTION_PRESETS[name]  # the tiny teacher has 2 layers: DiagAttention in the first one only
    cfg = attention_preset(name, window=6 if preset.window else None, chunk_size=8,
                           local_layers=min(preset.local_layers, 1))
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


@pytest.mark.parametrize("name", ["liger-swa", "gated-delta-swa", "transnormer-norm", "nalaformer"])
def test_transfer_reaches_every_family_parameter(name, tiny_teacher):
    from linearize.transfer.attention_transfer import attention_transfer

    students = make_student_attention(tiny_teacher, attention_preset(name, window=6, chunk_size=8))
    params = dict(students[0].named_parameters())
    trained = {n for n in params if n.startswith(("feature_map_", "mix_logit", "beta_logit", "norm_gain"))}
    family = {"gated-delta-swa": {"beta_logit"}, "transnormer-norm": {"norm_gain"},
              "nalaformer": {"feature_map_q.log_gain"}}.get(name, set())
    assert {"mix_logit"} | family <= trained
    before = {n: params[n].detach().clone() for n in trained}
    attention_transfer(tiny_teacher, students, torch.randint(0, 320, (4, 24)), lr=1e-2, progress=False)
    assert all(not torch.equal(before[n], params[n]) for n in trained)
