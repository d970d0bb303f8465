"""flash-linear-attention kernels as the linear memory: same result as linear_memory's forms.

The CPU tests check the adapter (layout, GQA, gates, delta rule, initial and final memory, the hybrid around it)
against stand-in kernels written here from fla 0.6.0's contract. The CUDA tests need a GPU and
`pip install flash-linear-attention==0.6.0` (they skip without them): every kernel's output, final memory and
gradients must be as close to a float64 reference as the PyTorch chunked form in the same dtype is (within a factor),
so rounding passes and a wrong formula fails. In float32, Triton rounds matrix-product inputs to TF32 unless
TRITON_F32_DEFAULT=ieee; the PyTorch side then uses TF32 too (torch.backends.cuda.matmul.allow_tf32)."""

import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from linearize.ops import fla_kernels
from linearize.ops.hybrid.chunked import attention_chunked
from linearize.ops.hybrid.naive import attention_quadratic
from linearize.ops.hybrid.spec import AttentionSpec, LayerConstants
from linearize.ops.hybrid.state import Streams
from linearize.ops.fla_kernels import FLA_ENV, memory_fla
from linearize.ops.linear_memory import memory_chunked, memory_naive

HAVE_FLA_GPU = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None
CASES = [("sum", False), ("sum", True), ("delta", False), ("delta", True)]  # (rule, gated)


