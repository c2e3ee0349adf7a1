"""Triton rotary embedding (non-interleaved halves), forward and backward (imported lazily).

x is viewed as [T, h, d] with T = the two leading dims flattened; cos/sin are broadcast to
[T, rot] (rot = rotary dim <= d) and made contiguous -- T*rot values, small next to x's T*h*d.
One program per token loads its cos/sin once and rotates every head. Features past ``rot`` are
copied. The backward is the transposed rotation:
    y1 = x1*c1 - x2*s1, y2 = x2*c2 + x1*s2  =>  dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1
which equals rotating by -sin only when the two halves of cos/sin agree (they do for standard
RoPE tables, but the kernel does not assume it). cos/sin get no gradient here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, NH, D, HALF,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    rmask = r < HALF
    c1 = tl.load(cos_ptr + tok * 2 * HALF + r, mask=rmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + tok * 2 * HALF + HALF + r, mask=rmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + tok * 2 * HALF + r, mask=rmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + tok * 2 * HALF + HALF + r, mask=rmask, other=0.0).to(tl.float32)
    heads = tl.arange(0, BLOCK_H)
    base = tok * NH * D
    for h0 in range(0, NH, BLOCK_H):
        hh = h0 + heads
        hmask = hh < NH
        m2 = hmask[:, None] & rmask[None, :]
        off1 = base + hh[:, None] * D + r[None, :]
        x1 = tl.load(x_ptr + off1, mask=m2, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + off1 + HALF, mask=m2, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1[None, :] + x2 * s2[None, :]
            y2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            y1 = x1 * c1[None, :] - x2 * s1[None, :]
            y2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(y_ptr + off1, y1.to(y_ptr.dtype.element_ty), mask=m2)
        tl.store(y_ptr + off1 + HALF, y2.to(y_ptr.dtype.element_ty), mask=m2)
        if BLOCK_P > 0:  # partial rotary: copy the untouched tail of each head
            p = 2 * HALF + tl.arange(0, BLOCK_P)
            mp = hmask[:, None] & (p < D)[None, :]
            offp = base + hh[:, None] * D + p[None, :]
            tl.store(y_ptr + offp, tl.load(x_ptr + offp, mask=mp, other=0.0), mask=mp)


def _launch(x, cos_t, sin_t, backward):
    a, b, nh, d = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    half = cos_t.shape[-1] // 2
    tail = d - 2 * half
    _rope_kernel[(a * b,)](
        x, cos_t, sin_t, y, nh, d, half,
        BACKWARD=backward,
        BLOCK_H=min(16, triton.next_power_of_2(nh)),
        BLOCK_R=triton.next_power_of_2(half),
        BLOCK_P=triton.next_power_of_2(tail) if tail else 0,
    )
    return y


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        a, b = x.shape[:2]
        rot = cos.shape[-1]
        cos_t = cos.expand(a, b, 1, rot).reshape(a * b, rot).contiguous()
        sin_t = sin.expand(a, b, 1, rot).reshape(a * b, rot).contiguous()
        ctx.save_for_backward(cos_t, sin_t)
        return _launch(x, cos_t, sin_t, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos_t, sin_t = ctx.saved_tensors
        return _launch(grad, cos_t, sin_t, backward=True), None, None
