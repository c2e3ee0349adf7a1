"""apply_rope: the reference and the fused torch path against a complex-number rotation, both
layouts, partial rotary; fused and Triton (interpreted / compiled) against the reference,
forward and backward."""

import pytest
import torch

from megatron_unihetero.kernels import apply_rope
from megatron_unihetero.kernels.testing import assert_close


def _angles(s, rot, seed=0, batch=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, s, rot // 2) if batch else (s, rot // 2)
    half = torch.rand(shape, generator=gen) * 6.0
    return torch.cat([half, half], dim=-1)  # HF / Llama table: both halves share the angles


def _run(impl, x, cos, sin, g):
    x = x.detach().clone().requires_grad_()
    y = apply_rope(x, cos, sin, impl=impl)
    y.backward(g)
    return y.detach(), x.grad


def check_parity(impl, dtype, layout="bshd", b=2, s=6, h=3, d=16, rot=16, per_sample=False, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    ang = _angles(s, rot, batch=b if per_sample else None)
    if layout == "bshd":
        x = torch.randn(b, s, h, d, generator=gen)
        ang = ang[:, :, None] if per_sample else ang[None, :, None]
    else:
        assert not per_sample
        x = torch.randn(s, b, h, d, generator=gen)
        ang = ang[:, None, None]
    g = torch.randn(x.shape, generator=gen)
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    out, gx = _run(impl, x.to(device, dtype), cos, sin, g.to(device, dtype))
    ref, rgx = _run("reference", x.to(device), cos, sin, g.to(device))
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype, msg=f"{impl} {layout} out")
    assert_close(gx, rgx, dtype, msg=f"{impl} {layout} grad")


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_is_a_complex_rotation_of_half_pairs(impl):
    b, s, h, d = 2, 5, 3, 8
    x = torch.randn(b, s, h, d, dtype=torch.float64)
    ang = _angles(s, d).double()
    y = apply_rope(x, ang.cos()[None, :, None], ang.sin()[None, :, None], impl=impl)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :]) * torch.polar(torch.ones(s, d // 2).double(), ang[:, : d // 2])[None, :, None]
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], dim=-1))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_backward_is_the_transposed_rotation(impl):
    """gradcheck in fp64, partial rotary, with tables whose halves differ (the fused backward
    must not assume the Llama table's duplicated halves)."""
    x = torch.randn(2, 4, 3, 10, dtype=torch.float64, requires_grad=True)
    ang = torch.rand(2, 4, 1, 6, dtype=torch.float64) * 6.0
    torch.autograd.gradcheck(lambda t: apply_rope(t, ang.cos(), ang.sin(), impl=impl), (x,))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_layouts_agree_and_partial_rotary_passes_tail(impl):
    x = torch.randn(2, 5, 3, 8)
    ang = _angles(5, 4)
    y_bshd = apply_rope(x, ang.cos()[None, :, None], ang.sin()[None, :, None], impl=impl)
    y_sbhd = apply_rope(x.transpose(0, 1), ang.cos()[:, None, None], ang.sin()[:, None, None], impl=impl)
    torch.testing.assert_close(y_bshd, y_sbhd.transpose(0, 1))
    torch.testing.assert_close(y_bshd[..., 4:], x[..., 4:])


def test_rejects_bad_shapes():
    x = torch.randn(2, 5, 3, 8)
    with pytest.raises(ValueError):
        apply_rope(x, torch.ones(5, 8), torch.ones(5, 8))  # 2-D tables are ambiguous: refuse
    with pytest.raises(ValueError):
        apply_rope(x, torch.ones(1, 5, 3, 8), torch.ones(1, 5, 3, 8))  # varies over heads
    table = torch.ones(1, 5, 1, 8, requires_grad=True)
    with pytest.raises(ValueError, match="constants"):
        apply_rope(x, table, table)  # no gradient would reach it: refused, not dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_torch_paths_dtypes(impl, dtype):
    check_parity(impl, dtype)
    check_parity(impl, dtype, "sbhd", rot=8)  # partial rotary


def interpreted_cases():
    """Run by test_kernel_triton_interpret.py in a child process with TRITON_INTERPRET=1."""
    for dtype in (torch.float32, torch.bfloat16):
        check_parity("triton", dtype, "bshd")
        check_parity("triton", dtype, "sbhd", rot=8)  # partial rotary
    check_parity("triton", torch.float32, "bshd", per_sample=True, h=20)  # > one head block


@pytest.mark.requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bshd", "sbhd"])
def test_triton_gpu_matches_reference(dtype, layout):
    check_parity("triton", dtype, layout, b=2, s=1024, h=32, d=128, rot=128, device="cuda")
    check_parity("auto", dtype, layout, b=2, s=64, h=8, d=128, rot=64, device="cuda")


if __name__ == "__main__":
    interpreted_cases()
