"""Triton RMSNorm forward / backward (imported lazily by rmsnorm.py).

One program per row in the forward (the whole row in registers: H up to a few tens of
thousands); the forward saves 1/rms per row so the backward never recomputes the reduction.
Backward: dx = rstd * (w*dy - x_hat * mean(x_hat * w*dy)), x_hat = x * rstd; the weight
gradient sum(dy * x_hat) over rows is accumulated per program in fp32 over a strided set of
rows, then the few partial rows are summed in torch (no atomics: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_PARTIALS = 256  # programs in the backward; each owns rows pid, pid + G, pid + 2G, ...


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * H + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, M, H, G, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: M * H may exceed 2**31
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, tl.cdiv(M - pid, G)):
        row = pid + i * G
        offs = row * H + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        wdy = w * dy
        dx = rstd * (wdy - x_hat * (tl.sum(x_hat * wdy, 0) / H))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_partial_ptr + pid * H + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, h = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(h)
        _fwd_kernel[(m,)](x2, weight.contiguous(), y, rstd, h, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.block = block
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        m, h = x2.shape
        dy2 = dy.reshape(m, h).contiguous()
        dx = torch.empty_like(x2)
        g = max(1, min(m, _MAX_PARTIALS))
        dw_partial = torch.empty(g, h, dtype=torch.float32, device=x2.device)
        _bwd_kernel[(g,)](dy2, x2, weight.contiguous(), rstd, dx, dw_partial, m, h, g, BLOCK=ctx.block)
        dw = dw_partial.sum(0).to(weight.dtype)
        return dx.view(dy.shape), dw, None
