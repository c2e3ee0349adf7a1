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
