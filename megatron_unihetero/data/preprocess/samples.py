"""Turn one input row into training samples: token ids, images and (optionally) a loss mask.

A row becomes a *document*, a list of segments: ``("image", value)`` or ``("text", str,
is_target)``. Each text segment is encoded on its own (so the prompt/answer boundary is a
token boundary) and each image becomes ``<image_start> <image> <image_end>``; the sample is
``BOS + segments + EOS``.

Templates (``--template``):
  caption      [image] caption                          every text token is a target
  qa           [image] "Question: q Answer:" " a"       targets: the answer and EOS only
  both         one caption sample and one qa sample per row
  interleaved  the row's list of {"text": ...} / {"image": ...} segments, every text a target
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from megatron_unihetero.data.preprocess.images import ImageError, load_image_value

TEMPLATES = ("caption", "qa", "both", "interleaved")


class RowReject(Exception):
    """The row is skipped; ``reason`` is one of the counted reject reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class SampleConfig:
    """How rows become samples (shared by every worker; must pickle)."""

    template: str = "caption"
    text_column: str = "caption"
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"
    interleaved_column: str = "segments"
    image_path_root: Optional[str] = None
    image_size: int = 64
    max_text_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose from {TEMPLATES}")

    @property
    def has_loss_mask(self) -> bool:
        """Shards carry a loss mask when any sample has a prompt/answer split."""
        return self.template in ("qa", "both")

    def columns(self) -> Optional[List[str]]:
        """Parquet columns to read (the others are never decoded)."""
        if self.template == "interleaved":
            return [self.interleaved_column]
        cols = [self.image_column]
        if self.template in ("caption", "both"):
            cols.append(self.text_column)
        if self.template in ("qa", "both"):
            cols += [self.question_column, self.answer_column]
        return cols


@dataclass
class Sample:
    tokens: np.ndarray                     # int32 [T]
    images: List[np.ndarray] = field(default_factory=list)  # uint8 [S, S, 3] each
    loss_mask: Optional[np.ndarray] = None  # int8 [T] when the shard has a loss mask


def _text(rec: Dict[str, Any], column: str) -> str:
    if column not in rec:
        raise RowReject("missing_column", f"column {column!r} is missing")
    v = rec[column]
    if v is None:
        raise RowReject("missing_column", f"column {column!r} is null")
    if not isinstance(v, str):
        raise RowReject("wrong_type", f"column {column!r} is {type(v).__name__}, expected a string")
    if not v.strip():
        raise RowReject("empty_text", f"column {column!r} is empty")
    return v


def _image(rec: Dict[str, Any], column: str) -> Any:
    if column not in rec or rec[column] is None:
        raise RowReject("missing_column", f"image column {column!r} is missing or null")
    return rec[column]


def documents(rec: Dict[str, Any], cfg: SampleConfig) -> List[List[tuple]]:
    """The row's documents (one per sample) as segment lists; raises RowReject."""
    if cfg.template == "interleaved":
        return [_interleaved(rec, cfg)]
    docs = []
    if cfg.template in ("caption", "both"):
        docs.append([("image", _image(rec, cfg.image_column)), ("text", _text(rec, cfg.text_column), True)])
    if cfg.template in ("qa", "both"):
        q, a = _text(rec, cfg.question_column), _text(rec, cfg.answer_column)
        docs.append([("image", _image(rec, cfg.image_column)), ("text", f"Question: {q} Answer:", False), ("text", " " + a, True)])
    return docs


def _interleaved(rec: Dict[str, Any], cfg: SampleConfig) -> List[tuple]:
    col = cfg.interleaved_column
    if col not in rec or rec[col] is None:
        raise RowReject("missing_column", f"column {col!r} is missing or null")
    segs = rec[col]
    if isinstance(segs, str):  # parquet/jsonl may carry the list as a JSON string
        try:
            segs = json.loads(segs)
        except json.JSONDecodeError as e:
            raise RowReject("wrong_type", f"column {col!r} is a string but not JSON: {e}") from None
    if not isinstance(segs, list) or not segs:
        raise RowReject("wrong_type", f"column {col!r} must be a non-empty list of segments")
    out = []
    for j, seg in enumerate(segs):
        if not isinstance(seg, dict):
            raise RowReject("wrong_type", f"{col}[{j}] is {type(seg).__name__}, expected {{'text': ...}} or {{'image': ...}}")
        if seg.get("image") is not None:
            out.append(("image", seg["image"]))
        elif isinstance(seg.get("text"), str):
            if seg["text"].strip():
                out.append(("text", seg["text"], True))
        else:
            raise RowReject("wrong_type", f"{col}[{j}] has neither a string 'text' nor an 'image'")
    if not any(s[0] == "text" for s in out):
        raise RowReject("empty_text", f"column {col!r} has no non-empty text segment")
    return out


def encode_document(doc: List[tuple], tokenizer, cfg: SampleConfig, cache: Optional[Dict[int, np.ndarray]] = None) -> Sample:
    """Tokenize and decode one document (raises RowReject for bad images / too long text).

    ``cache`` maps ``id(image value)`` to its pixels, so the caption and qa samples of one row
    ("both") decode the shared image once; it must not outlive the row (ids get reused).
    """
    # BOS counts as a target unless the document has a prompt: a caption sample's mask then
    # equals the default a shard without a loss mask implies (ShardReader.loss_mask).
    has_prompt = any(seg[0] == "text" and not seg[2] for seg in doc)
    ids: List[int] = [tokenizer.bos_id]
    mask: List[int] = [0 if has_prompt else 1]
    images: List[np.ndarray] = []
    n_text = 0
    image_ids = [tokenizer.image_start_id, tokenizer.image_token_id, tokenizer.image_end_id]
    for seg in doc:
        if seg[0] == "image":
            key = id(seg[1])
            if cache is None or key not in cache:
                try:
                    pixels = load_image_value(seg[1], cfg.image_size, cfg.image_path_root)
                except ImageError as e:
                    raise RowReject(e.reason, str(e)) from None
                if cache is not None:
                    cache[key] = pixels
            images.append(cache[key] if cache is not None else pixels)
            ids += image_ids
            mask += [0, 0, 0]
        else:
            t = tokenizer.encode(seg[1])
            ids += t
            mask += [1 if seg[2] else 0] * len(t)
            n_text += len(t)
    if cfg.max_text_tokens is not None and n_text > cfg.max_text_tokens:
        raise RowReject("too_long", f"{n_text} text tokens > --max-text-tokens {cfg.max_text_tokens}")
    ids.append(tokenizer.eos_id)
    mask.append(1)
    return Sample(
        tokens=np.asarray(ids, dtype=np.int32),
        images=images,
        loss_mask=np.asarray(mask, dtype=np.int8) if cfg.has_loss_mask else None,
    )


def row_to_samples(rec: Dict[str, Any], tokenizer, cfg: SampleConfig) -> List[Sample]:
    """All samples of one row; the whole row is rejected if any of its samples is bad."""
    if not isinstance(rec, dict):
        raise RowReject("wrong_type", f"row is {type(rec).__name__}, expected an object")
    cache: Dict[int, np.ndarray] = {}
    return [encode_document(doc, tokenizer, cfg, cache) for doc in documents(rec, cfg)]
