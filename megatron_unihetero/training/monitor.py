"""Where a run's time and memory go: phase timers, the straggler check, a profiler window.

* :class:`PhaseTimer`: the wall time of the phases of one step on this rank (the engines time
  ``forward_backward`` and ``optimizer``; the trainer ``data`` and ``checkpoint``), logged as
  ``time_<phase>_s`` in metrics.jsonl, so a data stall or a slow save shows in the step it
  costs. On a GPU the host runs ahead of the device, so each boundary synchronises the device
  (two or three syncs per step; ``logging.time_breakdown=false`` turns the timers off).
* :func:`slowest_rank`: at each log interval, every rank's step time in one all-gather of a
  scalar; the slowest rank and its time are logged, so one slow node shows before it becomes
  a hang (Megatron-Bridge's straggler detection in its simplest form).
* :class:`ProfileWindow`: ``logging.profile_steps = [first, last]`` runs torch.profiler over
  those steps on ``logging.profile_ranks`` and writes a trace that TensorBoard's profiler
  plugin and Perfetto read (``LOGGING_DIR/profile/``); on a GPU the CUDA memory history of
  the window is dumped too (``memory_snapshot_rank{R}.pickle``, for pytorch.org/memory_viz),
  on CPU the peak resident memory (``memory_rank{R}.json``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import resource
import time
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_unihetero import platform


class PhaseTimer:
    """Accumulates the wall time of named phases (seconds) until :meth:`pop`."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.times: Dict[str, float] = collections.defaultdict(float)

    def _sync(self) -> None:
        if platform.has_cuda():
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] += time.perf_counter() - start

    def pop(self) -> Dict[str, float]:
        """The phases timed since the last pop."""
        times, self.times = dict(self.times), collections.defaultdict(float)
        return times


def slowest_rank(step_s: float) -> Dict[str, float]:
    """Every rank's step time (one all-gather of a scalar over the world): the slowest rank,
    its time and the median's. Collective: every rank calls it at the same steps."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {"slowest_rank": 0.0, "slowest_rank_step_s": step_s, "median_rank_step_s": step_s}
    mine = torch.tensor([step_s], dtype=torch.float64, device=platform.device())
    every = torch.empty(world, dtype=torch.float64, device=platform.device())
    dist.all_gather_into_tensor(every, mine)
    every = every.cpu()
    rank = int(torch.argmax(every))
    return {"slowest_rank": float(rank), "slowest_rank_step_s": float(every[rank]),
            "median_rank_step_s": float(every.median())}


class ProfileWindow:
    """torch.profiler over steps ``first..last`` (inclusive) on the chosen global ranks."""

    def __init__(self, steps: Optional[Sequence[int]], ranks: Sequence[int], folder: str) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.active = bool(steps) and rank in set(int(r) for r in ranks)
        self.rank, self.folder = rank, os.path.join(folder, "profile")
        self.profiler: Optional[torch.profiler.profile] = None
        self.written: List[str] = []

    def step_begins(self, step: int) -> None:
        """Call before step ``step`` (1-based) runs."""
        if not self.active or step != self.first:
            return
        os.makedirs(self.folder, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if platform.has_cuda():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = torch.profiler.profile(
            activities=activities, record_shapes=True, profile_memory=True,
            # one cycle over the window: each step is a ProfilerStep#N span in the trace
            schedule=torch.profiler.schedule(wait=0, warmup=0, active=self.last - self.first + 1, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(self.folder, worker_name=f"rank{self.rank}"))
        self.profiler.start()

    def step_ends(self, step: int) -> None:
        """Call after step ``step`` ran (its checkpoint and evaluation included)."""
        if self.profiler is None:
            return
        self.profiler.step()
        if step < self.last:
            return
        self.profiler.stop()
        self.profiler = None
        self.written = sorted(os.path.join(self.folder, name) for name in os.listdir(self.folder)
                              if name.startswith(f"rank{self.rank}.") and name.endswith(".json"))
        if platform.has_cuda():
            path = os.path.join(self.folder, f"memory_snapshot_rank{self.rank}.pickle")
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
        else:
            path = os.path.join(self.folder, f"memory_rank{self.rank}.json")
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            with open(path, "w") as handle:
                json.dump({"steps": [self.first, self.last], "peak_rss_gib": peak}, handle)
        self.written.append(path)

    def close(self) -> None:
        """A run that ends inside the window still writes what it profiled."""
        if self.profiler is not None:
            self.step_ends(self.last)
