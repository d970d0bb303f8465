"""Where the sparse cache scores its keys (and the sinks, once outside the window): cache_distance, cache_packed.

    own positions (cache_distance None): a key keeps its RoPE, scored as far back as it was written.
    cache distance (cache_distance = D): an exact key j outside the window (a cached key or a sink) is scored as if
        it were D tokens before the query: s_ij = rope(q_i, D - i) . rope(k_j, -j) * scale (q, k carry RoPE at their
        own positions i, j). With D = W every such key sits just beyond the window, where the model is used to
        reading, however far back it was written: a 135M teacher finds a pass key 8k tokens back 6 times in 10,
        the student with its cache at D = W 7 in 10 (0 at its own positions). The sinks sit at D too: at their own
        positions they drift beyond any distance trained on as the context grows (with them at D and the memory
        capped at 256 keys: 10 in 10; README).
    packed (cache_packed, with D): those keys keep their order, one position apart, the newest at D: with F_i the
        exact keys outside query i's window, s_ij = rope(q_i, D + n_ij - i) . rope(k_j, -j) * scale, n_ij the number
        of keys of F_i after j. The text between them reads as if cut out (StreamingLLM numbers its cache the same
        way): a needle's tokens stay in a row, and the farthest key sits at most D + |F_i| - 1 back.

A state holds such keys with their RoPE undone (rotated to position 0) and their positions (to_cache), so a step
rotates its query alone.
"""

import torch

from ..hybrid.spec import AttentionSpec
from ..hybrid.state import Streams
from ..hybrid.terms import per_group
from ..rotary import rotate


def to_cache(keys: Streams, first: int, spec: AttentionSpec, inv_freq) -> Streams:
    """Keys (B, Hkv, n, .) at positions first, first + 1, ... as the sparse cache holds them: k, v; where the cache
    scores them at a distance, k rotated back to position 0 (its RoPE undone, so a step rotates its query alone)
    and their positions (to redo it: rope_keys)."""
    if spec.cache_distance is None:
        return Streams(keys.k, keys.v)
    B, Hkv, n, _ = keys.k.shape
    position = torch.arange(first, first + n, device=keys.k.device, dtype=torch.int32).expand(B, Hkv, n)
    return Streams(rotate(keys.k, -position, inv_freq), keys.v, position=position)


def rope_keys(cache: Streams, inv_freq) -> torch.Tensor:
    """The cache's keys (B, Hkv, m, d) with RoPE at their own positions, as they left the window."""
    return cache.k if cache.position is None else rotate(cache.k, cache.position, inv_freq)


def cache_queries(qg, pos_q, spec: AttentionSpec, inv_freq, n_far=0) -> torch.Tensor:
    """Queries qg (B, Hkv, G, n, d) at positions pos_q (n,) as they score the exact keys outside the window (sinks,
    cache): as they are, or, where those are scored at a distance, rotated to it (their keys at position 0; packed:
    the r-th of a query's n_far (int or (n,)) such keys at r, the query at distance + n_far - 1: in_row)."""
    if spec.cache_distance is None:
        return qg
    return rotate(qg, spec.cache_distance + (n_far - 1 if spec.cache_packed else 0) - pos_q, inv_freq)


def in_row(k: torch.Tensor, first: int, spec: AttentionSpec, inv_freq) -> torch.Tensor:
    """Keys (B, Hkv, m, d) outside the window, the first..first+m-1-th of their row, as cache_queries scores them:
    packed, RoPE'd to positions first, first + 1, ... (their RoPE was undone: to_cache); else as they are."""
    if not spec.cache_packed:
        return k
    return rotate(k, torch.arange(first, first + k.shape[2], device=k.device), inv_freq)


def cache_scores(qg_cache, cache: Streams, spec: AttentionSpec, inv_freq=None, first: int = 0) -> torch.Tensor:
    """Queries (B, Hkv, G, n, d) from cache_queries against m keys outside the window, from the first-th of their
    row on -> scores (B, Hkv, G, n, m)."""
    return per_group(qg_cache, in_row(cache.k, first, spec, inv_freq).transpose(-1, -2)) * spec.scale
