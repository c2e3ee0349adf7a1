"""The on-disk shard format: the contract between preprocessing and the training loader.

A shard is a set of files sharing a path prefix ``S`` (datasets are split into shards named
``PREFIX_00000``, ``PREFIX_00001``, ...; see :func:`shard_name` and :func:`list_shards`):

``S.text.bin/.idx``
    megatron.core IndexedDataset, dtype int32, ONE sequence (and one document) per sample:
    ``BOS ... EOS`` (no BOS from a tokenizer without one). Every image of the sample appears
    as exactly one placeholder wrapped as ``<image_start> <image> <image_end>``; the loader
    expands ``<image>`` to the model's tokens-per-image.
``S.encoded.bin/.idx``  (``image_store == "encoded"``, the preprocessing default; format 2)
    IndexedDataset, dtype uint8, one sequence per image: the image's encoded file bytes
    (JPEG, PNG or WebP, see ``ENCODED_FORMATS``), already at ``image_size`` x ``image_size``
    (the source file itself when it was, else re-encoded; ``image_encoding`` in the json says
    how). The loader decodes them (:meth:`ShardReader.images`), in its worker processes: about
    10x smaller than pixels at 224 px (150 KB raw RGB).
``S.images.bin/.idx``  (``image_store == "pixels"``)
    IndexedDataset, dtype uint8, one sequence per image: ``image_size*image_size*3`` RGB bytes
    in HWC order, images in the order they appear across samples.
``S.features.bin/.idx``  (``image_store == "features"``)
    Frozen vision-encoder features, one sequence per image of shape ``feature_shape`` =
    ``[tokens, dim]``. IndexedDataset has no float16 dtype, so the float16 values are stored
    as their int16 bit patterns (``feature_dtype == "float16"``, ``feature_storage ==
    "int16_bits"``); :meth:`ShardReader.images` views them back as float16.
``S.image_offsets.npy``
    int64 ``[num_samples + 1]``, cumulative image counts: sample i owns images
    ``off[i]:off[i+1]``.
``S.lossmask.bin/.idx``  (optional, ``has_loss_mask``)
    IndexedDataset, dtype int8, same lengths as the text: 1 = this token is a training target
    (label). Written only when some input had a prompt/answer split (QA samples: loss on the
    answer and EOS only). Without it, :meth:`ShardReader.loss_mask` returns the default: every
    token is a target except the three image tokens.
``S.json``
    Metadata (see :meth:`ShardWriter.finalize`). Written LAST: a shard exists iff its json does.

Every file is written under a temporary name (``S.tmp.*``) and renamed to its final name only
by :meth:`ShardWriter.finalize`, json last, so an interrupted run never leaves a shard that
looks whole.

:class:`ShardReader` checks a shard's integrity when it opens it, from file sizes, headers and
the index arrays only (never the token or image data), and raises :class:`ShardError` naming the
file and what is wrong: every ``.idx`` header (magic, version, dtype) and size, every ``.bin``
size against the sum of its sequence lengths, the json fields the reader relies on,
``image_offsets.npy`` against both, every stored image's length against the image geometry, and
the tokenizer's image ids when the shard has images. A damaged file (a copy cut short, a disk
filling up) thus fails when the datasets are built, not mid-epoch inside numpy.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import struct
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

# torch and megatron.core are imported where used: both are slow to import, and the
# preprocessing workers import this module (through preprocess/pipeline.py) but never write.

# 2: adds the "encoded" image store. Version 1 shards (pixels / features) read unchanged.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SHARD_INDEX_DIGITS = 5

TEXT, IMAGES, ENCODED, FEATURES, LOSSMASK = "text", "images", "encoded", "features", "lossmask"
_DTYPES = {TEXT: np.int32, IMAGES: np.uint8, ENCODED: np.uint8, FEATURES: np.int16, LOSSMASK: np.int8}
# image_store -> the file kind holding its images
STORE_KINDS = {"encoded": ENCODED, "pixels": IMAGES, "features": FEATURES}
# The formats an encoded image may be in (PIL format names). Decoding is restricted to them, so
# a shard cannot make the loader run any other of PIL's decoders.
ENCODED_FORMATS = ("JPEG", "PNG", "WEBP")

# The fixed part of a megatron.core IndexedDataset .idx file (see its _IndexWriter): magic,
# version, dtype code, sequence count, document count. The arrays follow: int32 sequence
# lengths, int64 byte pointers into the .bin, int64 document indices.
_IDX_HEADER = struct.Struct("<9sQBQQ")
_IDX_VERSION = 1
_IMAGE_TOKEN_KEYS = ("image_start_id", "image_token_id", "image_end_id")


class ShardError(ValueError):
    """A shard's files are missing, damaged or disagree with each other (raised when opened),
    or changed under the job reading them."""


def _identity(path: str) -> Tuple[int, int, int]:
    """(size, inode, mtime) of ``path``: what says that a file is still the one mapped."""
    st = os.stat(path)
    return st.st_size, st.st_ino, st.st_mtime_ns


def shard_name(prefix: str, index: int) -> str:
    """The prefix of shard ``index`` of dataset ``prefix``: ``PREFIX_00003``."""
    return f"{prefix}_{index:0{SHARD_INDEX_DIGITS}d}"


def list_shards(prefix: str) -> list[str]:
    """All finished shards of dataset ``prefix``, in index order.

    Accepts either a dataset prefix (finds ``PREFIX_NNNNN.json``) or the prefix of a single
    shard (``PREFIX.json`` exists, e.g. the output of tools/merge_shards.py).
    """
    if os.path.exists(prefix + ".json"):
        return [prefix]
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"_(\d{%d,})\.json$" % SHARD_INDEX_DIGITS)
    found = []
    for path in glob.glob(glob.escape(prefix) + "_*.json"):
        m = pattern.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path[: -len(".json")]))
    return [p for _, p in sorted(found)]


def check_preprocessing_finished(prefix: str) -> None:
    """Raise :class:`ShardError` when ``prefix`` is the output of a preprocessing run that did
    not finish: the run writes ``PREFIX.rejects.jsonl`` from its start and
    ``PREFIX.summary.json`` at its end (removing an older one first), and its shards' files
    under temporary names until each is whole. Its finished shards hold only part of the data:
    training on them would silently drop the rest. (Shards written by other means, without a
    rejects file, are not checked here.)"""
    rejects, summary = prefix + ".rejects.jsonl", prefix + ".summary.json"
    leftovers = sorted(glob.glob(glob.escape(prefix) + "_*.tmp.*") + glob.glob(glob.escape(prefix) + ".tmp.*"))
    if (os.path.exists(rejects) and not os.path.exists(summary)) or leftovers:
        found = f"temporary file {leftovers[0]}" if leftovers else f"{rejects} but no {summary}"
        raise ShardError(f"{prefix}: its preprocessing did not finish ({found}); its shards hold "
                         f"part of the data at most. Run the same tools/preprocess_data.py command "
                         f"again (it replaces them), then train")


def _indexed_dataset_module():
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class ShardWriter:
    """Writes one shard. Use as a context manager: an exception aborts (deletes the temp files).

    Args:
        prefix: final path prefix of the shard.
        image_store: "encoded" (encoded image bytes, JPEG/PNG/WebP of ``image_size``), "pixels"
            (uint8 HWC images of ``image_size``) or "features".
        image_size: side of the square images (encoded and pixels stores).
        feature_shape: ``(tokens, dim)`` of each image's features (features store).
        with_loss_mask: write ``S.lossmask.*``; then every :meth:`add_sample` needs a mask.
        metadata: extra entries for ``S.json`` (tokenizer, sources, template, ...).
    """

    def __init__(
        self,
        prefix: str,
        *,
        image_store: str = "pixels",
        image_size: Optional[int] = None,
        feature_shape: Optional[Sequence[int]] = None,
        with_loss_mask: bool = False,
        metadata: Optional[Dict[str, Any]] = None,
    ) -> None:
        if image_store not in STORE_KINDS:
            raise ValueError(f"image_store must be one of {sorted(STORE_KINDS)}, got {image_store!r}")
        if image_store in ("encoded", "pixels") and not image_size:
            raise ValueError(f"image_store={image_store!r} needs image_size")
        if image_store == "features" and (feature_shape is None or len(feature_shape) != 2):
            raise ValueError(f"image_store='features' needs feature_shape=(tokens, dim), got {feature_shape}")
        self.prefix = prefix
        self.image_store = image_store
        self.image_size = image_size
        self.feature_shape = tuple(int(x) for x in feature_shape) if feature_shape is not None else None
        self.with_loss_mask = with_loss_mask
        self.metadata = dict(metadata or {})
        self._kinds = [TEXT, STORE_KINDS[image_store]] + ([LOSSMASK] if with_loss_mask else [])
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        idx = _indexed_dataset_module()
        self._builders = {k: idx.IndexedDatasetBuilder(self._tmp(k) + ".bin", dtype=_DTYPES[k]) for k in self._kinds}
        self._offsets = [0]
        self._num_tokens = 0
        self.bytes_written = 0
        self._done = False

    def _tmp(self, kind: str) -> str:
        return f"{self.prefix}.tmp.{kind}"

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    def add_sample(self, tokens: np.ndarray, images: Sequence[np.ndarray] = (), loss_mask: Optional[np.ndarray] = None) -> None:
        """Append one sample: its token ids, its images (in placeholder order) and loss mask.

        An image is a uint8 ``[S, S, 3]`` array (pixels), the encoded file bytes (encoded) or a
        ``[tokens, dim]`` array (features).
        """
        import torch

        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"{self.prefix}: sample {len(self)}: tokens must be a non-empty 1-D array")
        if self.with_loss_mask:
            if loss_mask is None or len(loss_mask) != len(tokens):
                raise ValueError(f"{self.prefix}: sample {len(self)}: loss_mask must have len(tokens)={len(tokens)}")
            self._add(LOSSMASK, np.asarray(loss_mask, dtype=np.int8), torch)
        elif loss_mask is not None:
            raise ValueError(f"{self.prefix}: writer was created with with_loss_mask=False but got a loss_mask")
        for img in images:
            self._add(self._kinds[1], self._check_image(img), torch)
        self._add(TEXT, tokens, torch)
        self._offsets.append(self._offsets[-1] + len(images))
        self._num_tokens += len(tokens)

    def _add(self, kind: str, arr: np.ndarray, torch) -> None:
        b = self._builders[kind]
        b.add_item(torch.from_numpy(np.ascontiguousarray(arr).reshape(-1)))
        b.end_document()
        self.bytes_written += arr.nbytes

    def _check_image(self, img: Any) -> np.ndarray:
        if self.image_store == "encoded":
            if not isinstance(img, (bytes, bytearray, memoryview)) or len(img) == 0:
                raise ValueError(f"{self.prefix}: sample {len(self)}: an encoded image must be non-empty bytes, "
                                 f"got {type(img).__name__}")
            # The header only (no decode): the workers decoded it already; this catches a
            # caller passing images of another size or format into the shard.
            try:
                fmt, size = encoded_image_header(bytes(img))
            except ValueError as e:
                raise ValueError(f"{self.prefix}: sample {len(self)}: encoded image is {e}") from None
            if fmt not in ENCODED_FORMATS or size != (self.image_size, self.image_size):
                raise ValueError(f"{self.prefix}: sample {len(self)}: encoded image is {fmt} {size}, expected one of "
                                 f"{ENCODED_FORMATS} at ({self.image_size}, {self.image_size})")
            return np.frombuffer(bytearray(img), dtype=np.uint8)  # writable: torch.from_numpy warns otherwise
        img = np.asarray(img)
        if self.image_store == "pixels":
            want = (self.image_size, self.image_size, 3)
            if img.shape != want or img.dtype != np.uint8:
                raise ValueError(f"{self.prefix}: sample {len(self)}: image must be uint8 {want}, got {img.dtype} {img.shape}")
            return img
        if tuple(img.shape) != self.feature_shape:
            raise ValueError(f"{self.prefix}: sample {len(self)}: features must be {self.feature_shape}, got {img.shape}")
        return np.asarray(img, dtype=np.float16).view(np.int16)

    def append_shard(self, reader: "ShardReader") -> None:
        """Append a whole finished shard by concatenating its files (IndexedDatasetBuilder.add_index).

        The shard must match this writer's image store and geometry. A shard without a loss
        mask merged into a writer with one gets its default mask written sample by sample.
        """
        import torch

        m = reader.metadata
        if m["image_store"] != self.image_store or m.get("image_size") != self.image_size or (
            m.get("feature_shape") and tuple(m["feature_shape"]) != self.feature_shape
        ):
            raise ValueError(
                f"{reader.prefix}: image store {m['image_store']}/{m.get('image_size')}/{m.get('feature_shape')} "
                f"does not match {self.prefix}: {self.image_store}/{self.image_size}/{self.feature_shape}"
            )
        self._append_indexed(TEXT, reader.prefix)
        self._append_indexed(self._kinds[1], reader.prefix)
        if self.with_loss_mask:
            if m.get("has_loss_mask"):
                self._append_indexed(LOSSMASK, reader.prefix)
            else:
                for i in range(len(reader)):
                    self._add(LOSSMASK, reader.loss_mask(i), torch)
        elif m.get("has_loss_mask"):
            raise ValueError(f"{reader.prefix} has a loss mask but the output writer was created without one")
        base = self._offsets[-1]
        self._offsets.extend(int(base + x) for x in reader.image_offsets[1:])
        self._num_tokens += int(m.get("num_tokens", int(reader.sequence_lengths.sum())))
        for kind in (TEXT, self._kinds[1]):
            self.bytes_written += os.path.getsize(f"{reader.prefix}.{kind}.bin")

    def _append_indexed(self, kind: str, prefix: str) -> None:
        """IndexedDatasetBuilder.add_index without its gc.collect() per call (a third of a
        second each in a large process: hours over a merge of thousands of shards). The source
        index is read (and checked) with numpy, so no memory map needs collecting."""
        builder = self._builders[kind]
        lengths, documents = check_indexed_files(f"{prefix}.{kind}", _DTYPES[kind], with_documents=True)
        offset = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths.tolist())
        builder.document_indices.extend((offset + documents[1:]).tolist())
        with open(f"{prefix}.{kind}.bin", "rb") as f:
            shutil.copyfileobj(f, builder.data_file)

    def abort(self) -> None:
        """Close and delete every temporary file; no final-named file is created."""
        if self._done:
            return
        self._done = True
        for kind, b in self._builders.items():
            try:
                b.data_file.close()
            except Exception:
                pass
            for ext in (".bin", ".idx"):
                if os.path.exists(self._tmp(kind) + ext):
                    os.remove(self._tmp(kind) + ext)
        if os.path.exists(self._tmp("image_offsets") + ".npy"):
            os.remove(self._tmp("image_offsets") + ".npy")

    def finalize(self, **extra_metadata: Any) -> Dict[str, Any]:
        """Write the indices and metadata, then rename everything to final names (json last)."""
        if self._done:
            raise RuntimeError(f"{self.prefix}: writer already finalized or aborted")
        for kind, b in self._builders.items():
            b.finalize(self._tmp(kind) + ".idx")
        np.save(self._tmp("image_offsets") + ".npy", np.asarray(self._offsets, dtype=np.int64))
        meta = {
            "format_version": FORMAT_VERSION,
            "num_samples": len(self),
            "num_images": int(self._offsets[-1]),
            "num_tokens": int(self._num_tokens),
            "image_store": self.image_store,
            "image_size": self.image_size,
            "image_layout": {"pixels": "HWC uint8 RGB", "encoded": "encoded image files (JPEG/PNG/WEBP), decoded to RGB",
                             "features": None}[self.image_store],
            "feature_shape": list(self.feature_shape) if self.feature_shape else None,
            "feature_dtype": "float16" if self.image_store == "features" else None,
            "feature_storage": "int16_bits" if self.image_store == "features" else None,
            "has_loss_mask": self.with_loss_mask,
            "loss_mask_default": "all tokens except <image_start>/<image>/<image_end>",
            **self.metadata,
            **extra_metadata,
        }
        with open(self._tmp("meta") + ".json", "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        for kind in self._kinds:
            for ext in (".bin", ".idx"):
                os.replace(self._tmp(kind) + ext, f"{self.prefix}.{kind}{ext}")
        os.replace(self._tmp("image_offsets") + ".npy", f"{self.prefix}.image_offsets.npy")
        os.replace(self._tmp("meta") + ".json", f"{self.prefix}.json")
        self._done = True
        return meta


class ShardReader:
    """Random access to one finished shard (memory-mapped).

    Every accessor returns a copy: IndexedDataset closes its mmap when it is garbage collected,
    and a view outliving its reader would then segfault on access.
    """

    def __init__(self, prefix: str) -> None:
        meta_path = prefix + ".json"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: not a finished shard (interrupted preprocessing?)")
        self.prefix = prefix
        self.metadata: Dict[str, Any] = _read_metadata(meta_path)
        n = self.metadata["num_samples"]
        self._store = STORE_KINDS[self.metadata["image_store"]]
        idx = _indexed_dataset_module()

        # Every check runs before IndexedDataset maps a file: its own checks are bare asserts,
        # and a short .bin maps fine and fails only when a sample past its end is read.
        text_lengths = check_indexed_files(f"{prefix}.{TEXT}", _DTYPES[TEXT], idx)
        if len(text_lengths) != n:
            raise ShardError(f"{meta_path}: num_samples is {n} but {prefix}.{TEXT}.idx holds {len(text_lengths)} samples")
        image_lengths = check_indexed_files(f"{prefix}.{self._store}", _DTYPES[self._store], idx)
        self.image_offsets = _read_image_offsets(f"{prefix}.image_offsets.npy", n, meta_path,
                                                 f"{prefix}.{self._store}.idx", len(image_lengths))
        self._check_images(image_lengths)
        if self._store == ENCODED and len(image_lengths):
            self._check_first_encoded(int(image_lengths[0]))
        if self.metadata.get("has_loss_mask"):
            mask_lengths = check_indexed_files(f"{prefix}.{LOSSMASK}", _DTYPES[LOSSMASK], idx)
            bad = _first_mismatch(mask_lengths, text_lengths)
            if bad is not None:
                raise ShardError(f"{prefix}.{LOSSMASK}.idx: sample {bad}: mask length "
                                 f"{_at(mask_lengths, bad)} != text length {_at(text_lengths, bad)}")
        self._check_totals(text_lengths, len(image_lengths))

        tok = self.metadata.get("tokenizer") or {}
        self._image_token_ids = np.asarray([tok[k] for k in _IMAGE_TOKEN_KEYS if k in tok], dtype=np.int32)

        # What each mapped file was when opened: a file truncated under a memory map kills the
        # reader with SIGBUS at the first read past its new end, and one rewritten in place
        # gives other samples than the run planned; both are named before each read instead.
        mapped = [TEXT] + ([LOSSMASK] if self.metadata.get("has_loss_mask") else [])
        mapped += [self._store] if len(image_lengths) > 0 else []
        self._identity = {kind: _identity(f"{prefix}.{kind}.bin") for kind in mapped}
        self._text = idx.IndexedDataset(f"{prefix}.{TEXT}")
        self._mask = idx.IndexedDataset(f"{prefix}.{LOSSMASK}") if self.metadata.get("has_loss_mask") else None
        # A text-only shard has an empty image .bin, which cannot be memory-mapped: skip it.
        self._images = idx.IndexedDataset(f"{prefix}.{self._store}") if len(image_lengths) > 0 else None

    def _unchanged(self, kind: str) -> None:
        """Raise ShardError when ``kind``'s .bin is not the file this reader mapped (one stat)."""
        path = f"{self.prefix}.{kind}.bin"
        was = self._identity[kind]
        try:
            now = _identity(path)
        except OSError as exc:
            raise ShardError(f"{path} was removed under the running job ({exc.strerror})") from None
        if now != was:
            change = "replaced by another file" if now[1] != was[1] else f"rewritten ({was[0]} -> {now[0]} bytes)"
            raise ShardError(f"{path} was {change} while this job reads it: a shard must not change "
                             f"under a run (write new data to a new prefix, then point the run at it)")

    def _check_images(self, image_lengths: np.ndarray) -> None:
        """Every stored image has the geometry of the metadata; the tokenizer can mark images."""
        m, meta_path = self.metadata, self.prefix + ".json"
        if self._store == ENCODED:
            # An encoded image's length says nothing about its geometry; an empty one is damage.
            bad = np.flatnonzero(image_lengths <= 0)
            if len(bad):
                raise ShardError(f"{self.prefix}.{ENCODED}.idx: image {int(bad[0])} is empty "
                                 f"({len(bad)} of {len(image_lengths)} images are)")
        elif self._store == IMAGES:
            s = m["image_size"]
            want, what = s * s * 3, f"image_size {s} ({s}x{s}x3 bytes)"
        else:
            want, what = int(np.prod(m["feature_shape"])), f"feature_shape {m['feature_shape']}"
        bad = np.flatnonzero(image_lengths != want) if self._store != ENCODED else []
        if len(bad):
            i = int(bad[0])
            raise ShardError(f"{self.prefix}.{self._store}.idx: image {i} has {int(image_lengths[i])} values, expected "
                             f"{want} from {meta_path} {what} ({len(bad)} of {len(image_lengths)} images differ)")
        if len(image_lengths):
            # The default loss mask and the loader's placeholder expansion need these ids.
            tok = m.get("tokenizer")
            missing = [k for k in _IMAGE_TOKEN_KEYS if not isinstance(tok, dict) or not _is_int(tok.get(k))]
            if missing:
                raise ShardError(f"{meta_path}: the shard has {len(image_lengths)} images but its 'tokenizer' "
                                 f"section lacks {missing}")

    def _check_first_encoded(self, length: int) -> None:
        """The first encoded image's header matches the metadata (catches a shard written with
        the wrong image_size or a foreign .bin); the others are checked when decoded."""
        path = f"{self.prefix}.{ENCODED}.bin"
        with open(path, "rb") as f:
            data = f.read(length)
        try:
            fmt, size = encoded_image_header(data)
        except ValueError as e:
            raise ShardError(f"{path}: image 0 is not a readable image file ({e})") from None
        s = self.metadata["image_size"]
        if fmt not in ENCODED_FORMATS or size != (s, s):
            raise ShardError(f"{path}: image 0 is {fmt} {size[0]}x{size[1]}, expected one of {ENCODED_FORMATS} at "
                             f"{s}x{s} (image_size in {self.prefix}.json)")

    def _check_totals(self, text_lengths: np.ndarray, num_stored: int) -> None:
        """The json's summary counts, when present, agree with the index files."""
        meta_path = self.prefix + ".json"
        for key, actual, source in (("num_images", num_stored, f"{self.prefix}.{self._store}.idx"),
                                    ("num_tokens", int(text_lengths.sum(dtype=np.int64)), f"{self.prefix}.{TEXT}.idx")):
            if key in self.metadata and self.metadata[key] != actual:
                raise ShardError(f"{meta_path}: {key} is {self.metadata[key]!r} but {source} holds {actual}")

    def __len__(self) -> int:
        return int(self.metadata["num_samples"])

    @property
    def sequence_lengths(self) -> np.ndarray:
        """Token count of every sample (for packing without reading the tokens)."""
        return self._text.sequence_lengths

    def tokens(self, i: int) -> np.ndarray:
        self._unchanged(TEXT)
        return np.array(self._text[i])

    def num_images(self, i: int) -> int:
        return int(self.image_offsets[i + 1] - self.image_offsets[i])

    def encoded_images(self, i: int) -> list:
        """Sample i's images as their stored file bytes (encoded store only)."""
        if self._store != ENCODED:
            raise ValueError(f"{self.prefix}: image_store is {self.metadata['image_store']!r}, not 'encoded'")
        lo, hi = int(self.image_offsets[i]), int(self.image_offsets[i + 1])
        if hi > lo:
            self._unchanged(self._store)
        return [self._images[j].tobytes() for j in range(lo, hi)]

    def images(self, i: int) -> np.ndarray:
        """Sample i's images: uint8 ``[n, H, W, 3]`` (pixels; encoded, decoded here) or float16
        ``[n, tokens, dim]`` (features)."""
        lo, hi = int(self.image_offsets[i]), int(self.image_offsets[i + 1])
        if hi > lo:
            self._unchanged(self._store)
        if self._store == ENCODED:
            s = self.metadata["image_size"]
            out = [self._decode(self._images[j].tobytes(), lo, j) for j in range(lo, hi)]
            return np.stack(out) if out else np.zeros((0, s, s, 3), dtype=np.uint8)
        if self._store == IMAGES:
            s = self.metadata["image_size"]
            shape = (s, s, 3)
        else:
            shape = tuple(self.metadata["feature_shape"])
        out = [self._images[j].reshape(shape) for j in range(lo, hi)]
        arr = np.stack(out) if out else np.zeros((0, *shape), dtype=np.uint8 if self._store == IMAGES else np.int16)
        return arr if self._store == IMAGES else arr.view(np.float16)

    def _decode(self, data: bytes, first: int, j: int) -> np.ndarray:
        s = self.metadata["image_size"]
        try:
            pixels = decode_encoded_image(data)
        except ValueError as e:
            raise ShardError(f"{self.prefix}.{ENCODED}.bin: image {j} cannot be decoded ({e})") from None
        if pixels.shape != (s, s, 3):
            raise ShardError(f"{self.prefix}.{ENCODED}.bin: image {j} is {pixels.shape[1]}x{pixels.shape[0]}, "
                             f"expected {s}x{s} (image_size in {self.prefix}.json)")
        return pixels

    def loss_mask(self, i: int) -> np.ndarray:
        """int8 mask, 1 = the token is a training target. See the module docstring for the default."""
        if self._mask is not None:
            self._unchanged(LOSSMASK)
            return np.array(self._mask[i])
        tokens = self.tokens(i)
        return (~np.isin(tokens, self._image_token_ids)).astype(np.int8)


