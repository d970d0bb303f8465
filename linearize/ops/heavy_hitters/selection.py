"""Choosing the heavy hitters: of candidate keys in position order, the `size` that received the most window
attention (key a beats key b when r_a > r_b, or r_a == r_b and a is older).

Shapes: r (B, Hkv, N) the received attention of N candidate keys in position order.
"""

import torch
import torch.nn.functional as F


def heavy_sets(r: torch.Tensor, available: torch.Tensor, size: int, chunk: int = 64):
    """r (B, Hkv, N), available (Tq,) ints: how many of the first candidates query u may choose from ->
    (columns (n,), kept (B, Hkv, Tq, n) bool): kept[.., u, i] says candidate columns[i] is one of the `size` best of
    the first available[u]; candidates outside `columns` are never among them for any query.

    Without an N x N table: a candidate is ever among the best only if fewer than `size` older ones beat it (found
    in chunks against the running best `size`), and it stays until the arrival of its size-th beater, which is
    itself one of those (a beater that arrives while it is among the best enters them too)."""
    B, Hkv, N = r.shape
    index = torch.arange(N, device=r.device)
    ever = torch.zeros(B, Hkv, N, dtype=torch.bool, device=r.device)
    top = r.new_empty(B, Hkv, 0)  # the scores of the best `size` so far (all older than the chunk)
    step = torch.arange(chunk, device=r.device)
    older_in_chunk = step[:, None] < step[None, :]  # [a, b]: a is older than b
    for start in range(0, N, chunk):
        part = r[..., start : start + chunk]
        n = part.shape[-1]
        older = older_in_chunk[:n, :n]
        beaten = ((top[..., :, None] >= part[..., None, :]).sum(-2)
                  + (older & (part[..., :, None] >= part[..., None, :])).sum(-2))
        ever[..., start : start + n] = beaten < size
        both = torch.cat([top, part], dim=-1)  # older first: a stable sort keeps the older of equal scores first
        top = both.gather(-1, torch.sort(both, dim=-1, descending=True, stable=True).indices[..., :size])
    columns = ever.any(1).any(0).nonzero()[:, 0]
    rc = r[..., columns]
    # beaten[.., i, a]: column a beats column i; counted along a (the last, contiguous dim)
    beaten = ((rc[..., None, :] > rc[..., :, None])
              | ((rc[..., None, :] == rc[..., :, None]) & (columns[None, :] < columns[:, None])))
    k = (beaten.to(torch.int32).cumsum(-1) < size).sum(-1) + 1  # the first k columns hold fewer than `size` beaters
    n = len(columns)
    stays = torch.where(k <= n, F.pad(columns + 1, (1, 0))[k.clamp(max=n)], N + 1)  # the size-th beater's index + 1
    stays = stays.masked_fill(~ever[..., columns], 0)
    kept = (columns < available[:, None]) & (available[:, None] < stays[..., None, :])
    return columns, kept


def best_of_prefixes(r: torch.Tensor, available: torch.Tensor, size: int) -> torch.Tensor:
    """r (B, Hkv, N), available (Tq,) -> (B, Hkv, Tq, N) bool: candidate c is one of the `size` best of the first
    available[u] (heavy_sets over every column)."""
    columns, kept = heavy_sets(r, available, size)
    out = kept.new_zeros(*r.shape[:2], len(available), r.shape[-1])
    out[..., columns] = kept
    return out


def best(r: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r (B, Hkv, N) -> (kept (B, Hkv, min(size, N)), dropped (B, Hkv, N - kept)): indices in position order, the
    kept ones the `size` best of each head."""
    N = r.shape[-1]
    return split(best_of_prefixes(r, torch.tensor([N], device=r.device), size)[..., 0, :], min(size, N))


def split(keep: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keep (B, Hkv, N) bool with k True per head -> (kept (B, Hkv, k), dropped (B, Hkv, N - k)): indices in
    position order."""
    N = keep.shape[-1]
    order = torch.argsort(keep.to(torch.uint8), dim=-1, stable=True)  # dropped first, then kept, each in order
    return order[..., N - k:], order[..., : N - k]


def drop_worst(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r (B, Hkv, n) -> (kept (B, Hkv, n - 1), dropped (B, Hkv, 1)): the same as best(r, n - 1) in a few ops, for
    decoding: each head drops its least received key, the newest of them on a tie."""
    n = r.shape[-1]
    worst = (n - 1 - r.flip(-1).argmin(-1, keepdim=True))  # the last position holding the minimum
    index = torch.arange(n - 1, device=r.device)
    return index + (index >= worst).to(index.dtype), worst
