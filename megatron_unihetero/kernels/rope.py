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

impl: "torch" (reference and CPU fallback; cos/sin may require grad there), "triton" (one program
per token, looping over heads; cos/sin are treated as constants with no gradient; CUDA or
TRITON_INTERPRET=1), "auto" (triton on CUDA, else torch; MEGATRON_UNIHETERO_KERNELS=torch forces
torch). TransformerEngine's / apex's fused RoPE take the rotation angles rather than cos/sin and
megatron's sbhd layout; they are reached through megatron-core's own rope path, not from here.
"""

from __future__ import annotations

import torch

from megatron_unihetero.kernels._dispatch import require, resolve_impl, triton_usable

IMPLS = ("torch", "triton")


def _rope_torch(x, cos, sin):
    rot = cos.shape[-1]
    # At least fp32 (bf16/fp16 inputs are upcast); fp64 inputs stay fp64.
    compute = torch.promote_types(x.dtype, torch.float32)
    xr = x[..., :rot].to(compute)
    # rotate_half(x) * sin == roll(x, rot/2) * [-sin_1, sin_2]: the sign moves onto sin (small,
    # [.., 1, rot]) and the rotation is one copy of x instead of a negation and a concatenation.
    half = rot // 2
    sin = sin.to(compute)
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    out = xr * cos.to(compute) + torch.roll(xr, half, dims=-1) * signed_sin
    if rot < x.shape[-1]:
        out = torch.cat((out, x[..., rot:].to(compute)), dim=-1)
    return out.to(x.dtype)


def _check(x, cos, sin):
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D ([b, s, h, d] or [s, b, h, d]), got {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    rot = cos.shape[-1]
    if rot % 2 or rot > x.shape[-1]:
        raise ValueError(f"rotary dim {rot} must be even and <= head dim {x.shape[-1]}")
    if cos.dim() != 4 or cos.shape[2] != 1:
        raise ValueError(f"cos/sin must be 4-D with size 1 on the head dim, got {tuple(cos.shape)}")
    torch.broadcast_shapes(cos.shape[:3], x.shape[:3])  # raises a clear error if not broadcastable


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Rotate ``x`` by the angles whose cos/sin are given; see the module docstring."""
    _check(x, cos, sin)
    order = (["triton"] if x.is_cuda and triton_usable(x.device) else []) + ["torch"]
    impl = resolve_impl("apply_rope", impl, IMPLS, order)
    if impl == "triton":
        require(triton_usable(x.device), "apply_rope", impl, "needs triton and CUDA (or TRITON_INTERPRET=1)")
        from megatron_unihetero.kernels import _triton_rope

        return _triton_rope.RopeFunction.apply(x, cos, sin)
    return _rope_torch(x, cos, sin)
