"""Training checkpoints: complete or absent, resumable, the last K kept.

    CKPT_DIR/latest                       name of the newest *complete* iteration folder
    CKPT_DIR/iter_0000100/config.yaml     the resolved run config
    CKPT_DIR/iter_0000100/model/          per-(TP, PP) safetensors + layout.json (model_io.py)
    CKPT_DIR/iter_0000100/engine/         optimizer state per (TP, PP) rank (engine-specific)
    CKPT_DIR/iter_0000100/trainer.pt      step, LR scheduler, loader position, RNG states (rank 0)
    CKPT_DIR/iter_0000100/manifest.json   every other file of the folder: size and sha256

Every rank writes its part into the iteration folder, all ranks meet at a barrier, then rank 0
writes the manifest (reading every file, so on a shared filesystem it sees all ranks' parts),
fsyncs the files, the manifest and the folders, and only then moves ``latest``
(write-then-rename). A crash mid-save leaves ``latest`` on the previous complete checkpoint.

A file can still be damaged after the save (a full disk during a copy, a truncated transfer),
so a resume verifies the manifest first (:func:`resume_candidate`): sizes always, checksums in
``full`` mode, and with fallback it takes the newest checkpoint that verifies. Files are loaded
with ``torch.load(weights_only=True)`` or safetensors: no pickle of untrusted data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_unihetero import platform
from megatron_unihetero.checkpointing import model_io

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# sha256: hardware-accelerated through OpenSSL on current CPUs, and checkable by hand with
# `sha256sum`. The manifest records the algorithm, so verification follows what was written.
CHECKSUM = "sha256"
VERIFY_MODES = ("full", "sizes")
_ITER = re.compile(r"^iter_(\d{7})$")
_NONE, _FAILED = -1, -2  # broadcast codes: no checkpoint / rank 0 raised


class CheckpointError(model_io.CheckpointError):
    """A checkpoint that is missing, incomplete or corrupt; the message names the file."""


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
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(pointer + ".tmp", pointer)
    _fsync_dir(ckpt_dir)  # the rename itself survives a power loss only once the folder is synced


def iteration_step(iter_dir: str) -> int:
    match = _ITER.match(os.path.basename(os.path.normpath(iter_dir)))
    if match is None:
        raise CheckpointError(f"{iter_dir} is not an iteration folder (iter_NNNNNNN)")
    return int(match.group(1))


def iteration_names(ckpt_dir: str) -> List[str]:
    """The iteration folders of ``ckpt_dir``, newest first."""
    return sorted((n for n in os.listdir(ckpt_dir) if _ITER.match(n)
                   and os.path.isdir(os.path.join(ckpt_dir, n))), reverse=True)


# -- the manifest ------------------------------------------------------------------------------
def write_manifest(iter_dir: str) -> str:
    """``iter_dir/manifest.json``: every file under ``iter_dir`` with its size and checksum.

    Call it after every rank has written its part (after the barrier) and before
    :func:`mark_latest`. Each file is fsynced as it is hashed (on one machine that flushes any
    process's writes to it; on a network filesystem each writer's close already has), then the
    manifest and every folder, so ``latest`` never names a checkpoint still in the page cache.
    """
    files = {}
    for rel in _files_under(iter_dir):
        with open(os.path.join(iter_dir, rel), "rb") as handle:
            digest = hashlib.file_digest(handle, CHECKSUM).hexdigest()
            os.fsync(handle.fileno())
            files[rel] = {"size": os.fstat(handle.fileno()).st_size, CHECKSUM: digest}
    path = os.path.join(iter_dir, MANIFEST)
    with open(path + ".tmp", "w") as handle:
        json.dump({"format": MANIFEST_FORMAT, "iteration": os.path.basename(os.path.normpath(iter_dir)),
                   "checksum": CHECKSUM, "files": files}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)
    for folder, _, _ in os.walk(iter_dir):
        _fsync_dir(folder)
    return path


def manifest_problems(iter_dir: str, mode: str = "full") -> List[str]:
    """What is wrong with ``iter_dir`` against its manifest; empty when it verifies.

    ``sizes`` compares sizes only; ``full`` also compares checksums, reading each file once
    (only when every size matched: a truncated file needs no read to be found). Files that the
    manifest does not list are ignored (a later load may add converted state to the folder).
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verification mode must be one of {VERIFY_MODES}; got {mode!r}")
    name = os.path.basename(os.path.normpath(iter_dir))
    path = os.path.join(iter_dir, MANIFEST)
    if not os.path.isfile(path):
        return [f"{name}/{MANIFEST} is missing (a checkpoint from before manifests, or a save "
                f"that did not finish)"]
    try:
        with open(path) as handle:
            manifest = json.load(handle)
        files = manifest["files"]
        algorithm = manifest.get("checksum", CHECKSUM)
        expected = {rel: int(entry["size"]) for rel, entry in files.items()}
        if algorithm not in hashlib.algorithms_available:
            raise ValueError(f"unknown checksum {algorithm!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{name}/{MANIFEST} is unreadable: {type(exc).__name__}: {exc}"]
    problems = []
    for rel in sorted(files):
        full_path = os.path.join(iter_dir, rel)
        if not os.path.isfile(full_path):
            problems.append(f"{name}/{rel}: missing (the manifest lists {expected[rel]} bytes)")
            continue
        size = os.path.getsize(full_path)
        if size != expected[rel]:
            problems.append(f"{name}/{rel}: size {size}, manifest says {expected[rel]}")
    if problems or mode == "sizes":
        return problems
    for rel in sorted(files):
        with open(os.path.join(iter_dir, rel), "rb") as handle:
            digest = hashlib.file_digest(handle, algorithm).hexdigest()
        if digest != files[rel].get(algorithm):
            problems.append(f"{name}/{rel}: {algorithm} checksum mismatch (the file changed "
                            f"after it was saved)")
    return problems


