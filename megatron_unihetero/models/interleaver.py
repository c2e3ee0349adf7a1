"""The vision-token interleaver: where each image's embeddings go in the LLM input sequence.

Token sequences carry each image as ``tokens_per_image`` consecutive placeholder tokens
(``image_token_id``), the way HF's LlavaProcessor expands ``<image>``. Images are given in
order of appearance: row 0's images, then row 1's, and so on.

The work is split in two so the last pipeline stage, which has no embeddings, can still build
the semantic-generation targets:

* :func:`layout` validates placeholders and returns the masks (text, visual, semantic
  positions) and, for each visual position, which image token sits there. It needs only token
  ids, so every pipeline stage can compute it.
* :func:`scatter_visual` writes the visual embeddings into the text embeddings (first stage).
* :func:`semantic_targets` gathers, for every semantic position i, the target of position i+1
  (last stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


class InterleaveError(ValueError):
    """Placeholders and images do not agree; the message names the sample and the problem."""


@dataclass
class Layout:
    """Where text and images sit in a batch [B, S] (after any truncation)."""

    tokens: torch.Tensor  # [B, S] the (possibly truncated) token ids
    segment_ids: torch.Tensor  # [B, S] document index per position, -1 for padding
    visual_mask: torch.Tensor  # [B, S] bool: position holds an image embedding
    text_mask: torch.Tensor  # [B, S] bool: position holds a text token (not padding)
    semantic_mask: torch.Tensor  # [B, S] bool: the next position is visual, same document
    visual_index: torch.Tensor  # [num_visual] flat index (image * T + token) per visual position
    images_per_sample: torch.Tensor  # [B] images each row holds before truncation
    num_truncated_tokens: int  # tokens cut from the end of rows longer than max_length

    @property
    def num_images(self) -> int:
        return int(self.images_per_sample.sum())


def layout(
    tokens: torch.Tensor,
    *,
    image_token_id: int,
    tokens_per_image: int,
    num_images: int,
    segment_ids: Optional[torch.Tensor] = None,
    images_per_sample: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    pad_token_id: Optional[int] = None,
) -> Layout:
    """Validate the image placeholders of a batch and compute where everything goes.

    Raises :class:`InterleaveError` naming the sample when a row's placeholders are not whole
    blocks of ``tokens_per_image``, when a row's image count disagrees with
    ``images_per_sample``, or when the batch's total disagrees with ``num_images``.
    Rows longer than ``max_length`` are truncated; an image cut by the truncation keeps its
    first embeddings, images entirely past the end are not placed (both are counted in
    ``num_truncated_tokens``).
    """
    if tokens.dim() != 2:
        raise InterleaveError(f"tokens must be [batch, seq]; got shape {list(tokens.shape)}")
    batch, seq = tokens.shape
    if segment_ids is None:
        segment_ids = torch.zeros_like(tokens, dtype=torch.int32)
        if pad_token_id is not None:
            segment_ids = torch.where(tokens == pad_token_id, -1, segment_ids)
    is_image = tokens == image_token_id

    counts = _validate_blocks(is_image, tokens_per_image)
    if images_per_sample is not None:
        images_per_sample = images_per_sample.to(counts.device)
        for row in range(batch):
            if int(counts[row]) != int(images_per_sample[row]):
                raise InterleaveError(
                    f"sample {row}: {int(counts[row]) * tokens_per_image} image placeholder tokens "
                    f"({int(counts[row])} image(s) of {tokens_per_image} tokens) but "
                    f"{int(images_per_sample[row])} image(s) were given for it"
                )
    if int(counts.sum()) != num_images:
        raise InterleaveError(
            f"the batch's placeholders make {int(counts.sum())} image(s) "
            f"(per sample: {counts.tolist()}, {tokens_per_image} tokens each) but {num_images} "
            f"image(s) were given"
        )

    truncated = 0
    if max_length is not None and seq > max_length:
        valid = segment_ids[:, max_length:] >= 0
        truncated = int(valid.sum())
        tokens, segment_ids, is_image = (
            tokens[:, :max_length], segment_ids[:, :max_length], is_image[:, :max_length]
        )

    visual_mask = is_image & (segment_ids >= 0)
    text_mask = ~is_image & (segment_ids >= 0)
    semantic_mask = semantic_positions(visual_mask, segment_ids)

    # The k-th visual position of row b holds token k of that row's image stream, which starts
    # at flat offset (images before row b) * T.
    row_offsets = (torch.cumsum(counts, 0) - counts) * tokens_per_image
    rank_in_row = torch.cumsum(visual_mask.long(), dim=1) - 1
    visual_index = (rank_in_row + row_offsets[:, None])[visual_mask]
    return Layout(tokens, segment_ids, visual_mask, text_mask, semantic_mask, visual_index,
                  counts, truncated)


def semantic_positions(visual_mask: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: positions whose next position is visual and in the same document."""
    mask = torch.zeros_like(visual_mask)
    mask[:, :-1] = visual_mask[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])
    return mask


