"""Jobs for tests/platform/test_distributed_helper.py (module-level: workers import them)."""

import os

import torch
import torch.distributed as dist


def all_reduce_job(expected_env: str) -> None:
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    assert t.item() == dist.get_world_size() * (dist.get_world_size() + 1) / 2
    assert os.environ.get("UNIHETERO_HELPER_CHECK") == expected_env
    assert os.getcwd() == expected_cwd_of_caller()


def expected_cwd_of_caller() -> str:
    return os.environ["UNIHETERO_HELPER_CWD"]


def failing_job() -> None:
    dist.barrier()
    if dist.get_rank() == 1:
        raise ValueError("rank one fails on purpose")
    dist.barrier()


def printing_job(marker: str) -> None:
    print(f"{marker} from rank {dist.get_rank()}", flush=True)


def join_twice() -> None:
    """For tests/platform/test_init_distributed.py. Joins twice: the second join (after a
    teardown, as in-process tests and tools do) sees the RANK the first one wrote into the
    environment."""
    from megatron_unihetero import parallel

    for _ in range(2):
        parallel.init_distributed(0.5)
        print("world", dist.get_world_size(), dist.get_rank(), flush=True)
        dist.destroy_process_group()
