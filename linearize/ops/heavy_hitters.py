"""Heavy hitters: the keys that drew the most softmax-window attention stay exact after they leave the window.

Attention sinks are not only the first tokens. In SmolLM2-135M's layers 3-10 about 40 % of every query's attention
falls on keys older than a 256-token window, and about 90 % of that on a handful of keys (a space, a " the"):
sinks that appear mid-text (scripts/far_attention.py, docs/results/far_attention.md). A linear memory blurs them
into an average; StreamingLLM's window loses them. With `heavy = M`, the M such keys per KV head stay in exact
softmax beside the window and the sinks, chosen by the score of H2O (Zhang et al. 2023), the attention a key
received while it was in the window:

    r_j = sum over the group's query heads h and the W queries i = j .. j+W-1 of
          p_hij = exp(s_hij) / sum_{j' in window(i)} exp(s_hij')         (the window alone, no sinks, no memory)

Once key j leaves the window (and is not a sink) it competes with the far keys before it: key a beats key b when
r_a > r_b, or r_a == r_b and a is older. Query i attends exactly to the M best of the far keys S <= j <= i - W;
the others are in the linear memory (dropped without one). A key that drops out of the best M never returns (the
set it competes in only grows), so decoding keeps M keys and writes the one it drops into the memory: the state
grows by M keys and a score per window key, constant in context length.

Shapes: r (B, Hkv, N) the received attention of N candidate keys in position order.
"""

import torch
import torch.nn.functional as F


def best_of_prefixes(r: torch.Tensor, available: torch.Tensor, size: int) -> torch.Tensor:
    """r (B, Hkv, N), available (Tq,) ints: how many of the first candidates query u may choose from ->
    (B, Hkv, Tq, N) bool: candidate c is one of the `size` best of the first available[u]."""
    N = r.shape[-1]
    index = torch.arange(N, device=r.device)
    older = index[:, None] < index[None, :]
    beats = (r[..., :, None] > r[..., None, :]) | ((r[..., :, None] == r[..., None, :]) & older)  # [.., a, b]
    beaten_by_first = F.pad(beats.to(torch.int32).cumsum(-2), (0, 0, 1, 0))  # (B, Hkv, N + 1, N)
    rank = beaten_by_first[..., available, :]  # (B, Hkv, Tq, N): how many of the first available[u] beat c
    return (index[None, :] < available[:, None]) & (rank < size)


def best(r: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r (B, Hkv, N) -> (kept (B, Hkv, min(size, N)), dropped (B, Hkv, N - kept)): indices in position order, the
    kept ones the `size` best of each head."""
    N = r.shape[-1]
    keep = best_of_prefixes(r, torch.tensor([N], device=r.device), size)[..., 0, :]
    order = torch.argsort(keep.to(torch.uint8), dim=-1, stable=True)  # dropped first, then kept, each in order
    k = min(size, N)
    return order[..., N - k:], order[..., : N - k]
