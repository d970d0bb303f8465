"""GPU kernels for pure linear attention (window 0): flash-linear-attention 0.6.0 (`pip install
flash-linear-attention`), chunked or fused-recurrent, with the PyTorch forms of hybrid_attention.py as fallback.

Same math as hybrid_attention with W = 0:  y_i = sum_{j<=i} (fq_i . fk_j) v_j / (sum_{j<=i} fq_i . fk_j + EPS).
The kernel computes the numerator (normalize=False, scale=1: fq, fk are already feature maps); the denominator
fq_i . cumsum_j fk_j is computed here, so the normaliser and its EPS are exactly ours. fla 0.6.0 takes
(B, T, H, X) tensors and equal head counts, so keys/values are repeated over the query groups (GQA).
"""

import importlib.util
import os

import torch

from .hybrid_attention import EPS

FLA_FORMS = ("chunk", "fused_recurrent")


# Opt-in: on an H200 (torch 2.11, triton 3.6, fla 0.6.0) the chunk kernel's outputs and dv matched the PyTorch form
# but its gradient for the query features did not (fp32, rtol/atol 2e-3; tests/test_fla_kernels.py), so training
# uses the PyTorch forms unless LINEARIZE_FLA_KERNELS=1 (see docs/scaling.md).
FLA_ENV = "LINEARIZE_FLA_KERNELS"


def fla_usable(x: torch.Tensor) -> bool:
    """True when x lives on a CUDA device, flash-linear-attention is importable and LINEARIZE_FLA_KERNELS=1."""
    return x.is_cuda and os.environ.get(FLA_ENV) == "1" and importlib.util.find_spec("fla") is not None


def fla_applies(config, x: torch.Tensor, log_gate=None, beta=None) -> bool:
    """The kernels cover pure linear attention (window 0, no sinks or cache, no gate, sum rule, the shared normaliser)
    on CUDA with fla installed."""
    pure = config.linear and config.window == 0 and not config.sinks and not config.cache and config.norm == "shared"
    return pure and log_gate is None and beta is None and fla_usable(x)


def linear_attention_fla(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, form: str = "chunk") -> torch.Tensor:
    """fq (B, H, T, F), fk (B, Hkv, T, F), v (B, Hkv, T, d) -> y (B, H, T, d), causal, pure linear."""
    from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn

    kernel = {"chunk": chunk_linear_attn, "fused_recurrent": fused_recurrent_linear_attn}[form]
    G = fq.shape[1] // fk.shape[1]
    fk, v = fk.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    num, _ = kernel(fq.transpose(1, 2), fk.transpose(1, 2), v.transpose(1, 2), scale=1.0, normalize=False)
    den = (fq.float() * fk.float().cumsum(dim=2)).sum(-1, keepdim=True)
    return (num.transpose(1, 2).float() / (den + EPS)).to(v.dtype)
