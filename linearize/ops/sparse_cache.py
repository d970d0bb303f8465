"""Sparse cache (the idea of LoLA, McDermott et al. 2025): the keys a linear memory recalls worst stay exact.

With a cache of M keys per KV head, a key that leaves the softmax window (and is not a sink) does not enter the
linear memory at once: it joins the cached keys and stays exact. Every `every` tokens (after the tokens at absolute
positions p with (p + 1) % every == 0) the cached keys are ranked by how badly the memory S recalls the direction of
their values (sum rule, S = [S_v | s] of shape (F, d + 1), the last column the normaliser):

    e_j = 1 - cos(v_j, phi(k_j) S_v / (phi(k_j) . s))      (0 <= e_j <= 2; 1 while the memory is empty;
                                                              || v_j ||^2 with no linear part at all)

Each key then takes the largest error within `pool` keys on either side of it in the cache (which holds its keys in
position order), so a kept key keeps its neighbours: a number written as several digit tokens stays whole, as SnapKV
pools its scores. The M keys with the largest pooled error stay, the others are written into the memory
(S += phi(k_j)^T [v_j, 1]) or, with no linear part, dropped. So query i attends exactly to every token up to i that
is not in the memory (window, sinks, cache, and the keys that left the window since the last selection) and reads
the others from the memory, which changes only at selections. The state holds at most M + every - 1 cached keys per
head: constant in context length.

The direction, not the squared error of LoLA's self-recall: a linear read-out is an average of many values, short
next to any one of them, so || v_j - read ||^2 mostly ranks keys by the norm of their values (on passkey prompts the
cache fills with filler words such as " There" and "."), while the cosine ranks them by what the memory has not
seen. On the default run with a cache of 64 (10 trials) passkey at 1k was 70 % with the squared error
(docs/results/cache_squared_1k.json), with the cosine 90 / 100 / 80 % at 1k / 2k / 4k (docs/results/recall.json,
the memory capped at 32 keys). Ties (an empty memory) keep the older keys.

One normaliser, as in hybrid_attention.py, with one change of units: the memory was trained beside the window and
sinks, as a stand-in for exp(s_ij - m_i) with m_i the largest window/sink score, so it keeps those units. A cached
key weighs w_h exp(s_ij - m_i) too, which exceeds 1 when it outscores the window (the key the query looks for): it
then outweighs the memory as in the teacher's softmax, however many tokens the memory holds. (With m_i the largest
score of the whole exact set instead, the memory's mass, which grows with the context, drowns such a key.)

Shapes: cached keys k, v (B, Hkv, n, d); their features fk (B, Hkv, n, F); memory S (B, Hkv, F, d + 1) or None.
"""

import torch
import torch.nn.functional as F

from .heavy_hitters import split

EPS = 1e-6


def read_out(fk: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, n, d): the memory's read-out of each key, phi(k) S_v / (phi(k) . s), in float32 at least (bf16 ties)."""
    read = (fk @ memory).to(torch.promote_types(memory.dtype, torch.float32))  # (B, Hkv, n, d + 1)
    return read[..., :-1] / (read[..., -1:] + EPS)


def self_recall_error(fk: torch.Tensor | None, v: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
    """(B, Hkv, n): how badly the memory recalls each value from its key: 1 - the cosine between the value and its
    read-out (1 while the memory is empty); with no memory at all (no linear part) || v ||^2."""
    wide = torch.promote_types(v.dtype, torch.float32)  # rank in float32 at least (bf16 ties)
    if memory is None:
        return v.to(wide).pow(2).sum(-1)
    return 1 - F.cosine_similarity(v.to(wide), read_out(fk, memory).to(wide), dim=-1)


def pooled(errors: torch.Tensor, radius: int) -> torch.Tensor:
    """errors (B, Hkv, n) of keys in position order -> each the largest within `radius` keys on either side (-inf,
    a key that is not a candidate, stays -inf); radius 0 returns errors."""
    if not radius:
        return errors
    B, Hkv, n = errors.shape
    wide = F.max_pool1d(errors.reshape(B * Hkv, 1, n), 2 * radius + 1, stride=1, padding=radius).view(B, Hkv, n)
    return wide.masked_fill(errors == float("-inf"), float("-inf"))


def worst_recalled(errors: torch.Tensor, size: int) -> torch.Tensor:
    """errors (B, Hkv, n) -> (B, Hkv, n) bool: the `size` largest errors of each head (-inf never, while others
    remain); of equal errors the earlier positions win."""
    top = torch.sort(errors, dim=-1, descending=True, stable=True).indices[..., :size]
    return torch.zeros(errors.shape, dtype=torch.bool, device=errors.device).scatter_(-1, top, True)


def keep_worst_recalled(errors: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """errors (B, Hkv, n) with n > size -> (kept (B, Hkv, size), evicted (B, Hkv, n - size)): indices in position
    order, the kept ones the `size` largest errors of each head."""
    return split(worst_recalled(errors, size), size)


def gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, n, X), index (B, Hkv, m) -> (B, Hkv, m, X)"""
    return torch.take_along_dim(x, index[..., None], dim=2)
