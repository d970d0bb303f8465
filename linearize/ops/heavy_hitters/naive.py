"""The heavy hitters' quadratic reference: explicit per-query sets of heavy keys, explicit T x T weights.

Query i attends exactly to its window, the sinks and the `heavy` best of the keys S <= j <= i - W (in the units
exp(s_ij - m_i), m_i still the window/sink max), and reads the others from the linear memory."""

import torch

from ..hybrid.spec import AttentionSpec, LayerConstants
from ..hybrid.state import Streams
from ..hybrid.terms import capped, combine, exact_num, group, keys_in_memory, ones_column
from .selection import best_of_prefixes


def heavy_quadratic(streams: Streams, spec: AttentionSpec, layer: LayerConstants) -> torch.Tensor:
    """q (B, H, T, d), k, v (B, Hkv, T, d)[, fq, fk] -> y (B, H, T, d)."""
    q, k, v = streams.q, streams.k, streams.v
    B, H, T, d = q.shape
    Hkv, W, S = k.shape[1], spec.window, spec.sinks
    pos = torch.arange(T, device=q.device)
    i, j = pos[:, None], pos[None, :]
    causal = j <= i
    window = causal & (j > i - W)
    reference = window | (causal & (j < S))  # the window and the sinks: the units of the memory
    s = (group(q, Hkv) @ k.unsqueeze(2).transpose(-1, -2)) * spec.scale  # (B, Hkv, G, T, T)
    received = torch.softmax(s.masked_fill(~window, float("-inf")), -1).sum((2, 3))  # (B, Hkv, T)
    heavy = torch.zeros(B, Hkv, T, T, dtype=torch.bool, device=q.device)  # [.., query i, key j]
    n = max(T - W - S, 0)  # the keys that ever leave the window, not sinks: S .. T - W - 1
    if n:
        available = (pos - W - S + 1).clamp(0, n)  # how many of them query i may choose from
        heavy[..., S : S + n] = best_of_prefixes(received[..., S : S + n], available, spec.heavy)
    m = s.masked_fill(~reference, float("-inf")).amax(-1, keepdim=True)
    s_exact = s.masked_fill(~(reference | heavy).unsqueeze(2), float("-inf"))
    m_all = torch.maximum(m, s_exact.amax(-1, keepdim=True))
    num_sm = exact_num(s_exact, v, m_all)
    lin = None
    if spec.memory:  # every key that left the window, not a sink and not heavy; in units of exp(s - m)
        in_memory = causal & ~reference & ~heavy
        a = (group(streams.fq, Hkv) @ streams.fk.unsqueeze(2).transpose(-1, -2)) * in_memory.unsqueeze(2)
        lin = capped(a @ ones_column(v).unsqueeze(2), keys_in_memory(pos, spec), spec) * torch.exp(m - m_all)
    return combine(num_sm, lin, layer.mix, Hkv)
