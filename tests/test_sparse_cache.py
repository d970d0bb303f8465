"""The sparse cache (ops/sparse_cache/): the keys the linear memory recalls worst stay in exact softmax.
Every form (chunked, recurrent, prefill in uneven blocks, prefill then decoding) equals the quadratic reference,
which replays the selections on explicit sets; a cache that holds everything is exact softmax attention; a key
kept in the cache is retrieved exactly; the decoding state does not grow; a converted model takes a cache without
training and then, with room for every key, equals its teacher."""

from dataclasses import replace

import pytest
import torch

from linearize import LinearAttentionConfig, LinearizedForCausalLM
from linearize.errors import LinearizeError
from linearize.models.linearized import reconfigure
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants
from linearize.ops.hybrid.state import Streams
from linearize.ops.rotary import rotate
from linearize.ops.sparse_cache import keep_worst_recalled, pooled, self_recall_error
from linearize.training_free import TrainingFree

from conftest import attention_inputs, blocks, decode_stepwise, run_in_spans

CASES = [  # (B, H, Hkv, T, d, window, sinks, cache, every)
    (2, 4, 2, 70, 8, 5, 2, 3, 8),  # GQA, selections every 8 tokens, sinks
    (1, 2, 1, 40, 8, 0, 1, 2, 4),  # no window: keys leave it at once and wait in the cache
    (1, 6, 2, 129, 8, 8, 4, 5, 16),  # GQA groups of 3, many selections
    (1, 2, 2, 10, 8, 16, 3, 2, 4),  # shorter than the window: nothing is ever cached
]
SPANS = {
    "chunked": lambda T: [(slice(0, T), "chunked")],
    "recurrent": lambda T: [(slice(0, T), "recurrent")],
    "prefill-blocks": lambda T: [(s, "chunked") for s in blocks(T)],
    "prefill+decode": lambda T: [(slice(0, T // 2), "chunked"), (slice(T // 2, T), "recurrent")],
}


@pytest.mark.parametrize("form", sorted(SPANS))
@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("pool", [0, 2])
@pytest.mark.parametrize("B,H,Hkv,T,d,window,sinks,cache,every", CASES)
def test_form_matches_reference(B, H, Hkv, T, d, window, sinks, cache, every, pool, linear, form):
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d, linear=linear)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, linear=linear, cache=cache, cache_every=every, cache_pool=pool)
    layer = LayerConstants(mix, key_features)
    ref = attention_quadratic(streams, spec, layer)
    y, state = run_in_spans(streams, spec, layer, SPANS[form](T))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    left = max(T - window - sinks, 0)  # keys that left the window and are no sinks
    held = 0 if state.cache is None else len(state.cache)
    assert held == (left if left <= cache else cache + (T - (T // every) * every))  # M + those since the selection
    if left > cache and linear:  # the cache changed the result
        without = attention_quadratic(streams, AttentionSpec(window, d**-0.5, sinks=sinks), layer)
        assert (ref - without).abs().max() > 1e-3


def test_cache_for_every_key_is_exact_softmax():
    streams, mix, _, _ = attention_inputs(1, 4, 2, 50, 8)
    full = attention_quadratic(streams, AttentionSpec(None, 8**-0.5, linear=False), LayerConstants(mix))
    got = attention_quadratic(streams, AttentionSpec(4, 8**-0.5, cache=50, cache_every=8), LayerConstants(mix))
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_key_kept_in_the_cache_is_retrieved_exactly():
    """Linear part off: only window + cache. A needle whose value the memory cannot recall (here: the largest) is
    kept; a query that matches its key reads its value exactly, 90 tokens later, far outside the window."""
    T, d, needle = 100, 8, 7
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, T, d, generator=g), torch.randn(1, 1, T, d, generator=g)
    v[0, 0, needle] *= 20
    q = torch.randn(1, 1, T, d, generator=g)
    q[0, 0, -1] = 50 * k[0, 0, needle]  # the last query asks for the needle
    streams, layer = Streams(k, v, q=q), LayerConstants(torch.ones(1))
    with_cache = attention_quadratic(streams, AttentionSpec(4, d**-0.5, linear=False, cache=2, cache_every=8), layer)
    y, state = run_in_spans(streams, AttentionSpec(4, d**-0.5, linear=False, cache=2, cache_every=8), layer,
                            SPANS["recurrent"](T))
    torch.testing.assert_close(y[0, 0, -1], v[0, 0, needle], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_cache, y)
    assert any(torch.equal(row, k[0, 0, needle]) for row in state.cache.k[0, 0])
    window_only = attention_quadratic(streams, AttentionSpec(4, d**-0.5, linear=False), layer)
    assert (window_only[0, 0, -1] - v[0, 0, needle]).abs().max() > 1.0


def test_self_recall_error_and_selection():
    fk = torch.rand(1, 1, 5, 6, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 3, dtype=torch.float64)
    memory = fk[:, :, :2].transpose(-1, -2) @ torch.cat([v[:, :, :2], torch.ones(1, 1, 2, 1, dtype=v.dtype)], -1)
    errors = self_recall_error(fk, v, memory)
    read = fk @ memory
    read = read[..., :3] / (read[..., 3:] + 1e-6)
    cos = (v * read).sum(-1) / (v.norm(dim=-1) * read.norm(dim=-1))
    assert torch.allclose(errors, 1 - cos)
    assert torch.equal(self_recall_error(None, v, None), v.pow(2).sum(-1))
    # the direction counts, not the length: a value the memory points at, however long, is recalled
    assert self_recall_error(fk[..., :1, :], 10 * read[..., :1, :], memory).abs().max() < 1e-9
    assert torch.equal(self_recall_error(fk, v, torch.zeros_like(memory)), torch.ones(1, 1, 5, dtype=v.dtype))
    kept, evicted = keep_worst_recalled(torch.tensor([[[0.5, 3.0, 0.1, 2.0, 1.0]]]), 2)
    assert kept.tolist() == [[[1, 3]]] and evicted.tolist() == [[[0, 2, 4]]]  # position order both
    kept, _ = keep_worst_recalled(torch.tensor([[[1.0, 1.0, 1.0, 1.0]]]), 2)
    assert kept.tolist() == [[[0, 1]]]  # ties (an empty memory): the older keys stay


def test_pooled_ranking_keeps_a_kept_keys_neighbours():
    errors = torch.tensor([[[0.0, 0.1, 5.0, 0.2, 0.0, 0.3, 0.0, 1.0]]])
    assert pooled(errors, 0) is errors
    torch.testing.assert_close(pooled(errors, 1), torch.tensor([[[0.1, 5.0, 5.0, 5.0, 0.3, 0.3, 1.0, 1.0]]]))
    kept, _ = keep_worst_recalled(pooled(errors, 1), 3)
    assert kept.tolist() == [[[1, 2, 3]]]  # the worst key and both of its neighbours (ties: the earlier keys)
    assert keep_worst_recalled(errors, 3)[0].tolist() == [[[2, 5, 7]]]  # unpooled: three scattered keys
    masked = pooled(torch.tensor([[[float("-inf"), 2.0, float("-inf")]]]), 1)
    assert masked.tolist() == [[[float("-inf"), 2.0, float("-inf")]]]  # no candidate becomes one


def test_model_with_cache_for_everything_equals_teacher_and_state_is_constant(tiny_teacher):
    """A converted model takes a cache without training. With room for every key nothing enters the memory, so it
    is its teacher (full forward and step-wise decoding); with a small cache its state has the same bytes at
    every selection, however long the context."""
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny_teacher(input_ids=ids).logits
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=4, sinks=1, chunk_size=4))
    student = TrainingFree(cache=48, cache_every=8).apply(student.eval())
    assert student.config.attention["cache"] == 48
    assert {m.spec.cache_pool for m in student.attention_modules()} == {LinearAttentionConfig.cache_pool} == {2}
    assert {m.spec.cache_pool for m in reconfigure(student, cache_pool=0).attention_modules()} == {0}
    as_configured = TrainingFree(cache=48).apply(student)
    assert {m.spec.cache_pool for m in as_configured.attention_modules()} == {0}
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        stepwise, _ = decode_stepwise(student, ids, prompt=13)
        torch.testing.assert_close(stepwise, expected, rtol=1e-4, atol=1e-4)
        TrainingFree(cache=3, cache_every=8).apply(student)
        long = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(2))
        state, sizes = student.new_decoding_state(), {}
        for t in range(0, 200, 8):
            student(input_ids=long[:, t : t + 8], linear_state=state)
            sizes[t + 8] = state.nbytes()
    assert len(set(list(sizes.values())[3:])) == 1  # from the first full cache on, every selection leaves M keys
    assert all(len(s.cache) == 3 for s in state)


