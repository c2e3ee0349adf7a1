"""The training loss of both engines: the objectives' weighted total, normalised by global counts.

Each objective k (text, semantic, pixel) contributes

    w_k * (sum of its per-token losses over the whole step) / (its global token count)

where the count spans every micro-batch of the step on every data-parallel rank. The counts
depend on token ids alone, so they are known before the step runs (:func:`global_counts`), and
each micro-batch's loss is divided by them up front (:func:`assemble_loss`): the step's loss is
then the plain SUM of the micro-batch losses over micro-batches and DP ranks, and so is its
gradient. A micro-batch holding more (or fewer) of an objective's tokens weighs accordingly,
so the loss and the gradients are the same for any micro-batch split and any DP size, and each
objective is a mean over its own tokens whatever the others count.

The engines must therefore sum, never average: megatron-core's schedule with
``calculate_per_token_loss`` does not divide by the number of micro-batches, and its DDP with
``average_in_collective=False`` sums gradients over DP; DeepSpeed averages gradients over DP,
so its engine multiplies the backward by the DP size.

Weights: text defaults to 1, the others to 0. An objective other than text whose weight is 0
is left out of the total and the report (its head may still be built, e.g. during a ramp).

Diagnostics: the model's ``ModelLosses.stats`` (eval/diagnostics.py) are sufficient
statistics, not objectives. They never enter the total; the report carries them detached and
:func:`summarize` sums them over the micro-batches (tensors), so that after the DP sum the
step-level figures (R², baselines) are exact for any split.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Tuple

import torch
import torch.distributed as dist

from megatron_unihetero import platform
from megatron_unihetero.eval import diagnostics
from megatron_unihetero.models.heads import ModelLosses, text_label_mask
from megatron_unihetero.models.interleaver import semantic_positions
from megatron_unihetero.training.results import StepResult

OBJECTIVES = ("text", "semantic", "pixel")


def objective_weight(weights: Mapping[str, float], name: str) -> float:
    return weights.get(name, 1.0 if name == "text" else 0.0)


def count_targets(batch: Mapping[str, torch.Tensor], image_token_id: int) -> Dict[str, int]:
    """Tokens each objective trains on in a micro-batch (from token ids alone)."""
    labels, tokens = batch["labels"], batch["tokens"]
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        segment_ids = torch.zeros_like(tokens)
    valid = segment_ids >= 0
    text = (text_label_mask(labels, image_token_id) & valid).sum()
    semantic = semantic_positions((tokens == image_token_id) & valid, segment_ids).sum()
    # The pixel objective trains on the same positions: each semantic position has the next
    # visual token's latent as its target.
    return {"text": int(text), "semantic": int(semantic), "pixel": int(semantic)}


def global_counts(batches: Iterable[Mapping[str, torch.Tensor]], image_token_id: int,
                  dp_group=None) -> Dict[str, int]:
    """Each objective's target tokens in the whole step: these micro-batches, summed over DP."""
    totals = {k: 0 for k in OBJECTIVES}
    for batch in batches:
        for key, value in count_targets(batch, image_token_id).items():
            totals[key] += value
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        # On the collective's device: NCCL reduces CUDA tensors only.
        packed = torch.tensor([totals[k] for k in OBJECTIVES], dtype=torch.long, device=platform.device())
        dist.all_reduce(packed, group=dp_group)
        totals = dict(zip(OBJECTIVES, packed.tolist()))
    return totals


@dataclasses.dataclass
class LossReport:
    """One micro-batch's detached figures: each objective's share of the step mean
    (``loss_sum / global count``) and the diagnostics' statistics."""

    shares: Dict[str, torch.Tensor]
    stats: Dict[str, torch.Tensor]


def assemble_loss(outputs: ModelLosses, counts: Mapping[str, int],
                  weights: Mapping[str, float]) -> Tuple[torch.Tensor, LossReport]:
    """One micro-batch's share of the step loss.

    ``outputs``: the model's :class:`ModelLosses` for this micro-batch; ``counts``: the step's
    global token counts (:func:`global_counts`). Returns the total
    ``sum_k w_k * loss_sum_k / max(count_k, 1)`` (the count is 0 when no micro-batch of the step
    has the objective's tokens; its loss sum is then 0 too) and the report: each objective's
    detached ``loss_sum_k / count_k``, whose sum over the step's micro-batches and DP ranks is the
    objective's mean loss, and the statistics, detached.
    """
    device = next(iter(outputs.objectives.values()))[0].device
    total = torch.zeros((), device=device)
    shares: Dict[str, torch.Tensor] = {}
    for name, (loss_sum, _) in outputs.objectives.items():
        weight = objective_weight(weights, name)
        if name != "text" and weight == 0.0:
            continue
        share = loss_sum / max(counts.get(name, 0), 1)
        total = total + weight * share
        shares[name] = share.detach()
    return total, LossReport(shares, {k: v.detach() for k, v in outputs.stats.items()})


def summarize(reports: List[LossReport], counts: Mapping[str, int],
              weights: Mapping[str, float]) -> StepResult:
    """The step's result on this rank from its micro-batches' reports.

    ``losses``: each objective's shares summed over the micro-batches, and ``loss`` their
    weighted total; ``counts``: the global counts. The shares are this rank's part of the
    DP-global means: the trainer sums them over DP (training/results.py). Diagnostic
    statistics become ``stats[name]``, summed float64 tensors reduced over DP the same way; the
    figures (R², ...) come from them after that.
    """
    shares: Dict[str, float] = {}
    stats: Dict[str, torch.Tensor] = {}
    for report in reports:
        for name, value in report.shares.items():
            shares[name] = shares.get(name, 0.0) + float(value)
        for name, value in report.stats.items():
            stats[name] = diagnostics.add_stats(stats.get(name), value)
    shares["loss"] = sum(objective_weight(weights, k) * v for k, v in shares.items())
    return StepResult(losses=shares, counts={k: int(v) for k, v in counts.items()}, stats=stats)
