"""One training (or evaluation) step over micro-batches, through megatron-core's schedules.

The loss is assembled by :mod:`~megatron_unihetero.training.losses`: each micro-batch's loss
arrives already divided by the step's global token counts, so the step loss is the sum of the
micro-batch losses. The model's TransformerConfig sets ``calculate_per_token_loss`` (the
schedule adds the micro-batch losses up without dividing by their number) and the engine's DDP
sums gradients over data-parallel ranks (``average_in_collective=False``): no compensating
factor here, and the same loss and gradients for any micro-batch split and any DP size.
"""

from __future__ import annotations

from typing import Dict, List, Mapping

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config

from megatron_unihetero.training import losses
from megatron_unihetero.training.results import StepResult

MODEL_INPUTS = ("tokens", "position_ids", "segment_ids", "labels", "images", "image_features",
                "image_latents")


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite, with one device sync (not one per
    tensor): this rank's answer, the callers all-reduce it."""
    tensors = list(tensors)
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def model_inputs(batch: Mapping, device: torch.device) -> Dict:
    """The model's keyword arguments from a collated micro-batch, on ``device``."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k in MODEL_INPUTS}


def forward_backward(
    model,  # a pipeline stage, or this rank's list of virtual-stage chunks
    batches: List[Dict[str, torch.Tensor]],
    *,
    weights: Mapping[str, float],
    image_token_id: int,
    forward_only: bool = False,
    dp_group=None,
) -> StepResult:
    """Run one step's micro-batches (forward and, unless ``forward_only``, backward).

    Returns, on the last pipeline stage, this rank's result (:func:`losses.summarize`: each
    objective's share of the step mean, the weighted total ``loss``, the global counts and the
    diagnostics' statistics); other stages return an empty one. Gradients accumulate in ``.grad`` (or megatron DDP's buffers) for
    the optimizer.
    """
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not get_model_config(chunks[0]).calculate_per_token_loss:
        # Without it the schedule would divide each (already normalised) loss by its token
        # count and by the number of micro-batches.
        raise ValueError("forward_backward needs the model's TransformerConfig with "
                         "calculate_per_token_loss=True (models/llm.py transformer_config)")
    counts = losses.global_counts(batches, image_token_id, dp_group)
    device = next(chunks[0].parameters()).device

    def loss_func(outputs):
        total, report = losses.assemble_loss(outputs, counts, weights)
        # megatron only adds the num_tokens up, for finalize_model_grads' division of the
        # gradients by their sum, which this codebase does not use (the loss is normalised
        # per objective already); this micro-batch's text tokens are what it would count.
        num_tokens = outputs.objectives["text"][1].detach().to(torch.int)
        return total, num_tokens, report

    def forward_step(data_iterator, stage_model):
        return stage_model(**model_inputs(next(data_iterator), device)), loss_func

    first = batches[0]
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        # Interleaved 1F1B runs each micro-batch through every chunk: one iterator per chunk.
        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=first["tokens"].shape[1],
        micro_batch_size=first["tokens"].shape[0],
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return StepResult(counts=counts)
    return losses.summarize(reports, counts, weights)
