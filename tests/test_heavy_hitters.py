"""Heavy hitters (ops/heavy_hitters/): of the keys that left the window, the M per KV head that drew the most window
attention stay exact. Brute force (one query, one key at a time) == quadratic == chunked == recurrent == prefill in
blocks + decoding; with room for every key and no linear part it is exact causal softmax; the state stays M keys."""

import pytest
import torch

from linearize import LinearAttentionConfig
from linearize.errors import LinearizeError
from linearize.ops import heavy_hitters
from linearize.ops.hybrid.chunked import attention_chunked
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.recurrent import attention_recurrent
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants

from conftest import attention_inputs, blocks, run_in_spans

CASES = [  # (B, H, Hkv, T, d, window, chunk, sinks, heavy)
    (2, 4, 2, 37, 8, 5, 8, 2, 3),  # GQA, sinks
    (1, 6, 2, 41, 8, 8, 16, 0, 1),  # groups of 3, one heavy key, no sinks
    (1, 2, 2, 29, 8, 4, 4, 1, 50),  # room for every key
    (2, 2, 1, 6, 8, 8, 4, 1, 2),  # shorter than the window: nothing leaves it
]


def brute_force(streams, mix, window, scale, sinks, heavy, linear=True):
    """y_i one query and one key at a time: received attention, the per-query best far keys, one normaliser."""
    q, k, v, fq, fk = streams.q, streams.k, streams.v, streams.fq, streams.fk
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    y = torch.zeros_like(q)
    for b in range(B):
        received = torch.zeros(Hkv, T, dtype=q.dtype)
        for h in range(H):
            for i in range(T):
                win = [j for j in range(max(0, i - window + 1), i + 1)]
                e = torch.exp(torch.stack([q[b, h, i] @ k[b, h // G, j] * scale for j in win]))
                for n, j in enumerate(win):
                    received[h // G, j] += e[n] / e.sum()
        for h in range(H):
            kh = h // G
            for i in range(T):
                far = list(range(sinks, i - window + 1))
                best = sorted(far, key=lambda j: (-received[kh, j].item(), j))[:heavy]
                reference = [j for j in range(i + 1) if j > i - window or j < sinks]
                s = {j: q[b, h, i] @ k[b, kh, j] * scale for j in reference + best}
                m = max(s[j] for j in reference)  # the units of the memory
                top = max(s.values())  # every term re-based to the largest exact score (the epsilon's units)
                w = mix[h] if linear else 1.0
                a = {j: w * torch.exp(s[j] - top) for j in s}
                if linear:
                    for j in far:
                        if j not in best:
                            a[j] = (1 - mix[h]) * (fq[b, h, i] @ fk[b, kh, j]) * torch.exp(m - top)
                y[b, h, i] = sum(a[j] * v[b, kh, j] for j in a) / (sum(a.values()) + (1e-6 if linear else 0))
    return y


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk,sinks,heavy", CASES[:2])
def test_quadratic_matches_brute_force(B, H, Hkv, T, d, window, chunk, sinks, heavy, linear):
    streams, mix, _, _ = attention_inputs(B, H, Hkv, T, d, linear=linear)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, linear=linear, heavy=heavy)
    ref = brute_force(streams, mix, window, d**-0.5, sinks, heavy, linear)
    torch.testing.assert_close(attention_quadratic(streams, spec, LayerConstants(mix)), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("B,H,Hkv,T,d,window,chunk,sinks,heavy", CASES)
def test_chunked_recurrent_and_blocks_match_quadratic(B, H, Hkv, T, d, window, chunk, sinks, heavy, linear):
    streams, mix, key_features, _ = attention_inputs(B, H, Hkv, T, d, linear=linear)
    spec = AttentionSpec(window, d**-0.5, sinks=sinks, linear=linear, heavy=heavy, memory_cap=7 if linear else 0)
    layer = LayerConstants(mix, key_features)
    ref = attention_quadratic(streams, spec, layer)
    y, state = attention_chunked(streams, spec, layer, chunk=chunk, output_final_state=True)
    torch.testing.assert_close(y, ref)
    y, _ = attention_recurrent(streams, spec, layer)
    torch.testing.assert_close(y, ref)
    spans = [(s, "chunked" if n % 2 == 0 else "recurrent") for n, s in enumerate(blocks(T))]
    y, end = run_in_spans(streams, spec, layer, spans, chunk=chunk)
    torch.testing.assert_close(y, ref)
    # the state after one chunked prefill equals the one after prefill in blocks and decoding
    held = 0 if state.heavy is None else len(state.heavy)
    assert held == min(heavy, max(T - window - sinks, 0))
    if held:
        torch.testing.assert_close(end.heavy.k, state.heavy.k)
        torch.testing.assert_close(end.heavy.received, state.heavy.received)
    if linear:
        torch.testing.assert_close(end.kv, state.kv)


def test_room_for_every_key_without_a_linear_part_is_exact_softmax():
    streams, mix, _, _ = attention_inputs(1, 4, 2, 30, 8, linear=False)
    full = attention_quadratic(streams, AttentionSpec(None, 8**-0.5, linear=False), LayerConstants(mix))
    y, _ = attention_chunked(streams, AttentionSpec(4, 8**-0.5, linear=False, heavy=30), LayerConstants(mix), chunk=8)
    torch.testing.assert_close(y, full)


def test_heavy_keys_change_the_result_and_are_the_most_attended():
    """Guard against a test that cannot fail, and the score itself: the one kept key is the one that drew the most."""
    streams, mix, key_features, _ = attention_inputs(1, 2, 1, 24, 8)
    k = streams.k.clone()
    k[:, :, 5] = 3 * streams.q[:, :, 5:9].sum(2).mean(1, keepdim=True)  # key 5 draws its window's queries 5..8
    streams.k = k
    plain = attention_quadratic(streams, AttentionSpec(4, 8**-0.5), LayerConstants(mix))
    spec = AttentionSpec(4, 8**-0.5, heavy=1)
    y, state = attention_chunked(streams, spec, LayerConstants(mix, key_features), chunk=8, output_final_state=True)
    assert (y[:, :, 4:] - plain[:, :, 4:]).abs().amax() > 1e-3  # key 0 leaves the window for query 4
    torch.testing.assert_close(y[:, :, :4], plain[:, :, :4])
    torch.testing.assert_close(state.heavy.k[0, 0, 0], k[0, 0, 5])


def test_state_stays_the_same_size():
    streams, mix, key_features, _ = attention_inputs(1, 2, 1, 80, 8)
    spec = AttentionSpec(6, 8**-0.5, sinks=2, heavy=3)
    sizes = []
    layer = LayerConstants(mix, key_features)
    run_in_spans(streams, spec, layer, [(slice(0, 30), "chunked"), (slice(30, 80), "recurrent")],
                 check=lambda s, state: sizes.append(state.nbytes()))
    _, long = attention_chunked(streams, spec, layer, chunk=8, output_final_state=True)
    assert sizes[0] == sizes[1] == long.nbytes()
    assert len(long.heavy) == 3


def test_best_of_prefixes_prefers_older_keys_on_ties():
    r = torch.tensor([[[1.0, 3.0, 3.0, 2.0]]])
    kept = heavy_hitters.best_of_prefixes(r, torch.tensor([1, 2, 3, 4]), 2)[0, 0]
    assert kept.tolist() == [[True, False, False, False], [True, True, False, False], [False, True, True, False],
                             [False, True, True, False]]
    assert heavy_hitters.best(r, 2)[0].tolist() == [[[1, 2]]]


@pytest.mark.parametrize("bad", [dict(heavy=-1), dict(heavy=2, window=0), dict(heavy=2, cache=4),
                                 dict(heavy=2, gate="key"), dict(heavy=2, rule="delta")])
def test_bad_configurations_say_what_to_change(bad):
    with pytest.raises(LinearizeError, match="heavy"):
        LinearAttentionConfig(**{"window": 8, **bad})


def test_model_forward_decoding_and_training_with_heavy_hitters(tiny_teacher):
    """A converted model with heavy hitters: prefill + ring decoding equals the full forward, the heavy keys are in
    the state, and stage 1's parameters get gradients through the heavy-hitter form."""
    from linearize.models.linearized import LinearizedForCausalLM
    from linearize.training_free import TrainingFree

    from conftest import decode_stepwise

    cfg = LinearAttentionConfig(window=6, sinks=1, heavy=2, chunk_size=4)
    student = LinearizedForCausalLM.from_teacher(tiny_teacher, cfg).eval()
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = student(input_ids=ids).logits
        stepwise, state = decode_stepwise(student, ids, prompt=13)
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-4)
    assert all(len(s.heavy) == 2 for s in state)
    plain = TrainingFree(heavy=0).apply(LinearizedForCausalLM.from_teacher(tiny_teacher, cfg)).eval()
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - full).abs().max() > 1e-4
    student.train()
    student(input_ids=ids).logits.square().mean().backward()
    grads = [p.grad for a in student.attention_modules() for p in a.trainable_transfer_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_convert_and_eval_with_heavy_hitters(model_dir, data_file, tmp_path, capsys):
    """`convert --heavy M` trains with the heavy hitters and the saved model keeps them; `eval --heavy 0` switches
    them off without training; a bad value is one clear error line."""
    import json

    from linearize.cli import main
    from linearize.convert.settings import ConvertSettings
    from linearize.loading.student import load_student
    from linearize.training_free import TrainingFree

    assert ConvertSettings(heavy=5).attention_config().heavy == 5
    out = tmp_path / "heavy"
    small = ["--seq-len", "32", "--tokens", "64", "--lora-tokens", "32", "--eval-tokens", "64", "--window", "8",
             "--no-progress"]
    assert main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *small,
                 "--heavy", "3"]) == 0
    model, _ = load_student(out)
    assert {a.spec.heavy for a in model.attention_modules()} == {3}
    assert json.loads((out / "config.json").read_text())["attention"]["heavy"] == 3
    assert {a.spec.heavy for a in load_student(out, training_free=TrainingFree(heavy=0))[0].attention_modules()} == {0}
    capsys.readouterr()
    assert main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "bad"),
                 *small, "--heavy", "-2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--heavy" in err


def test_drop_worst_is_best_of_all_but_one():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (3, 2, 9), generator=g).double()  # many ties
    kept, dropped = heavy_hitters.drop_worst(r)
    best_kept, best_dropped = heavy_hitters.best(r, 8)
    assert torch.equal(kept, best_kept) and torch.equal(dropped, best_dropped)
