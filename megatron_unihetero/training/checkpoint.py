"""Training checkpoints: complete or absent, resumable, the last K kept.

    CKPT_DIR/latest                       name of the newest *complete* iteration folder
    CKPT_DIR/iter_0000100/config.yaml     the resolved run config
    CKPT_DIR/iter_0000100/dist/           model (+ megatron optimizer) state, torch_dist:
                                          every rank writes its own part (checkpointing/dist.py)
    CKPT_DIR/iter_0000100/engine/         DeepSpeed's own checkpoint (deepspeed engine only)
    CKPT_DIR/iter_0000100/trainer.pt      step, LR scheduler, loader position, RNG states (rank 0)
    CKPT_DIR/iter_0000100/manifest.json   every other file of the folder: size and sha256
    CKPT_DIR/requeue.json                 present while the run has stopped early to be run
                                          again (a signal, a deadline: training/stopping.py)

A save (:class:`CheckpointManager`, the one owner of a run's checkpoints) has every rank write
its part into the iteration folder, in place or in a forked writer process
(``checkpoint.async_save``: training goes on meanwhile),
then *commits* it once every rank's write finished: the files are hashed and fsynced (spread
over the ranks), rank 0 writes the manifest, fsyncs it and the folders, and only then moves
``latest`` (write-then-rename) and prunes. A crash or a failed write (a full disk) before the
commit leaves ``latest`` and the older checkpoints as they were.

A file can still be damaged after the save (a full disk during a copy, a truncated transfer),
so a resume verifies the manifest first (:func:`resume_candidate`): sizes always, checksums in
``full`` mode, and with fallback it takes the newest checkpoint that verifies. Files are loaded
with ``torch.load(weights_only=True)`` or torch_dist's tensor reads: no pickle of untrusted data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from megatron_unihetero import platform
from megatron_unihetero.checkpointing import dist as dist_ckpt
from megatron_unihetero.checkpointing import pickles
from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.checkpointing.run_lock import RunLock
from megatron_unihetero.config_io import load_config, save_config
from megatron_unihetero.training.config import RunConfig

LATEST = "latest"
# Written (global rank 0) when a run stopped before train.steps to be run again, removed when a
# run takes the folder: the launch scripts requeue the job when they find it
# (examples/launch/slurm.sbatch), whatever exit status the launcher passed on.
REQUEUE = "requeue.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# sha256: hardware-accelerated through OpenSSL on current CPUs, and checkable by hand with
# `sha256sum`. The manifest records the algorithm, so verification follows what was written.
CHECKSUM = "sha256"
VERIFY_MODES = ("full", "sizes")
_ITER = re.compile(r"^iter_(\d{7})$")
_NONE, _FAILED = -1, -2  # broadcast codes: no checkpoint / rank 0 raised


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
        raise CheckpointError(f"{pointer} names {name!r}, which is not an iteration folder in {ckpt_dir}")
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

    Collective when a process group is up (every rank calls it, after every rank's write and
    before :func:`mark_latest`): rank 0 lists the files, each rank hashes and fsyncs its share
    (largest first, so the ranks finish together: at 7B a checkpoint is ~100 GB, too much for
    one reader), and rank 0 writes the manifest and fsyncs it and every folder, so ``latest``
    never names a checkpoint still in the page cache. Alone, one process does all of it.
    """
    rank, world = _rank_and_world()
    listing = [[(rel, os.path.getsize(os.path.join(iter_dir, rel))) for rel in _files_under(iter_dir)]
               if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(listing, src=0)
    mine = {rel: _hash_and_sync(os.path.join(iter_dir, rel)) for rel in _share(listing[0], rank, world)}
    parts = [mine]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
    path = os.path.join(iter_dir, MANIFEST)
    if rank == 0:
        files = {rel: entry for part in parts for rel, entry in part.items()}
        with open(path + ".tmp", "w") as handle:
            json.dump({"format": MANIFEST_FORMAT, "iteration": os.path.basename(os.path.normpath(iter_dir)),
                       "checksum": CHECKSUM, "files": files}, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(path + ".tmp", path)
        for folder, _, _ in os.walk(iter_dir):
            _fsync_dir(folder)
    if world > 1:
        dist.barrier()
    return path


def _share(listing: List[Tuple[str, int]], rank: int, world: int) -> List[str]:
    """This rank's files: the largest go first, each to the rank with the least bytes so far."""
    load = [0] * world
    mine = []
    for rel, size in sorted(listing, key=lambda item: (-item[1], item[0])):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += size
        if owner == rank:
            mine.append(rel)
    return mine


def _hash_and_sync(path: str) -> dict:
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, CHECKSUM).hexdigest()
        # On one machine this flushes any process's writes to the file; on a network
        # filesystem each writer's close already has.
        os.fsync(handle.fileno())
        return {"size": os.fstat(handle.fileno()).st_size, CHECKSUM: digest}


def _rank_and_world() -> Tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


def on_rank0(decide: Callable[[], int],
             refused: str = "global rank 0 rejected the checkpoint to load; its log names the file") -> int:
    """Run ``decide`` on global rank 0 and broadcast its integer answer to every rank.

    Whatever rank 0 raises is raised there after the broadcast, and the other ranks raise a
    :class:`CheckpointError` saying ``refused``: no rank is left waiting in a collective.
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
        raise CheckpointError(refused)
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


class CheckpointManager:
    """The one owner of a run's checkpoints: what to resume, loading, saving, committing.

    Built before the engine (it decides the resume point once, collectively, and a weights-only
    ``checkpoint.load`` goes into the bare model chunks); the loop then calls :meth:`load` once
    and :meth:`save` at its cadence, :meth:`poll` every step and :meth:`close` at the end.

    A save has every rank write its part into the iteration folder (the engine's files and
    megatron-core's torch_dist request, ``Engine.save``; trainer.pt on rank 0), in place or in
    a forked writer (``checkpoint.async_save``: megatron-core's ``AsyncCallsQueue``, training
    goes on, :meth:`poll` finalises once every rank is done), then commits it (:func:`commit`:
    manifest, ``latest``, prune). One save is in flight at a time. A failed write raises
    :class:`CheckpointError` naming the folder and leaves ``latest`` where it was; a model
    with non-finite parameters is never saved.
    """

    def __init__(self, cfg: RunConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.ck = cfg.checkpoint
        self.log = log
        # One run per checkpoint directory (checkpointing/run_lock.py), held by global rank 0;
        # a node that stopped refreshing it for twice the collective timeout is taken as dead.
        self.progress: dict = {}  # the loop's counters, from trainer.pt on a resume (load)
        self.lock = RunLock(self.ck.dir, stale_after_s=2 * cfg.parallel.timeout_minutes * 60, log=log)
        on_rank0(self._acquire_lock,
                 refused=f"global rank 0 found {self.ck.dir} in use by another run; its log names it")
        self.queue = AsyncCallsQueue() if self.ck.async_save else None
        self.in_flight: Optional[str] = None
        self.last_committed: Optional[str] = None
        # Decided once, on global rank 0 (verifying reads the checkpoint), the same on all ranks.
        self.resume_dir = (agree_on_resume(self.ck.dir, self.ck.verify, self.ck.fallback, repoint=True)
                           if self.ck.resume else None)

    def _acquire_lock(self) -> int:
        self.lock.acquire()
        # An earlier run's request to be run again is answered by this run.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.ck.dir, REQUEUE))
        return 0

    def mark_requeue(self, step: int, reason: str) -> None:
        """Record that the run stopped at ``step`` (committed) before its end, to be run again:
        ``CKPT_DIR/requeue.json``, written by global rank 0; collective, so that no rank ends
        (and no launcher tears the job down) before the file is there."""
        if _rank_and_world()[0] == 0:
            path = os.path.join(self.ck.dir, REQUEUE)
            with open(path + ".tmp", "w") as handle:
                json.dump({"step": step, "checkpoint": self.latest_name(), "reason": reason,
                           "job": os.environ.get("SLURM_JOB_ID")}, handle, indent=1)
            os.replace(path + ".tmp", path)
        barrier()

    # -- load --------------------------------------------------------------------------------
    def load_initial_weights(self, chunks) -> bool:
        """``checkpoint.load``, weights only, into the bare model chunks when the run does not
        resume (before the engine wraps them); whether it loaded."""
        if self.resume_dir is not None or not self.ck.load:
            return False
        dist_ckpt.load_model(chunks, dist_ckpt.dist_dir(self._resolve_load(self.ck.load)))
        return True

    def _resolve_load(self, path: str) -> str:
        """``checkpoint.load``: a checkpoint dir (its newest verified iteration; ``latest`` is
        not moved in another run's folder) or an iteration folder (verified when it has a
        manifest)."""
        if os.path.isfile(os.path.join(path, LATEST)):
            return agree_on_resume(path, self.ck.verify, self.ck.fallback)
        agree_on_folder(path, self.ck.verify)
        return path

    def load(self, engine, loader) -> int:
        """Resume engine (model, optimizer, its state), loader position and RNG states from the
        resume point; returns the step to continue from (0 without one)."""
        if self.resume_dir is None:
            if self.ck.load:
                self.log(f"initialised weights from {self.ck.load}")
            return 0
        engine.load(self.resume_dir)
        state = load_trainer_state(self.resume_dir)
        step = int(state["step"])
        self.progress = dict(state.get("progress") or {})  # absent in older checkpoints
        engine.load_state_dict(state, step)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.log(f"resumed from {self.resume_dir} at step {step}")
        return step

    # -- save --------------------------------------------------------------------------------
    def save(self, step: int, engine, loader, progress: Optional[dict] = None) -> Optional[str]:
        """Save step ``step``; collective. ``progress``: the loop's counters (samples seen),
        kept in trainer.pt and given back by :meth:`load` as :attr:`progress`. Returns the
        folder, committed as ``latest`` now or, with ``checkpoint.async_save``, by a later
        :meth:`poll`; None (nothing written,
        ``latest`` and older checkpoints untouched) when the model is non-finite."""
        if not _all_ranks(engine.parameters_are_finite()):
            # A NaN/Inf model must never become `latest` (a restart would resume from it) nor
            # make pruning delete the good checkpoints before it.
            self.log(f"not saving a checkpoint at step {step}: the model has non-finite "
                     f"parameters; latest stays {self.latest_name()}")
            return None
        self.wait()  # one save in flight: the previous one commits first
        iter_dir = iteration_dir(self.ck.dir, step)
        if self.latest_name() == iter_dir:
            return iter_dir  # this step is the checkpoint resumed from (a SIGTERM right after)
        if dist.get_rank() == 0:
            # Whatever an earlier, uncommitted save of this step left (a crash, a full disk)
            # must not end up in this checkpoint's manifest.
            shutil.rmtree(iter_dir, ignore_errors=True)
            os.makedirs(iter_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(iter_dir, "config.yaml"))
        barrier()
        with naming_failures(iter_dir):
            request = engine.save(iter_dir)
            if dist.get_rank() == 0:
                save_trainer_state(iter_dir, dict(engine.state_dict(), step=step, rng=rng_state(),
                                                  loader=loader.state_dict(), progress=dict(progress or {})))
        self._write(iter_dir, request)
        return iter_dir

    def _write(self, iter_dir: str, request: AsyncRequest) -> None:
        if self.queue is None:
            with naming_failures(iter_dir):
                request.execute_sync()
            self._commit(iter_dir)
            return
        request.add_finalize_fn(lambda: commit(self.ck.dir, iter_dir, self.ck.keep_last))
        self.in_flight = iter_dir
        with naming_failures(iter_dir):
            self.queue.schedule_async_request(request)

    def poll(self) -> Optional[str]:
        """Finalise a finished asynchronous write (collective); the folder committed, if any.
        Called every step: it also tells other runs this one is alive (the run lock)."""
        self.lock.refresh()
        return self._finalize(blocking=False)

    def wait(self) -> Optional[str]:
        """Block until the write in flight is committed; the folder, if there was one."""
        return self._finalize(blocking=True)

    def close(self) -> Optional[str]:
        """Commit the write in flight and stop the writer; the folder committed, if any."""
        committed = self.wait()
        if self.queue is not None:
            self.queue.close()
        return committed

    def release(self) -> None:
        """Give the checkpoint directory back (the run lock) when the run ends, however."""
        self.lock.release()

    def _finalize(self, blocking: bool) -> Optional[str]:
        if self.queue is None or self.in_flight is None:
            return None
        iter_dir = self.in_flight
        with naming_failures(iter_dir):
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        if not done:
            return None
        self.in_flight = None
        self._committed(iter_dir)
        return iter_dir

    def _commit(self, iter_dir: str) -> None:
        commit(self.ck.dir, iter_dir, self.ck.keep_last)
        self._committed(iter_dir)

    def _committed(self, iter_dir: str) -> None:
        self.last_committed = iter_dir
        self.log(f"saved checkpoint {iter_dir}")

    def latest_name(self) -> str:
        """The folder ``latest`` names, or "none"."""
        latest = latest_iteration_dir(self.ck.dir) if os.path.isdir(self.ck.dir) else None
        return latest or "none"


def _all_ranks(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (collective when a process group is up)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=platform.device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def commit(ckpt_dir: str, iter_dir: str, keep_last: int) -> None:
    """Make the fully written ``iter_dir`` the ``latest`` checkpoint; collective."""
    barrier()  # every rank's files (trainer state, DeepSpeed's partitions) are on disk
    write_manifest(iter_dir)  # synced to disk before `latest` names the folder
    if _rank_and_world()[0] == 0:
        mark_latest(ckpt_dir, iter_dir)
        prune(ckpt_dir, keep_last)
    barrier()


@contextlib.contextmanager
def naming_failures(iter_dir: str):
    """A failed write (disk full, no permission, a rank's writer died) as a CheckpointError
    that names the folder; ``latest`` is only moved by a commit, so it is untouched."""
    try:
        yield
    except CheckpointError:
        raise
    # torch's CheckpointException (what megatron-core raises on every rank when a write
    # failed) derives from BaseException, not Exception.
    except (Exception, TorchCheckpointException) as exc:
        raise CheckpointError(f"writing checkpoint {iter_dir} failed: {type(exc).__name__}: {exc}. "
                              f"latest still names the previous checkpoint") from exc


def load_model_weights(iter_dir: str) -> Dict[str, torch.Tensor]:
    """The model of checkpoint folder ``iter_dir`` as one TP=1/PP=1 state dict, on this one
    process, whatever layout saved it (built from the folder's config.yaml)."""
    run = load_config(RunConfig, os.path.join(iter_dir, "config.yaml"))
    return dist_ckpt.load_full_model_state(iter_dir, run.model)


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


TRAINER_STATE_KEYS = ("step", "loader", "rng")


def load_trainer_state(iter_dir: str) -> dict:
    """trainer.pt, weights-only (tensors, containers, numbers: nothing in it can run code); a
    file torch refuses or that lacks the loop's keys is the CheckpointError naming it."""
    path = os.path.join(iter_dir, "trainer.pt")
    pickles.check_torch_file(path)  # the same scan, and words, as every pickle of a checkpoint
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()
        raise CheckpointError(f"{path} cannot be loaded safely ({type(exc).__name__}: "
                              f"{reason[0] if reason else ''}): a file written by someone else, or "
                              f"damaged; refusing it") from None
    missing = [key for key in TRAINER_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: it is not a trainer state this project wrote")
    return state


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
