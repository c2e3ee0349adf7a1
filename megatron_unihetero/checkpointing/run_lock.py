"""One run per checkpoint directory.

Two runs started on one ``checkpoint.dir`` (a resubmitted job while the first still runs, a
copy-pasted command) would both write ``iter_*`` folders and move ``latest``, and one run's
checkpoints would be silently lost. The run's global rank 0 holds ``CKPT_DIR/run.lock`` for
the run's lifetime: a JSON record of the holder (host, pid, the process's start time, the
scheduler's job id, when it started), refreshed (its mtime) at most every
:data:`REFRESH_EVERY_S` seconds, from the loop's per-step call.

A second run refuses to start, naming the holder, unless the holder is gone:

- same host: its pid is not alive, or is alive with another start time (a reused pid);
- the same scheduler job (``SLURM_JOB_ID`` / torchrun's ``TORCHELASTIC_RUN_ID``): a requeue or
  an in-job restart of this very run, possibly on another node;
- another host: the lock has not been refreshed for ``stale_after_s`` (the holder's node died).

A lock left by a dead run is taken over with a warning. File locks (flock / fcntl) are not used:
they are not reliable on the network filesystems checkpoints live on (Lustre without
``-o flock``, NFS across clients), and they say nothing about who holds them.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
from typing import Callable, Optional

import psutil

from megatron_unihetero.checkpointing.errors import CheckpointError

LOCK_NAME = "run.lock"
# How often the holder touches the lock: far below any staleness window, and one metadata
# write a minute on a shared filesystem rather than one a step.
REFRESH_EVERY_S = 60.0
JOB_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")


def _job_id() -> Optional[str]:
    for name in JOB_VARIABLES:
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": psutil.Process().create_time(), "job": _job_id(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


class RunLock:
    """``CKPT_DIR/run.lock`` held by this process (call on global rank 0 only)."""

    def __init__(self, ckpt_dir: str, stale_after_s: float, log: Callable[[str], None] = print):
        self.path = os.path.join(ckpt_dir, LOCK_NAME)
        self.stale_after_s = stale_after_s
        self.log = log
        self.held = False
        self._refreshed = 0.0  # time.monotonic() of the last refresh

    def acquire(self) -> None:
        """Take the lock, or raise :class:`CheckpointError` naming the live holder, or the
        folder when it cannot be written (the run would fail at its first save otherwise)."""
        try:
            self._acquire()
        except OSError as exc:
            raise CheckpointError(
                f"cannot take {self.path} ({type(exc).__name__}: {exc}): checkpoint.dir must be "
                f"a folder this run can create and write") from None

    def _acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = _this_process()
        holder = self._holder()
        if holder is not None:
            why_gone = self._gone(holder, me)
            if why_gone is None:
                raise CheckpointError(
                    f"{os.path.dirname(self.path)} is in use by another run: host "
                    f"{holder.get('host')} pid {holder.get('pid')}"
                    f"{' (' + holder['job'] + ')' if holder.get('job') else ''}, started "
                    f"{holder.get('started')}, lock refreshed {self._age_s():.0f} s ago. Two runs "
                    f"on one checkpoint.dir would overwrite each other's checkpoints: give this "
                    f"run another checkpoint.dir, or stop that run. If it is gone, remove "
                    f"{self.path}")
            if why_gone:
                self.log(f"WARNING: taking over {self.path} from host {holder.get('host')} pid "
                         f"{holder.get('pid')} (started {holder.get('started')}): {why_gone}")
        tmp = f"{self.path}.{me['host']}.{me['pid']}.tmp"
        with open(tmp, "w") as handle:
            json.dump(me, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self.held = True
        self._refreshed = time.monotonic()

    def refresh(self) -> None:
        """Tell other runs the holder is alive (the lock's mtime); call it every step, it writes
        at most every :data:`REFRESH_EVERY_S` seconds."""
        now = time.monotonic()
        if self.held and now - self._refreshed >= REFRESH_EVERY_S:
            os.utime(self.path)
            self._refreshed = now

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid() \
                    and holder.get("host") == socket.gethostname():
                os.remove(self.path)
            self.held = False

    # -- the holder ------------------------------------------------------------------------
    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path) as handle:
                holder = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.log(f"WARNING: {self.path} is unreadable ({type(exc).__name__}: {exc}); taking it over")
            return {}
        return holder if isinstance(holder, dict) else {}

    def _age_s(self) -> float:
        try:
            return time.time() - os.path.getmtime(self.path)
        except OSError:
            return float("inf")

    def _gone(self, holder: dict, me: dict) -> Optional[str]:
        """Why the holder no longer runs ("" for our own or an unreadable lock), or None when
        it may still run."""
        if not holder:
            return ""
        if holder.get("host") == me["host"]:
            if holder.get("pid") == me["pid"]:
                return ""  # this process (a second manager, a second run in one process)
            if not _alive(holder.get("pid"), holder.get("process_start")):
                return "its process is no longer running"
            return None
        if me["job"] is not None and holder.get("job") == me["job"]:
            return f"the same job ({me['job']}) restarted"
        if self._age_s() > self.stale_after_s:
            return f"not refreshed for {self._age_s():.0f} s (more than {self.stale_after_s:.0f} s)"
        return None


def _alive(pid, process_start) -> bool:
    try:
        process = psutil.Process(int(pid))
        return process_start is None or abs(process.create_time() - float(process_start)) < 1.0
    except psutil.AccessDenied:
        return True  # it exists (another user's): not ours to call dead
    except (psutil.NoSuchProcess, TypeError, ValueError):
        return False
