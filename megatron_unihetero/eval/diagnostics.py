"""Diagnostics of the generation heads that a predictor of the mean cannot fool.

A regression loss alone says little: a semantic head that always outputs the mean visual
embedding reaches an MSE equal to the targets' own per-dimension variance, which is small when
the embeddings are small. What these diagnostics report instead, each next to the same figure
for a *baseline* that knows nothing but the targets' statistics:

- semantic: ``semantic_r2`` = 1 - SSE / SST, with SST about the mean target of the step (so a
  mean predictor scores 0 and an exact one 1); the mean cosine of prediction and target and of
  the mean target and target (``semantic_baseline_cos``); the MSE per dimension next to the
  targets' variance per dimension (``semantic_baseline_mse``, the mean predictor's MSE); the
  spread of the predictions (``semantic_pred_var``: ~0 means the head outputs a constant);
  the mean norms of targets and predictions.
- pixel: the diffusion loss next to ``pixel_baseline``, the loss of the best denoiser that does
  not see the condition and knows only the mean and per-channel variance of the latents (the
  Gaussian-optimal estimate of the noise, or v, from x_t and t), averaged over the training's
  timestep distribution; ``pixel_r2`` = 1 - loss / baseline; and ``pixel_baseline_zero``, the
  loss of predicting zero (for epsilon prediction: 1).
- embeddings: mean L2 norm of the visual and of the text input embeddings (``embed_norm_*``):
  a collapse of the visual embeddings (the semantic target) shows here first.

Exact at the step level under any micro-batch or data-parallel split: the model's last stage
emits *sufficient statistics* (sums: count, SSE, sum of targets, sum of squared targets, ...)
by name in ``ModelLosses.stats`` (models/heads.py). training/losses.py carries them (detached,
never in the loss) into the step's ``StepResult.stats`` as summed tensors, the trainer reduces
them over DP with the losses (a sum, training/results.py), and :func:`figures` turns the
step's sums into the figures.
Nothing here takes part in the loss or its gradients: every function runs under no_grad on
detached tensors.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

_SEMANTIC_HEAD = 7  # n, sse, sum_sq_t, sum_sq_p, cos_sum, norm_t_sum, norm_p_sum
_PIXEL_HEAD = 6  # n, loss_sum, C * n, T * n, v_flag * n, sum_sq_x0
_EMBED = 6  # n_vis, sum |v|, sum |v|^2, n_text, sum |e|, sum |e|^2


# -- sufficient statistics (per micro-batch; sums, float64) -----------------------------------
@torch.no_grad()
def regression_stats(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sums over the rows of ``prediction`` / ``target`` [N, D] from which :func:`finish`
    computes R², cosines and variances exactly for any union of row sets (float64, [7 + 3D])."""
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} "
                         "must both be [N, D]")
    p, t = prediction.detach().double(), target.detach().double()
    n = p.shape[0]
    t_norm, p_norm = t.norm(dim=-1), p.norm(dim=-1)
    cos = F.cosine_similarity(p, t, dim=-1, eps=1e-12) if n else p.new_zeros(0)
    unit_t = t / t_norm.clamp_min(1e-12)[:, None]
    head = torch.stack([
        p.new_tensor(float(n)), (p - t).pow(2).sum(), t.pow(2).sum(), p.pow(2).sum(), cos.sum(),
        t_norm.sum(), p_norm.sum(),
    ])
    return torch.cat([head, t.sum(0), p.sum(0), unit_t.sum(0)])


def empty_regression_stats(dim: int, device=None) -> torch.Tensor:
    """The statistics of no rows (every rank must emit the same keys and sizes: they are
    all-reduced)."""
    return torch.zeros(_SEMANTIC_HEAD + 3 * dim, dtype=torch.float64, device=device)


@torch.no_grad()
def pixel_stats(loss_sum: torch.Tensor, latents: torch.Tensor, alphas_cumprod: torch.Tensor,
                prediction: str) -> torch.Tensor:
    """Sums for the pixel loss and its condition-free baseline (float64, [6 + 2C + T]).

    ``loss_sum``: the head's summed per-token loss over the rows of ``latents`` [N, C] (the
    clean latent targets); ``alphas_cumprod`` [T]: the training noise schedule (timesteps drawn
    uniformly from it); ``prediction``: epsilon | v. The schedule rides along multiplied by N so
    that the step-level sums alone determine the baseline.
    """
    if prediction not in ("epsilon", "v"):
        raise ValueError(f"prediction must be epsilon or v; got {prediction!r}")
    x0 = latents.detach().double()
    n, c = x0.shape
    abar = alphas_cumprod.detach().double().to(x0.device)
    head = torch.stack([
        x0.new_tensor(float(n)), loss_sum.detach().double().to(x0.device).reshape(()),
        x0.new_tensor(float(c * n)), x0.new_tensor(float(abar.numel() * n)),
        x0.new_tensor(float(n if prediction == "v" else 0)), x0.pow(2).sum(),
    ])
    return torch.cat([head, x0.sum(0), x0.pow(2).sum(0), abar * n])


def empty_pixel_stats(channels: int, num_timesteps: int, device=None) -> torch.Tensor:
    return torch.zeros(_PIXEL_HEAD + 2 * channels + num_timesteps, dtype=torch.float64, device=device)


