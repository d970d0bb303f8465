"""The quadratic reference of every mode, with explicit T x T weights (tests only).

attention_quadratic(streams, spec, layer) -> y (B, H, T, d): the sparse cache (sparse_cache/naive.py), the heavy
hitters (heavy_hitters/naive.py), or the window + sinks + linear memory hybrid (hybrid_quadratic).
"""

from dataclasses import replace

import torch

from ..heavy_hitters.naive import heavy_quadratic
from ..linear_memory import memory_naive
from ..sparse_cache.naive import cached_quadratic
from .spec import AttentionSpec, LayerConstants
from .state import Streams
from .terms import capped, combine, exact_num, group, keys_in_memory, linear_part


def attention_quadratic(streams: Streams, spec: AttentionSpec, layer: LayerConstants) -> torch.Tensor:
    """Reference form with explicit T x T weights. Returns (B, H, T, d)."""
    if spec.cache:
        return cached_quadratic(streams, spec, layer)
    if spec.heavy:
        return heavy_quadratic(streams, spec, layer)
    return hybrid_quadratic(streams, spec, layer)


def hybrid_quadratic(streams: Streams, spec: AttentionSpec, layer: LayerConstants) -> torch.Tensor:
    """Query i attends exactly to its window and the sinks (explicit masks) and reads the memory of the keys
    S <= j <= i - W (linear_memory.memory_naive over the keys delayed by the window). Returns (B, H, T, d)."""
    q, k, v = streams.q, streams.k, streams.v
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    W = T if spec.window is None else spec.window
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    lin = None
    if spec.memory:
        fk = streams.fk.masked_fill(j.T < spec.sinks, 0.0)  # a zero key leaves the memory unchanged: no sink enters
        lin = capped(linear_part(streams.fq, replace(streams, fk=fk), spec, W, memory_naive)[0],
                     keys_in_memory(i[:, 0], spec), spec)
    num_sm = None
    if W > 0 or spec.sinks > 0:
        G = H // Hkv
        s = (q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)) * spec.scale
        s = group(s.masked_fill(~((j <= i) & ((j > i - W) | (j < spec.sinks))), float("-inf")), Hkv)
        num_sm = exact_num(s, v, s.amax(-1, keepdim=True))
    return combine(num_sm, lin, layer.mix, Hkv, spec.delta, layer.norm_gain)