def memory_inputs(rule, gated, B=2, Hkv=2, G=2, T=150, Fd=16, D=9, state=False, seed=0):
    """fq (B, Hkv, G, T, F), fk, v, log_gate, beta, state as the hybrid gives them: softmax features for the sum rule
    (v with its ones column), unit-norm features and b in (0, 1) for the delta rule, Liger-like gates."""
    g = torch.Generator().manual_seed(seed)
    fq, fk = torch.randn(B, Hkv, G, T, Fd, generator=g), torch.randn(B, Hkv, T, Fd, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    if rule == "sum":
        fq, fk = fq.softmax(-1), fk.softmax(-1)
        v = torch.cat([v[..., :-1], torch.ones_like(v[..., :1])], -1)
    else:
        fq, fk = F.normalize(fq, dim=-1), F.normalize(fk, dim=-1)
    log_gate = F.logsigmoid(2 + torch.randn(B, Hkv, T, generator=g)) if gated else None
    beta = torch.sigmoid(torch.randn(B, Hkv, T, generator=g)) if rule == "delta" else None
    S0 = 0.1 * torch.randn(B, Hkv, Fd, D, generator=g) if state else None
    return dict(fq=fq, fk=fk, v=v, log_gate=log_gate, beta=beta, state=S0)


def stand_in(q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False, **_):
    """fla 0.6.0's contract in PyTorch, one step at a time: (B, T, H, X) tensors, one key head per query head,
    S_t = exp(g_t) S_{t-1} + k_t^T v_t (with beta: exp(g_t) S_{t-1} + b_t k_t^T (v_t - k_t exp(g_t) S_{t-1})),
    o_t = scale q_t S_t; initial / final state (B, H, K, V) in float32."""
    assert scale == 1.0 and q.shape[2] == k.shape[2] == v.shape[2] and q.dtype == k.dtype == v.dtype
    if q.dtype in (torch.bfloat16, torch.float16):  # fla 0.6.0's chunk_bwd_dv asserts this
        assert q.shape[-1] % 2 == 0 and v.shape[-1] % 2 == 0, "16-bit kernels need even K and V"
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state
    out = []
    for t in range(T):
        if g is not None:
            S = torch.exp(g[:, t, :, None, None]) * S
        k_t, v_t = k[:, t, :, :, None].float(), v[:, t, :, None, :].float()
        if beta is None:
            S = S + k_t @ v_t
        else:
            S = S + beta[:, t, :, None, None] * k_t @ (v_t - k_t.transpose(-1, -2) @ S)
        out.append(q[:, t, :, None, :].float() @ S)
    return torch.cat(out, 2).transpose(1, 2).to(v.dtype), (S if output_final_state else None)


@pytest.fixture
def stand_in_fla(monkeypatch):
    """Importable fake fla.ops.simple_gla / fla.ops.gated_delta_rule whose kernels are the stand-in."""
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name, kernels in (("simple_gla", ("chunk_simple_gla", "fused_recurrent_simple_gla")),
                          ("gated_delta_rule", ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"))):
        fake = types.ModuleType(f"fla.ops.{name}")
        for k in kernels:
            setattr(fake, k, stand_in)
        monkeypatch.setitem(sys.modules, f"fla.ops.{name}", fake)


@pytest.mark.parametrize("rule,gated", CASES)
@pytest.mark.parametrize("state", [False, True])
def test_adapter_equals_naive_memory_with_stand_in_kernel(stand_in_fla, rule, gated, state):
    x = memory_inputs(rule, gated, state=state, T=40)
    o_ref, S_ref = memory_naive(**x)
    o, S = memory_fla(**x)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-4, atol=1e-5)


def hybrid_inputs(rule="sum", gated=False, B=1, H=4, Hkv=2, T=70, d=8, Fd=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, d, generator=g) for h in (H, Hkv, Hkv))
    fq, fk = torch.randn(B, H, T, Fd, generator=g), torch.randn(B, Hkv, T, Fd, generator=g)
    fq, fk = (fq.softmax(-1), fk.softmax(-1)) if rule == "sum" else (F.normalize(fq, dim=-1), F.normalize(fk, dim=-1))
    log_gate = F.logsigmoid(2 + torch.randn(B, Hkv, T, generator=g)) if gated else None
    beta = torch.sigmoid(torch.randn(B, Hkv, T, generator=g)) if rule == "delta" else None
    mix = torch.sigmoid(torch.randn(H, generator=g))
    return Streams(k=k, v=v, q=q, fq=fq, fk=fk, log_gate=log_gate, beta=beta), mix


@pytest.mark.parametrize("rule,gated", CASES)
@pytest.mark.parametrize("window,sinks,cap", [(0, 0, 0), (16, 0, 0), (16, 4, 0), (16, 4, 20)])
def test_hybrid_attention_with_kernel_memory_equals_reference(stand_in_fla, monkeypatch, rule, gated, window, sinks,
                                                              cap):
    """attention_chunked takes memory_fla where the kernels are usable: windowed, sink, gated, delta and capped
    attentions all keep the quadratic reference's result, in one pass and in blocks continuing a state."""
    if cap and (rule == "delta" or gated):
        pytest.skip("the memory cap is for the plain sum rule")
    calls = []
    monkeypatch.setattr(fla_kernels, "fla_usable", lambda *xs: True)
    monkeypatch.setattr(fla_kernels, "memory_fla", lambda *a, **kw: calls.append(1) or memory_fla(*a, **kw))
    streams, mix = hybrid_inputs(rule, gated)
    spec = AttentionSpec(window=window, scale=0.3, sinks=sinks, rule=rule, memory_cap=cap)
    layer = LayerConstants(mix, key_features=lambda k: None)
    expected = attention_quadratic(streams, spec, layer)
    y, _ = attention_chunked(streams, spec, layer, chunk=16)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    first, state = attention_chunked(streams.slice(slice(0, 33)), spec, layer, chunk=16, output_final_state=True)
    if window == 0:  # pure linear: the state holds only the memory, no window keys to recompute
        rest, _ = attention_chunked(streams.slice(slice(33, None)), spec, layer, state, chunk=16)
        torch.testing.assert_close(torch.cat([first, rest], 2), expected, rtol=1e-4, atol=1e-5)
    assert calls, "the kernel memory was not used"


def test_adapter_pads_an_odd_value_width_in_16_bit(stand_in_fla):
    """The sum rule's [v, 1] has an odd width for an even head_dim; fla's 16-bit backward refuses odd widths."""
    x = {k: None if t is None else t.to(torch.bfloat16) for k, t in memory_inputs("sum", True, state=True).items()}
    assert x["v"].shape[-1] % 2 == 1
    o_ref, S_ref = memory_naive(**{k: None if t is None else t.float() for k, t in x.items()})
    o, S = memory_fla(**x)
    assert o.shape == o_ref.shape and S.shape == S_ref.shape and o.dtype == S.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), o_ref, rtol=0.03, atol=0.03)
    torch.testing.assert_close(S.float(), S_ref, rtol=0.03, atol=0.03)


