"""One training dataset: its shards, a deterministic train/validation split, shuffled epochs.

A dataset is the list of shards of one preprocessed corpus (``list_shards(prefix)``). Samples
are numbered globally over its shards (shard 0's samples first). The split assigns every
sample to train or validation once, from ``split_seed`` alone, so it does not move when the
training seed changes. Each epoch visits the split's samples in a fresh permutation drawn
from ``(seed, salt, epoch)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_unihetero.data.shards import ShardError, ShardReader, check_preprocessing_finished, list_shards

SPLITS = ("train", "valid")


@dataclass
class Sample:
    """One sample as read from its shard (placeholders not yet expanded)."""

    tokens: np.ndarray  # int32 [L]
    images: np.ndarray  # uint8 [n, H, W, 3] or float16 [n, T, D]
    loss_mask: Optional[np.ndarray]  # int8 [L], 1 = target; None = every token is a target
    shard: str
    index: int  # index within the shard


def _tokenizer_ids(metadata: Dict[str, Any]) -> Dict[str, Any]:
    tok = metadata.get("tokenizer") or {}
    return {k: v for k, v in tok.items() if k.endswith("_id") or k in ("vocab_size", "kind")}


def _shard_name(reader: Any) -> str:
    return getattr(reader, "prefix", repr(reader))


class MultimodalDataset:
    """The samples of one split of one corpus.

    Args:
        shards: a dataset prefix (all its shards via :func:`list_shards`), a shard prefix, or a
            list of them; objects with the ShardReader interface may stand in for paths.
        name: for logs and stats (default: the first shard's prefix).
        split: "train" or "valid".
        valid_fraction: fraction of samples held out for "valid" (at least one when > 0).
        split_seed: seeds the split only.
    """

    def __init__(
        self,
        shards: Union[str, Sequence[Union[str, Any]]],
        *,
        name: Optional[str] = None,
        split: str = "train",
        valid_fraction: float = 0.0,
        split_seed: int = 0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        if isinstance(shards, str):
            shards = [shards]
        self.readers: List[Any] = []
        # Every shard is opened (and so checked, see ShardReader) here, before the first batch.
        # Damaged shards are all reported at once: with thousands of shards, one per run would
        # turn a bad copy into many restarts.
        errors: List[ShardError] = []
        for s in shards:
            if not isinstance(s, str):
                self.readers.append(s)
                continue
            check_preprocessing_finished(s)
            paths = list_shards(s)
            if not paths:
                raise FileNotFoundError(f"no shards found for {s!r} (expected {s}.json or {s}_00000.json)")
            for p in paths:
                try:
                    self.readers.append(ShardReader(p))
                except ShardError as e:
                    errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ShardError(f"{len(errors)} damaged shards (one line each):\n" + "\n".join(str(e) for e in errors))
        if not self.readers:
            raise ValueError("a dataset needs at least one shard")
        self.name = name or _shard_name(self.readers[0])
        self.split = split
        self.metadata = self._check_consistent()

        sizes = np.asarray([len(r) for r in self.readers], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        total = int(self._starts[-1])
        # Per-sample token and image counts for packing, from the index files (no token reads).
        self._seq_lengths = np.concatenate([np.asarray(r.sequence_lengths, dtype=np.int64) for r in self.readers])
        self._num_images = np.concatenate([np.diff(np.asarray(r.image_offsets, dtype=np.int64)) for r in self.readers])

        n_valid = int(round(total * valid_fraction))
        if valid_fraction > 0 and n_valid == 0 and total > 1:
            n_valid = 1
        perm = np.random.default_rng([split_seed, 0x5B117]).permutation(total)
        chosen = perm[:n_valid] if split == "valid" else perm[n_valid:]
        self.indices = np.sort(chosen).astype(np.int64)  # global sample indices of this split
        if len(self.indices) == 0:
            raise ValueError(f"dataset {self.name}: split {split!r} is empty ({total} samples, valid_fraction={valid_fraction})")

    # --- metadata --------------------------------------------------------------------------

    def _check_consistent(self) -> Dict[str, Any]:
        """All shards must agree on what the loader relies on; name the first that differs."""
        first = self.readers[0].metadata
        keys = ("image_store", "image_size", "feature_shape")
        for r in self.readers[1:]:
            m = r.metadata
            for k in keys:
                if m.get(k) != first.get(k):
                    raise ValueError(f"shard {_shard_name(r)}: {k}={m.get(k)!r} differs from {_shard_name(self.readers[0])}'s {first.get(k)!r}")
            # Compare what the loader and model rely on (ids, vocabulary), not where the
            # tokenizer file happened to live when each shard was written.
            ids, first_ids = _tokenizer_ids(m), _tokenizer_ids(first)
            if ids != first_ids:
                diff = {k: (ids.get(k), first_ids.get(k)) for k in set(ids) | set(first_ids)
                        if ids.get(k) != first_ids.get(k)}
                raise ValueError(f"shard {_shard_name(r)}: tokenizer differs from "
                                 f"{_shard_name(self.readers[0])}'s (this, first): {diff}")
        tok = first.get("tokenizer") or {}
        for k in ("image_token_id", "pad_id"):
            if k not in tok:
                raise ValueError(f"shard {_shard_name(self.readers[0])}: metadata 'tokenizer' lacks {k!r}")
        return first

    @property
    def tokenizer_ids(self) -> Dict[str, Any]:
        return self.metadata["tokenizer"]

    @property
    def image_store(self) -> str:
        return self.metadata["image_store"]

    # --- samples -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_samples_total(self) -> int:
        return int(self._starts[-1])

    def expanded_lengths(self, tokens_per_image: int) -> np.ndarray:
        """Length after placeholder expansion of every sample (by global index)."""
        return self._seq_lengths + self._num_images * (tokens_per_image - 1)

    def locate(self, index: int) -> Tuple[Any, int]:
        """(reader, index within its shard) of global sample ``index``."""
        s = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.readers[s], int(index - self._starts[s])

    def describe(self, index: int) -> Tuple[str, int]:
        reader, local = self.locate(index)
        return _shard_name(reader), local

    def sample(self, index: int, *, with_images: bool = True) -> Sample:
        reader, local = self.locate(index)
        # Copies, not views of the memory map: IndexedDataset unmaps its file when collected, and
        # a Sample may outlive its reader (the arrays are small; images are stacked copies anyway).
        tokens = np.array(reader.tokens(local))
        mask = reader.loss_mask(local)
        images = reader.images(local) if with_images else None
        return Sample(tokens=tokens, images=images, loss_mask=None if mask is None else np.array(mask),
                      shard=_shard_name(reader), index=local)

    def epoch_order(self, epoch: int, seed: int, salt: int = 0) -> np.ndarray:
        """Global sample indices of this split in the order of ``epoch``."""
        rng = np.random.default_rng([seed, salt, epoch, 0xE90C])
        return self.indices[rng.permutation(len(self.indices))]
