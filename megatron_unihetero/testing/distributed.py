"""Run a function on N ranks with torch.distributed, for tests (gloo on CPU, nccl on GPU).

Workers are *spawned*, never forked: gloo in forked children of a long pytest process can
deadlock. The function and its arguments must therefore be picklable
(a module-level function). A failure on any rank is re-raised in the parent with that rank's
traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, kwargs, error_dir, timeout_s):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # Two cores for the whole machine: one intra-op thread per rank avoids oversubscription.
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        fn(*args, **kwargs)
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as handle:
            handle.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed_test(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: int = 300,
    **kwargs: Any,
) -> None:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; raise if any rank fails."""
    with tempfile.TemporaryDirectory() as error_dir:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), backend, fn, args, kwargs, error_dir, timeout_s),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except Exception as exc:
            reports = []
            for name in sorted(os.listdir(error_dir)):
                with open(os.path.join(error_dir, name)) as handle:
                    reports.append(f"--- {name} ---\n{handle.read()}")
            raise RuntimeError("distributed test failed:\n" + "\n".join(reports)) from exc
