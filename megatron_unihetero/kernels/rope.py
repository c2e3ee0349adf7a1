"""Rotary position embedding, non-interleaved halves (Llama / HF ``rotate_half``).

    y = apply_rope(x, cos, sin)         # y = x * cos + rotate_half(x) * sin

rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]): the first half of the head dim pairs with the
second half (NOT the interleaved even/odd pairing of the original RoFormer / GPT-J).

Layouts: x is 4-D, [b, s, h, d] or [s, b, h, d] -- the function never needs to know which,
because cos and sin must already broadcast against x, head dim included, e.g.
- x [b, s, h, d]: cos/sin [s, d] -> pass cos[None, :, None, :] (or [b, s, 1, d] for per-sample
  position ids, as HF returns them after unsqueeze(2));
- x [s, b, h, d] (megatron): cos/sin [s, 1, 1, d].
cos/sin must not vary over the head dim (size 1 there). Only the first ``cos.shape[-1]`` features
are rotated when it is smaller than d (partial rotary); the rest pass through unchanged.
Output: x's shape and dtype (the rotation is computed in fp32).

impl: "reference" (x * cos + rotate_half(x) * sin under plain autograd), "fused" (an autograd
function whose backward is the transposed rotation, no rotate_half materialised; the CPU path of
"auto"), "triton" (one program per token, looping over heads; CUDA or TRITON_INTERPRET=1),
"auto" (triton on CUDA, else fused; MEGATRON_UNIHETERO_KERNELS=reference forces the reference).
All treat cos/sin as constants (tables that require grad are refused). TransformerEngine's /
apex's fused RoPE take the rotation angles rather than cos/sin and megatron's sbhd layout; they
are reached through megatron-core's own rope path, not from here.
"""

from __future__ import annotations

import torch

from megatron_unihetero.kernels._dispatch import REFERENCE, require, resolve_impl, triton_usable


def _reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The textbook composition under autograd, at least fp32 (fp64 stays fp64)."""
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    xr = x[..., :rot].to(compute)
    rotate_half = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos.to(compute) + rotate_half * sin.to(compute)
    if rot < x.shape[-1]:  # partial rotary: the tail passes through
        out = torch.cat((out, x[..., rot:].to(compute)), dim=-1)
    return out.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The rotation (or its transpose, for the backward) without autograd: three kernels.

    With x = [x1, x2] (halves of the rotary dims) and c = [c1, c2], s = [s1, s2]:
    forward   y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2;
    transpose y1 = x1 c1 + x2 s2,  y2 = x2 c2 - x1 s1.
    The sin terms are accumulated in place into the halves of ``x * cos``, so neither
    rotate_half(x) nor a concatenation is ever materialised.
    """
    rot, half = cos.shape[-1], cos.shape[-1] // 2
    # At least fp32 (bf16/fp16 inputs are upcast); fp64 inputs stay fp64.
    compute = torch.promote_types(x.dtype, torch.float32)
    xr, cos, sin = x[..., :rot].to(compute), cos.to(compute), sin.to(compute)
    out = torch.empty(x.shape, dtype=compute, device=x.device)
    rotated = out[..., :rot]
    torch.mul(xr, cos, out=rotated)
    x1, x2, s1, s2 = xr[..., :half], xr[..., half:], sin[..., :half], sin[..., half:]
    sign = 1.0 if transpose else -1.0
    rotated[..., :half].addcmul_(x2, s2 if transpose else s1, value=sign)
    rotated[..., half:].addcmul_(x1, s1 if transpose else s2, value=-sign)
    if rot < x.shape[-1]:
        out[..., rot:] = x[..., rot:]
    return out.to(x.dtype)


class _FusedRope(torch.autograd.Function):
    """A rotation's gradient is the transposed rotation: the backward is the same three kernels
    (the plain autograd composition needed twice as many, and two copies of x)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, transpose=True), None, None


def _fused(x, cos, sin):
    return _FusedRope.apply(x, cos, sin)


def _triton(x, cos, sin):
    require(triton_usable(x.device), "apply_rope", "triton", "needs triton and CUDA (or TRITON_INTERPRET=1)")
    from megatron_unihetero.kernels import _triton_rope

    return _triton_rope.RopeFunction.apply(x, cos, sin)


# impl name -> implementation, looked up at call time (tests swap entries to see which ran).
_IMPLS = {REFERENCE: _reference, "fused": _fused, "triton": _triton}
IMPLS = tuple(_IMPLS)


def _check(x, cos, sin):
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D ([b, s, h, d] or [s, b, h, d]), got {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    rot = cos.shape[-1]
    if rot % 2 or rot > x.shape[-1]:
        raise ValueError(f"rotary dim {rot} must be even and <= head dim {x.shape[-1]}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("apply_rope treats cos/sin as constants: pass tables that do not "
                         "require grad (detach them)")
    if cos.dim() != 4 or cos.shape[2] != 1:
        raise ValueError(f"cos/sin must be 4-D with size 1 on the head dim, got {tuple(cos.shape)}")
    # cos/sin broadcast against x's first two dims (a plain check: torch.broadcast_shapes costs
    # more than the rotation's Python on small tensors).
    if any(c not in (1, n) for c, n in zip(cos.shape[:2], x.shape[:2])):
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not broadcast against x {tuple(x.shape)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rotate ``x`` by the angles whose cos/sin are given; see the module docstring."""
    _check(x, cos, sin)
    order = (["triton"] if x.is_cuda and triton_usable(x.device) else []) + ["fused"]
    impl = resolve_impl("apply_rope", impl, IMPLS, order)
    return _IMPLS[impl](x, cos, sin)
