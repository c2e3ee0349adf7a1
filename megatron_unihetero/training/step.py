"""One training (or evaluation) step over micro-batches, through megatron-core's schedules.

Loss normalisation (DESIGN.md section 2): each objective k contributes
``w_k * (sum of its per-token losses over the whole step) / (its global token count)``, where
the count spans all micro-batches and all data-parallel ranks. The counts are known before the
step (they depend only on token ids), so each micro-batch's loss is scaled by the global count
up front; megatron's schedule then divides by the number of micro-batches and DDP averages over
DP ranks, which :func:`forward_backward` undoes. The result: the same loss and gradients for any
micro-batch split and any DP size.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping

import torch
import torch.distributed as dist

from megatron_unihetero import platform
from megatron_unihetero.models.heads import text_label_mask
from megatron_unihetero.models.interleaver import semantic_positions

OBJECTIVES = ("text", "semantic", "pixel")


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


def forward_backward(
    model,  # a pipeline stage, or this rank's list of virtual-stage chunks
    batches: List[Dict[str, torch.Tensor]],
    *,
    weights: Mapping[str, float],
    image_token_id: int,
    forward_only: bool = False,
    dp_group=None,
    grads_averaged_over_dp: bool = True,
) -> Dict[str, float]:
    """Run one step's micro-batches (forward and, unless ``forward_only``, backward).

    Returns, on the last pipeline stage, each objective's mean loss over the step and the
    weighted total (``loss``); other stages return {}. Gradients accumulate in ``.grad`` (or
    megatron DDP's buffers) for the optimizer.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    num_micro = len(batches)
    counts = global_counts(batches, image_token_id, dp_group)
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    # Undo the schedule's 1/num_microbatches and, when DDP averages gradients, its 1/dp_size.
    scale = num_micro * (dp_size if grads_averaged_over_dp else 1)
    device = next(chunks[0].parameters()).device

    def loss_func(outputs):
        total = torch.zeros((), device=device)
        report = {}
        for name, (loss_sum, _) in outputs.items():
            denom = max(counts.get(name, 0), 1)
            weight = weights.get(name, 1.0 if name == "text" else 0.0)
            if name != "text" and weight == 0.0:
                continue
            total = total + weight * loss_sum / denom
            report[name] = loss_sum.detach() / denom
        return total * scale, report

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                 if k in _MODEL_INPUTS}
        return stage_model(**batch), loss_func

    first = batches[0]
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        # Interleaved 1F1B runs each micro-batch through every chunk: one iterator per chunk.
        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
        model=chunks,
        num_microbatches=num_micro,
        seq_length=first["tokens"].shape[1],
        micro_batch_size=first["tokens"].shape[0],
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return {}
    summary: Dict[str, float] = {}
    for report in reports:
        for name, value in report.items():
            summary[name] = summary.get(name, 0.0) + float(value)
    # Each report holds sum_mb / global_count, so their sum over micro-batches is the step mean;
    # across DP ranks the caller all-reduces (sum) for logging.
    summary["loss"] = sum(weights.get(k, 1.0 if k == "text" else 0.0) * v
                          for k, v in summary.items())
    summary.update({f"count_{k}": float(v) for k, v in counts.items()})
    return summary


_MODEL_INPUTS = ("tokens", "position_ids", "segment_ids", "labels", "images", "image_features",
                 "image_latents")
