"""Document-aware packing: variable-length samples -> rows of exactly ``seq_length`` tokens.

A sample (one document) is never split across rows. Samples whose *expanded* length (each
``<image>`` placeholder counted as ``tokens_per_image`` tokens) exceeds ``seq_length`` cannot be
packed at all: they are rejected, counted, and logged with their shard and index, never
dropped silently.

Packing works on *windows*: the sample stream is cut into consecutive windows of
``window_size`` samples and each window is packed on its own by best-fit-decreasing. Windows
are independent on purpose: the rows of window ``w`` are a pure function of the samples of
window ``w`` (and the seed), so a resumed loader can re-read one window and skip the rows it
had already produced, instead of replaying the whole stream. The price is the partly filled
last bins of each window; with windows of a few thousand samples that is well under 5 %.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

# Rejections are logged one line per sample up to this many times per packer, then summarised,
# so that a corpus with many over-long samples does not drown the training log.
MAX_REJECTION_LOG_LINES = 20


@dataclass(frozen=True)
class SampleRef:
    """One sample of the blended stream, by reference (its data is read at collation time).

    ``dataset`` indexes the loader's datasets, ``index`` is the sample's index in that dataset
    (over all its shards), ``length`` its expanded token count.
    """

    dataset: int
    index: int
    length: int


@dataclass
class PackingStats:
    """Counters for logging: packing efficiency and rejected samples."""

    seq_length: int = 1
    rows: int = 0
    tokens: int = 0  # non-padding tokens in packed rows
    documents: int = 0
    rejected_samples: int = 0
    rejected_tokens: int = 0
    rejected: List[Tuple[str, int, int]] = field(default_factory=list)  # (shard, index, length), first few

    @property
    def efficiency(self) -> float:
        """Fraction of non-padding tokens over all packed rows."""
        return self.tokens / (self.rows * self.seq_length) if self.rows else 0.0

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "documents": self.documents,
            "rejected_samples": self.rejected_samples,
            "rejected_tokens": self.rejected_tokens,
            "efficiency": self.efficiency,
        }


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Pack items into bins of ``capacity`` by best-fit-decreasing; returns lists of item indices.

    Deterministic: ties in length are broken by item index, ties between equally good bins
    by bin creation order. Each bin lists its items in increasing index order (stream order),
    so documents inside a row keep the order in which the stream produced them.
    Every length must be in ``[1, capacity]``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    # Sorted (remaining_capacity, bin_id) pairs: bisect finds the tightest bin that still fits.
    free: List[Tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n <= 0 or n > capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if remaining - n > 0:
            bisect.insort(free, (remaining - n, b))
    return [sorted(b) for b in bins]


class WindowPacker:
    """Packs one window of :class:`SampleRef` at a time into rows (lists of refs).

    Args:
        seq_length: tokens per row.
        seed: rows of a window are shuffled with ``(seed, window_index)`` so that a row of
            long documents is not always followed by one of long documents (BFD emits bins
            roughly in decreasing item size).
        describe: ``describe(ref) -> (shard_prefix, index_in_shard)`` for rejection messages.
    """

    def __init__(self, seq_length: int, seed: int, describe=None) -> None:
        if seq_length <= 0:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.seq_length = seq_length
        self.seed = seed
        self.describe = describe or (lambda ref: (f"dataset {ref.dataset}", ref.index))
        self.stats = PackingStats(seq_length=seq_length)

    def pack(self, refs: Sequence[SampleRef], window_index: int, count: bool = True) -> List[List[SampleRef]]:
        """Rows of the window. Over-long samples are left out, and counted and logged when
        ``count`` (False when a resumed loader re-packs a window it had already counted)."""
        kept = []
        for r in refs:
            if r.length <= self.seq_length:
                kept.append(r)
            elif count:
                self._reject(r)
        bins = best_fit_decreasing([r.length for r in kept], self.seq_length)
        rows = [[kept[i] for i in b] for b in bins]
        perm = np.random.default_rng([self.seed, window_index, 0x9ACC]).permutation(len(rows))
        return [rows[i] for i in perm]

    def _reject(self, ref: SampleRef) -> None:
        shard, index = self.describe(ref)
        st = self.stats
        st.rejected_samples += 1
        st.rejected_tokens += ref.length
        if len(st.rejected) < MAX_REJECTION_LOG_LINES:
            st.rejected.append((shard, index, ref.length))
            logger.warning(
                "packing: rejected sample %d of shard %s: expanded length %d > seq_length %d "
                "(raise seq_length or filter it in preprocessing)",
                index, shard, ref.length, self.seq_length,
            )
        elif st.rejected_samples == MAX_REJECTION_LOG_LINES + 1:
            logger.warning("packing: more over-long samples rejected; see the loader's stats for the count")

    def count_emitted(self, row: Sequence[SampleRef]) -> None:
        """Account a row the loader actually consumed (for the efficiency figure)."""
        self.stats.rows += 1
        self.stats.documents += len(row)
        self.stats.tokens += sum(r.length for r in row)
