"""The sparse cache's fixed-shape decoding step (ops/sparse_cache/static.py), what a captured CUDA graph replays:
token for token it equals the eager step (recurrent.cached_step with its selections), over many selections, for
every way of scoring the cache; its state converts back to the eager one; its buffers never change shape or
address."""

import copy
from dataclasses import replace

import pytest
import torch

from linearize.ops.hybrid.chunked import attention_chunked
from linearize.ops.hybrid.recurrent import attention_recurrent
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants
from linearize.ops.sparse_cache.static import StaticCacheState, selection_due, static_select, static_step

from conftest import attention_inputs

CASES = [  # (B, H, Hkv, T, d, window, sinks, cache, every, prompt)
    (2, 4, 2, 90, 8, 5, 2, 3, 8, 20),  # GQA, a selection every 8 tokens
    (1, 6, 2, 140, 8, 8, 4, 5, 16, 13),  # groups of 3; the cache not yet full when decoding starts
    (1, 2, 1, 60, 8, 6, 0, 2, 4, 30),  # no sinks
]
WHERE = {"own": dict(), "edge": dict(cache_distance="window"), "packed": dict(cache_distance="window",
                                                                              cache_packed=True)}


def spec_and_layer(H, Hkv, d, window, sinks, cache, every, where, score, linear, mix, key_features):
    extra = {k: window if v == "window" else v for k, v in WHERE[where].items()}
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, linear=linear, cache=cache, cache_every=every, cache_pool=1,
                         memory_cap=7 if linear else 0, cache_score=score, **extra)
    g = torch.Generator().manual_seed(1)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scorer = torch.randn(Hkv, 2 * d + 1, generator=g, dtype=torch.float64)
    return spec, LayerConstants(mix, key_features, inv_freq=inv_freq, cache_scorer=scorer)


def decode_static(streams, spec, layer, state, prompt):
    """Decode streams[prompt:] with the fixed-shape step from a copy of `state`, selecting when the host's counts
    say so; returns (y, the StaticCacheState)."""
    static = StaticCacheState.from_state(copy.deepcopy(state), spec)
    seen, count = state.seen, 0 if state.cache is None else len(state.cache)
    addresses = [t.data_ptr() for t in static.tensors()]
    ys = []
    for t in range(prompt, len(streams)):
        ys.append(static_step(streams.slice(slice(t, t + 1)), spec, layer, static))
        seen, count = seen + 1, count + 1
        if selection_due(seen, count, spec):
            static_select(spec, layer, static)
            count = spec.cache
        assert (int(static.seen), int(static.count)) == (seen, count)
    assert [t.data_ptr() for t in static.tensors()] == addresses  # written in place, never reallocated
    return torch.cat(ys, dim=2), static


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("where,score", [("own", "recall"), ("edge", "recall"), ("edge", "learned"),
                                         ("packed", "recall"), ("packed", "learned")])  # learned: at a distance
@pytest.mark.parametrize("B,H,Hkv,T,d,window,sinks,cache,every,prompt", CASES)
def test_static_step_equals_the_eager_step(B, H, Hkv, T, d, window, sinks, cache, every, prompt, where, score,
                                           linear):
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d, linear=linear)
    spec, layer = spec_and_layer(H, Hkv, d, window, sinks, cache, every, where, score, linear, mix, key_features)
    _, state = attention_chunked(streams.slice(slice(0, prompt)), spec, layer, None, True, chunk=4)
    y, static = decode_static(streams, spec, layer, state, prompt)
    eager, final = attention_recurrent(streams.slice(slice(prompt, T)), spec, layer, copy.deepcopy(state), True)
    torch.testing.assert_close(y, eager, rtol=1e-10, atol=1e-10)
    back = static.to_state(spec)
    assert (back.seen, back.start, len(back.cache)) == (final.seen, final.start, len(final.cache))
    for a, b in [(back.win.k, final.win.k), (back.cache.k, final.cache.k), (back.cache.v, final.cache.v)]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if linear:
        torch.testing.assert_close(back.kv, final.kv, rtol=1e-10, atol=1e-10)
    if spec.cache_distance is not None:
        assert torch.equal(back.cache.position, final.cache.position)
    # the state converted back decodes on as the eager one does
    more = attention_inputs(B, H, Hkv, 2 * every, d, linear=linear, seed=5)[0]
    torch.testing.assert_close(attention_recurrent(more, spec, layer, back, True)[0],
                               attention_recurrent(more, spec, layer, final, True)[0], rtol=1e-10, atol=1e-10)


