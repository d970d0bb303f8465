"""The recurrent form: one token at a time, for decoding; the state advances in place (the window is a ring).

attention_recurrent(streams, spec, layer, initial_state, output_final_state) -> (y, state | None): each token a
step of the sparse cache (sparse_cache/recurrent.py) or of the window + sinks + linear memory hybrid (hybrid_step,
with heavy hitters where spec.heavy: heavy_hitters/recurrent.py); a StaticCacheState (sparse_cache/static.py: fixed
buffers, what a captured step replays) takes one token of static_step.
"""

from dataclasses import replace

import torch

from ..heavy_hitters.recurrent import step_terms
from ..sparse_cache.recurrent import cached_step
from ..sparse_cache.segment import attention_cached
from ..sparse_cache.static import StaticCacheState, static_step
from .spec import AttentionSpec, LayerConstants
from .state import LinearAttentionState, Streams
from .terms import capped, combine, keys_in_memory, ones_column
from .window import empty_state, push_window


def attention_recurrent(streams: Streams, spec: AttentionSpec, layer: LayerConstants,
                        initial_state: LinearAttentionState | None = None, output_final_state: bool = False):
    """Decode T >= 1 new tokens one at a time. Returns (y (B, H, T, d), the state after them if output_final_state
    else None). initial_state (None: an empty one) is advanced in place, so the returned state is that object:
    decoding writes its window ring without copies. Query heads are grouped as (B, Hkv, G, .) so every product is a
    plain batched matmul (no broadcast copies of the state): decoding is latency-bound, so a step is few ops."""
    if isinstance(initial_state, StaticCacheState):  # fixed buffers (a captured step): one token, no selection
        if len(streams) != 1:
            raise ValueError("a fixed-shape decoding state takes one token at a time; its selections are the caller's")
        return static_step(streams, spec, layer, initial_state), initial_state if output_final_state else None
    state = empty_state(streams, spec) if initial_state is None else initial_state
    if spec.cache and not spec.window:  # no ring to write: the chunked form, one token at a time
        y = attention_cached(streams, spec, layer, state, 1)
    else:
        step = cached_step if spec.cache else hybrid_step
        ys = [step(streams.slice(slice(t, t + 1)), spec, layer, state) for t in range(len(streams))]
        y = torch.cat(ys, dim=2) if ys else torch.zeros_like(streams.q)
    return y, state if output_final_state else None


def hybrid_step(streams: Streams, spec: AttentionSpec, layer: LayerConstants, state: LinearAttentionState):
    """One token (B, ., 1, .) of the window + sinks + linear memory hybrid (+ heavy hitters): update `state` in
    place, return y (B, H, 1, d)."""
    B, _, _, d = streams.q.shape
    Hkv = streams.k.shape[1]
    if spec.heavy:
        streams = replace(streams, received=streams.k.new_zeros(streams.k.shape[:3]))
    push_window(state, spec, streams, layer)
    exact = ([state.win] if spec.window != 0 else []) + ([state.sinks] if state.sinks is not None else [])
    num_sm = lin = m = m_all = None
    if exact:
        qg = streams.q.reshape(B, Hkv, -1, d)
        scores = [(qg @ part.k.transpose(-1, -2)) * spec.scale for part in exact]  # (B, Hkv, G, n)
        m = scores[0].amax(-1, keepdim=True)
        for s in scores[1:]:
            m = torch.maximum(m, s.amax(-1, keepdim=True))
        m_all = m  # the memory is in units of the window and sinks; a heavy key may outscore them
        if spec.heavy:
            exact, scores, m_all = step_terms(state, qg, exact, scores, m, spec.scale)
        num_sm = sum(torch.exp(s - m_all) @ ones_column(part.v) for s, part in zip(scores, exact)).unsqueeze(3)
    if spec.memory:
        lin = (streams.fq.reshape(B, Hkv, -1, streams.fq.shape[-1]) @ state.kv).unsqueeze(3)  # (B, Hkv, G, 1, d+1)
        lin = capped(lin, keys_in_memory(state.seen - 1, spec), spec)
        if m_all is not m:
            lin = lin * torch.exp(m - m_all).unsqueeze(3)
    return combine(num_sm, lin, layer.mix, Hkv, spec.delta, layer.norm_gain)
