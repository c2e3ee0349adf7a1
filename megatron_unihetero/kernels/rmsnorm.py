"""RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * weight.

    y = rms_norm(x, weight, eps=1e-5)

x [..., H] (any leading shape), weight [H]; y has x's shape and dtype. Numerics: statistics and
the product with the weight are computed in fp32 and the result is cast once to x's dtype. (HF
Llama casts the normalised x to the input dtype *before* multiplying by the weight; in bf16 the
two differ by one rounding, within the tests' bf16 tolerance.)

impl: "reference" (plain autograd through torch ops), "fused" (one autograd function with a
closed-form backward; the CPU path of "auto"), "triton" (one row per program; forward stores the
per-row 1/rms for the backward; CUDA or TRITON_INTERPRET=1), "apex" (apex's
fused_rms_norm_affine, CUDA), "auto" (apex, then triton, on CUDA; fused otherwise;
MEGATRON_UNIHETERO_KERNELS=reference forces the reference). TransformerEngine's RMSNorm is a
module owning its weight, so it is reached through the layer specs (megatron-core's TENorm),
not through this function.
"""

from __future__ import annotations

import torch

from megatron_unihetero.kernels._dispatch import (
    REFERENCE,
    optional_import,
    require,
    resolve_impl,
    triton_usable,
)


def _reference(x, weight, eps):
    """The formula under autograd, at least fp32 (fp64 stays fp64), cast once to x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(compute)).to(x.dtype)


class _FusedRMSNorm(torch.autograd.Function):
    """The fused path as one autograd node: the backward is the closed form

        dx = rstd * (g*w - x_hat * mean(g*w * x_hat)),   dw = sum over rows of g * x_hat

    (fewer, larger kernels than autograd through pow / mean / rsqrt / mul). Saves x_hat and
    rstd; computed in at least fp32, cast once to x's / the weight's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        compute = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(compute)
        rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True).add_(eps))
        x_hat = xf * rstd
        ctx.save_for_backward(x_hat, rstd, weight)
        return (x_hat * weight.to(compute)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x_hat, rstd, weight = ctx.saved_tensors
        g = grad.to(x_hat.dtype)
        gw = g * weight.to(x_hat.dtype)
        grad_x = (gw - x_hat * (gw * x_hat).mean(dim=-1, keepdim=True)).mul_(rstd)
        grad_w = (g * x_hat).reshape(-1, x_hat.shape[-1]).sum(dim=0)
        return grad_x.to(grad.dtype), grad_w.to(weight.dtype), None


def _fused(x, weight, eps):
    return _FusedRMSNorm.apply(x, weight, eps)


def _triton(x, weight, eps):
    require(triton_usable(x.device), "rms_norm", "triton", "needs triton and CUDA (or TRITON_INTERPRET=1)")
    from megatron_unihetero.kernels import _triton_rmsnorm

    return _triton_rmsnorm.RMSNormFunction.apply(x, weight, eps)


def _apex_rms_norm():
    module = optional_import("apex.normalization.fused_layer_norm")
    return getattr(module, "fused_rms_norm_affine", None) if module is not None else None


def _apex(x, weight, eps):
    fn = _apex_rms_norm()
    require(fn is not None and x.is_cuda, "rms_norm", "apex", "needs apex with CUDA extensions")
    return fn(x, weight, weight.shape, eps)


# impl name -> implementation, looked up at call time (tests swap entries to see which ran).
_IMPLS = {REFERENCE: _reference, "fused": _fused, "triton": _triton, "apex": _apex}
IMPLS = tuple(_IMPLS)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, impl: str = "auto") -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim, scaled by ``weight``; see the module docstring."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    order = []
    if x.is_cuda and _apex_rms_norm() is not None:
        order.append("apex")
    if x.is_cuda and triton_usable(x.device):
        order.append("triton")
    order.append("fused")
    impl = resolve_impl("rms_norm", impl, IMPLS, order)
    return _IMPLS[impl](x, weight, eps)
