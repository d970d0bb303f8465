"""The terms every form of the hybrid attention shares, and how they mix.

For query i, keys in the exact set E_i (window, sinks, and the sparse cache's or heavy hitters' keys) weigh
exp(s_ij - m_i) (s_ij = q_i . k_j * scale, m_i a max score), the others are read from a linear memory:

    sum rule (default):  y_i = [w_h * sum_{j in E_i} exp(s_ij - m_i) [v_j, 1] + (1 - w_h) * phi(q_i) S_i] divided
        by its last column (one shared normaliser), S_i = sum_j decay_ij phi(k_j)^T [v_j, 1] over the memory's keys;
    delta rule: y_i = w_h * softmax output over E_i + (1 - w_h) * phi(q_i) S_i (no normaliser);
    output normalisation (norm_gain): y_i = w_h * softmax output + (1 - w_h) * g_h * RMSNorm(o_i), o_i the memory's
        read-out without its normaliser.

Grouped-query attention: H = G * Hkv, query head h uses key head h // G; the forms work on (B, Hkv, G, T, .).
"""

import torch
import torch.nn.functional as F

from .spec import AttentionSpec
from .state import Streams

EPS = 1e-6


def ones_column(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: the last column of a weighted sum of these is the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, T, X) -> (B, Hkv, G, T, X)"""
    B, H, T, X = x.shape
    return x.view(B, num_kv_heads, H // num_kv_heads, T, X)


def per_group(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, Hkv, G, T, X) @ b (B, Hkv, X, Y) -> (B, Hkv, G, T, Y): the G query heads of a KV head share b, so their
    rows are stacked into one product per KV head (a broadcast b.unsqueeze(2) would copy b G times)."""
    B, Hkv, G, T, X = a.shape
    return (a.reshape(B, Hkv, G * T, X) @ b).view(B, Hkv, G, T, b.shape[-1])


def rms_normalized(lin, norm_gain, delta: bool):
    """The linear part's output without a denominator, RMS-normalised over its d channels and scaled by the gain:
    lin (B, Hkv, G, T, d[+1]: the sum rule's last column, its normaliser, is unused), norm_gain (H, d)."""
    o = lin if delta else lin[..., :-1]
    B, Hkv, G, T, d = o.shape
    return F.rms_norm(o, (d,), eps=EPS) * norm_gain.view(Hkv, G, 1, d).to(o.dtype)


def combine(num_sm, lin, mix, num_kv_heads, delta: bool = False, norm_gain=None):
    """Mix the window numerator num_sm (B, Hkv, G, T, d+1) with the linear part lin (sum rule: a numerator of the
    same shape sharing the normaliser; delta rule: an output (B, Hkv, G, T, d); None: no linear part).
    norm_gain (H, d): output normalisation of the linear part instead of the shared normaliser (None: shared)."""
    if lin is None:
        y = num_sm[..., :-1] / num_sm[..., -1:]  # the window max contributes exp(0) = 1: no epsilon needed
    else:
        w = mix.view(num_kv_heads, -1, 1, 1).to(lin.dtype)  # lerp(lin, sm, w) = w * sm + (1 - w) * lin
        if norm_gain is not None:
            lin = rms_normalized(lin, norm_gain, delta)
        if delta or norm_gain is not None:  # lin is an output: mix it with the window's output
            y = lin if num_sm is None else torch.lerp(lin, num_sm[..., :-1] / num_sm[..., -1:], w)
        else:
            num = lin if num_sm is None else torch.lerp(lin, num_sm, w)
            y = num[..., :-1] / (num[..., -1:] + EPS)
    B, Hkv, G, T, d = y.shape
    return y.reshape(B, Hkv * G, T, d)


def capped(lin, n_keys, spec: AttentionSpec):
    """The memory's terms lin (B, Hkv, G, T, X) scaled by min(1, C / n): n_keys the number of keys in the memory
    each query reads, a tensor broadcastable to (B, Hkv, 1, T) or one int (decoding: no tensor is made); unchanged
    without a cap."""
    if not spec.memory_cap or lin is None:
        return lin
    if isinstance(n_keys, int):
        return lin * (spec.memory_cap / max(n_keys, spec.memory_cap))
    n = n_keys.to(device=lin.device, dtype=torch.promote_types(lin.dtype, torch.float32))  # counts exact in bf16
    return lin * (spec.memory_cap / n.clamp(min=spec.memory_cap)).unsqueeze(-1).to(lin.dtype)


def keys_in_memory(position, spec: AttentionSpec):
    """How many keys the memory holds for a query at this absolute position (an int or a tensor of them):
    the keys S <= j <= p - W."""
    n = position - spec.window - spec.sinks + 1
    return max(n, 0) if isinstance(n, int) else n.clamp(min=0)


def pad_time(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Zero-pad dim -2 (time) of (..., T, X)."""
    return F.pad(x, (0, 0, front, back))


def delay(x, window: int):
    """Shift (B, Hkv, T[, X]) `window` steps later along time (zeros enter): the stream of keys leaving the window.
    A zero key (and zero log gate) leaves the memory unchanged."""
    if x is None:
        return None
    T = x.shape[2]
    pad = (0, 0, window, 0) if x.dim() == 4 else (window, 0)
    return F.pad(x, pad)[:, :, :T]


def linear_part(fq, keys: Streams, spec: AttentionSpec, window: int, memory, **kw):
    """The linear half over the key stream delayed by the window: (lin, memory after the last delayed key)."""
    values = keys.v if spec.delta else ones_column(keys.v)
    return memory(group(fq, keys.k.shape[1]), *(delay(x, window) for x in (keys.fk, values, keys.log_gate,
                                                                           keys.beta)), **kw)


def exact_num(scores, values, m):
    """sum_j exp(scores_ij - m_i) [v_j, 1]: scores (B, Hkv, G, T, N), values (B, Hkv, N, d), m (B, Hkv, G, T, 1)."""
    return per_group(torch.exp(scores - m), ones_column(values))