@torch.no_grad()
def embedding_stats(embeddings_bsh: torch.Tensor, visual_mask: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
    """Norm sums of the LLM's input embeddings [b, s, h]: at ``visual_mask`` (visual) and at the
    other ``valid`` positions (text); float64 [6]."""
    norms = embeddings_bsh.detach().double().norm(dim=-1)
    vis, text = norms[visual_mask], norms[valid & ~visual_mask]
    return torch.stack([
        norms.new_tensor(float(vis.numel())), vis.sum(), vis.pow(2).sum(),
        norms.new_tensor(float(text.numel())), text.sum(), text.pow(2).sum(),
    ])


# -- the figures ---------------------------------------------------------------------------
def _split_regression(stats: torch.Tensor):
    dim = (stats.numel() - _SEMANTIC_HEAD) // 3
    if stats.numel() != _SEMANTIC_HEAD + 3 * dim:
        raise ValueError(f"regression statistics of length {stats.numel()} are malformed")
    head = stats[:_SEMANTIC_HEAD].tolist()
    body = stats[_SEMANTIC_HEAD:].reshape(3, dim)
    return head, body[0], body[1], body[2], dim


def regression_figures(stats: torch.Tensor, prefix: str = "semantic") -> Dict[str, float]:
    """R², cosines, MSE and variances from summed :func:`regression_stats`; {} for no rows."""
    stats = stats.detach().double().cpu()
    (n, sse, sum_sq_t, sum_sq_p, cos_sum, norm_t, norm_p), sum_t, sum_p, sum_unit, dim = \
        _split_regression(stats)
    if n <= 0:
        return {}
    sst = max(sum_sq_t - float(sum_t.pow(2).sum()) / n, 0.0)
    spread_p = max(sum_sq_p - float(sum_p.pow(2).sum()) / n, 0.0)
    mean_t = sum_t / n
    mean_norm = float(mean_t.norm())
    baseline_cos = float((mean_t / mean_norm) @ sum_unit) / n if mean_norm > 0 else 0.0
    return {
        f"{prefix}_r2": 1.0 - sse / sst if sst > 0 else float("nan"),
        f"{prefix}_mse": sse / (n * dim),
        f"{prefix}_baseline_mse": sst / (n * dim),  # = the targets' variance per dimension
        f"{prefix}_cos": cos_sum / n,
        f"{prefix}_baseline_cos": baseline_cos,
        f"{prefix}_pred_var": spread_p / (n * dim),
        f"{prefix}_target_norm": norm_t / n,
        f"{prefix}_pred_norm": norm_p / n,
    }


def gaussian_denoiser_mse(abar: torch.Tensor, variance: torch.Tensor, prediction: str) -> torch.Tensor:
    """Per (timestep, channel) MSE of the best estimate of the noise (or v) from x_t alone when
    x0 ~ N(mu, variance) per channel: x_t = a x0 + b eps with a² = abar, b² = 1 - abar.

    eps: a² s² / (a² s² + b²); v = a eps - b x0: (a² + b² s²) - (a b (1 - s²))² / (a² s² + b²).
    """
    a2, b2 = abar[:, None], (1.0 - abar)[:, None]
    s2 = variance[None, :]
    var_xt = (a2 * s2 + b2).clamp_min(1e-30)
    if prediction == "epsilon":
        return a2 * s2 / var_xt
    return (a2 + b2 * s2) - a2 * b2 * (1.0 - s2).pow(2) / var_xt


def pixel_figures(stats: torch.Tensor) -> Dict[str, float]:
    stats = stats.detach().double().cpu()
    n = float(stats[0])
    if n <= 0:
        return {}
    loss_sum, channels, steps, v_count, sum_sq = (float(x) for x in stats[1:_PIXEL_HEAD])
    c, t = int(round(channels / n)), int(round(steps / n))
    if stats.numel() != _PIXEL_HEAD + 2 * c + t:
        raise ValueError(f"pixel statistics of length {stats.numel()} are malformed")
    sum_x0 = stats[_PIXEL_HEAD:_PIXEL_HEAD + c]
    sum_x0_sq = stats[_PIXEL_HEAD + c:_PIXEL_HEAD + 2 * c]
    abar = stats[_PIXEL_HEAD + 2 * c:] / n
    prediction = "v" if v_count > 0.5 * n else "epsilon"
    variance = (sum_x0_sq / n - (sum_x0 / n).pow(2)).clamp_min(0.0)
    baseline = float(gaussian_denoiser_mse(abar, variance, prediction).mean())
    if prediction == "epsilon":
        zero = 1.0
    else:  # E[v²] = a² + b² E[x0²], per channel, averaged over t
        zero = float(abar.mean() + (1.0 - abar.mean()) * (sum_sq / (n * c)))
    loss = loss_sum / n
    return {"pixel_loss_mean": loss, "pixel_baseline": baseline, "pixel_baseline_zero": zero,
            "pixel_r2": 1.0 - loss / baseline if baseline > 0 else float("nan")}


def embedding_figures(stats: torch.Tensor) -> Dict[str, float]:
    n_vis, sum_vis, _, n_text, sum_text, _ = stats.detach().double().cpu().tolist()
    out = {}
    if n_vis > 0:
        out["embed_norm_visual"] = sum_vis / n_vis
    if n_text > 0:
        out["embed_norm_text"] = sum_text / n_text
    return out


_FIGURES = {"semantic": regression_figures, "pixel": pixel_figures, "embedding": embedding_figures}


def figures(name: str, stats, prefix: str = "") -> Dict[str, float]:
    """The figures (named ``<prefix><figure>``) of statistics ``name`` summed over a step."""
    compute = _FIGURES.get(name)
    if compute is None:
        raise KeyError(f"unknown statistics {name!r}; known: {sorted(_FIGURES)}")
    return {prefix + k: v for k, v in compute(torch.as_tensor(stats)).items()}


def add_stats(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """Sum two statistics vectors (None: nothing yet)."""
    value = torch.as_tensor(value, dtype=torch.float64)
    return value.clone() if total is None else total + value.to(total.device)
