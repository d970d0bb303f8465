"""The sparse cache while decoding: one token at a time with a window W > 0 (with W = 0 decoding runs
segment.attention_cached one token at a time)."""

import torch

from ..hybrid.spec import AttentionSpec, LayerConstants
from ..hybrid.state import LinearAttentionState, Streams
from ..hybrid.terms import capped, combine, ones_column
from ..hybrid.window import push_window
from .positions import cache_queries, in_row
from .segment import cached_memory_size, select_when_due


def cached_step(streams: Streams, spec: AttentionSpec, layer: LayerConstants, state: LinearAttentionState):
    """One token (B, ., 1, .) with the sparse cache and a window W > 0, for decoding: segment.cached_segment with n = 1,
    but the window is the ring of push_window, written in place (the key leaving it joins the sinks or the cache),
    and no mask is built. Returns y (B, H, 1, d)."""
    q, inv_freq = streams.q, layer.inv_freq
    B, _, _, d = q.shape
    Hkv = streams.k.shape[1]
    in_memory = cached_memory_size(state)
    push_window(state, spec, streams, layer)
    qg = q.reshape(B, Hkv, -1, d)
    parts = [state.win] + [p for p in (state.sinks, state.cache) if p is not None]
    n_ref = len(state.win) + (0 if state.sinks is None else len(state.sinks))  # the window and sinks come first
    v = torch.cat([p.v for p in parts], dim=2)
    if spec.cache_distance is None or len(parts) == 1:
        scores = (qg @ torch.cat([p.k for p in parts], dim=2).transpose(-1, -2)) * spec.scale  # (B, Hkv, G, n)
    else:  # the window as it is, the sinks and the cache (after it) at their distance
        near = (qg @ state.win.k.transpose(-1, -2)) * spec.scale
        pos_q = torch.full((1,), state.seen - 1, device=q.device)
        far_k = in_row(torch.cat([p.k for p in parts[1:]], dim=2), 0, spec, inv_freq)
        far = (cache_queries(qg, pos_q, spec, inv_freq, far_k.shape[2]) @ far_k.transpose(-1, -2)) * spec.scale
        scores = torch.cat([near, far], dim=-1)
    y = step_output(scores, n_ref, v, streams.fq, state.kv, in_memory, spec, layer)
    select_when_due(state, spec, layer)
    return y


def step_output(scores, n_ref: int, v, fq, kv, in_memory, spec: AttentionSpec, layer: LayerConstants):
    """One token's output from its scores (B, Hkv, G, n) against the exact keys (window and sinks first, n_ref of
    them), their values v (B, Hkv, n, d), and the memory kv (B, Hkv, F, d + 1) read by fq (B, H, 1, F), holding
    in_memory keys (an int or a () tensor): the shared normaliser in the units of the largest window/sink score.
    Returns y (B, H, 1, d). (cached_step here and static.static_step share it.)"""
    B, Hkv = v.shape[:2]
    m_ref = scores[..., :n_ref].amax(-1, keepdim=True)  # the largest window/sink score: the memory's units
    m = scores.amax(-1, keepdim=True)
    num_sm = (torch.exp(scores - m) @ ones_column(v)).unsqueeze(3)
    lin = None
    if spec.memory:
        lin = (fq.reshape(B, Hkv, -1, fq.shape[-1]) @ kv).unsqueeze(3)  # (B, Hkv, G, 1, d+1)
        lin = capped(lin * torch.exp(m_ref - m).unsqueeze(3), in_memory, spec)
    return combine(num_sm, lin, layer.mix, Hkv)
