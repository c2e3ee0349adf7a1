"""Blending several datasets into one deterministic sample stream that follows their weights.

The rule is Megatron's: at step t (0-based) take the next sample from the dataset whose
realised count lags its share the most, ``argmax_i(w_i * (t + 1) - count_i)`` (ties -> lowest
i). After any number of steps every count is within one sample of ``w_i * t``, and the
choice depends only on the counts, so the stream's state is just ``(t, counts)``.

Dataset i's k-th sample is position ``k % len_i`` of its epoch ``k // len_i`` order: each
dataset cycles through its own epochs independently of the others (a small dataset with a
large weight is simply repeated more often).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_unihetero.data.dataset import MultimodalDataset
from megatron_unihetero.data.packing import SampleRef


def normalize_weights(weights: Optional[Sequence[float]], n: int) -> np.ndarray:
    if weights is None:
        weights = [1.0] * n
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"got {len(w)} weights for {n} datasets")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    return w / w.sum()


def parse_data_path(spec: Sequence[str]) -> Tuple[List[str], List[float]]:
    """Megatron-style ``--data-path``: ``[prefix]`` or ``[w1, prefix1, w2, prefix2, ...]``."""
    spec = list(spec)
    if len(spec) == 1:
        return spec, [1.0]
    if len(spec) % 2:
        raise ValueError(f"data path must be one prefix or weight/prefix pairs, got {spec}")
    try:
        weights = [float(x) for x in spec[0::2]]
    except ValueError as e:
        raise ValueError(f"data path {spec}: expected 'weight prefix' pairs ({e})") from None
    return spec[1::2], weights


class BlendedSampleStream:
    """The sample stream of one or more datasets, as :class:`SampleRef` (index + expanded length).

    Args:
        datasets: the datasets to blend (one is fine).
        weights: their relative weights (default: equal).
        seed: shuffles every dataset's epochs.
        tokens_per_image: to compute each sample's expanded length.
        num_samples: total samples to draw before the stream ends (None: endless).
    """

    def __init__(
        self,
        datasets: Sequence[MultimodalDataset],
        weights: Optional[Sequence[float]] = None,
        *,
        seed: int,
        tokens_per_image: int,
        num_samples: Optional[int] = None,
    ) -> None:
        if not datasets:
            raise ValueError("need at least one dataset")
        self.datasets = list(datasets)
        self.weights = normalize_weights(weights, len(self.datasets))
        self.seed = seed
        self.num_samples = num_samples
        self._lengths = [d.expanded_lengths(tokens_per_image) for d in self.datasets]
        self._orders: Dict[int, Tuple[int, np.ndarray]] = {}  # dataset -> (epoch, order) cache
        self.position = 0
        self.counts = [0] * len(self.datasets)

    def _choose(self) -> int:
        t = self.position + 1
        lag = [w * t - c for w, c in zip(self.weights, self.counts)]
        return max(range(len(lag)), key=lambda i: (lag[i], -i))

    def _nth(self, d: int, k: int) -> int:
        ds = self.datasets[d]
        epoch, pos = divmod(k, len(ds))
        cached = self._orders.get(d)
        if cached is None or cached[0] != epoch:
            cached = (epoch, ds.epoch_order(epoch, self.seed, salt=d))
            self._orders[d] = cached
        return int(cached[1][pos])

    def take(self, n: int) -> List[SampleRef]:
        """The next ``n`` samples (fewer, possibly none, when ``num_samples`` is reached)."""
        if self.num_samples is not None:
            n = max(0, min(n, self.num_samples - self.position))
        out = []
        for _ in range(n):
            d = self._choose()
            index = self._nth(d, self.counts[d])
            out.append(SampleRef(dataset=d, index=index, length=int(self._lengths[d][index])))
            self.counts[d] += 1
            self.position += 1
        return out

    @property
    def exhausted(self) -> bool:
        return self.num_samples is not None and self.position >= self.num_samples

    def state_dict(self) -> dict:
        return {"position": self.position, "counts": list(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["counts"]) != len(self.datasets):
            raise ValueError(f"state has {len(state['counts'])} dataset counts, stream has {len(self.datasets)} datasets")
        self.position = int(state["position"])
        self.counts = [int(c) for c in state["counts"]]