def verify_checkpoint(iter_dir: str, mode: str = "full", require_manifest: bool = True) -> bool:
    """Raise :class:`CheckpointError` naming the file when ``iter_dir`` fails its manifest.

    Returns True when it verified, False when it has no manifest and ``require_manifest`` is
    off (a checkpoint written before manifests existed: readers that load a folder they were
    pointed at still accept it).
    """
    if not require_manifest and not os.path.isfile(os.path.join(iter_dir, MANIFEST)):
        return False
    problems = manifest_problems(iter_dir, mode)
    if problems:
        raise CheckpointError(f"checkpoint {iter_dir} failed verification: {'; '.join(problems)}")
    return True


def resume_candidate(ckpt_dir: str, mode: str = "full",
                     fallback: bool = True) -> Tuple[Optional[str], Optional[str]]:
    """(the checkpoint to resume from, a note for the log), or (None, None) without ``latest``.

    The one ``latest`` names comes first; with ``fallback`` the older ones follow, newest first,
    and the first that verifies is taken. Folders newer than ``latest`` are never candidates:
    ``latest`` is what a save commits. Raises :class:`CheckpointError` when ``latest``'s
    checkpoint fails and ``fallback`` is off, or when no checkpoint verifies (starting afresh
    would train over them; ``checkpoint.resume=false`` does that on purpose).
    """
    latest = latest_iteration_dir(ckpt_dir)
    if latest is None:
        return None, None
    newest = os.path.basename(latest)
    failed = []
    for name in [n for n in iteration_names(ckpt_dir) if n <= newest]:
        path = os.path.join(ckpt_dir, name)
        problems = manifest_problems(path, mode)
        if not problems:
            if not failed:
                return path, None
            return path, "; ".join(failed) + f"; resuming from {name}"
        failed.append(f"{name} failed verification ({'; '.join(problems)})")
        if not fallback:
            raise CheckpointError(f"checkpoint {path} failed verification: {'; '.join(problems)}. "
                                  f"Repair or remove it, or resume from the newest checkpoint "
                                  f"that verifies with --checkpoint.fallback=true")
    raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies: {'; '.join(failed)}. Start "
                          f"afresh with --checkpoint.resume=false (or another checkpoint.dir)")


