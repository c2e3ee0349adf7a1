"""Fused regression head + loss for semantic generation (DESIGN.md section 2, L_sem).

    loss_sum = fused_regression_loss(hidden, weight, bias, target, loss="mse")

prediction = hidden @ weight.T + bias, with hidden [N, H], weight [D, H], bias [D] or None and
target [N, D] (a constant: stop-gradient, it never receives a gradient). Per-token losses:
- "mse":       mean over the D features of (pred - target)^2
- "smooth_l1": mean over the D features of smooth-L1 with beta = 1.0
- "cosine":    1 - cos(pred, target), with cos = <p, t> / (max(|p|, eps) * max(|t|, eps)),
               eps = 1e-8 (the clamping is the known approximation near zero vectors; it
               matches torch.nn.functional.cosine_similarity)
The result is the SUM over tokens as an fp32 scalar (normalise by the global count upstream).

Fused path: one pass computes the prediction, the loss and the gradient of the loss with respect
to the prediction, contracts it at once into the hidden / weight / bias gradients and keeps only
those for the backward (which scales them by the incoming gradient). The [N, D] prediction and
its gradient are never kept alive across forward and backward.

impl: "torch" (plain autograd: the reference), "fused" (the one-pass path with torch elementwise
math; the CPU fallback), "triton" (the one-pass path, loss and d(loss)/d(pred) in one Triton
kernel per row; CUDA or TRITON_INTERPRET=1), "auto" (triton on CUDA, else fused;
MEGATRON_UNIHETERO_KERNELS=torch forces torch).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_unihetero.kernels._dispatch import require, resolve_impl, triton_usable

IMPLS = ("torch", "fused", "triton")
LOSSES = ("mse", "smooth_l1", "cosine")
COSINE_EPS = 1e-8


def _reference(hidden, weight, bias, target, loss):
    pred = F.linear(hidden, weight, bias).float()
    target = target.detach().float()
    if loss == "mse":
        per_token = (pred - target).pow(2).mean(dim=-1)
    elif loss == "smooth_l1":
        per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(dim=-1)
    else:
        per_token = 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=COSINE_EPS)
    return per_token.sum()


def loss_and_grad_torch(pred: torch.Tensor, target: torch.Tensor, loss: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [N] and d(sum loss)/d(pred) [N, D], both fp32, in closed form."""
    pred, target = pred.float(), target.float()
    d = pred.shape[-1]
    diff = pred - target
    if loss == "mse":
        return diff.pow(2).mean(-1), diff * (2.0 / d)
    if loss == "smooth_l1":
        absd = diff.abs()
        quad = absd < 1.0
        per_elem = torch.where(quad, 0.5 * diff * diff, absd - 0.5)
        grad = torch.where(quad, diff, diff.sign()) / d
        return per_elem.mean(-1), grad
    # cosine: loss = 1 - <p,t> / (P T), with P = max(|p|, eps), T = max(|t|, eps).
    p_norm = pred.norm(dim=-1).clamp_min(COSINE_EPS)
    t_norm = target.norm(dim=-1).clamp_min(COSINE_EPS)
    dot = (pred * target).sum(-1)
    cos = dot / (p_norm * t_norm)
    # d cos / d p = t / (P T) - cos * p / P^2 (the second term vanishes where |p| < eps).
    p_term = torch.where(pred.norm(dim=-1) > COSINE_EPS, cos / p_norm.pow(2), torch.zeros_like(cos))
    grad = -(target / (p_norm * t_norm)[:, None] - p_term[:, None] * pred)
    return 1.0 - cos, grad


class _FusedRegression(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, loss, use_triton):
        pred = F.linear(hidden, weight, bias)
        if use_triton:
            from megatron_unihetero.kernels import _triton_regression as tk

            per_token, grad_pred = tk.loss_and_grad(pred, target, loss)
        else:
            per_token, grad_pred = loss_and_grad_torch(pred, target, loss)
        del pred
        grad_pred = grad_pred.to(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = grad_pred @ weight if need_h else None
        grad_weight = grad_pred.t() @ hidden if need_w else None
        grad_bias = grad_pred.float().sum(0).to(bias.dtype) if need_b else None
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return per_token.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None


def fused_regression_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    *,
    loss: str = "mse",
    impl: str = "auto",
) -> torch.Tensor:
    """Sum over tokens of the regression loss of ``hidden @ weight.T + bias`` against ``target``."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if hidden.dim() != 2 or target.shape != (hidden.shape[0], weight.shape[0]):
        raise ValueError(
            f"expected hidden [N, H], weight [D, H], target [N, D]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(target.shape)}"
        )
    order = (["triton"] if hidden.is_cuda and triton_usable(hidden.device) else []) + ["fused", "torch"]
    impl = resolve_impl("fused_regression_loss", impl, IMPLS, order)
    if impl == "torch":
        return _reference(hidden, weight, bias, target, loss)
    if impl == "triton":
        require(triton_usable(hidden.device), "fused_regression_loss", impl,
                "needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    return _FusedRegression.apply(hidden, weight, bias, target.detach(), loss, impl == "triton")