def condition_positions(layout: Layout, starts_with_bos: bool) -> torch.Tensor:
    """[B, S] bool: the text each document's first image is generated from (the caption of a
    text-to-image sample), the positions classifier-free guidance's condition dropout nulls.

    Training lays a document out as ``BOS text <image_start> <image>*T <image_end> ...``
    (data/preprocess/samples.py; no BOS for a tokenizer without one): the condition is every
    position before the marker right before its first visual position, except the document's
    first one when it is BOS (``starts_with_bos``: model.documents_start_with_bos). A document
    that starts with its image (a caption sample: image first) or has none has no condition.
    """
    segments, visual = layout.segment_ids, layout.visual_mask
    b, s = segments.shape
    position = torch.arange(s, device=segments.device).expand(b, s)
    valid = segments >= 0
    # One slot per (row, document): the document's first position and first visual position.
    slot = torch.arange(b, device=segments.device)[:, None] * s + segments.long().clamp(min=0)
    start = torch.full((b * s,), s, dtype=torch.long, device=segments.device)
    start.scatter_reduce_(0, slot[valid], position[valid], reduce="amin")
    first_visual = torch.full((b * s,), -1, dtype=torch.long, device=segments.device)
    first_visual.scatter_reduce_(0, slot[visual], position[visual], reduce="amin", include_self=False)
    first_visual = first_visual[slot]
    after_bos = position > start[slot] if starts_with_bos else position >= start[slot]
    return valid & ~visual & after_bos & (position < first_visual - 1)


def _validate_blocks(is_image: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Each row's placeholders must form whole runs of ``tokens_per_image``; returns images/row."""
    flags = is_image.to(torch.int8)
    edge = flags.new_zeros(flags.shape[0], 1)
    edges = torch.diff(flags, dim=1, prepend=edge, append=edge)  # +1 where a run starts, -1 after
    # nonzero lists (row, position) pairs in row-major order, so the k-th start and the k-th
    # end belong to the same run.
    starts, ends = torch.nonzero(edges == 1), torch.nonzero(edges == -1)
    lengths = ends[:, 1] - starts[:, 1]
    bad = torch.nonzero(lengths % tokens_per_image)
    if bad.numel():
        first = int(bad[0, 0])
        raise InterleaveError(
            f"sample {int(starts[first, 0])}: a run of {int(lengths[first])} image placeholder "
            f"tokens starts at position {int(starts[first, 1])}; each image takes exactly "
            f"{tokens_per_image} (a run may hold several whole images)"
        )
    placeholders = torch.zeros(flags.shape[0], dtype=torch.long, device=is_image.device)
    placeholders.index_add_(0, starts[:, 0], lengths)
    return placeholders // tokens_per_image


def scatter_visual(
    text_embeddings: torch.Tensor, visual_embeddings: torch.Tensor, layout: Layout
) -> torch.Tensor:
    """Put image embeddings [n_img, T, H] at the visual positions of text embeddings [B, S, H]."""
    flat = visual_embeddings.reshape(-1, visual_embeddings.shape[-1])
    out = text_embeddings.clone()
    out[layout.visual_mask] = flat[layout.visual_index].to(out.dtype)
    return out


def semantic_targets(visual_targets: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Targets [num_semantic, D]: for each semantic position i, the target of position i+1.

    ``visual_targets`` is [n_img, T, D], aligned with the images (the projector output, an
    EMA projector's output, or the encoder features). Callers pass detached tensors: the
    target is a stop-gradient.
    """
    flat = visual_targets.reshape(-1, visual_targets.shape[-1])
    per_position = torch.full(layout.visual_mask.shape, -1, dtype=torch.long,
                              device=layout.visual_mask.device)
    per_position[layout.visual_mask] = layout.visual_index
    next_index = per_position[:, 1:][layout.semantic_mask[:, :-1]]
    return flat[next_index]
