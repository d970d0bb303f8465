"""Ranking the sparse cache's keys: how badly the memory recalls each value from its key (or a score fitted to
the model's attention: learned_score), pooled over neighbours, and the keys each head keeps.

Shapes: cached keys k, v (B, Hkv, n, d); their features fk (B, Hkv, n, F); memory S (B, Hkv, F, d + 1) or None;
a fitted scorer w (Hkv, 2d + 1).
"""

import torch
import torch.nn.functional as F

from ..heavy_hitters.selection import split

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


def score_features(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, n, 2d + 1) float32 at least: [k, v, 1] of each key, k with its RoPE undone (at position 0), what a
    learned score reads (transfer/cache_score.py fits it)."""
    wide = torch.promote_types(v.dtype, torch.float32)
    return torch.cat([k.to(wide), v.to(wide), torch.ones_like(v[..., :1], dtype=wide)], dim=-1)


def learned_score(k: torch.Tensor, v: torch.Tensor, scorer: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, n): a linear score per KV head, [k, v, 1] . w_h, fitted to predict how strongly a question asked
    far beyond the window reads each key (transfer/cache_score.py); k with its RoPE undone, scorer (Hkv, 2d + 1)."""
    return (score_features(k, v) @ scorer.to(torch.promote_types(scorer.dtype, torch.float32))[..., None]).squeeze(-1)


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
