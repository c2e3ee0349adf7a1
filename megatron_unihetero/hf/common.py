"""Pieces both converters share: all-or-nothing output folders and safetensors writing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Dict, Iterator

import torch
from safetensors.torch import save_file

from megatron_unihetero.hf.configs import ConversionError

MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default max_shard_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def staged_output(target: str) -> Iterator[str]:
    """Yield a temporary sibling folder; rename it to ``target`` only if the body succeeds.

    A failed or interrupted conversion therefore never leaves a half-written ``target`` that
    a later ``from_pretrained`` or resume would mistake for a complete one. The published folder
    is readable by everyone (:func:`publish_modes`), whatever the umask, ``mkdtemp``'s 0700 or
    the 0600 of files written through temporary files made.
    """
    target = os.path.abspath(target)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ConversionError(f"output {target!r} already exists and is not empty; "
                              f"choose a new folder (nothing is overwritten)")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        yield staging
        publish_modes(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(target):
        os.rmdir(target)  # empty (checked above)
    os.replace(staging, target)


FILE_MODE, DIR_MODE = 0o644, 0o755


def publish_modes(root: str) -> None:
    """Set ``root`` and every folder under it to 0755 and every file to 0644 (links untouched)."""
    os.chmod(root, DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, DIR_MODE if name in dirs else FILE_MODE)


def cast_floats(state: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_hf_weights(state: Dict[str, torch.Tensor], folder: str,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json``."""
    shards, current, size = [], {}, 0
    for name in sorted(state):
        tensor = state[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata=metadata)
        return
    weight_map, total = {}, 0
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file_name), metadata=metadata)
        for name, tensor in shard.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=1)