def test_no_kernel_gradients_on_hopper_with_a_miscompiling_triton(monkeypatch):
    """Triton >= 3.4, < 3.7.1 on compute capability 9.x: the kernels serve inference only (fla issue 640)."""
    capability = {"cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["cap"])
    sound = fla_kernels.backward_is_sound
    sound.cache_clear()
    cpu = torch.device("cpu")
    assert not fla_kernels.backward_is_sound(cpu, "3.6.0")
    assert not fla_kernels.backward_is_sound(cpu, "3.4.0")
    assert fla_kernels.backward_is_sound(cpu, "3.7.1") and fla_kernels.backward_is_sound(cpu, "3.3.1+git5e2")
    capability["cap"] = (8, 0)  # A100: not affected
    fla_kernels.backward_is_sound.cache_clear()  # the answer is cached per device and version
    assert fla_kernels.backward_is_sound(cpu, "3.6.0")
    # the decision: grad-free inputs use the kernels, inputs that need a gradient do not
    capability["cap"] = (9, 0)
    monkeypatch.setenv(FLA_ENV, "1")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(fla_kernels, "backward_is_sound", lambda device: False)
    cuda_like = types.SimpleNamespace(is_cuda=True, requires_grad=False, device=cpu)
    trained = types.SimpleNamespace(is_cuda=True, requires_grad=True, device=cpu)
    assert fla_kernels.fla_usable(cuda_like, None)
    with pytest.warns(UserWarning, match="3.7.1"):
        assert not fla_kernels.fla_usable(cuda_like, trained)
    with torch.no_grad():
        assert fla_kernels.fla_usable(cuda_like, trained)
    sound.cache_clear()  # leave no answer made under the fake capability


def test_kernels_are_opt_in_and_cuda_only(monkeypatch):
    monkeypatch.setenv(FLA_ENV, "1")
    assert not fla_kernels.fla_usable(torch.zeros(1))  # a CPU tensor: the PyTorch forms
    monkeypatch.delenv(FLA_ENV)
    assert not fla_kernels.fla_usable(types.SimpleNamespace(is_cuda=True))  # not asked for


# ---------------------------------------------------------------- CUDA: the real kernels against a float64 reference

def rel_errors(fn, x: dict, dtype, device="cuda") -> dict:
    """max |got - float64 reference| / max |reference| for the output, the final memory and the gradients of
    fq, fk, v, log_gate and beta (a fixed random cotangent), fn run in `dtype` on `device`."""
    def run(fn, dtype, device):
        xs = {k: None if t is None else t.detach().to(device, dtype).clone().requires_grad_(k != "state")
              for k, t in x.items()}
        o, S = fn(**xs)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
        (o.double() * w).sum().backward()
        grads = {f"d{k}": t.grad.double().cpu() for k, t in xs.items() if t is not None and t.grad is not None}
        return {"o": o.detach().double().cpu(), "S": S.detach().double().cpu(), **grads}

    ref = run(memory_naive, torch.float64, "cpu")
    got = run(fn, dtype, device)
    return {k: ((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-12)).item() for k in ref}


SOUND_BACKWARD = HAVE_FLA_GPU and fla_kernels.backward_is_sound(torch.device("cuda"))


@pytest.mark.skipif(not HAVE_FLA_GPU, reason="needs CUDA and flash-linear-attention")
@pytest.mark.skipif(HAVE_FLA_GPU and not SOUND_BACKWARD, reason="Hopper with Triton >= 3.4, < 3.7.1: fla's chunk "
                    "backward is miscompiled (fla issue 640); the kernels serve inference only there")
@pytest.mark.parametrize("rule,gated", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_kernel_as_accurate_as_pytorch_form(monkeypatch, rule, gated, dtype):
    ieee = os.environ.get("TRITON_F32_DEFAULT") == "ieee"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", not ieee)  # the same fp32 rounding on both sides
    x = memory_inputs(rule, gated, T=300, Fd=32, D=17, state=True)
    kernel = rel_errors(memory_fla, x, dtype)
    pytorch = rel_errors(lambda **kw: memory_chunked(**kw, chunk=64), x, dtype)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    bad = {k: (kernel[k], pytorch[k]) for k in kernel if kernel[k] > 4 * pytorch[k] + floor}
    print(f"{rule} gated={gated} {dtype} kernel {kernel} pytorch {pytorch}")
    assert not bad, f"{rule} gated={gated} {dtype}: kernel vs PyTorch relative errors {bad}"


@pytest.mark.skipif(not HAVE_FLA_GPU, reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("rule,gated", CASES)
@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
def test_kernel_forward_matches(rule, gated, form):
    """Inference (no gradient): both kernel forms against the reference, on every GPU."""
    x = {k: None if t is None else t.cuda() for k, t in memory_inputs(rule, gated, T=300, Fd=32, D=17,
                                                                       state=True).items()}
    o_ref, S_ref = memory_naive(**x)
    with torch.no_grad():
        o, S = memory_fla(**x, form=form)
    tf32 = form == "chunk" and os.environ.get("TRITON_F32_DEFAULT") != "ieee"  # Triton's fp32 products: TF32 inputs
    tol = dict(rtol=1e-2, atol=1e-2) if tf32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(o, o_ref, **tol)
    torch.testing.assert_close(S, S_ref, **tol)