def test_static_state_bytes_are_constant_and_one_key_above_the_eager_bound():
    """The buffers hold W + S + M + N keys per KV head whatever the context: the eager state's largest (M + N - 1
    cached keys between steps) and the one that waits during a selection's step."""
    B, H, Hkv, d, window, sinks, cache, every = 1, 4, 2, 8, 6, 2, 3, 4
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, 200, d)
    spec, layer = spec_and_layer(H, Hkv, d, window, sinks, cache, every, "packed", "recall", True, mix, key_features)
    sizes = []
    for prompt in (20, 90):
        _, state = attention_chunked(streams.slice(slice(0, prompt)), spec, layer, None, True, chunk=4)
        _, static = decode_static(streams.slice(slice(0, prompt + 9)), spec, layer, state, prompt)
        sizes.append(static.nbytes())
    per_key = Hkv * (2 * d * 8 + 4)  # k, v in float64, an int32 position
    kv = Hkv * 2 * d * (d + 1) * 8  # the feature map doubles d (attention_inputs)
    assert sizes[0] == sizes[1] == window * Hkv * 2 * d * 8 + (sinks + cache + every) * per_key + kv + 3 * 8


def test_static_state_refuses_what_it_cannot_hold():
    B, H, Hkv, d = 1, 2, 1, 8
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, 40, d)
    spec, layer = spec_and_layer(H, Hkv, d, 6, 2, 3, 4, "packed", "recall", True, mix, key_features)
    _, short = attention_chunked(streams.slice(slice(0, 7)), spec, layer, None, True, chunk=4)
    assert "fill the window and the sinks" in StaticCacheState.unsupported(short, spec)
    with pytest.raises(ValueError, match="fill the window"):
        StaticCacheState.from_state(short, spec)
    no_cache = AttentionSpec(6, d**-0.5, sinks=2)
    assert "sparse cache" in StaticCacheState.unsupported(short, no_cache)
    _, state = attention_chunked(streams.slice(slice(0, 20)), spec, layer, None, True, chunk=4)
    static = StaticCacheState.from_state(state, spec)
    with pytest.raises(ValueError, match="one token at a time"):
        attention_recurrent(streams.slice(slice(20, 22)), spec, layer, static, True)


def cached_student(tiny_teacher, position="packed"):
    from linearize import LinearAttentionConfig, LinearizedForCausalLM
    from linearize.training_free import TrainingFree

    student = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=6, sinks=2, chunk_size=4))
    return TrainingFree(cache=3, cache_every=5, memory_cap=9, cache_position=position).apply(student.eval())


