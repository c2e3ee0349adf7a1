"""Training checkpoints: complete or absent, resumable, the last K kept.

    CKPT_DIR/latest                       name of the newest *complete* iteration folder
    CKPT_DIR/iter_0000100/config.yaml     the resolved run config
    CKPT_DIR/iter_0000100/model/          per-(TP, PP) safetensors + layout.json (model_io.py)
    CKPT_DIR/iter_0000100/engine/         optimizer state per (TP, PP) rank (engine-specific)
    CKPT_DIR/iter_0000100/trainer.pt      step, LR scheduler, loader position, RNG states (rank 0)

Every rank writes its part into the iteration folder, all ranks meet at a barrier, then rank 0
moves ``latest`` (write-then-rename). A crash mid-save leaves ``latest`` on the previous
complete checkpoint, so restarting the same command resumes from a whole one. Files are loaded
with ``torch.load(weights_only=True)`` or safetensors: no pickle of untrusted data.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import List, Optional

import torch
import torch.distributed as dist

LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7})$")


def iteration_dir(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"iter_{step:07d}")


def latest_iteration_dir(ckpt_dir: str) -> Optional[str]:
    """The newest complete checkpoint, or None when there is none."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as handle:
        name = handle.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not _ITER.match(name) or not os.path.isdir(path):
        raise RuntimeError(f"{pointer} names {name!r}, which is not an iteration folder in {ckpt_dir}")
    return path


def mark_latest(ckpt_dir: str, iter_dir: str) -> None:
    pointer = os.path.join(ckpt_dir, LATEST)
    with open(pointer + ".tmp", "w") as handle:
        handle.write(os.path.basename(iter_dir) + "\n")
    os.replace(pointer + ".tmp", pointer)


def prune(ckpt_dir: str, keep_last: int) -> List[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the latest)."""
    if keep_last <= 0:
        return []
    latest = latest_iteration_dir(ckpt_dir)
    names = sorted(n for n in os.listdir(ckpt_dir) if _ITER.match(n))
    doomed = [n for n in names[:-keep_last] if os.path.join(ckpt_dir, n) != latest]
    for name in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    return doomed


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_trainer_state(iter_dir: str, state: dict) -> None:
    path = os.path.join(iter_dir, "trainer.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_trainer_state(iter_dir: str) -> dict:
    return torch.load(os.path.join(iter_dir, "trainer.pt"), weights_only=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _to_lists(value):
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value):
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value
