"""swiglu_linear's fused path against megatron-core's fc1 + glu (one GEMM, chunk, silu * up, the
reference impl): forward and backward, fp64 gradcheck, fp32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

from megatron_unihetero.kernels.swiglu import swiglu_linear
from megatron_unihetero.kernels.testing import assert_close


def _reference(x, weight):
    gate, up = torch.chunk(F.linear(x, weight), 2, dim=-1)
    return F.silu(gate) * up


def _inputs(shape, width, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(dtype)
    weight = (torch.randn(2 * width, shape[-1], generator=gen) / shape[-1] ** 0.5).to(dtype)
    grad = torch.randn(*shape[:-1], width, generator=gen).to(dtype)
    return x, weight, grad


def _run(fn, x, weight, grad):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = fn(x, weight)
    out.backward(grad)
    return out.detach(), x.grad, weight.grad


def test_gradcheck():
    x, weight, _ = _inputs((3, 2, 5), 4, torch.float64)
    torch.autograd.gradcheck(swiglu_linear, (x.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_megatron_fc1_and_glu(dtype):
    x, weight, grad = _inputs((7, 3, 40), 24, dtype)
    ours = _run(swiglu_linear, x, weight, grad)
    reference = _run(_reference, x.float(), weight.float(), grad.float())
    assert ours[0].shape == (7, 3, 24) and ours[0].dtype == dtype
    for name, a, r in zip(("out", "grad x", "grad weight"), ours, reference):
        assert_close(a, r, dtype, scale=10 if name == "grad weight" else 1, msg=name)


def test_reference_impl_is_megatrons_composition():
    x, weight, _ = _inputs((4, 6), 3, torch.float64)
    torch.testing.assert_close(swiglu_linear(x, weight, impl="reference"), _reference(x, weight))


def test_bad_weight_shape():
    with pytest.raises(ValueError, match=r"weight must be \[2F, 5\]"):
        swiglu_linear(torch.randn(2, 5), torch.randn(7, 5))
    with pytest.raises(ValueError, match="unknown impl"):
        swiglu_linear(torch.randn(2, 5), torch.randn(8, 5), impl="triton")