# --- encoded images ----------------------------------------------------------------------------


def encoded_image_header(data: bytes) -> tuple:
    """(PIL format, (width, height)) from an encoded image's header, without decoding it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=ENCODED_FORMATS) as img:
            return img.format, img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"not a {'/'.join(ENCODED_FORMATS)} image: {e}") from None


def decode_encoded_image(data: bytes) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB of an encoded JPEG/PNG/WebP image; ValueError if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    from megatron_unihetero.data.image_decode import to_rgb

    try:
        with Image.open(io.BytesIO(data), formats=ENCODED_FORMATS) as img:
            img.load()
            # preprocessing's decode (EXIF orientation, bit depth, alpha): a source kept as it
            # was decodes here as preprocessing saw it
            return np.array(to_rgb(img), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(str(e)) from None


# --- integrity checks (ShardReader.__init__) ---------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _at(a: np.ndarray, i: int) -> Any:
    return int(a[i]) if i < len(a) else "none"


def _first_mismatch(a: np.ndarray, b: np.ndarray) -> Optional[int]:
    """The first index where ``a`` and ``b`` differ (a length difference counts), or None."""
    k = min(len(a), len(b))
    bad = np.flatnonzero(a[:k] != b[:k])
    if len(bad):
        return int(bad[0])
    return None if len(a) == len(b) else k


def _read_metadata(meta_path: str) -> Dict[str, Any]:
    """The shard's json, with the fields the reader relies on checked."""
    try:
        with open(meta_path) as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{meta_path}: unreadable shard metadata ({e})") from e
    if not isinstance(m, dict):
        raise ShardError(f"{meta_path}: shard metadata must be a JSON object, got {type(m).__name__}")
    if m.get("format_version") not in READABLE_VERSIONS:
        raise ShardError(f"{meta_path}: format_version {m.get('format_version')!r} is not one this reader "
                         f"reads {READABLE_VERSIONS}")
    if not _is_int(m.get("num_samples")) or m["num_samples"] < 0:
        raise ShardError(f"{meta_path}: num_samples must be a non-negative integer, got {m.get('num_samples')!r}")
    store = m.get("image_store")
    if store == "encoded" and m["format_version"] < 2:
        raise ShardError(f"{meta_path}: image_store 'encoded' needs format_version 2, got {m['format_version']}")
    if store in ("encoded", "pixels"):
        if not _is_int(m.get("image_size")) or m["image_size"] <= 0:
            raise ShardError(f"{meta_path}: image_store {store!r} needs a positive integer image_size, "
                             f"got {m.get('image_size')!r}")
    elif store == "features":
        shape = m.get("feature_shape")
        if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(x) and x > 0 for x in shape):
            raise ShardError(f"{meta_path}: image_store 'features' needs feature_shape [tokens, dim] of positive "
                             f"integers, got {shape!r}")
    else:
        raise ShardError(f"{meta_path}: image_store must be one of {sorted(STORE_KINDS)}, got {store!r}")
    return m


