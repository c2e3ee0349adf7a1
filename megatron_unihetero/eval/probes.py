"""Linear probes: what do the visual hidden states know (shape, colour, position, size)?

A multinomial logistic regression (torch, full-batch, L2-regularised) is fit on a train split of
per-image features and scored on the held-out rest. Features are standardised with the train
split's statistics. The baseline to beat is the majority-class rate, reported alongside.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def split_indices(n: int, test_fraction: float = 0.3, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A seeded random (train, test) split of range(n); both non-empty when n >= 2."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return order[n_test:], order[:n_test]


def encode_labels(labels: Sequence) -> Tuple[torch.Tensor, List]:
    """Class ids for arbitrary hashable labels, and the class list (sorted by first appearance)."""
    classes: List = []
    index = {}
    ids = []
    for label in labels:
        if label not in index:
            index[label] = len(classes)
            classes.append(label)
        ids.append(index[label])
    return torch.tensor(ids, dtype=torch.long), classes


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                            steps: int = 200, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """Full-batch L-BFGS on the (convex) cross-entropy + L2 objective: deterministic."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], num_classes).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=steps,
                                  line_search_fn="strong_wolfe")
    x, y = x.double(), y

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def probe_accuracy(features: torch.Tensor, labels: Sequence, *, test_fraction: float = 0.3,
                   seed: int = 0, weight_decay: float = 1e-3) -> Dict[str, float]:
    """Train a linear probe on a split of (features [N, D], labels [N]); score the rest."""
    y, classes = encode_labels(labels)
    train, test = split_indices(len(y), test_fraction, seed)
    x = features.detach().double().cpu()
    mean, std = x[train].mean(0), x[train].std(0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    probe = fit_logistic_regression(x[train], y[train], len(classes), weight_decay=weight_decay)
    with torch.no_grad():
        predicted = probe(x).argmax(-1)
    majority = int(torch.bincount(y[train], minlength=len(classes)).argmax())
    return {
        "train_accuracy": float((predicted[train] == y[train]).double().mean()),
        "test_accuracy": float((predicted[test] == y[test]).double().mean()),
        "majority_baseline": float((y[test] == majority).double().mean()),
        "num_classes": float(len(classes)),
        "num_test": float(len(test)),
    }
