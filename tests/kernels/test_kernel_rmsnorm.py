"""rms_norm: the reference and the fused torch path against the textbook formula; fused, Triton
(interpreted / compiled) and apex against the reference, forward and backward, fp32 and bf16."""

import pytest
import torch

from megatron_unihetero.kernels import rms_norm
from megatron_unihetero.kernels.testing import assert_close


def _inputs(shape, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(device, dtype)
    g = torch.randn(shape, generator=gen).to(device, dtype)
    return x, w, g


def _run(impl, x, w, g, eps):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = rms_norm(x, w, eps=eps, impl=impl)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def check_parity(impl, dtype, shape=(3, 5, 40), eps=1e-5, device="cpu"):
    x, w, g = _inputs(shape, dtype, device)
    outs = _run(impl, x, w, g, eps)
    refs = _run("reference", x.float(), w.float(), g.float(), eps)
    assert outs[0].shape == x.shape and outs[0].dtype == dtype
    for name, a, r in zip(("y", "grad x", "grad w"), outs, refs):
        assert_close(a, r, dtype, scale=10 if name == "grad w" else 1, msg=f"{impl} {name}")


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_formula(impl):
    x, w, _ = _inputs((4, 7), torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm(x, w, eps=1e-6, impl=impl), expected)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_backward_gradcheck(impl):
    x, w, _ = _inputs((3, 2, 9), torch.float64)
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, eps=1e-6, impl=impl),
                             (x.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_torch_paths_dtypes(impl, dtype):
    check_parity(impl, dtype)


def test_bad_weight_shape():
    with pytest.raises(ValueError):
        rms_norm(torch.randn(2, 4), torch.ones(3))


def interpreted_cases():
    """Run by test_kernel_triton_interpret.py in a child process with TRITON_INTERPRET=1."""
    from megatron_unihetero.kernels import _triton_rmsnorm

    _triton_rmsnorm._MAX_PARTIALS = 16  # fewer backward programs than rows, on a small shape
    for dtype in (torch.float32, torch.bfloat16):
        check_parity("triton", dtype)
        check_parity("triton", dtype, shape=(37, 24))


@pytest.mark.requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "apex", "auto"])
def test_gpu_matches_reference(impl, dtype):
    from megatron_unihetero.kernels.rmsnorm import _apex_rms_norm

    if impl == "apex" and _apex_rms_norm() is None:
        pytest.skip("apex not installed")
    check_parity(impl, dtype, shape=(4, 512, 4096), device="cuda")


if __name__ == "__main__":
    interpreted_cases()
