"""When a run stops before ``train.steps``: a signal, or a deadline coming up.

A multi-day run lives through many scheduler allocations. The run stops itself, cleanly, when

- it receives ``train.exit_signal`` (SIGUSR1 by default; examples/launch/slurm.sbatch has Slurm
  send it ahead of the time limit) or SIGTERM (a preemption, Slurm's own end of a job), or
- a deadline is near: ``train.exit_after_minutes`` after the process started, and the job's end
  time that Slurm puts in the environment (``SLURM_JOB_END_TIME``, seconds since the epoch; the
  projected end when the job started, so a limit changed later is not seen). Nothing else is
  asked of the scheduler. The run stops when one more step, a save (the longest this process
  has measured) and ``train.exit_margin_minutes`` would not fit before the earlier of the two.

The decision is collective: each rank says what it saw, and one all-reduced pair (MAX over the
ranks: the highest signal number, deadline yes / no) per step makes every rank stop after the
same step, so no rank waits in a collective that the others have left; a signal delivered to
one rank only stops them all. Then the trainer saves (committing an asynchronous save in
flight), and pretrain exits with :data:`EXIT_REQUEUE`: run the same command again to resume.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Callable, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_unihetero import platform
from megatron_unihetero.training.config import exit_signal_name

# pretrain's exit status for "stopped before train.steps, checkpoint committed, run the same
# command again": sysexits.h's EX_TEMPFAIL (a temporary failure; the user is invited to retry).
# Distinct from pretrain's own codes (2 config, 3 non-finite, 4 checkpoint, 5 collective).
EXIT_REQUEUE = 75
SLURM_END_TIME = "SLURM_JOB_END_TIME"
# torchrun sets these in its workers.
TORCHRUN_RUN_ID = "TORCHELASTIC_RUN_ID"
TORCHRUN_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
TORCHRUN_MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"


def signal_number(name: str) -> Optional[int]:
    """``train.exit_signal`` as a signal number (None for ``none``)."""
    name = exit_signal_name(name)
    return None if name == "NONE" else int(getattr(signal, name))


def requeue_exit_status(environ: Mapping[str, str] = os.environ) -> int:
    """The process's exit status after a stop for a requeue: :data:`EXIT_REQUEUE`, but 0 under
    torchrun, which counts any other status as a failed worker (and spends one of its
    ``--max-restarts`` on it) and does not pass a worker's status on; the checkpoint folder's
    ``requeue.json`` says it for every launcher (training/checkpoint.py)."""
    return 0 if environ.get(TORCHRUN_RUN_ID) else EXIT_REQUEUE


def torchrun_restarts(environ: Mapping[str, str] = os.environ) -> Tuple[int, Optional[int]]:
    """(restarts of the worker group so far, the most torchrun will do) under torchrun; (0, None)
    otherwise."""
    def number(name):
        try:
            return int(environ[name])
        except (KeyError, ValueError):
            return None
    return number(TORCHRUN_RESTART_COUNT) or 0, number(TORCHRUN_MAX_RESTARTS)


def slurm_end_time(environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """The job's end time from ``SLURM_JOB_END_TIME`` (epoch seconds), None when unset or not a
    positive number (a job without a time limit)."""
    value = environ.get(SLURM_END_TIME, "").strip()
    try:
        end = float(value)
    except ValueError:
        return None
    return end if math.isfinite(end) and end > 0 else None


class StopPolicy:
    """Whether the run stops after this step, decided the same on every rank (:meth:`agree`).

    Build it when the process starts (``train.exit_after_minutes`` counts from then) and call
    :meth:`install` from the main thread: the handlers only note the signal. ``clock`` (wall
    seconds since the epoch, like ``SLURM_JOB_END_TIME``) and ``environ`` are for tests.
    """

    def __init__(self, train_cfg, *, clock: Callable[[], float] = time.time,
                 environ: Mapping[str, str] = os.environ):
        self.clock = clock
        self.started = clock()
        self.exit_signal = signal_number(train_cfg.exit_signal)
        self.margin_s = 60.0 * train_cfg.exit_margin_minutes
        deadlines = []
        if train_cfg.exit_after_minutes is not None:
            deadlines.append((self.started + 60.0 * train_cfg.exit_after_minutes,
                              f"train.exit_after_minutes={train_cfg.exit_after_minutes:g}"))
        end = slurm_end_time(environ)
        if end is not None:
            deadlines.append((end, f"the job's end time ({SLURM_END_TIME}={end:.0f})"))
        self.deadline, self.deadline_source = min(deadlines) if deadlines else (None, None)
        self.received: Optional[int] = None  # the last stop signal this process got
        self.save_s = 0.0  # the longest save this process measured

    # -- what this rank sees -----------------------------------------------------------------
    def install(self) -> None:
        """Handle the exit signal and SIGTERM: note it, nothing else (the loop stops after the
        step it is in)."""
        def handler(signum, frame):
            self.received = signum
        for signum in {signal.SIGTERM, self.exit_signal} - {None}:
            signal.signal(signum, handler)

    def note_save(self, seconds: float) -> None:
        """A save took ``seconds`` (the margin before a deadline keeps room for the longest)."""
        self.save_s = max(self.save_s, seconds)

    def deadline_near(self, step_s: float) -> bool:
        """Whether one more step of ``step_s`` seconds, a save and the margin no longer fit
        before the deadline."""
        if self.deadline is None:
            return False
        return self.clock() + step_s + self.save_s + self.margin_s >= self.deadline

    # -- what the ranks agree on -----------------------------------------------------------------
    def agree(self, step_s: float) -> Optional[str]:
        """Why every rank stops after this step (a signal's name, or the deadline), or None;
        collective when a process group is up: one all-reduce of two numbers."""
        flags = torch.tensor([self.received or 0, int(self.deadline_near(step_s))],
                             dtype=torch.int64, device=platform.device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, deadline = (int(v) for v in flags.tolist())
        if signum:
            return signal.Signals(signum).name
        if deadline:
            return f"the deadline ({self.deadline_source}) is near"
        return None
