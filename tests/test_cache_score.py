"""The sparse cache's learned score (cache_score "learned"): every form equals the quadratic reference, the score
decides what stays, fitting recovers a planted score and reads what a far question attends to, and a fitted model
saves, loads and refuses what it cannot do."""

import pytest
import torch

from linearize import LinearAttentionConfig, LinearizedForCausalLM
from linearize.errors import LinearizeError
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants, SettingsError
from linearize.ops.hybrid.state import Streams
from linearize.ops.rotary import rotate
from linearize.ops.sparse_cache import learned_score, score_features
from linearize.transfer.cache_score import (EPS, QUESTION_QUERIES, Sums, answer_queries, cached_layers, labels,
                                           fit_cache_score, question_targets)
from linearize.training_free import TrainingFree

from conftest import attention_inputs, decode_stepwise, run_in_spans
from test_sparse_cache import CASES, SPANS, rope_frequencies


@pytest.mark.parametrize("form", sorted(SPANS))
@pytest.mark.parametrize("B,H,Hkv,T,d,window,sinks,cache,every", CASES[:3])
def test_learned_score_matches_reference(B, H, Hkv, T, d, window, sinks, cache, every, form):
    """Every form (chunked, recurrent, prefill in blocks, prefill then decode) equals the quadratic reference with
    a learned score, and the result differs from the self-recall ranking's."""
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, cache=cache, cache_every=every, cache_distance=window,
                         cache_pool=1, cache_score="learned")
    scorer = torch.randn(Hkv, 2 * d + 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    layer = LayerConstants(mix, key_features, inv_freq=rope_frequencies(d), cache_scorer=scorer)
    ref = attention_quadratic(streams, spec, layer)
    y, _ = run_in_spans(streams, spec, layer, SPANS[form](T))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    recall = AttentionSpec(window, d**-0.5, sinks=sinks, cache=cache, cache_every=every, cache_distance=window,
                           cache_pool=1)
    assert (ref - attention_quadratic(streams, recall, layer)).abs().max() > 1e-3


def test_learned_score_keeps_the_keys_it_ranks_highest():
    """A scorer that reads one value channel keeps, of the keys beyond the window, exactly those with the largest
    values there (no pooling), wherever they are."""
    B, H, Hkv, T, d, window, cache = 1, 2, 1, 48, 4, 4, 3
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d)
    marked = [7, 20, 33]
    v = streams.v.clone()
    v[..., 0] = 0
    v[:, :, marked, 0] = 5.0
    streams = Streams(k=streams.k, v=v, q=streams.q, fq=streams.fq, fk=streams.fk)
    scorer = torch.zeros(Hkv, 2 * d + 1, dtype=torch.float64)
    scorer[:, d] = 1.0  # v's first channel
    spec = AttentionSpec(window, d**-0.5, cache=cache, cache_every=8, cache_distance=window, cache_score="learned")
    layer = LayerConstants(mix, key_features, inv_freq=rope_frequencies(d), cache_scorer=scorer)
    _, state = run_in_spans(streams, spec, layer, SPANS["chunked"](T))
    assert sorted(state.cache.position[0, 0, :cache].tolist()) == marked


def test_score_features_and_settings():
    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    x = score_features(k, v)
    assert x.shape == (2, 3, 5, 9) and torch.equal(x[..., -1], torch.ones(2, 3, 5))
    w = torch.randn(3, 9)
    torch.testing.assert_close(learned_score(k, v, w), torch.einsum("bhnd,hd->bhn", x, w))
    with pytest.raises(SettingsError, match="cache-position"):
        AttentionSpec(4, 0.5, cache=2, cache_score="learned")  # a cache at its own positions keeps RoPE on its keys
    with pytest.raises(SettingsError, match="cache_score"):
        AttentionSpec(4, 0.5, cache=2, cache_distance=4, cache_score="best")
    with pytest.raises(LinearizeError, match="cache-position packed"):
        LinearAttentionConfig(window=4, cache=2, cache_score="learned")


def test_ridge_fit_recovers_a_linear_score():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 9, generator=g)
    sums = Sums()
    for _ in range(4):
        x = torch.cat([torch.randn(1, 2, 200, 8, generator=g), torch.ones(1, 2, 200, 1)], -1)
        sums.add(x, torch.einsum("bhnd,hd->bhn", x, w))
    torch.testing.assert_close(sums.solve(), w, rtol=0.05, atol=0.05)
    assert sums.keys == 800