def test_bad_cache_settings_are_refused(tiny_teacher):
    with pytest.raises(LinearizeError, match="sparse cache"):
        LinearAttentionConfig(cache=8, rule="delta")
    with pytest.raises(LinearizeError, match="sparse cache"):
        LinearAttentionConfig(cache=8, gate="key")
    with pytest.raises(LinearizeError, match="cache"):
        LinearAttentionConfig(cache=-1)
    with pytest.raises(LinearizeError, match="cache_pool >= 0"):
        LinearAttentionConfig(cache=8, cache_pool=-1)
    pure = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=0))
    with pytest.raises(LinearizeError, match="--cache"):
        TrainingFree(cache=8).apply(pure)


def rope_frequencies(d: int) -> torch.Tensor:
    return 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


@pytest.mark.parametrize("form", sorted(SPANS))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("B,H,Hkv,T,d,window,sinks,cache,every", CASES[:3])
def test_cache_scored_at_a_distance_matches_reference(B, H, Hkv, T, d, window, sinks, cache, every, packed, form):
    """cache_distance D (and packed): every form equals the quadratic reference, and the result differs from the
    cache scored at its keys' own positions (and packed from all at D)."""
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, cache=cache, cache_every=every, cache_distance=window,
                         cache_packed=packed)
    layer = LayerConstants(mix, key_features, inv_freq=rope_frequencies(d))
    ref = attention_quadratic(streams, spec, layer)
    y, state = run_in_spans(streams, spec, layer, SPANS[form](T))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert state.cache.position.shape == state.cache.k.shape[:3]
    other = replace(spec, cache_packed=False) if packed else replace(spec, cache_distance=None)
    assert (ref - attention_quadratic(streams, other, layer)).abs().max() > 1e-3


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_packed_cache_reads_as_if_the_text_between_were_cut_out(form):
    """cache_position "packed": linear part off, window 4, a cache of 2 re-selected after every token. A two-token
    needle (the largest values: kept) sits 20 or 60 tokens back; the last query's output is exact softmax over the
    shortened text -- the needle, the one key that just left the window, then the window -- with RoPE at the
    positions of that text, wherever the needle was."""
    T, d, W = 90, 8, 4
    g = torch.Generator().manual_seed(3)
    inv_freq = rope_frequencies(d)
    raw_k, raw_v, raw_q = (torch.randn(1, 1, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    spec = AttentionSpec(W, d**-0.5, linear=False, cache=2, cache_every=1, cache_distance=W, cache_packed=True)
    for where in (T - 1 - W - 20, T - 1 - W - 60):
        k, v = raw_k.clone(), raw_v.clone()
        k[0, 0, where : where + 2], v[0, 0, where : where + 2] = raw_k[0, 0, :2], 20 * raw_v[0, 0, :2]
        pos = torch.arange(T)
        streams = Streams(rotate(k, pos, inv_freq), v, q=rotate(raw_q, pos, inv_freq))
        y, _ = run_in_spans(streams, spec, LayerConstants(torch.ones(1), inv_freq=inv_freq), SPANS[form](T))
        kept = [where, where + 1] + list(range(T - 1 - W, T))  # the needle, the key that just left, the window
        short = torch.arange(len(kept))
        q = rotate(raw_q[:, :, -1:], short[-1:], inv_freq)
        weights = ((q @ rotate(k[:, :, kept], short, inv_freq).transpose(-1, -2)) * d**-0.5).softmax(-1)
        torch.testing.assert_close(y[:, :, -1:], weights @ v[:, :, kept], rtol=1e-12, atol=1e-12)


def test_cache_at_a_distance_reads_a_needle_the_same_however_far_back():
    """Linear part off, window 4, a cache of 1 key: keys and queries carry RoPE at their positions. The last query
    reads the same output whether the needle sat 30 or 80 tokens back (the window and the needle's key and value
    the same), as if it sat just beyond the window; scored at its own position it reads differently."""
    T, d, W = 100, 8, 4
    g = torch.Generator().manual_seed(0)
    inv_freq = rope_frequencies(d)
    raw_k, v, raw_q = (torch.randn(1, 1, T, d, generator=g, dtype=torch.float64) for _ in range(3))
    outputs = {}
    for where in (70, 20):
        k, vv = raw_k.clone(), v.clone()
        k[0, 0, where], vv[0, 0, where] = raw_k[0, 0, 0], 20 * v[0, 0, 0]  # the needle: the largest value, kept
        pos = torch.arange(T)
        streams = Streams(rotate(k, pos, inv_freq), vv, q=rotate(raw_q, pos, inv_freq))
        for distance in (W, None):
            spec = AttentionSpec(W, d**-0.5, linear=False, cache=1, cache_every=8, cache_distance=distance)
            layer = LayerConstants(torch.ones(1), inv_freq=inv_freq)
            y, state = run_in_spans(streams, spec, layer, SPANS["recurrent"](T))
            torch.testing.assert_close(y, attention_quadratic(streams, spec, layer))
            outputs[where, distance] = y[0, 0, -1]
    torch.testing.assert_close(outputs[70, W], outputs[20, W], rtol=1e-12, atol=1e-12)
    assert (outputs[70, None] - outputs[20, None]).abs().max() > 1e-3


@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_sinks_at_a_distance_read_the_same_however_far_back(form):
    """With a cache distance the sinks sit there too: linear part off, window 4, one sink, a cache of 1; the keys
    between sink and window are zero with zero values (each weighs the same at any position). The last query reads
    the same whether it is 40 or 88 tokens after its sink (the sink, window and query alike); with the sinks at their
    own positions (no distance) it reads differently."""
    d, W = 8, 4
    g = torch.Generator().manual_seed(2)
    inv_freq = rope_frequencies(d)
    sink_k, sink_v, near_k, near_v, near_q = (torch.randn(1, 1, n, d, generator=g, dtype=torch.float64)
                                              for n in (1, 1, W, W, W))
    outputs = {}
    for T in (40, 88):  # the same number of keys in the cache at the last query (T % 8 alike)
        middle = torch.zeros(1, 1, T - 1 - W, d, dtype=torch.float64)
        k, v = torch.cat([5 * sink_k, middle, near_k], 2), torch.cat([sink_v, middle, near_v], 2)
        q = torch.cat([torch.zeros(1, 1, T - W, d, dtype=torch.float64), near_q], 2)
        pos = torch.arange(T)
        streams = Streams(rotate(k, pos, inv_freq), v, q=rotate(q, pos, inv_freq))
        for distance in (W, None):
            spec = AttentionSpec(W, d**-0.5, sinks=1, linear=False, cache=1, cache_every=8, cache_distance=distance)
            layer = LayerConstants(torch.ones(1), inv_freq=inv_freq)
            y, _ = run_in_spans(streams, spec, layer, SPANS[form](T))
            torch.testing.assert_close(y, attention_quadratic(streams, spec, layer))
            outputs[T, distance] = y[0, 0, -1]
    torch.testing.assert_close(outputs[40, W], outputs[88, W], rtol=1e-12, atol=1e-12)
    assert (outputs[40, None] - outputs[88, None]).abs().max() > 1e-3


@pytest.mark.parametrize("where", ["edge", "packed"])
def test_model_scores_its_cache_at_the_window_edge(tiny_teacher, tmp_path, where):
    """TrainingFree(cache_position="edge" / "packed"): the layers read the teacher's RoPE frequencies (kept after
    save and load), full forward and step-wise decoding agree, and the logits differ from the cache at its own
    positions."""
    ids = torch.randint(0, 320, (1, 60), generator=torch.Generator().manual_seed(1))
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=4, sinks=1, chunk_size=4))
    student = TrainingFree(cache=3, cache_every=8).apply(student.eval())
    with torch.no_grad():
        own = student(input_ids=ids).logits
        TrainingFree(cache_position=where).apply(student)
        assert {(m.spec.cache_distance, m.spec.cache_packed) for m in student.attention_modules()} == {
            (4, where == "packed")}
        edge = student(input_ids=ids).logits
        stepwise, _ = decode_stepwise(student, ids, prompt=13)
    torch.testing.assert_close(stepwise, edge, rtol=1e-4, atol=1e-4)
    assert (edge - own).abs().max() > 1e-3
    rotary = tiny_teacher.model.rotary_emb.inv_freq
    student.save_pretrained(tmp_path)
    loaded = LinearizedForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention["cache_position"] == where
    for m in loaded.attention_modules():
        torch.testing.assert_close(m.rope_frequencies, rotary)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, edge, rtol=1e-5, atol=1e-5)
    with pytest.raises(LinearizeError, match="cache_position"):
        LinearAttentionConfig(cache=8, cache_position="far")
