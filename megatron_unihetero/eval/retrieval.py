"""Semantic-generation quality by retrieval: does the predicted next embedding find the true one?

For every semantic position (its next position is visual) the semantic head predicts the next
visual embedding. The candidates are the sample's own visual targets (all its image tokens);
the prediction is right when its nearest candidate by cosine similarity is the true next one.
Chance is 1 / (number of candidates). This measures what a generated embedding can be used
for (feeding it back as input) rather than its raw regression error, which depends on scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_by_cosine(predictions: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For predictions [N, D] and candidates [K, D], the index [N] of the most similar one."""
    sims = F.normalize(predictions.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    return sims.argmax(dim=-1)


def top1_hits(predictions: torch.Tensor, candidates: torch.Tensor,
              true_index: torch.Tensor) -> torch.Tensor:
    """Bool [N]: whether prediction n retrieves candidate ``true_index[n]`` first."""
    if predictions.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return nearest_by_cosine(predictions, candidates).cpu() == true_index.cpu()


def topk_hits(predictions: torch.Tensor, candidates: torch.Tensor, true_index: torch.Tensor,
              k: int) -> torch.Tensor:
    """Bool [N]: whether candidate ``true_index[n]`` is among the ``k`` most cosine-similar to
    prediction n (all candidates when there are fewer than k). Ties rank the true one last, so
    a constant prediction is not credited with hits."""
    if predictions.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    sims = F.normalize(predictions.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T
    true_index = true_index.to(sims.device)
    true_sim = sims.gather(1, true_index[:, None])
    rank = (sims >= true_sim).sum(dim=1)  # 1 = strictly best; ties count against it
    return (rank <= k).cpu()