def check_indexed_files(path_prefix: str, dtype: type, idx: Any = None, with_documents: bool = False):
    """Check one IndexedDataset pair ``path_prefix.idx/.bin``; returns its sequence lengths.

    Reads the .idx (header and arrays: O(number of sequences)) and only the size of the .bin.
    Raises :class:`ShardError` naming the file when the header is not megatron's, the dtype is
    not ``dtype``, the .idx size disagrees with its counts, the pointers are not the running
    sum of the lengths, or the .bin size is not the sum of the lengths times the dtype size.
    ``with_documents``: returns (lengths, document indices).
    """
    idx = idx or _indexed_dataset_module()
    idx_path, bin_path = path_prefix + ".idx", path_prefix + ".bin"
    for p in (idx_path, bin_path):
        if not os.path.isfile(p):
            raise ShardError(f"{p}: missing (every shard file is renamed into place before its json)")
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    if len(head) < _IDX_HEADER.size:
        raise ShardError(f"{idx_path}: {idx_size} bytes, shorter than the {_IDX_HEADER.size}-byte "
                         "IndexedDataset header (truncated?)")
    magic, version, code, n, d = _IDX_HEADER.unpack(head)
    if magic != idx._INDEX_HEADER:
        raise ShardError(f"{idx_path}: header {magic!r} is not an IndexedDataset index ({idx._INDEX_HEADER!r})")
    if version != _IDX_VERSION:
        raise ShardError(f"{idx_path}: index version {version}, expected {_IDX_VERSION}")
    want_code = idx.DType.code_from_dtype(dtype)
    if code != want_code:
        names = {c.value: c.name for c in idx.DType}
        raise ShardError(f"{idx_path}: dtype code {code} ({names.get(code, 'unknown')}), expected "
                         f"{want_code} ({np.dtype(dtype).name})")
    expected_idx = _IDX_HEADER.size + n * (4 + 8) + d * 8
    if idx_size != expected_idx:
        raise ShardError(f"{idx_path}: size {idx_size} bytes, expected {expected_idx} for its {n} sequences and "
                         f"{d} documents (truncated or padded)")
    off = _IDX_HEADER.size
    lengths = np.fromfile(idx_path, dtype=np.int32, count=n, offset=off)
    pointers = np.fromfile(idx_path, dtype=np.int64, count=n, offset=off + 4 * n)
    documents = np.fromfile(idx_path, dtype=np.int64, count=d, offset=off + 12 * n)
    if (lengths < 0).any():
        i = int(np.flatnonzero(lengths < 0)[0])
        raise ShardError(f"{idx_path}: sequence {i} has negative length {int(lengths[i])}")
    if d == 0 or int(documents[0]) != 0 or int(documents[-1]) != n:
        raise ShardError(f"{idx_path}: document indices must run from 0 to the {n} sequences, got "
                         f"{documents[:1].tolist()}..{documents[-1:].tolist()}")
    itemsize = np.dtype(dtype).itemsize
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    bad = np.flatnonzero(pointers != ends - lengths.astype(np.int64) * itemsize)
    if len(bad):
        i = int(bad[0])
        raise ShardError(f"{idx_path}: sequence {i} points to byte {int(pointers[i])}, expected "
                         f"{int(ends[i] - lengths[i] * itemsize)} (corrupt index)")
    expected_bin = int(ends[-1]) if n else 0
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        how = "truncated" if bin_size < expected_bin else "padded"
        raise ShardError(f"{bin_path}: size {bin_size} bytes, expected {expected_bin} ({n} sequences of "
                         f"{np.dtype(dtype).name} per {idx_path}): {how}")
    return (lengths, documents) if with_documents else lengths


