"""The memory cap (AttentionSpec.memory_cap): once the linear memory holds n > C keys its terms are scaled by C / n.
Every form (chunked, recurrent, prefill in uneven blocks, prefill then decoding; with and without the sparse cache)
equals the quadratic reference; the reference equals a per-query loop written from the definition; a cap of at least
the keys the memory ever holds changes nothing; a converted model takes it without training and records it."""

import pytest
import torch

from linearize import LinearAttentionConfig, LinearizedForCausalLM
from linearize.errors import LinearizeError
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants
from linearize.training_free import TrainingFree

from conftest import attention_inputs, blocks, run_in_spans

CASES = [  # (B, H, Hkv, T, d, window, sinks, cap, cache)
    (2, 4, 2, 60, 8, 5, 2, 3, 0),  # GQA, sinks, a cap far below the memory's length
    (1, 2, 1, 40, 8, 0, 1, 7, 0),  # no window: the memory starts at once
    (1, 6, 2, 90, 8, 8, 4, 20, 0),
    (2, 4, 2, 70, 8, 5, 2, 3, 4),  # with a sparse cache: the memory holds what the cache evicted
    (1, 6, 2, 129, 8, 8, 4, 10, 5),
]
SPANS = {
    "chunked": lambda T: [(slice(0, T), "chunked")],
    "recurrent": lambda T: [(slice(0, T), "recurrent")],
    "prefill-blocks": lambda T: [(s, "chunked") for s in blocks(T)],
    "prefill+decode": lambda T: [(slice(0, T // 2), "chunked"), (slice(T // 2, T), "recurrent")],
}


def spec_of(d, window, sinks, cap, cache=0):
    return AttentionSpec(window, d**-0.5, sinks=sinks, memory_cap=cap, cache=cache, cache_every=8)


@pytest.mark.parametrize("form", sorted(SPANS))
@pytest.mark.parametrize("B,H,Hkv,T,d,window,sinks,cap,cache", CASES)
def test_form_matches_reference(B, H, Hkv, T, d, window, sinks, cap, cache, form):
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d)
    spec = spec_of(d, window, sinks, cap, cache)
    layer = LayerConstants(mix, key_features)
    ref = attention_quadratic(streams, spec, layer)
    y, _ = run_in_spans(streams, spec, layer, SPANS[form](T))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    uncapped = attention_quadratic(streams, spec_of(d, window, sinks, 0, cache), layer)
    assert (ref - uncapped).abs().max() > 1e-3  # the cap is in effect


def test_reference_follows_the_definition():
    """y_i = (w sum_{j in E_i} exp(s_ij - m_i) [v_j, 1] + (1 - w) min(1, C / n_i) sum_{j in M_i} fq_i . fk_j [v_j, 1])
    divided by its last column: E_i the window and sinks, M_i the n_i keys S <= j <= i - W."""
    T, d, W, S, C = 30, 4, 3, 2, 5
    streams, mix, _, _ = attention_inputs(1, 1, 1, T, d)
    q, k, v, fq, fk, w = streams.q[0, 0], streams.k[0, 0], streams.v[0, 0], streams.fq[0, 0], streams.fk[0, 0], mix[0]
    v1 = torch.cat([v, torch.ones(T, 1, dtype=v.dtype)], -1)
    expected = []
    for i in range(T):
        exact = [j for j in range(i + 1) if j > i - W or j < S]
        memory = [j for j in range(S, i - W + 1)]
        s = q[i] @ k[exact].T * d**-0.5
        num = w * torch.exp(s - s.max()) @ v1[exact]
        if memory:
            num = num + (1 - w) * min(1.0, C / len(memory)) * (fq[i] @ fk[memory].T) @ v1[memory]
        expected.append(num[:-1] / (num[-1] + 1e-6))
    got = attention_quadratic(streams, spec_of(d, W, S, C), LayerConstants(mix))[0, 0]
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-10, atol=1e-10)


def test_cap_at_least_the_memory_length_changes_nothing():
    """A cap of T - W - S (the most keys the memory holds in a row of T tokens: the training length) leaves every
    output of such a row as it was: the cap only acts on longer contexts."""
    T, d, W, S = 50, 8, 6, 2
    streams, mix, key_features, _ = attention_inputs(2, 4, 2, T, d)
    layer = LayerConstants(mix, key_features)
    plain = attention_quadratic(streams, spec_of(d, W, S, 0), layer)
    for form in SPANS:
        got, _ = run_in_spans(streams, spec_of(d, W, S, T - W - S), layer, SPANS[form](T))
        torch.testing.assert_close(got, plain, rtol=1e-10, atol=1e-10)
    shorter = attention_quadratic(streams, spec_of(d, W, S, T - W - S - 1), layer)
    assert (shorter - plain)[:, :, -1].abs().max() > 0  # one key less: the last query sees the cap


def test_converted_model_takes_a_cap_without_training(tiny_teacher):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny_teacher.config.vocab_size, (1, 40))
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=4, sinks=1, chunk_size=4))
    student.eval()
    with torch.no_grad():
        plain = student(input_ids=ids).logits
        TrainingFree(memory_cap=40 - 4 - 1).apply(student)
        torch.testing.assert_close(student(input_ids=ids).logits, plain)
        TrainingFree(memory_cap=2).apply(student)
        capped = student(input_ids=ids).logits
    assert (capped - plain).abs().max() > 1e-4
    assert student.config.attention["memory_cap"] == 2
    assert all(m.spec.memory_cap == 2 for m in student.attention_modules() if m.config.linear)


def test_bad_cap_settings_are_refused(tiny_teacher):
    with pytest.raises(LinearizeError, match="memory cap"):
        LinearAttentionConfig(window=4, rule="delta", memory_cap=8)
    with pytest.raises(LinearizeError, match="memory_cap must be >= 0"):
        LinearAttentionConfig(window=4, memory_cap=-1)
    gated = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=4, gate="key"))
    with pytest.raises(LinearizeError, match="memory cap"):
        TrainingFree(memory_cap=8).apply(gated)
