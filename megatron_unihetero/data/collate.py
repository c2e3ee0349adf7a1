"""Packed rows of samples -> one micro-batch dict (the batch contract the model consumes).

For a micro-batch of B rows of length S:

- ``tokens`` int64 [B, S]: each ``<image>`` placeholder expanded to ``tokens_per_image`` copies
  of ``image_token_id``; padding is ``pad_id``.
- ``labels`` int64 [B, S]: ``tokens[b, i+1]`` when position i+1 is in the same document and is
  a training target (loss mask 1), else -100 (document ends, padding, prompt tokens).
- ``position_ids`` int64 [B, S]: restart at 0 per document; 0 on padding.
- ``segment_ids`` int32 [B, S]: 0, 1, 2, ... per document of the row; -1 on padding.
- ``images`` float32 [N, 3, H, W] (row 0's images in order, then row 1's, ...), or
  ``image_features`` float32 [N, T, D] for feature shards; [0, ...] when there are none.
- ``num_documents``, ``num_padding_tokens``: ints, for stats.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_unihetero.data.dataset import Sample
from megatron_unihetero.data.image_transforms import ImageNormalizer

IGNORE_INDEX = -100


def expand_sample(sample: Sample, image_token_id: int, tokens_per_image: int) -> Tuple[np.ndarray, np.ndarray]:
    """(tokens, target mask) of one sample with every ``<image>`` repeated ``tokens_per_image`` times.

    The target mask of an expanded image token is the placeholder's own loss-mask value.
    Raises if the placeholders and the sample's stored images disagree in number.
    """
    tokens = np.asarray(sample.tokens, dtype=np.int64)
    is_image = tokens == image_token_id
    n_placeholders = int(is_image.sum())
    n_images = len(sample.images) if sample.images is not None else n_placeholders
    if n_placeholders != n_images:
        raise ValueError(
            f"shard {sample.shard}: sample {sample.index}: {n_placeholders} <image> placeholders "
            f"(token id {image_token_id}) in 'text' but {n_images} entries in 'images' (image_offsets)"
        )
    if sample.loss_mask is None:
        mask = np.ones(len(tokens), dtype=bool)
    else:
        mask = np.asarray(sample.loss_mask) != 0
        if len(mask) != len(tokens):
            raise ValueError(f"shard {sample.shard}: sample {sample.index}: 'lossmask' has {len(mask)} "
                             f"entries for {len(tokens)} tokens")
    if n_placeholders == 0 or tokens_per_image == 1:
        return tokens, mask
    repeats = np.where(is_image, tokens_per_image, 1)
    return np.repeat(tokens, repeats), np.repeat(mask, repeats)


class Collator:
    """Builds batches; one per loader (holds the special ids and the image normaliser)."""

    def __init__(
        self,
        *,
        seq_length: int,
        tokens_per_image: int,
        image_token_id: int,
        pad_id: int,
        image_store: str,
        image_shape: Sequence[int],
        normalizer: Optional[ImageNormalizer] = None,
    ) -> None:
        self.seq_length = seq_length
        self.tokens_per_image = tokens_per_image
        self.image_token_id = int(image_token_id)
        self.pad_id = int(pad_id)
        self.image_store = image_store
        # (3, H, W) for pixels, (T, D) for features: the shape of an empty image tensor.
        self.image_shape = tuple(int(x) for x in image_shape)
        self.normalizer = normalizer or ImageNormalizer()

    def __call__(self, rows: Sequence[Sequence[Sample]]) -> dict:
        B, S = len(rows), self.seq_length
        tokens = np.full((B, S), self.pad_id, dtype=np.int64)
        labels = np.full((B, S), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((B, S), dtype=np.int64)
        segments = np.full((B, S), -1, dtype=np.int32)
        images: List[np.ndarray] = []
        for b, row in enumerate(rows):
            if row:
                self._fill_row(b, row, tokens[b], labels[b], positions[b], segments[b])
                images += [s.images for s in row if s.images is not None and len(s.images)]
        num_docs = sum(len(row) for row in rows)
        batch = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions),
            "segment_ids": torch.from_numpy(segments),
            "num_documents": num_docs,
            "num_padding_tokens": int((segments < 0).sum()),
        }
        if self.image_store == "pixels":
            batch["images"] = self._pixels(images)
        else:
            batch["image_features"] = self._features(images)
        return batch

    def _fill_row(self, b: int, row: Sequence[Sample], tokens, labels, positions, segments) -> None:
        """Write one row's documents into the row views (vectorised over the whole row)."""
        doc_tokens = [np.asarray(s.tokens, dtype=np.int64) for s in row]
        masks = []
        for s, t in zip(row, doc_tokens):
            if s.loss_mask is None:
                masks.append(np.ones(len(t), dtype=bool))
            elif len(s.loss_mask) != len(t):
                raise ValueError(f"shard {s.shard}: sample {s.index}: 'lossmask' has {len(s.loss_mask)} entries "
                                 f"for {len(t)} tokens")
            else:
                masks.append(np.asarray(s.loss_mask) != 0)
        tok = np.concatenate(doc_tokens)
        target = np.concatenate(masks)
        doc = np.repeat(np.arange(len(row)), [len(t) for t in doc_tokens])
        is_image = tok == self.image_token_id
        placeholders = np.bincount(doc[is_image], minlength=len(row))
        for s, n in zip(row, placeholders.tolist()):
            if s.images is not None and len(s.images) != n:
                raise ValueError(f"shard {s.shard}: sample {s.index}: {n} <image> placeholders (token id "
                                 f"{self.image_token_id}) in 'text' but {len(s.images)} entries in 'images' (image_offsets)")
        repeats = np.where(is_image, self.tokens_per_image, 1)
        tok, target, doc = np.repeat(tok, repeats), np.repeat(target, repeats), np.repeat(doc, repeats)
        n = len(tok)
        if n > self.seq_length:
            s = row[-1]
            raise ValueError(f"row {b} (last: shard {s.shard}, sample {s.index}) has {n} tokens > seq_length "
                             f"{self.seq_length}: packing and collation disagree")
        doc_start = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
        tokens[:n] = tok
        # labels[i] = tok[i+1] where i+1 is a target of the same document.
        labels[:n - 1] = np.where(target[1:] & (doc[1:] == doc[:-1]), tok[1:], IGNORE_INDEX)
        positions[:n] = np.arange(n) - np.repeat(doc_start, np.diff(np.r_[doc_start, n]))
        segments[:n] = doc

    def _pixels(self, images: List[np.ndarray]) -> torch.Tensor:
        if not images:
            return torch.zeros((0, *self.image_shape), dtype=torch.float32)
        shapes = {im.shape[1:] for im in images}
        if len(shapes) == 1:
            return self.normalizer(np.concatenate(images))
        # Blended datasets stored at different sizes: the normaliser resizes each group to one size.
        if self.normalizer.image_size is None:
            raise ValueError(f"images of different sizes {sorted(shapes)} in one batch: pass image_size to the loader")
        return torch.cat([self.normalizer(im) for im in images])

    def _features(self, images: List[np.ndarray]) -> torch.Tensor:
        if not images:
            return torch.zeros((0, *self.image_shape), dtype=torch.float32)
        return torch.from_numpy(np.concatenate(images).astype(np.float32))