@pytest.mark.parametrize("position", ["own", "packed"])
def test_decoder_on_fixed_buffers_equals_the_eager_decoder(tiny_teacher, position):
    """The Decoder's fixed-buffer path (generate/captured.py, eager off CUDA) gives the eager decoder's logits at
    every step over several selections, its state reads back as the eager one (and prefills on), and its bytes stay
    constant. A prompt too short to fill the window and sinks decodes eagerly until it has."""
    from linearize.generate.decoding import Decoder

    student = cached_student(tiny_teacher, position)
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(3))
    for prompt in (5, 14):  # 5: shorter than window + sinks = 8
        eager, fixed = Decoder(student, captured=False), Decoder(student, captured=True)
        steps = []
        for dec in (eager, fixed):
            logits, out, sizes = dec.prefill(ids[:, :prompt]), [], []
            for t in range(prompt, 36):
                out.append(logits)
                logits = dec.step(ids[:, t : t + 1])
                sizes.append(dec.cache_bytes())
            steps.append((torch.cat(out), sizes))
        torch.testing.assert_close(steps[1][0], steps[0][0], rtol=1e-5, atol=1e-5)
        assert fixed._live and fixed._step is not None and not eager._live
        assert len(set(steps[1][1][10:])) == 1  # constant once on fixed buffers
        state = fixed.cache  # read back from the buffers
        assert not fixed._live and state.seen == eager.cache.seen == 36
        for a, b in zip(state, eager.cache):
            torch.testing.assert_close(a.kv, b.kv, rtol=1e-5, atol=1e-5)
            assert len(a.cache) == len(b.cache) and a.start == b.start
        more = ids[:, 36:40]
        torch.testing.assert_close(fixed.prefill(more, state=state), eager.prefill(more, state=eager.cache),
                                   rtol=1e-5, atol=1e-5)


def test_decoder_decodes_eagerly_where_no_fixed_step_exists(tiny_teacher):
    from linearize import LinearAttentionConfig, LinearizedForCausalLM
    from linearize.generate.captured import CapturedStep
    from linearize.generate.decoding import Decoder

    student = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=6, sinks=2)).eval()
    assert "sparse cache" in CapturedStep.model_unsupported(student)
    dec = Decoder(student, captured=True)
    assert not dec.captured
    dec.step(dec.prefill(torch.randint(0, 320, (1, 20))).argmax(-1, keepdim=True))
    assert dec._step is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_graphs_replay_the_eager_decoder_on_cuda(tiny_teacher):
    """On CUDA the step and the selection are captured once and replayed: the logits equal the eager decoder's."""
    from linearize.generate.decoding import Decoder

    student = cached_student(tiny_teacher).cuda()
    ids = torch.randint(0, 320, (1, 60), generator=torch.Generator().manual_seed(3)).cuda()
    outs = []
    for captured in (False, True):
        dec, logits, out = Decoder(student, captured=captured), None, []
        logits = dec.prefill(ids[:, :14])
        for t in range(14, 60):
            out.append(logits)
            logits = dec.step(ids[:, t : t + 1])
        outs.append(torch.cat(out))
        if captured:
            assert dec._step.graphs is not None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_bench_point_says_how_the_student_decoded(tiny_teacher):
    from linearize.bench.measure import measure_point

    student = cached_student(tiny_teacher)
    assert measure_point(student, context=40, decode_tokens=3)["decode_step"] == "eager"  # the CPU's default
    fixed = measure_point(student, context=40, decode_tokens=3, captured=True)
    assert fixed["decode_step"] == "fixed buffers" and fixed["decode_ms_per_token"] > 0


def test_static_step_in_bfloat16_follows_the_eager_step():
    """bfloat16 buffers (what a GPU decodes in): the fixed-shape step stays within bfloat16's rounding of the eager
    one over several selections (the memory cap's counts are taken in float32 by both)."""
    B, H, Hkv, T, d, window, sinks, cache, every, prompt = CASES[0]
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d, dtype=torch.bfloat16)
    spec, layer = spec_and_layer(H, Hkv, d, window, sinks, cache, every, "packed", "learned", True, mix, key_features)
    layer = replace(layer, cache_scorer=layer.cache_scorer.float())  # a model's buffer: float32 at most
    with torch.no_grad():
        _, state = attention_chunked(streams.slice(slice(0, prompt)), spec, layer, None, True, chunk=4)
        y, _ = decode_static(streams, spec, layer, state, prompt)
        eager, _ = attention_recurrent(streams.slice(slice(prompt, T)), spec, layer, copy.deepcopy(state), True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, eager, rtol=2e-2, atol=2e-2)
