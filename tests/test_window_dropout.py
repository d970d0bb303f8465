"""Scheduled sliding-window dropout (transfer/window_dropout.py): a dropped layer computes exactly the attention
with a one-token window; the schedule falls to 0, is deterministic per step and resumes; convert checks the flag."""

import copy

import pytest
import torch

from linearize.convert.settings import ConvertSettings
from linearize.errors import LinearizeError
from linearize.layers.linear_attention import DROPPED_WINDOW, LinearAttentionConfig
from linearize.models.linearized import make_student_attention
from linearize.transfer.attention_transfer import attention_transfer, transfer_state
from linearize.transfer.window_dropout import WindowDropout

from conftest import interrupted_at_step


def sequences(n=12, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (n, T), generator=g)


def test_a_dropped_layer_is_the_layer_with_a_one_token_window(tiny_teacher):
    """window_dropped in training = the same weights built with window DROPPED_WINDOW and no memory cap, sinks kept;
    and it changes the output (the window is really gone)."""
    cfg = LinearAttentionConfig(window=8, sinks=2, chunk_size=8, memory_cap=20)
    torch.manual_seed(0)
    layer = make_student_attention(tiny_teacher, cfg)[0]
    torch.manual_seed(0)
    narrow = make_student_attention(tiny_teacher, LinearAttentionConfig(window=DROPPED_WINDOW, sinks=2, chunk_size=8,
                                                                        memory_cap=0))[0]
    narrow.load_state_dict(layer.state_dict())
    g = torch.Generator().manual_seed(1)
    B, T, H, Hkv, d = 1, 40, 4, 2, 16
    from linearize.ops.hybrid.state import Streams

    streams = Streams(q=torch.randn(B, H, T, d, generator=g), k=torch.randn(B, Hkv, T, d, generator=g),
                      v=torch.randn(B, Hkv, T, d, generator=g))
    full = layer.attend(copy.copy(streams))
    layer.window_dropped = True
    dropped = layer.attend(copy.copy(streams))
    torch.testing.assert_close(dropped, narrow.attend(copy.copy(streams)))
    assert not torch.allclose(dropped, full, atol=1e-3)


def test_the_schedule_falls_to_zero_and_draws_per_step():
    students = [type("S", (), {"window_dropped": False})() for _ in range(50)]
    dropout = WindowDropout(0.8, seed=3)
    assert dropout.probability_at(0, 10) == 0.8 and dropout.probability_at(9, 10) == 0.0
    assert dropout.probability_at(5, 11) == pytest.approx(0.4)
    first = dropout.set(students, 0, 10)
    assert 25 <= sum(first) <= 50 and [s.window_dropped for s in students] == first
    assert dropout.set(students, 0, 10) == first  # the same step draws the same layers
    assert dropout.set(students, 1, 10) != first
    assert not any(dropout.set(students, 9, 10))
    WindowDropout(1.0).set(students, 0, 10)
    WindowDropout.clear(students)
    assert not any(s.window_dropped for s in students)


def test_transfer_with_window_dropout_trains_otherwise_and_resumes_exactly(tiny_teacher, tmp_path, monkeypatch):
    data = sequences(n=10)
    cfg = LinearAttentionConfig(window=4, sinks=1, chunk_size=8)

    def run(dropout, **kw):
        torch.manual_seed(0)
        students = make_student_attention(tiny_teacher, cfg)
        attention_transfer(tiny_teacher, students, data, progress=False, window_dropout=dropout, **kw)
        return students

    plain, dropped = run(None), run(WindowDropout(0.9))
    assert not any(s.window_dropped for s in dropped)  # cleared after the stage
    assert any(not torch.equal(a, b) for a, b in zip(transfer_state(plain).values(), transfer_state(dropped).values()))
    torch.manual_seed(0)
    interrupted = make_student_attention(tiny_teacher, cfg)
    interrupted_at_step(monkeypatch, 6, lambda: attention_transfer(
        tiny_teacher, interrupted, data, checkpoint_dir=tmp_path / "ckpt", progress=False,
        window_dropout=WindowDropout(0.9)))
    resumed = make_student_attention(tiny_teacher, cfg)
    attention_transfer(tiny_teacher, resumed, data, checkpoint_dir=tmp_path / "ckpt", progress=False,
                       window_dropout=WindowDropout(0.9))
    for k, v in transfer_state(dropped).items():
        torch.testing.assert_close(transfer_state(resumed)[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(window_dropout=1.5), "between 0 and 1"),
    (dict(window_dropout=0.5, attention="streaming"), "needs both"),
    (dict(window_dropout=0.5, window=0), "needs both"),
])
def test_convert_checks_window_dropout(kw, message):
    with pytest.raises(LinearizeError, match=message):
        ConvertSettings(**kw).check()
