"""Tiny on-disk inputs for tests and benchmarks: a tokenizer, images, jsonl, webdataset tars.

Shipped in the package (not under tests/) so tests, benchmarks and other engineers' tests
(e.g. the loader's) can build real shards in a temp folder in a fraction of a second.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from megatron_unihetero.data.demo_world import write_demo_data
from megatron_unihetero.data.preprocess.train_spm import train_sentencepiece


def png_bytes(seed: int = 0, size=(40, 30), fmt: str = "PNG") -> bytes:
    """A small random image, non-square on purpose (exercises resize + centre crop)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def train_tiny_tokenizer(folder: str, num_samples: int = 200, vocab_size: int = 400) -> str:
    """A SentencePiece model trained on demo-world text; returns the .model path."""
    data = os.path.join(folder, "tok_data")
    write_demo_data(data, num_samples, seed=123, image_size=16, valid_fraction=0.0)
    path = os.path.join(folder, "tiny.model")
    train_sentencepiece([os.path.join(data, "train.parquet")], path, vocab_size, ["caption", "question", "answer"])
    return path


def write_jsonl(path: str, rows: Iterable[Any], raw_lines: Optional[Dict[int, str]] = None) -> str:
    """One JSON value per line; ``raw_lines[i]`` replaces line i verbatim (for broken JSON)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write((raw_lines or {}).get(i, json.dumps(row)) + "\n")
    return path


def write_webdataset(path: str, samples: List[Dict[str, bytes]]) -> str:
    """A tar with members ``{key}.{ext}``; ``samples[i]`` maps ext -> bytes (key = 6-digit i)."""
    with tarfile.open(path, "w") as tar:
        for i, files in enumerate(samples):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return path


def save_tiny_dinov2(folder: str) -> str:
    """A randomly initialised 2-layer Dinov2 (32px, patch 8 -> 1 + 16 tokens of dim 32)."""
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    Dinov2Model(cfg).eval().save_pretrained(folder)
    return folder
