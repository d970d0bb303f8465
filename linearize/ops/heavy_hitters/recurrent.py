"""The heavy hitters while decoding: the state keeps the `heavy` best far keys of each KV head (k, v and the window
attention each received), a key that left the window joins them (admit), and a step reads them exactly
(step_terms)."""

import torch

from ..hybrid.spec import AttentionSpec
from ..hybrid.state import LinearAttentionState, Streams, then
from ..hybrid.terms import ones_column
from ..linear_memory import memory_step
from ..sparse_cache.selection import gather_time
from .selection import drop_worst


def heavy_keys(streams: Streams, index: torch.Tensor) -> Streams:
    """k, v, received of streams at index (B, Hkv, n) (per head) along time."""
    return Streams(gather_time(streams.k, index), gather_time(streams.v, index),
                   received=gather_time(streams.received[..., None], index)[..., 0])


def admit(state: LinearAttentionState, spec: AttentionSpec, leaving: Streams, key_features):
    """The key `leaving` (B, Hkv, 1, .) left the window: it joins the heavy keys, and while they number more than
    spec.heavy each head drops its worst, which enters the linear memory (when there is one)."""
    key = Streams(leaving.k, leaving.v, received=leaving.received).clone()  # the window slot is about to be reused
    if state.heavy is None or len(state.heavy) < spec.heavy:
        state.heavy = then(state.heavy, key)
        return
    candidates = state.heavy.append(key)
    kept, dropped = drop_worst(candidates.received)
    state.heavy = heavy_keys(candidates, kept)
    if state.kv is not None:
        dropped = heavy_keys(candidates, dropped)
        state.kv = memory_step(key_features(dropped.k), ones_column(dropped.v), None, None, state.kv)


def step_terms(state: LinearAttentionState, qg, exact: list, scores: list, m, scale: float):
    """One query qg (B, Hkv, G, 1, d) after its scores against the exact parts (the window first, then the sinks)
    with m their max: the window keys' received attention grows by the window's softmax (summed over the group), and
    the state's heavy keys join the exact parts. Returns (exact parts, their scores, m_all: the max over all of
    them, m itself while there are no heavy keys)."""
    state.win.received += torch.softmax(scores[0], -1).sum(2).detach()  # window attention drawn, group summed
    if state.heavy is None:
        return exact, scores, m
    scores = scores + [(qg @ state.heavy.k.transpose(-1, -2)) * scale]
    return exact + [state.heavy], scores, torch.maximum(m, scores[-1].amax(-1, keepdim=True))
