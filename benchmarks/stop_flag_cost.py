#!/usr/bin/env python
"""The cost of the per-step stop decision (training/stopping.py ``StopPolicy.agree``): one
all-reduce (MAX) of two int64 numbers per step, with the clock read for the deadline.

    python benchmarks/stop_flag_cost.py [--world 2 --calls 2000]

On CPU with gloo (the ranks started from the test forkserver): the mean time of one ``agree``
per rank, with a deadline set (the clock read) and a handler installed, next to the time of a
step of the tiny run (megatron_unihetero.testing.runs) for scale. On a GPU the flag is a CUDA
tensor and ``tolist`` synchronises the stream, which the step's own logging already does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_unihetero.testing import run_distributed_test  # noqa: E402


def _job(calls: int) -> None:
    from megatron_unihetero.training.config import TrainConfig
    from megatron_unihetero.training.stopping import StopPolicy

    policy = StopPolicy(TrainConfig(exit_after_minutes=600), environ={})
    for _ in range(50):  # warm-up: gloo's pairs, the allocator
        policy.agree(step_s=1.0)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        assert policy.agree(step_s=1.0) is None
    agree_us = (time.perf_counter() - start) / calls * 1e6
    # For comparison: the bare one-number all-reduce the trainer ran per step before.
    flag = torch.zeros(1)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bool(flag.item())
    bare_us = (time.perf_counter() - start) / calls * 1e6
    means = [None] * dist.get_world_size()
    dist.all_gather_object(means, (agree_us, bare_us))
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f"StopPolicy.agree over {world} gloo ranks: "
              + ", ".join(f"rank {r} {m[0]:.1f} us" for r, m in enumerate(means)) + " per call")
        print("a bare 1-number all_reduce (the trainer's per-step flag before): "
              + ", ".join(f"rank {r} {m[1]:.1f} us" for r, m in enumerate(means)) + " per call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    run_distributed_test(_job, args.world, args.calls)


if __name__ == "__main__":
    main()
