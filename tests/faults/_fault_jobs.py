"""Pretraining processes that fail on purpose, for the fault tests.

    python -m tests.faults._fault_jobs FAULT [pretrain overrides ...]

FAULT is ``none`` or ``KIND@STEP``, acting on the checkpoint save of that step:
- ``kill_mid_write@S``: the process is killed (SIGKILL) while torch_dist writes its tensor
  files (the writer, a forked child, writes one item and then kills its parent);
- ``kill_before_commit@S``: killed after every file is written, before the manifest and
  ``latest`` (the commit);
- ``enospc@S``: writing the tensor files fails with "No space left on device";
- ``stall@S``: before step S, rank 1 sleeps longer than ``parallel.timeout_minutes`` (a hung
  rank: the others' next collective times out);
- ``usr1@S``: before step S, rank 1 alone sends itself SIGUSR1 (the exit signal reaching one
  rank: every rank must stop after step S);
- ``sigkill@S``: before step S, rank 1 is killed (SIGKILL), in torchrun's first try only (its
  restart goes on).
The faults are injected by wrapping the functions they hit, in this process only.

The heavy imports (torch, megatron-core, the package) are inside the functions, not at the top:
this module is the ``__main__`` of its process, and megatron-core's checkpoint writer starts a
``spawn`` multiprocessing Manager at the first save, whose process imports ``__main__`` again
(top-level imports here cost that helper process seconds at every first save).
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import time



def _is_step(path: str, step: int) -> bool:
    return f"iter_{step:07d}" in str(path)


def _wrap_tensor_writes(step: int, fault):
    """Run ``fault(stream)`` before each item torch_dist writes into the checkpoint of ``step``
    (in the forked writer process)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async._write_item

    @functools.wraps(original)  # megatron inspects its signature
    def write_item(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write"))
        if _is_step(getattr(stream, "name", ""), step):
            fault(stream)
        return original(*args, **kwargs)

    filesystem_async._write_item = write_item


def kill_mid_write(step: int) -> None:
    def fault(stream):
        # Something of the file is on disk, then the training process dies mid-save. Written
        # through the writer's own stream: with multistorageclient installed, megatron-core
        # writes through msc.open, whose file is a hidden .NAME.tmp until it is closed.
        stream.write(b"\0" * 64)
        stream.flush()
        os.kill(os.getppid(), signal.SIGKILL)
        os._exit(1)

    _wrap_tensor_writes(step, fault)


def kill_before_commit(step: int) -> None:
    from megatron_unihetero.training import checkpoint as ckpt

    original = ckpt.write_manifest

    def write_manifest(iter_dir):
        if _is_step(iter_dir, step):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(iter_dir)

    ckpt.write_manifest = write_manifest


def enospc(step: int) -> None:
    def fault(stream):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stream.name)

    _wrap_tensor_writes(step, fault)


def stall(step: int) -> None:
    from megatron_unihetero.training.trainer import Trainer

    original = Trainer.next_batches

    def next_batches(self):
        if self.step + 1 == step and int(os.environ.get("RANK", "0")) == 1:
            time.sleep(60 * self.cfg.parallel.timeout_minutes * 4)
        return original(self)

    Trainer.next_batches = next_batches


def _before_step_on_rank1(step: int, action) -> None:
    """Run ``action()`` on rank 1 as it starts loading the batches of ``step``."""
    from megatron_unihetero.training.trainer import Trainer

    original = Trainer.next_batches

    def next_batches(self):
        if self.step + 1 == step and int(os.environ.get("RANK", "0")) == 1:
            action()
        return original(self)

    Trainer.next_batches = next_batches


def usr1(step: int) -> None:
    _before_step_on_rank1(step, lambda: os.kill(os.getpid(), signal.SIGUSR1))


def sigkill(step: int) -> None:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        _before_step_on_rank1(step, lambda: os.kill(os.getpid(), signal.SIGKILL))


FAULTS = {"kill_mid_write": kill_mid_write, "kill_before_commit": kill_before_commit,
          "enospc": enospc, "stall": stall, "usr1": usr1, "sigkill": sigkill}


def _inject(fault: str) -> None:
    if fault != "none":
        kind, step = fault.split("@")
        FAULTS[kind](int(step))


def main(argv) -> None:
    from megatron_unihetero import pretrain

    fault, overrides = argv[0], argv[1:]
    _inject(fault)
    pretrain.main(overrides)


def requeue_job(fault: str, overrides, exit_status: int) -> None:
    """pretrain with ``fault`` in a worker of the test forkserver (no process of its own),
    expected to end with ``SystemExit(exit_status)`` (the requeue status)."""
    from megatron_unihetero import pretrain

    _inject(fault)
    try:
        pretrain.main(overrides)
    except SystemExit as exc:
        if exc.code != exit_status:
            raise
        return
    raise AssertionError(f"the run ended without the exit status {exit_status}")


if __name__ == "__main__":
    main(sys.argv[1:])
