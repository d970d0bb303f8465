"""GPU kernels for the linear memory: flash-linear-attention 0.6.0 (`pip install flash-linear-attention`).

`memory_fla` has the contract of linear_memory.memory_chunked (same arguments, same result), so it serves every
family that has a linear memory, hybrid ones included: the window / sinks softmax and the mixing stay in
ops/hybrid/ (PyTorch), only the memory's read-out runs in the kernel.

    sum rule, with or without the forget gate:  fla.ops.simple_gla  (head-wise log gate g (B, T, H); None: no gate)
    delta rule, with or without the gate:       fla.ops.gated_delta_rule (g = 0 without a gate)

Both compute o_t = q_t S_t with S_t = exp(g_t) S_{t-1} + k_t^T v_t (delta rule: exp(g_t) (I - b_t k_t^T k_t) S_{t-1}
+ b_t k_t^T v_t), scale 1 (fq, fk are already feature maps). For the sum rule the caller's values carry the ones
column, so the kernel returns numerator and normaliser together. fla 0.6.0 takes (B, T, H, X) tensors with one
key head per query head, so keys, values and gates are repeated over the query groups (GQA) and the final memory
is read from the first head of each group.

fla 0.6.0's bfloat16 / float16 backward needs even K and V: an odd value width (the sum rule's ones column) gets a
zero column. In fp32, Triton's matrix products round their inputs to TF32 unless TRITON_F32_DEFAULT=ieee.

Opt-in: LINEARIZE_FLA_KERNELS=1 (docs/scaling.md). Not for training on Hopper (H100 / H200) with Triton >= 3.4 and
< 3.7.1: a Triton miscompile there gives wrong gradients in fla's chunk backward (fla issue 640; fla 0.6.0 refuses
the gated case itself, and the ungated one failed our gradient check on an H200), so gradients then come from the
PyTorch forms while inference (no gradient) still uses the kernels.
"""

import functools
import importlib.util
import os
import warnings

import torch
from packaging.version import Version

FLA_FORMS = ("chunk", "fused_recurrent")
FLA_ENV = "LINEARIZE_FLA_KERNELS"
BAD_TRITON_ON_HOPPER = ("3.4.0", "3.7.1")  # [from, to): wrong chunk-backward gradients on compute capability 9.x


@functools.lru_cache(maxsize=None)
def backward_is_sound(device: torch.device, triton_version: str | None = None) -> bool:
    """False on a Hopper GPU with a Triton in BAD_TRITON_ON_HOPPER (fla's chunk backward is miscompiled there)."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        return True
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    low, high = map(Version, BAD_TRITON_ON_HOPPER)
    return not (low <= Version(triton_version) < high)


def fla_usable(*xs: torch.Tensor | None) -> bool:
    """True when the memory inputs xs (None: absent) live on a CUDA device, flash-linear-attention is importable,
    LINEARIZE_FLA_KERNELS=1, and, if a gradient will flow through them, fla's backward is sound on this GPU."""
    xs = [t for t in xs if t is not None]
    x = xs[0]
    if not (x.is_cuda and os.environ.get(FLA_ENV) == "1" and importlib.util.find_spec("fla") is not None):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in xs) and not backward_is_sound(x.device):
        warnings.warn("flash-linear-attention's chunk backward gives wrong gradients with this Triton on Hopper "
                      "(Triton >= 3.4, < 3.7.1; fla issue 640): training uses the PyTorch forms; upgrade Triton to "
                      ">= 3.7.1 for the kernels", stacklevel=2)
        return False
    return True


def _kernel(delta: bool, form: str):
    if delta:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        return {"chunk": chunk_gated_delta_rule, "fused_recurrent": fused_recurrent_gated_delta_rule}[form]
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    return {"chunk": chunk_simple_gla, "fused_recurrent": fused_recurrent_simple_gla}[form]


def memory_fla(fq, fk, v, log_gate=None, beta=None, chunk: int = 64, state=None, form: str = "chunk"):
    """fq (B, Hkv, G, T, F), fk (B, Hkv, T, F), v (B, Hkv, T, D), log_gate / beta (B, Hkv, T) or None, state
    (B, Hkv, F, D) or None -> (o (B, Hkv, G, T, D), final memory (B, Hkv, F, D)), as memory_chunked. `chunk` is
    the kernel's own business (accepted for the same signature)."""
    B, Hkv, G, T, Fd = fq.shape
    dtype, D = v.dtype, v.shape[-1]
    if D % 2:  # fla's 16-bit backward needs an even value width: one zero column, sliced off below
        v = torch.nn.functional.pad(v, (0, 1))
        state = None if state is None else torch.nn.functional.pad(state, (0, 1))

    def heads(x):  # (B, Hkv, T, ...) -> (B, T, Hkv * G, ...), each key head repeated for its G query heads
        return x.repeat_interleave(G, dim=1).transpose(1, 2).to(dtype).contiguous()

    q = fq.reshape(B, Hkv * G, T, Fd).transpose(1, 2).to(dtype).contiguous()
    kw = dict(scale=1.0, output_final_state=True,
              initial_state=None if state is None else state.float().repeat_interleave(G, dim=1))
    g = None if log_gate is None else heads(log_gate).float()
    if beta is None:
        o, S = _kernel(False, form)(q, heads(fk), heads(v), g=g, **kw)
    else:
        g = torch.zeros(B, T, Hkv * G, device=v.device) if g is None else g
        o, S = _kernel(True, form)(q, heads(fk), heads(v), g=g, beta=heads(beta), **kw)
    o = o.transpose(1, 2).reshape(B, Hkv, G, T, -1)[..., :D]
    return o, S[:, ::G, :, :D].to(fk.dtype)
