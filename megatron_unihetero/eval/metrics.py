"""Pure metric functions (no model): log-probabilities, candidate choice, accuracy, perplexity."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def target_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probability of each masked token given the ones before it, summed per row.

    ``logits`` [B, S, V] are the model's outputs at every position, ``tokens`` [B, S] the
    sequence, ``mask`` [B, S] (bool) marks the tokens to score. Position j is predicted by the
    logits at j - 1, so ``mask[:, 0]`` is ignored (nothing predicts the first token).
    Returns [B] sums (float64 for stable comparisons between candidates).
    """
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [B, S-1]
    return (picked * mask[:, 1:].to(picked.dtype)).sum(dim=1)


def pick_candidate(scores: Sequence[float]) -> int:
    """Index of the best-scoring candidate (the first one on a tie)."""
    if len(scores) == 0:
        raise ValueError("no candidates to pick from")
    return int(max(range(len(scores)), key=lambda i: (scores[i], -i)))


def accuracy(predictions: Sequence[int], answers: Sequence[int]) -> float:
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return float("nan")
    return sum(int(p == a) for p, a in zip(predictions, answers)) / len(answers)


def perplexity(nll_sum: float, count: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    if count <= 0:
        return float("nan")
    return math.exp(nll_sum / count)
