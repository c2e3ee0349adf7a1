"""Comparing loader output, for tests (the batch contract of data/collate.py)."""

from __future__ import annotations

from typing import Iterable, List

import torch


def take(loader: Iterable, n: int) -> List[dict]:
    """The next ``n`` batches of ``loader``."""
    return [batch for _, batch in zip(range(n), loader)]


def assert_same_batch(a: dict, b: dict) -> None:
    """Same keys, and every tensor equal in dtype and value (every other entry equal)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
