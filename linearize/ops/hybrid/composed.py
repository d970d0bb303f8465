"""The exact part of the hybrid as one fused masked attention (issue 37): PyTorch's flex_attention.

For a fresh call (no state: training, or the first block of a prefill) every query i reads exactly the keys
E_i = {j <= i : j > i - W or j < S} (its window and the sinks). flex_attention runs that as one kernel over the
block mask `causal & (window | sink)` and returns, besides its output o_i, the log-sum-exp lse_i and the max score
m_i of the scaled scores s_ij = q_i . k_j * scale. The other forms (chunked.sliding_window_chunked) work with the
numerator in units of exp(-m_i); it follows from the kernel's outputs as

    sum_{j in E_i} exp(s_ij - m_i) [v_j, 1] = exp(lse_i - m_i) [o_i, 1]

so terms.combine mixes it with the linear memory (flash-linear-attention's chunk kernel where fla_kernels says so)
under the shared normaliser exactly as before. exp(lse_i - m_i) is computed in float32 (float64 inputs: float64).

On CUDA the kernel is torch.compile'd flex_attention and returns m_i itself. On the CPU (tests) flex_attention runs
eagerly and cannot return m_i, so window_max computes it in PyTorch (a stand-in, as the fla tests use stand-ins).
Gradients: flex_attention differentiates o and lse, not m (no kernel does), so here m_i is a constant in the
backward pass where the PyTorch forms also differentiate the max; the forward results are the same.

Opt-in until measured on a GPU: LINEARIZE_FLEX_ATTENTION=1 on a CUDA device (usable()).
"""

import functools
import os
import warnings

import torch

FLEX_ENV = "LINEARIZE_FLEX_ATTENTION"
DEVICES = ("cuda",)  # where usable() allows the kernel (the CPU tests add "cpu": eager flex_attention + window_max)


def usable(x: torch.Tensor, *, state=None, window: int | None = None, heavy: int = 0) -> bool:
    """True when the exact part of this call can be the fused kernel: a tensor on a device of DEVICES (CUDA),
    LINEARIZE_FLEX_ATTENTION=1, a fresh call (no state to continue), a bounded window W > 0, no heavy hitters."""
    return (x.device.type in DEVICES and os.environ.get(FLEX_ENV) == "1" and state is None and bool(window)
            and not heavy)


def in_exact_set(i, j, window: int, sinks: int):
    """Whether key j is in query i's exact set E_i (tensors of positions, broadcast)."""
    return (j <= i) & ((j > i - window) | (j < sinks))


@functools.lru_cache(maxsize=32)
def window_block_mask(T: int, window: int, sinks: int, device: str):
    """flex_attention's block mask of E_i over T queries and T keys (the same for every batch row and head)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, i, j: in_exact_set(i, j, window, sinks), None, None, T, T, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def window_max(q, k, window: int, sinks: int, scale: float, rows: int = 256) -> torch.Tensor:
    """m_i = max_{j in E_i} s_ij for q (B, H, T, d), k (B, Hkv, T, d), `rows` queries at a time: (B, H, T).
    The CPU stand-in for the max score the CUDA kernel returns."""
    B, H, T, d = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    j = torch.arange(T, device=q.device)[None, :]
    out = []
    for a in range(0, T, rows):
        i = torch.arange(a, min(a + rows, T), device=q.device)[:, None]
        s = (q[:, :, a : a + rows] @ k.transpose(-1, -2)) * scale
        out.append(s.masked_fill(~in_exact_set(i, j, window, sinks), float("-inf")).amax(-1))
    return torch.cat(out, dim=-1)


def exact_part(q, k, v, window: int, sinks: int, scale: float):
    """The window + sinks numerator of a fresh call from one flex_attention: q (B, H, T, d), k, v (B, Hkv, T, d) ->
    numerator (B, Hkv, G, T, d + 1) in units of exp(-m_i), as chunked._window_and_sinks returns it (in q's dtype)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    B, H, T, d = q.shape
    Hkv = k.shape[1]
    mask = window_block_mask(T, window, sinks, str(q.device))
    if q.is_cuda:
        o, aux = _compiled_flex()(q, k, v, block_mask=mask, scale=scale, enable_gqa=Hkv != H,
                                  return_aux=AuxRequest(lse=True, max_scores=True))
        m = aux.max_scores.float()
    else:
        with warnings.catch_warnings():  # "use torch.compile": eager is the reference here, not the fast path
            warnings.simplefilter("ignore")
            o, aux = flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=Hkv != H,
                                    return_aux=AuxRequest(lse=True))
        m = window_max(q, k, window, sinks, scale)
    wide = torch.promote_types(q.dtype, torch.float32)
    units = torch.exp(aux.lse.to(wide) - m.to(wide))  # sum_j exp(s_ij - m_i) >= 1: the max's own term
    num = torch.cat([o.to(wide), torch.ones_like(o[..., :1], dtype=wide)], dim=-1) * units[..., None]
    G = H // Hkv
    return num.to(q.dtype).view(B, Hkv, G, T, d + 1)
