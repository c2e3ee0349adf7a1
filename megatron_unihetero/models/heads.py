"""Output heads and their losses: the LM head (text) and the embedding-regression head.

Every loss is returned as (sum over contributing tokens, number of those tokens) so the caller
can normalise by the *global* token count of the step: then gradient accumulation and data
parallelism do not change the loss.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from torch import nn

from megatron_unihetero.eval import diagnostics
from megatron_unihetero.kernels.cross_entropy import fused_linear_cross_entropy
from megatron_unihetero.kernels.regression import fused_regression_loss
from megatron_unihetero.models.config import IGNORE_INDEX

LossAndCount = Tuple[torch.Tensor, torch.Tensor]


class ModelLosses(NamedTuple):
    """What the model's last pipeline stage returns for a batch with labels.

    ``objectives``: each objective's (summed per-token loss, token count) for this micro-batch
    (text, semantic, pixel; normalised by the step's global counts in training/losses.py);
    ``stats``: the diagnostics' sufficient statistics by name (eval/diagnostics.py: semantic,
    pixel, embedding), float64 sums computed without gradients, never part of the loss.

    A NamedTuple of dicts, not a dataclass: engines walk a module's outputs to hook its tensors
    (DeepSpeed ZeRO-3 re-gathers the parameters for the backward from hooks on the output
    tensors, and its walk knows tuples, lists and dicts only).
    """

    objectives: Dict[str, LossAndCount]
    stats: Dict[str, torch.Tensor]


class SemanticHead(nn.Module):
    """Predicts the next visual embedding from an LLM hidden state (linear, or a 2-layer MLP).

    Replicated over tensor-parallel ranks: its input (the last stage's hidden states) is
    replicated there, so every rank computes the same prediction and gradients.
    """

    def __init__(self, hidden_size: int, target_dim: int, kind: str = "linear"):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Linear(hidden_size, target_dim)
        elif kind == "mlp":
            self.fc1 = nn.Linear(hidden_size, hidden_size)
            self.proj = nn.Linear(hidden_size, target_dim)
        else:
            raise ValueError(f"semantic head must be linear or mlp; got {kind!r}")

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """Everything before the last linear layer ``proj`` (what the fused loss kernel takes)."""
        return F.gelu(self.fc1(hidden)) if self.kind == "mlp" else hidden

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(hidden))


def semantic_loss(head: SemanticHead, hidden: torch.Tensor, target: torch.Tensor,
                  kind: str, impl: str = "auto") -> Tuple[LossAndCount, torch.Tensor]:
    """Summed regression loss of ``head(hidden)`` against the stop-gradient ``target``, and
    the diagnostics' statistics of that prediction (eval/diagnostics.py regression_stats).

    kernels/regression.py computes both in one pass (and validates ``kind``): by default the
    head's last linear layer and the loss run as one fused op that never keeps the prediction;
    ``impl="reference"`` is plain autograd through ``head(hidden)``.
    """
    count = torch.tensor(hidden.shape[0], dtype=torch.long, device=hidden.device)
    if hidden.shape[0] == 0:
        # Keep the head in the graph so every rank runs the same backward; every rank emits
        # statistics of the same size (they are all-reduced).
        empty = diagnostics.empty_regression_stats(target.shape[-1], hidden.device)
        return (sum(p.sum() for p in head.parameters()) * 0.0, count), empty
    loss_sum, stats = fused_regression_loss(head, hidden, target, loss=kind, impl=impl,
                                            prediction_stats=diagnostics.regression_stats)
    return (loss_sum, count), stats


def text_label_mask(labels: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Positions the text loss trains on: a label that is neither ignored nor the placeholder."""
    return (labels != IGNORE_INDEX) & (labels != image_token_id)


def text_loss(output_layer, hidden: torch.Tensor, labels: torch.Tensor, excluded_label: int,
              impl: str = "auto") -> LossAndCount:
    """Summed next-token cross-entropy over positions with a text label.

    ``hidden`` [N, H] and ``labels`` [N]; labels equal to IGNORE_INDEX or ``excluded_label``
    (the image placeholder: predicting it is the semantic head's job) do not count. The LM head
    stays vocab-parallel under TP. ``impl``: the linear + cross-entropy kernel
    (kernels/cross_entropy.py: auto | reference | fused | triton; fused and triton never
    materialise [N, V] logits), or "megatron" (the output layer, then megatron's vocab-parallel
    cross-entropy).
    """
    keep = text_label_mask(labels, excluded_label)
    if impl == "megatron":
        logits, _ = output_layer(hidden[None])  # [1, N, V / tp]
        safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), safe_labels[None])[0]
        return (per_token * keep).sum(), keep.sum()
    tp_group = (parallel_state.get_tensor_model_parallel_group()
                if parallel_state.get_tensor_model_parallel_world_size() > 1 else None)
    masked = torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))
    # The kernel all-reduces the hidden gradient over TP itself: no copy_to_tp_region here.
    return fused_linear_cross_entropy(hidden, output_layer.weight, masked,
                                      ignore_index=IGNORE_INDEX, tp_group=tp_group, impl=impl)
