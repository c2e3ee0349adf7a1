"""Turn one input row into training samples: token ids, images and (optionally) a loss mask.

A row becomes a *document*, a list of segments: ``("image", value)``, ``("text", str,
is_target)`` or ``("eos", is_target)``. Each image becomes ``<image_start> <image> <image_end>``
(by id: the text is encoded with ``Tokenizer.encode_plain``, so ``<image>`` or ``<pad>`` written
in a caption stays plain text, and a sample's placeholders are exactly its images);
the text between two special tokens is encoded as one string (as the exported HF tokenizer
encodes a rendered chat), and the target/prompt boundaries inside it must fall on token
boundaries (else the row is rejected, reason ``token_boundary``). The sample is
``BOS + segments + EOS`` (no second EOS when the document ends with one; no BOS for a
tokenizer without one, ``Tokenizer.bos_ids``).

Templates (``--template``):
  caption       [image] caption                          every text token is a target
                (a conversation record: its images, then its one assistant reply)
  qa            [image] "Question: q Answer: a"          targets: " a" and EOS only
                (the one-turn case of data/conversation.py's template)
  both          one caption sample and one qa sample per row
  interleaved   the row's list of {"text": ...} / {"image": ...} segments, every text a target
  conversation  a LLaVA record's ``conversations`` (``--input-format llava``), rendered by
                data/conversation.py: targets are the assistant turns and their EOS
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from megatron_unihetero.data import conversation
from megatron_unihetero.data.preprocess.images import (
    DEFAULT_MAX_IMAGE_BYTES,
    IMAGE_FORMATS,
    ImageError,
    ImageLimits,
    PathPolicy,
    prepare_image,
)

TEMPLATES = ("caption", "qa", "both", "interleaved", "conversation")
IMAGES_AS = ("pixels", "encoded")
# LLaVA's speaker names (and HF's) -> conversation.py roles
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LLAVA_IMAGE = "<image>"


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
    conversation_column: str = "conversations"
    image_path_root: Optional[str] = None
    # Image paths from the data stay inside image_path_root unless this is set (trusted data);
    # files over max_image_bytes are rejects (images.PathPolicy).
    allow_paths_outside_root: bool = False
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    # Degenerate and oversized sources are rejects, from their header (images.ImageLimits).
    min_image_size: int = ImageLimits.min_size
    max_aspect_ratio: float = ImageLimits.max_aspect_ratio
    max_image_pixels: int = ImageLimits.max_pixels
    image_size: int = 64
    max_text_tokens: Optional[int] = None
    # What a Sample's images are: "pixels" (uint8 arrays) or "encoded" (image file bytes at
    # image_size, see images.encode_image). The preprocessing pipeline sets it from its
    # image_store (--image-store); in-memory users (eval) keep pixels.
    images_as: str = "pixels"
    image_format: str = "auto"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; choose from {TEMPLATES}")
        if self.images_as not in IMAGES_AS:
            raise ValueError(f"images_as must be one of {IMAGES_AS}, got {self.images_as!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        if self.min_image_size < 1 or self.max_aspect_ratio < 1 or self.max_image_pixels < 1:
            raise ValueError(f"min_image_size, max_image_pixels must be >= 1 and max_aspect_ratio "
                             f">= 1; got {self.min_image_size}, {self.max_image_pixels}, "
                             f"{self.max_aspect_ratio}")

    @functools.cached_property
    def path_policy(self) -> PathPolicy:
        return PathPolicy(self.image_path_root, self.allow_paths_outside_root, self.max_image_bytes)

    @functools.cached_property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.min_image_size, self.max_aspect_ratio, self.max_image_pixels)

    @property
    def has_loss_mask(self) -> bool:
        """Shards carry a loss mask when any sample has a prompt/answer split."""
        return self.template in ("qa", "both", "conversation")

    def columns(self) -> Optional[List[str]]:
        """Parquet columns to read (the others are never decoded)."""
        if self.template == "interleaved":
            return [self.interleaved_column]
        if self.template == "conversation":
            return [self.image_column, self.conversation_column]
        cols = [self.image_column]
        if self.template in ("caption", "both"):
            cols.append(self.text_column)
        if self.template in ("qa", "both"):
            cols += [self.question_column, self.answer_column]
        return cols


@dataclass
class Sample:
    tokens: np.ndarray                     # int32 [T]
    images: List[Any] = field(default_factory=list)  # uint8 [S, S, 3] each, or encoded bytes
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
    if cfg.template == "conversation":
        return [_render(llava_messages(rec, cfg))]
    docs = []
    if cfg.template in ("caption", "both"):
        if cfg.text_column not in rec and cfg.conversation_column in rec:
            docs.append(_llava_caption(rec, cfg))
        else:
            docs.append([("image", _image(rec, cfg.image_column)), ("text", _text(rec, cfg.text_column), True)])
    if cfg.template in ("qa", "both"):
        q, a = _text(rec, cfg.question_column), _text(rec, cfg.answer_column)
        docs.append(_render(conversation.qa_messages(_image(rec, cfg.image_column), q, a)))
    return docs


def _render(messages: List[Dict[str, Any]]) -> List[tuple]:
    try:
        return conversation.render(messages)
    except conversation.ConversationError as e:
        raise RowReject("bad_conversation", str(e)) from None


def _llava_images(rec: Dict[str, Any], column: str) -> List[Any]:
    value = rec.get(column)
    if value is None:
        return []  # a text-only conversation
    values = value if isinstance(value, list) else [value]
    for j, v in enumerate(values):
        if not isinstance(v, (str, bytes, dict)) or (isinstance(v, str) and not v):
            raise RowReject("wrong_type", f"{column}[{j}] is {v!r:.60}, expected an image path")
    return values


def llava_messages(rec: Dict[str, Any], cfg: SampleConfig) -> List[Dict[str, Any]]:
    """A LLaVA record -> conversation.py messages, each ``<image>`` becoming the next image of
    ``rec[image_column]`` (a path or a list of paths) where it stands in the text.

    Text around an ``<image>`` is stripped (LLaVA's own preprocessing strips it too). A record
    with images but no ``<image>`` at all gets them at the start of its first turn (LLaVA's
    convention); any other count mismatch rejects the row.
    """
    col = cfg.conversation_column
    turns = rec.get(col)
    if not isinstance(turns, list) or not turns:
        raise RowReject("missing_column", f"column {col!r} is missing or not a non-empty list of turns")
    roles = [_llava_role(turn, f"{col}[{j}]") for j, turn in enumerate(turns)]
    images = _llava_images(rec, cfg.image_column)
    placeholders = sum(t["value"].count(LLAVA_IMAGE) for t in turns)
    if placeholders == 0 and images:
        turns = [dict(turns[0], value=LLAVA_IMAGE * len(images) + "\n" + turns[0]["value"])] + turns[1:]
    elif placeholders != len(images):
        raise RowReject("image_placeholders", f"{placeholders} {LLAVA_IMAGE} in {col!r} but {len(images)} "
                                              f"images in {cfg.image_column!r}")
    messages, k = [], 0
    for role, turn in zip(roles, turns):
        content = conversation.string_items(turn["value"])  # the export's rule for a string content
        for item in content:
            if item["type"] == "image":
                item["image"] = images[k]
                k += 1
        messages.append({"role": role, "content": content})
    for j, m in enumerate(messages):
        if m["role"] == "assistant" and not any(it["type"] == "text" for it in m["content"]):
            raise RowReject("empty_text", f"{col}[{j}]: the assistant turn is empty")
    return messages


def _llava_role(turn: Any, where: str) -> str:
    """The conversation.py role of one LLaVA turn; a turn of any other shape is a named reject."""
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise RowReject("wrong_type", f"{where} must be {{'from': str, 'value': str}}, got {turn!r:.80}")
    speaker = turn.get("from")
    role = LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
    if role is None:
        raise RowReject("bad_conversation", f"{where}: speaker {speaker!r:.40} is not one of {sorted(LLAVA_ROLES)}")
    return role


def _llava_caption(rec: Dict[str, Any], cfg: SampleConfig) -> List[tuple]:
    """``--template caption`` on a conversation record (LLaVA-Pretrain): the record's images,
    then its one assistant reply, every text token a target; the (boilerplate) instruction of
    the user turn is dropped, so the sample reads like any caption sample."""
    messages = llava_messages(rec, cfg)
    if len(messages) != 2:
        raise RowReject("bad_conversation", f"--template caption needs one user and one assistant turn, "
                                            f"got {len(messages)} turns (use --template conversation)")
    _render(messages)  # roles and order
    images = [("image", it["image"]) for it in messages[0]["content"] if it["type"] == "image"]
    if not images:
        raise RowReject("missing_column", f"image column {cfg.image_column!r} is missing or null")
    reply = " ".join(it["text"] for it in messages[1]["content"] if it["type"] == "text")
    return images + [("text", reply, True)]


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


def encode_document(doc: List[tuple], tokenizer, cfg: SampleConfig, cache: Optional[Dict[int, Any]] = None) -> Sample:
    """Tokenize and decode one document (raises RowReject for bad images / too long text).

    ``cache`` maps ``id(image value)`` to its prepared image, so the caption and qa samples of
    one row ("both") decode the shared image once; it must not outlive the row (ids get reused).
    """
    # BOS counts as a target unless the document has a prompt: a caption sample's mask then
    # equals the default a shard without a loss mask implies (ShardReader.loss_mask).
    has_prompt = any(seg[0] == "text" and not seg[2] for seg in doc)
    ids: List[int] = list(tokenizer.bos_ids)
    mask: List[int] = [0 if has_prompt else 1] * len(ids)
    images: List[Any] = []
    n_text = 0
    image_ids = [tokenizer.image_start_id, tokenizer.image_token_id, tokenizer.image_end_id]
    pending: List[tuple] = []  # the text segments since the last special token

    def flush() -> None:
        nonlocal n_text
        if pending:
            t, m = _encode_text(pending, tokenizer)
            ids.extend(t)
            mask.extend(m)
            n_text += len(t)
            pending.clear()

    for seg in doc:
        if seg[0] == "text":
            pending.append(seg)
            continue
        flush()
        if seg[0] == "eos":
            ids.append(tokenizer.eos_id)
            mask.append(1 if seg[1] else 0)
            continue
        key = id(seg[1])
        if cache is None or key not in cache:
            try:
                image = prepare_image(seg[1], cfg.image_size, cfg.path_policy, cfg.images_as,
                                      cfg.image_format, cfg.jpeg_quality, cfg.image_limits)
            except ImageError as e:
                raise RowReject(e.reason, str(e)) from None
            if cache is not None:
                cache[key] = image
        images.append(cache[key] if cache is not None else image)
        ids += image_ids
        mask += [0, 0, 0]
    flush()
    if cfg.max_text_tokens is not None and n_text > cfg.max_text_tokens:
        raise RowReject("too_long", f"{n_text} text tokens > --max-text-tokens {cfg.max_text_tokens}")
    if not (doc and doc[-1][0] == "eos"):
        ids.append(tokenizer.eos_id)
        mask.append(1)
    placeholders = ids.count(tokenizer.image_token_id)
    if placeholders != len(images):  # training would stop at this sample: reject it here
        raise RowReject("image_placeholders", f"the sample has {placeholders} image placeholders "
                                              f"for {len(images)} images")
    return Sample(
        tokens=np.asarray(ids, dtype=np.int32),
        images=images,
        loss_mask=np.asarray(mask, dtype=np.int8) if cfg.has_loss_mask else None,
    )


def _encode_text(segments: List[tuple], tokenizer) -> tuple:
    """(ids, mask) of consecutive text segments, encoded as ONE string.

    The exported HF tokenizer sees the rendered text between two special tokens as one string,
    so training must too. The mask needs the target/prompt boundaries inside it to be token
    boundaries: the ids of the text up to each boundary must be a prefix of the whole's.
    """
    runs: List[list] = []  # merge neighbours with the same target flag: [text, is_target]
    for seg in segments:
        if runs and runs[-1][1] == seg[2]:
            runs[-1][0] += seg[1]
        else:
            runs.append([seg[1], seg[2]])
    whole = "".join(r[0] for r in runs)
    try:  # JSON's "\ud800" escape decodes to a lone surrogate: text no tokenizer can take
        whole.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowReject("bad_utf8", f"the text holds {e.object[e.start:e.end]!r} at character {e.start} "
                                    f"(a lone UTF-16 surrogate, e.g. a JSON \\ud800 escape): not Unicode "
                                    f"text") from None
    ids = tokenizer.encode_plain(whole)
    if len(runs) == 1:
        return ids, [1 if runs[0][1] else 0] * len(ids)
    mask: List[int] = []
    text = ""
    for text_run, target in runs:
        text += text_run
        upto = tokenizer.encode_plain(text) if len(text) < len(whole) else ids
        if upto != ids[:len(upto)] or len(upto) < len(mask):
            raise RowReject("token_boundary", f"the tokenizer merges tokens across the prompt/answer boundary "
                                              f"after {text[-40:]!r}: the loss mask would be wrong")
        mask += [1 if target else 0] * (len(upto) - len(mask))
    return ids, mask


def row_to_samples(rec: Dict[str, Any], tokenizer, cfg: SampleConfig) -> List[Sample]:
    """All samples of one row; the whole row is rejected if any of its samples is bad."""
    if not isinstance(rec, dict):
        raise RowReject("wrong_type", f"row is {type(rec).__name__}, expected an object")
    cache: Dict[int, np.ndarray] = {}
    return [encode_document(doc, tokenizer, cfg, cache) for doc in documents(rec, cfg)]
