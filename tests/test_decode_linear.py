"""DecodeLinear (ops/decode_linear.py) against nn.Linear, its reference: same outputs for one token (the split
product) and for anything else, and a whole model decodes the same tokens after use_decode_linears."""

import pytest
import torch
import torch.nn.functional as F

from linearize.generate.decoding import Decoder
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of
from linearize.ops.decode_linear import DecodeLinear, use_decode_linears


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 24), (24,), (1, 24), (2, 1, 24), (1, 5, 24)])  # one token, or more
def test_decode_linear_matches_nn_linear(parts, bias, shape):
    torch.manual_seed(0)
    ref = torch.nn.Linear(24, 10, bias=bias, dtype=torch.float64)
    fast = torch.nn.Linear(24, 10, bias=bias, dtype=torch.float64)
    fast.load_state_dict(ref.state_dict())
    use_decode_linears(fast, parts=parts)
    assert type(fast) is DecodeLinear and fast.parts == parts and fast.weight.stride() == (1, 10)  # (in, out) in memory
    x = torch.randn(shape, dtype=torch.float64)
    y = fast(x)
    assert y.shape == (*shape[:-1], 10)
    torch.testing.assert_close(y, F.linear(x, ref.weight, ref.bias), rtol=1e-12, atol=1e-12)


def test_a_weight_shared_by_two_layers_is_re_laid_once():
    a, b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    model = use_decode_linears(torch.nn.Sequential(a, torch.nn.ReLU(), b), parts=2)
    assert a.weight is b.weight and a.weight.stride() == (1, 8) and not a.weight.is_contiguous()
    x = torch.randn(1, 8)
    torch.testing.assert_close(model(x), F.linear(torch.relu(F.linear(x, a.weight)), a.weight))


def test_a_width_the_parts_do_not_divide_keeps_one_part():
    layer = use_decode_linears(torch.nn.Linear(10, 4), parts=4)
    assert layer.parts == 1
    torch.testing.assert_close(layer(torch.ones(1, 10)), F.linear(torch.ones(1, 10), layer.weight, layer.bias))


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_a_model_with_decode_linears_decodes_the_same_tokens(tiny_converted, which):
    model = (load_teacher_of if which == "teacher" else load_student)(tiny_converted[0])[0].eval()
    ids = torch.randint(300, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    greedy = Decoder(model).generate(ids, 6)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    use_decode_linears(model, parts=2)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is DecodeLinear for m in linears)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())  # values kept
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    pointers = [m.weight.data_ptr() for m in linears]
    use_decode_linears(model, parts=2)  # a second call changes nothing
    assert [m.weight.data_ptr() for m in linears] == pointers
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert Decoder(model).generate(ids, 6) == greedy