def test_labels_mark_the_top_share_of_each_row_and_head():
    """labels(target, top): 1 on the keys whose target is in the top `top` of their row and KV head (here the 2 of
    100 largest, wherever they are), 0 elsewhere; top None fits the target itself. A ridge fit on such labels ranks
    keys of the positives' kind above the rest."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 2, 100, generator=g)
    y = labels(target, 0.02)
    assert set(y.unique().tolist()) == {0.0, 1.0} and (y.sum(-1) == 2).all()
    assert torch.equal(y.bool(), target >= target.topk(2, dim=-1).values[..., -1:])
    assert labels(target, None) is target
    read = torch.zeros(20, 2, 100, dtype=torch.bool)
    read[..., :2] = True  # 2 keys per row and head that questions read
    x = torch.cat([torch.randn(20, 2, 100, 8, generator=g), torch.ones(20, 2, 100, 1)], -1)
    x[..., 0] += 6 * read  # they differ from the rest along one feature; the target's bulk follows another
    bulk = 5 * x[..., 1] + torch.randn(20, 2, 100, generator=g)
    target = torch.where(read, bulk.amax(-1, keepdim=True) + 1, bulk)
    found = {}
    for top in (0.02, None):
        sums = Sums()
        sums.add(x, labels(target, top))
        score = torch.einsum("bhnd,hd->bhn", x, sums.solve())
        found[top] = read.gather(-1, score.topk(2, dim=-1).indices).float().mean().item()
    assert found[0.02] > 0.95 and found[None] < 0.5, found


def test_question_targets_read_what_the_last_queries_attend_to_beyond_the_window():
    """One key the last queries attend to strongly, 20 tokens back: the largest target; keys inside the window of
    every question query and the sinks are not reached."""
    T, d, window, sinks = 40, 8, 10, 2
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, T, d, generator=g) * 0.1, torch.randn(1, 1, T, d, generator=g)
    q = torch.zeros(1, 2, T, d)
    q[..., 0] = 10.0
    k[:, :, 20, 0] = 5.0
    target, reached = question_targets(Streams(k=k, v=v, q=q), d**-0.5, window, sinks, torch.arange(T - 4, T))
    # the last query (T - 1) reaches every key up to T - 1 - window
    assert target.shape == (1, 1, T) and reached.tolist() == [False] * sinks + [True] * (T - window - sinks) \
        + [False] * window
    assert target[0, 0, reached].argmax().item() == 20 - sinks
    default, _ = question_targets(Streams(k=k, v=v, q=q), d**-0.5, window, sinks)  # the last QUESTION_QUERIES
    assert torch.equal(default, question_targets(Streams(k=k, v=v, q=q), d**-0.5, window, sinks,
                                                 torch.arange(T - QUESTION_QUERIES, T))[0])
    # queries at 25..28 reach keys up to 18 only: the key at 20 is not theirs, and the keys after 18 are not reached
    early, reached = question_targets(Streams(k=k, v=v, q=q), d**-0.5, window, sinks, torch.arange(25, 29))
    assert reached.tolist() == [False] * sinks + [True] * (28 - window - sinks + 1) + [False] * (T - 28 + window - 1)
    assert early[0, 0, 20].item() == pytest.approx(torch.log(torch.tensor(EPS)).item())


def test_answer_queries_are_the_tokens_before_each_answer_end():
    assert answer_queries([12, 30], 30).tolist() == list(range(12 - QUESTION_QUERIES, 12)) + \
        list(range(30 - QUESTION_QUERIES, 30))
    assert answer_queries([3], 10).tolist() == [0, 1, 2]  # clipped at the row's start


def test_fitted_model_ranks_by_its_score_and_round_trips(tiny_teacher, tmp_path):
    """fit_cache_score on a tiny model: every cached layer holds a (Hkv, 2d + 1) scorer, the config says "learned",
    prefill and step-wise decoding agree, the logits differ from the self-recall ranking's, and save / load keeps it
    all; a model without a fitted score refuses --cache-score learned."""
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=4, sinks=1, chunk_size=4))
    student = TrainingFree(cache=3, cache_every=8, cache_position="edge").apply(student.eval())
    with pytest.raises(LinearizeError, match="no fitted cache score"):
        TrainingFree(cache_score="learned").apply(student)
    ids = torch.randint(0, 320, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        recall = student(input_ids=ids).logits
    rows = torch.randint(0, 320, (3, 32), generator=torch.Generator().manual_seed(2))
    weights = fit_cache_score(student, rows, ends=[[20, 31], [31], [12, 25]])
    layers = cached_layers(student)
    assert layers and sorted(weights) == [m.layer_idx for m in layers]
    for m in layers:
        assert m.cache_scorer.shape == (m.num_kv_heads, 2 * m.head_dim + 1) and m.spec.cache_score == "learned"
        assert not m.exact_softmax and "attend" not in vars(m)  # the fit left no hook behind
    assert student.config.attention["cache_score"] == "learned"
    with torch.no_grad():
        learned = student(input_ids=ids).logits
        stepwise, _ = decode_stepwise(student, ids, prompt=13)
    torch.testing.assert_close(stepwise, learned, rtol=1e-4, atol=1e-4)
    assert (learned - recall).abs().max() > 1e-4
    student.save_pretrained(tmp_path)
    loaded = LinearizedForCausalLM.from_pretrained(tmp_path).eval()
    for a, b in zip(cached_layers(loaded), layers):
        torch.testing.assert_close(a.cache_scorer, b.cache_scorer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, learned, rtol=1e-5, atol=1e-5)
        TrainingFree(cache_score="recall").apply(loaded)
        torch.testing.assert_close(loaded(input_ids=ids).logits, recall, rtol=1e-5, atol=1e-5)


def test_fit_refuses_a_model_without_a_cache_at_a_distance(tiny_teacher):
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, LinearAttentionConfig(window=4, sinks=1, cache=3))
    with pytest.raises(LinearizeError, match="cache-position packed"):
        fit_cache_score(student, torch.zeros(1, 32, dtype=torch.long))
    TrainingFree(cache_position="edge").apply(student)
    with pytest.raises(LinearizeError, match="longer than"):
        fit_cache_score(student, torch.zeros(1, 8, dtype=torch.long))