def agree_on_resume(ckpt_dir: str, mode: str = "full", fallback: bool = True,
                    repoint: bool = False) -> Optional[str]:
    """:func:`resume_candidate` decided on global rank 0, the same answer on every rank.

    Rank 0 alone reads the files (one read per checkpoint, not one per rank) and logs the
    fallback. With ``repoint`` (the run's own folder) a fallback moves ``latest`` back to the
    checkpoint resumed from, so a crash before the next save cannot leave ``latest`` naming the
    damaged one, and pruning then treats the damaged one as any other unverified folder.
    """
    def decide() -> int:
        if not os.path.isdir(ckpt_dir):
            return _NONE
        path, note = resume_candidate(ckpt_dir, mode, fallback)
        if path is None:
            return _NONE
        if note:
            if repoint:
                mark_latest(ckpt_dir, path)
            print(f"[megatron_unihetero] {note}", flush=True)
        return iteration_step(path)

    step = on_rank0(decide)
    return None if step == _NONE else iteration_dir(ckpt_dir, step)


def agree_on_folder(iter_dir: str, mode: str = "full") -> bool:
    """:func:`verify_checkpoint` of one named folder on global rank 0 (a folder without a
    manifest is accepted, unverified); every rank gets the answer or the error."""
    return on_rank0(lambda: int(verify_checkpoint(iter_dir, mode, require_manifest=False))) == 1


def on_rank0(decide: Callable[[], int]) -> int:
    """Run ``decide`` on global rank 0 and broadcast its integer answer to every rank.

    Whatever rank 0 raises is raised there after the broadcast, and the other ranks raise a
    :class:`CheckpointError` pointing at rank 0's log: no rank is left waiting in a collective.
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    code, error = _FAILED, None
    if not distributed or dist.get_rank() == 0:
        try:
            code = decide()
        except Exception as exc:  # re-raised below, once every rank knows
            error = exc
    if distributed:
        flag = torch.tensor([code], dtype=torch.int64, device=platform.device())
        dist.broadcast(flag, src=0)
        code = int(flag.item())
    if error is not None:
        raise error
    if code == _FAILED:
        raise CheckpointError("global rank 0 rejected the checkpoint to load; its log names the file")
    return code


def prune(ckpt_dir: str, keep_last: int, mode: str = "sizes") -> List[str]:
    """Delete all but the newest ``keep_last`` *verified* checkpoints and the one ``latest``
    names. Unverified folders (a damaged file, no manifest) do not count towards ``keep_last``,
    so a damaged newest checkpoint never pushes the last good one out. ``sizes`` by default:
    pruning runs at every save and must not re-read every checkpoint."""
    if keep_last <= 0:
        return []
    latest = latest_iteration_dir(ckpt_dir)
    keep = {os.path.basename(latest)} if latest is not None else set()
    names = iteration_names(ckpt_dir)
    verified = 0
    for name in names:
        if verified >= keep_last:
            break
        if not manifest_problems(os.path.join(ckpt_dir, name), mode):
            keep.add(name)
            verified += 1
    doomed = [n for n in names if n not in keep]
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


def _files_under(folder: str) -> List[str]:
    """Relative paths of every file under ``folder`` but the manifest, in a stable order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel not in (MANIFEST, MANIFEST + ".tmp"):
                found.append(rel.replace(os.sep, "/"))
    return found


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_lists(value):
    if isinstance(value, tuple):
        return [_to_lists(v) for v in value]
    return value


def _to_tuples(value):
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value
