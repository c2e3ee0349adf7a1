"""Triton kernel: per-token regression loss and its gradient wrt the prediction, in one pass.

One program per token row; the whole feature row (D up to a few thousand) sits in registers, so
the cosine loss gets its norms and dot product from a single read of pred and target. Math and
the eps clamping mirror regression.per_token_loss (the loss) and regression.loss_grad (its
gradient) exactly: those functions are the spec.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOSS_CODES = {"mse": 0, "smooth_l1": 1, "cosine": 2}


@triton.jit
def _loss_grad_kernel(pred_ptr, target_ptr, loss_ptr, grad_ptr, D, eps,
                      LOSS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    p = tl.load(pred_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    diff = p - t
    if LOSS == 0:  # mse: mean (p - t)^2
        loss = tl.sum(diff * diff, 0) / D
        grad = diff * (2.0 / D)
    elif LOSS == 1:  # smooth_l1, beta = 1
        absd = tl.abs(diff)
        quad = absd < 1.0
        loss = tl.sum(tl.where(mask, tl.where(quad, 0.5 * diff * diff, absd - 0.5), 0.0), 0) / D
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        grad = tl.where(quad, diff, sign) / D
    else:  # cosine: 1 - <p,t> / (max(|p|,eps) max(|t|,eps))
        p_raw = tl.sqrt(tl.sum(p * p, 0))
        p_norm = tl.maximum(p_raw, eps)
        t_norm = tl.maximum(tl.sqrt(tl.sum(t * t, 0)), eps)
        cos = tl.sum(p * t, 0) / (p_norm * t_norm)
        loss = 1.0 - cos
        p_term = tl.where(p_raw > eps, cos / (p_norm * p_norm), 0.0)
        grad = -(t / (p_norm * t_norm) - p_term * p)
    tl.store(loss_ptr + row, loss)
    tl.store(grad_ptr + row * D + cols, grad, mask=mask)


def loss_and_grad(pred: torch.Tensor, target: torch.Tensor, loss: str):
    """Per-token loss [N] and d(sum loss)/d(pred) [N, D], both fp32."""
    from megatron_unihetero.kernels.regression import COSINE_EPS

    pred, target = pred.contiguous(), target.contiguous()
    n, d = pred.shape
    per_token = torch.empty(n, dtype=torch.float32, device=pred.device)
    grad = torch.empty(n, d, dtype=torch.float32, device=pred.device)
    if n:
        _loss_grad_kernel[(n,)](pred, target, per_token, grad, d, COSINE_EPS,
                                LOSS=_LOSS_CODES[loss], BLOCK=triton.next_power_of_2(d))
    return per_token, grad
