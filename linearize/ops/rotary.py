"""Rotary position embedding (RoPE) by arbitrary angles, in the rotate-half layout of transformers' Llama-style
models: x at position p becomes x * cos(p w) + rotate_half(x) * sin(p w), w = inv_freq (d/2,) repeated twice.
Rotations compose (rotate(rotate(x, a), b) = rotate(x, a + b)) and a score q . k after RoPE depends on the
positions only through their difference, so a key already rotated to its own position p can be scored as if it sat
at another one by rotating it back by p and the query by (its position - the wanted distance).

- rotate(x, positions, inv_freq): x (..., T, d), positions (..., T) broadcastable to x's leading dims -> (..., T, d).
"""

import torch


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x (..., T, d) rotated by `positions` (..., T) (any integer or float, negative undoes a rotation)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # bfloat16 / float16 rotate in float32
    angles = positions.to(dtype)[..., None] * inv_freq.to(device=x.device, dtype=dtype)  # (..., T, d/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype).chunk(2, dim=-1)  # each half's pairs (x1, x2) turn by the same angle
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