def _read_image_offsets(path: str, num_samples: int, meta_path: str, images_idx: str, num_stored: int) -> np.ndarray:
    """``image_offsets.npy``: int ``[num_samples + 1]``, from 0, non-decreasing, ending at the images stored."""
    if not os.path.isfile(path):
        raise ShardError(f"{path}: missing")
    try:
        off = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ShardError(f"{path}: unreadable ({e})") from e
    if off.ndim != 1 or not np.issubdtype(off.dtype, np.integer):
        raise ShardError(f"{path}: must be a 1-D integer array, got {off.dtype} {off.shape}")
    if len(off) != num_samples + 1:
        raise ShardError(f"{path}: length {len(off)}, expected num_samples + 1 = {num_samples + 1} "
                         f"(num_samples from {meta_path})")
    if int(off[0]) != 0:
        raise ShardError(f"{path}: first entry is {int(off[0])}, expected 0")
    dec = np.flatnonzero(np.diff(off) < 0)
    if len(dec):
        i = int(dec[0])
        raise ShardError(f"{path}: decreases at sample {i} ({int(off[i])} -> {int(off[i + 1])})")
    if int(off[-1]) != num_stored:
        raise ShardError(f"{path}: last entry {int(off[-1])} but {images_idx} stores {num_stored} images")
    return off
