"""Regression head + loss for semantic generation, with a fused path that never keeps the
prediction.

    loss_sum = fused_regression_loss(head, hidden, target, loss="mse")

``head`` is the regression head module: ``head(hidden)`` is the prediction [N, D],
``head.features(hidden)`` everything before its last linear layer (identity for a linear head)
and ``head.proj`` that last ``nn.Linear`` (so ``head(h) == head.proj(head.features(h))``).
hidden [N, H]; target [N, D] is a constant (stop-gradient: it never receives a gradient).

This module is the one place that validates the loss kind (``LOSSES``) and defines the
per-token losses (:func:`per_token_loss`):
- "mse":       mean over the D features of (pred - target)^2
- "smooth_l1": mean over the D features of smooth-L1 with beta = 1.0
- "cosine":    1 - cos(pred, target), with cos = <p, t> / (max(|p|, eps) * max(|t|, eps)),
               eps = 1e-8 (the clamping is the known approximation near zero vectors; it
               matches torch.nn.functional.cosine_similarity)
The result is the SUM over tokens as an fp32 scalar: normalise by the global token count of
the step upstream, never here.

Fused path: one pass over (head.features(hidden), head.proj.weight, head.proj.bias) computes the
prediction, the loss and the gradient of the loss with respect to the prediction, contracts it
at once into the features / weight / bias gradients and keeps only those for the backward (which
scales them by the incoming gradient). The [N, D] prediction and its gradient are never kept
alive across forward and backward.

Statistics of the prediction: ``prediction_stats=fn`` evaluates ``fn(prediction, target)``
(detached, no grad) on the prediction the pass computes anyway and returns it beside the loss,
``(loss_sum, stats)``. The semantic diagnostics (eval/diagnostics.py) read it, so no second
pass of the head exists (one would run the head's weights outside the pass that owns them,
which a parameter-partitioning engine such as ZeRO-3 releases in between).

impl: "reference" (per_token_loss of head(hidden) under plain autograd), "fused" (the one-pass
path with torch elementwise math; the CPU path of "auto"), "triton" (the one-pass path, loss and
d(loss)/d(pred) in one Triton kernel per row; CUDA or TRITON_INTERPRET=1), "auto" (triton on
CUDA, else fused; MEGATRON_UNIHETERO_KERNELS=reference forces the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import Callable, Optional, Tuple, Union

from megatron_unihetero.kernels._dispatch import REFERENCE, require, resolve_impl, triton_usable

# fn(prediction [N, D], target [N, D]) -> a statistics tensor (see fused_regression_loss)
PredictionStats = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_NO_STATS = torch.empty(0)

LOSSES = ("mse", "smooth_l1", "cosine")
COSINE_EPS = 1e-8


def check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown regression loss {loss!r}; expected one of {', '.join(LOSSES)}")


def per_token_loss(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token regression loss [N] in fp32 (the definition; see the module docstring).
    ``target`` is detached here: a stop-gradient target."""
    check_loss(loss)
    pred, target = pred.float(), target.detach().float()
    if loss == "mse":
        return (pred - target).pow(2).mean(dim=-1)
    if loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).mean(dim=-1)
    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=COSINE_EPS)


def loss_grad(pred: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """d(sum of per_token_loss)/d(pred) [N, D] in fp32, in closed form (the fused path's
    backward, and the spec the Triton kernel mirrors)."""
    pred, target = pred.float(), target.float()
    diff = pred - target
    if loss == "mse":
        return diff * (2.0 / pred.shape[-1])
    if loss == "smooth_l1":
        return torch.where(diff.abs() < 1.0, diff, diff.sign()) / pred.shape[-1]
    # cosine: loss = 1 - <p,t> / (P T), with P = max(|p|, eps), T = max(|t|, eps);
    # d cos / d p = t / (P T) - cos * p / P^2 (the second term vanishes where |p| < eps).
    p_raw = pred.norm(dim=-1)
    p_norm = p_raw.clamp_min(COSINE_EPS)
    t_norm = target.norm(dim=-1).clamp_min(COSINE_EPS)
    cos = (pred * target).sum(-1) / (p_norm * t_norm)
    p_term = torch.where(p_raw > COSINE_EPS, cos / p_norm.pow(2), torch.zeros_like(cos))
    return -(target / (p_norm * t_norm)[:, None] - p_term[:, None] * pred)


class _FusedRegression(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, weight, bias, target, loss, use_triton, stats_fn):
        pred = F.linear(features, weight, bias)
        stats = stats_fn(pred, target) if stats_fn is not None else _NO_STATS.to(pred.device)
        ctx.mark_non_differentiable(stats)
        if use_triton:
            from megatron_unihetero.kernels import _triton_regression as tk

            per_token, grad_pred = tk.loss_and_grad(pred, target, loss)
        else:
            per_token, grad_pred = per_token_loss(pred, target, loss), loss_grad(pred, target, loss)
        del pred
        grad_pred = grad_pred.to(features.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_features = grad_pred @ weight if need_h else None
        grad_weight = grad_pred.t() @ features if need_w else None
        grad_bias = grad_pred.float().sum(0).to(bias.dtype) if need_b else None
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        return per_token.sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], grads[2], None, None, None, None


def _reference(head: nn.Module, hidden, target, loss, stats_fn):
    pred = head(hidden)
    with torch.no_grad():
        stats = stats_fn(pred.detach(), target) if stats_fn is not None else None
    return per_token_loss(pred, target, loss).sum(), stats


def _one_pass(head: nn.Module, hidden, target, loss, use_triton, stats_fn):
    features = head.features(hidden)
    loss_sum, stats = _FusedRegression.apply(features, head.proj.weight, head.proj.bias,
                                             target.to(features.dtype), loss, use_triton, stats_fn)
    return loss_sum, stats if stats_fn is not None else None


def _fused(head: nn.Module, hidden, target, loss, stats_fn):
    return _one_pass(head, hidden, target, loss, False, stats_fn)


def _triton(head: nn.Module, hidden, target, loss, stats_fn):
    require(triton_usable(hidden.device), "fused_regression_loss", "triton",
            "needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    return _one_pass(head, hidden, target, loss, True, stats_fn)


# impl name -> implementation, looked up at call time (tests swap entries to see which ran).
_IMPLS = {REFERENCE: _reference, "fused": _fused, "triton": _triton}
IMPLS = tuple(_IMPLS)


def fused_regression_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    target: torch.Tensor,
    *,
    loss: str = "mse",
    impl: str = "auto",
    prediction_stats: Optional[PredictionStats] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Sum over tokens of the regression loss of ``head(hidden)`` against ``target``; with
    ``prediction_stats``, ``(loss_sum, prediction_stats(prediction, target))`` from the same
    pass (the statistics detached)."""
    check_loss(loss)
    out_features = head.proj.weight.shape[0]
    if hidden.dim() != 2 or target.shape != (hidden.shape[0], out_features):
        raise ValueError(f"expected hidden [N, H] and target [N, {out_features}] (the head's "
                         f"output dim); got {tuple(hidden.shape)}, {tuple(target.shape)}")
    order = (["triton"] if hidden.is_cuda and triton_usable(hidden.device) else []) + ["fused"]
    impl = resolve_impl("fused_regression_loss", impl, IMPLS, order)
    loss_sum, stats = _IMPLS[impl](head, hidden, target.detach(), loss, prediction_stats)
    return loss_sum if prediction_stats is None else (loss_sum, stats)
