"""flash-linear-attention adapter: same outputs and gradients as the PyTorch chunked form.

The CUDA tests need a GPU and `pip install flash-linear-attention==0.6.0`; without them they skip. The CPU test
checks the adapter's layout, GQA and normaliser handling against a stand-in kernel with fla 0.6.0's contract."""

import importlib.util
import sys
import types

import pytest
import torch

from linearize import LinearAttentionConfig
from linearize.ops import hybrid_attention as ops
from linearize.ops.fla_kernels import FLA_ENV, FLA_FORMS, fla_applies, linear_attention_fla

HAVE_FLA_GPU = torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


def inputs(device="cpu", dtype=torch.float32, B=2, H=4, Hkv=2, T=100, d=16, F=32):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, T, d, generator=g), torch.randn(B, Hkv, T, d, generator=g)
    v = torch.randn(B, Hkv, T, d, generator=g)
    fq = torch.softmax(torch.randn(B, H, T, F, generator=g), -1)
    fk = torch.softmax(torch.randn(B, Hkv, T, F, generator=g), -1)
    return [x.to(device, dtype).requires_grad_() for x in (q, k, v, fq, fk)]


def reference(q, k, v, fq, fk):
    streams, spec = ops.Streams(k, v, q=q, fq=fq, fk=fk), ops.AttentionSpec(window=0, scale=q.shape[-1] ** -0.5)
    return ops.attention_chunked(streams, spec, q.new_zeros(q.shape[1]), chunk=16)[0]


def outputs_and_grads(fn, xs):
    y = fn(*xs)
    (y.float() * torch.linspace(-1, 1, y.shape[2], device=y.device)[:, None]).sum().backward()
    grads = [x.grad.clone() for x in xs[2:]]  # v, fq, fk (q, k do not enter the linear part)
    for x in xs:
        x.grad = None
    return [y.detach()] + grads


def stand_in_kernel(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True, **_):
    """fla 0.6.0's contract in PyTorch: (B, T, H, X) inputs, o_t = scale * sum_{s<=t} (q_t . k_s) v_s."""
    assert not normalize and scale == 1.0 and q.shape[2] == k.shape[2] == v.shape[2]
    a = torch.einsum("bthf,bshf->bhts", q, k).tril()
    return torch.einsum("bhts,bshd->bthd", a, v), None


def test_adapter_matches_pytorch_form_with_stand_in_kernel(monkeypatch):
    fake = types.ModuleType("fla.ops.linear_attn")
    fake.chunk_linear_attn = fake.fused_recurrent_linear_attn = stand_in_kernel
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.linear_attn", fake)
    xs = inputs()
    expected = outputs_and_grads(reference, xs)
    got = outputs_and_grads(lambda q, k, v, fq, fk: linear_attention_fla(fq, fk, v), xs)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_kernels_only_for_pure_linear_on_cuda(monkeypatch):
    monkeypatch.setenv(FLA_ENV, "1")
    x = torch.zeros(1)
    assert not fla_applies(LinearAttentionConfig(window=0), x)  # CPU tensor: the PyTorch forms
    if torch.cuda.is_available():
        assert not fla_applies(LinearAttentionConfig(window=64), x.cuda())  # hybrid: PyTorch forms
        assert not fla_applies(LinearAttentionConfig(window=0, gate="key"), x.cuda(), log_gate=x.cuda())


@pytest.mark.skipif(not HAVE_FLA_GPU, reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("form", FLA_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fla_kernel_matches_reference_outputs_and_gradients(form, dtype):
    xs = inputs("cuda", dtype, T=300)
    expected = outputs_and_grads(reference, [x.detach().float().requires_grad_() for x in xs])
    got = outputs_and_grads(lambda q, k, v, fq, fk: linear_attention_fla(fq, fk, v, form), xs)
    tol = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)  # TF32 / bf16
    for name, e, g in zip(("y", "dv", "dfq", "dfk"), expected, got):
        torch.testing.assert_close(g.float(), e, **tol, msg=lambda m: f"{form} {dtype} {name}: {m}")


def test_kernel_choice_on_a_cuda_like_tensor(monkeypatch):
    """The decision itself, checkable without a GPU: only pure linear attention (no window, sinks, gate or delta rule)
    goes to the kernels, and only when they are usable (CUDA tensor, fla importable, LINEARIZE_FLA_KERNELS=1)."""
    from types import SimpleNamespace

    from linearize.ops import fla_kernels

    cuda_like = SimpleNamespace(is_cuda=True)
    monkeypatch.delenv(FLA_ENV, raising=False)
    assert not fla_kernels.fla_usable(cuda_like)  # opt-in only
    monkeypatch.setattr(fla_kernels, "fla_usable", lambda x: True)
    x = torch.zeros(1)
    assert fla_applies(LinearAttentionConfig(window=0), x)
    assert not fla_applies(LinearAttentionConfig(window=64), x)
    assert not fla_applies(LinearAttentionConfig(window=0, sinks=4), x)
    assert not fla_applies(LinearAttentionConfig(window=0, gate="key"), x, log_gate=x)
    assert not fla_applies(LinearAttentionConfig(window=0, rule="delta"), x, beta=x)
