"""The sparse cache's quadratic reference: replay the cache's selections on explicit per-head sets of memory keys,
then explicit T x T weights: query i attends exactly to every key j <= i outside the memory it reads (window,
sinks, cache, and the keys that left the window since the last selection) and reads the memory linearly, in the
units of the window and sinks."""

import torch

from ..hybrid.spec import AttentionSpec, LayerConstants
from ..hybrid.state import Streams
from ..hybrid.terms import capped, combine, exact_num, group, ones_column
from ..rotary import rotate
from .selection import learned_score, pooled, self_recall_error, worst_recalled


def cached_quadratic(streams: Streams, spec: AttentionSpec, layer: LayerConstants) -> torch.Tensor:
    """q (B, H, T, d), k, v (B, Hkv, T, d)[, fq, fk] -> y (B, H, T, d)."""
    inv_freq = layer.inv_freq
    q, k, v = streams.q, streams.k, streams.v
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    pos = torch.arange(T, device=q.device)
    if spec.cache_score == "learned":  # of each key with its RoPE undone, as the cache holds it
        fitted = learned_score(rotate(k, -pos, inv_freq), v, layer.cache_scorer)
    in_memory = torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)  # after the latest selection
    memory_of = torch.zeros(B, Hkv, T, T, dtype=torch.bool, device=q.device)  # [.., query i, key j]
    for p in range(T):
        memory_of[:, :, p] = in_memory
        cached = (pos <= p - spec.window) & (pos >= spec.sinks) & ~in_memory  # (B, Hkv, T)
        if (p + 1) % spec.cache_every or cached.sum(-1).max() <= spec.cache:
            continue
        memory = None
        if spec.memory:
            memory = (streams.fk * in_memory[..., None]).transpose(-1, -2) @ ones_column(v)
        score = fitted if spec.cache_score == "learned" else self_recall_error(streams.fk, v, memory)
        errors = score.masked_fill(~cached, float("-inf"))
        if spec.cache_pool:  # over each head's cached keys alone, in position order, as the cache holds them
            for b, h in [(b, h) for b in range(B) for h in range(Hkv)]:
                at = cached[b, h].nonzero()[:, 0]
                errors[b, h, at] = pooled(errors[b, h, at][None, None], spec.cache_pool)[0, 0]
        kept = worst_recalled(errors, spec.cache)
        in_memory |= cached & ~kept  # written into the memory (dropped without a linear part)
    causal = pos[None, :] <= pos[:, None]
    exact = causal & ~memory_of  # (B, Hkv, T, T)
    window = causal & (pos[None, :] > pos[:, None] - spec.window)
    s = (group(q, Hkv) @ k.unsqueeze(2).transpose(-1, -2)) * spec.scale
    if spec.cache_distance is not None:  # exact keys outside the window (cache, sinks) at cache_distance (+ packed)
        far = (exact & ~window).int()  # (B, Hkv, T, T)
        after = far.flip(-1).cumsum(-1).flip(-1) - far  # [.., i, j]: far keys of query i after key j
        distance = spec.cache_distance + after * spec.cache_packed  # (B, Hkv, T, T)
        k_at = rotate(rotate(k, -pos, inv_freq).unsqueeze(2).expand(-1, -1, T, -1, -1), -distance, inv_freq)
        s_far = torch.einsum("bhgid,bhijd->bhgij", group(rotate(q, -pos, inv_freq), Hkv), k_at) * spec.scale
        s = torch.where(window, s, s_far)
    s_exact = s.masked_fill(~exact.unsqueeze(2), float("-inf"))
    m = s_exact.amax(-1, keepdim=True)
    num_sm = exact_num(s_exact, v, m)
    lin = None
    if spec.memory:  # in the units of the window and sinks: exp(s - m_ref)
        reference = window | (causal & (pos[None, :] < spec.sinks))
        m_ref = s.masked_fill(~reference, float("-inf")).amax(-1, keepdim=True)
        a = (group(streams.fq, Hkv) @ streams.fk.unsqueeze(2).transpose(-1, -2)) * memory_of.unsqueeze(2)
        lin = capped((a @ ones_column(v).unsqueeze(2)) * torch.exp(m_ref - m), memory_of.sum(-1).unsqueeze(2),
                     spec)
    return combine(num_sm, lin, layer.mix, Hkv)
