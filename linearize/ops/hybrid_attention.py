"""Hybrid sliding-window + linear attention (LoLCATs eq. 7) in three forms of the same math.

For query i, keys j with i - W < j <= i (the W most recent) get exact softmax weights, older keys
(j <= i - W) get linear weights phi(q_i) . phi(k_j); both share one normaliser:

    y_i = sum_j a_ij v_j / sum_j a_ij,
    a_ij = w_h * exp(s_ij - m_i)           if i - W < j <= i   (s_ij = q_i . k_j * scale, m_i = max over the window)
    a_ij = (1 - w_h) * phi(q_i) . phi(k_j) if j <= i - W

with w_h in (0, 1) a learned per-head mixing factor. W = 0 is pure linear attention (w unused).

Shapes: q (B, H, T, d) and k, v (B, Hkv, T, d) after RoPE; fq = phi(q) (B, H, T, F), fk = phi(k) (B, Hkv, T, F);
mix (H,). Grouped-query attention: H = G * Hkv, query head h uses key head h // G (as in transformers).

- attention_quadratic: the T x T reference (tests only).
- attention_chunked: O(T) memory, for training and prefill; can return the decoding state.
- attention_recurrent: one token at a time from a LinearAttentionState, for decoding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6


@dataclass
class LinearAttentionState:
    """Everything decoding needs, constant in context length.
    kv: (B, Hkv, F, d+1) sum of phi(k_j) [v_j, 1] over keys that left the window;
    win_k, win_v: (B, Hkv, <=W, d) and win_fk: (B, Hkv, <=W, F) the most recent keys."""

    kv: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_fk: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.win_k, self.win_v, self.win_fk))


def _ones_column(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: the last column of a weighted sum of these is the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, T, X) -> (B, Hkv, G, T, X)"""
    B, H, T, X = x.shape
    return x.view(B, num_kv_heads, H // num_kv_heads, T, X)


def _combine(num_sm, num_lin, mix, num_kv_heads):
    """Weighted sum of the two numerators (B, Hkv, G, T, d+1), then divide by the shared normaliser."""
    if num_sm is None:
        num = num_lin
    else:
        w = mix.view(num_kv_heads, -1, 1, 1).to(num_lin.dtype)
        num = w * num_sm + (1 - w) * num_lin
    y = num[..., :-1] / (num[..., -1:] + EPS)
    B, Hkv, G, T, d = y.shape
    return y.reshape(B, Hkv * G, T, d)


def attention_quadratic(q, k, v, fq, fk, mix, window: int, scale: float) -> torch.Tensor:
    """Reference form with explicit T x T weights. Returns (B, H, T, d)."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    k, v, fk = (x.repeat_interleave(G, dim=1) for x in (k, v, fk))
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    a = (fq @ fk.transpose(-1, -2)) * (j <= i - window)
    if window > 0:
        s = (q @ k.transpose(-1, -2)) * scale
        in_window = (j <= i) & (j > i - window)
        s = s.masked_fill(~in_window, float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        w = mix.view(1, H, 1, 1).to(q.dtype)
        a = w * e + (1 - w) * a
    return (a @ v) / (a.sum(-1, keepdim=True) + EPS)


def _pad_time(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Zero-pad dim -2 (time) of (..., T, X)."""
    return F.pad(x, (0, 0, front, back))


def _causal_linear_chunked(fq, fk, v1, chunk: int) -> torch.Tensor:
    """sum_{j <= i} (fq_i . fk_j) v1_j, chunk by chunk.
    fq (B, Hkv, G, T, F), fk (B, Hkv, 1, T, F), v1 (B, Hkv, 1, T, D) -> (B, Hkv, G, T, D)."""
    B, Hkv, G, T, Fd = fq.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    fq, fk, v1 = (_pad_time(x, 0, pad) for x in (fq, fk, v1))
    fq = fq.view(B, Hkv, G, n, chunk, Fd)
    fk = fk.view(B, Hkv, 1, n, chunk, Fd)
    v1 = v1.view(B, Hkv, 1, n, chunk, -1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    intra = ((fq @ fk.transpose(-1, -2)) * causal) @ v1
    kv = fk.transpose(-1, -2) @ v1  # (B, Hkv, 1, n, F, D): each chunk's contribution
    prefix = torch.cat([torch.zeros_like(kv[:, :, :, :1]), kv[:, :, :, :-1].cumsum(dim=3)], dim=3)
    out = intra + fq @ prefix
    return out.reshape(B, Hkv, G, n * chunk, -1)[:, :, :, :T]


def _sliding_window_chunked(q, k, v1, window: int, scale: float, chunk: int) -> torch.Tensor:
    """sum over the W most recent keys of exp(s_ij - m_i) v1_j, with m_i the max score in the window.
    q (B, Hkv, G, T, d), k (B, Hkv, 1, T, d), v1 (B, Hkv, 1, T, D) -> (B, Hkv, G, T, D).
    Each block of `chunk` queries sees a span of chunk + W - 1 keys."""
    B, Hkv, G, T, d = q.shape
    n = -(-T // chunk)
    span = chunk + window - 1
    q = _pad_time(q, 0, n * chunk - T).view(B, Hkv, G, n, chunk, d)
    # key position p sits at padded index p + W - 1; block b covers padded indices [b*chunk, b*chunk + span)
    k = _pad_time(k, window - 1, n * chunk - T).unfold(-2, span, chunk).transpose(-1, -2)  # (B,Hkv,1,n,span,d)
    v1 = _pad_time(v1, window - 1, n * chunk - T).unfold(-2, span, chunk).transpose(-1, -2)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, n, chunk, span)
    a = torch.arange(chunk, device=q.device)[:, None]
    b = torch.arange(span, device=q.device)[None, :]
    key_pos = torch.arange(n, device=q.device)[:, None, None] * chunk + b - (window - 1)  # (n, 1, span)
    valid = (b >= a) & (b <= a + window - 1) & (key_pos >= 0)  # (n, chunk, span)
    s = s.masked_fill(~valid, float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v1).reshape(B, Hkv, G, n * chunk, -1)[:, :, :, :T]


def attention_chunked(q, k, v, fq, fk, mix, window: int, scale: float, chunk: int = 64, return_state: bool = False):
    """Same result as attention_quadratic in O(T * (chunk + W)) memory. Returns y (B, H, T, d), and with
    return_state the LinearAttentionState after the last token (for decoding)."""
    Hkv, T = k.shape[1], k.shape[2]
    v1 = _ones_column(v).unsqueeze(2)
    # linear part: key j serves query i once j <= i - W, i.e. shift the keys W steps later
    fk_shift = _pad_time(fk, window, 0)[:, :, :T].unsqueeze(2)
    v1_shift = _pad_time(v1.squeeze(2), window, 0)[:, :, :T].unsqueeze(2)
    num_lin = _causal_linear_chunked(_group(fq, Hkv), fk_shift, v1_shift, chunk)
    num_sm = None
    if window > 0:
        num_sm = _sliding_window_chunked(_group(q, Hkv), k.unsqueeze(2), v1, window, scale, chunk)
    y = _combine(num_sm, num_lin, mix, Hkv)
    if not return_state:
        return y
    old = max(T - window, 0)  # keys 0 .. old-1 have left the window
    state = LinearAttentionState(
        kv=fk[:, :, :old].transpose(-1, -2) @ v1.squeeze(2)[:, :, :old],
        win_k=k[:, :, old:], win_v=v[:, :, old:], win_fk=fk[:, :, old:],
    )
    return y, state


def empty_state(batch: int, num_kv_heads: int, head_dim: int, feature_dim: int, dtype, device) -> LinearAttentionState:
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    return LinearAttentionState(
        kv=z(batch, num_kv_heads, feature_dim, head_dim + 1),
        win_k=z(batch, num_kv_heads, 0, head_dim), win_v=z(batch, num_kv_heads, 0, head_dim),
        win_fk=z(batch, num_kv_heads, 0, feature_dim),
    )


def attention_recurrent(q, k, v, fq, fk, mix, window: int, scale: float, state: LinearAttentionState):
    """Decode T >= 1 new tokens one at a time, updating `state` in place. Same shapes as attention_chunked
    (T = new tokens); returns y (B, H, T, d)."""
    Hkv = k.shape[1]
    out = []
    for t in range(q.shape[2]):
        k_t, v_t, fk_t = k[:, :, t : t + 1], v[:, :, t : t + 1], fk[:, :, t : t + 1]
        if window == 0:
            state.kv = state.kv + fk_t.transpose(-1, -2) @ _ones_column(v_t)
            num_sm = None
        else:
            state.win_k = torch.cat([state.win_k, k_t], dim=2)
            state.win_v = torch.cat([state.win_v, v_t], dim=2)
            state.win_fk = torch.cat([state.win_fk, fk_t], dim=2)
            if state.win_k.shape[2] > window:  # the oldest key leaves the window for the linear state
                state.kv = state.kv + state.win_fk[:, :, :1].transpose(-1, -2) @ _ones_column(state.win_v[:, :, :1])
                state.win_k, state.win_v, state.win_fk = (x[:, :, 1:] for x in (state.win_k, state.win_v, state.win_fk))
            s = (_group(q[:, :, t : t + 1], Hkv) @ state.win_k.unsqueeze(2).transpose(-1, -2)) * scale
            e = torch.exp(s - s.amax(-1, keepdim=True))
            num_sm = e @ _ones_column(state.win_v).unsqueeze(2)
        num_lin = _group(fq[:, :, t : t + 1], Hkv) @ state.kv.unsqueeze(2)
        out.append(_combine(num_sm, num_lin, mix, Hkv))
    return torch.cat(out, dim=2)
