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
    teardown, as in-process tests and tools do) must see the environment as the first found it;
    each join prints whether os.environ changed."""
    from megatron_unihetero import parallel

    before = dict(os.environ)
    for _ in range(2):
        parallel.init_distributed(0.5)
        print("world", dist.get_world_size(), dist.get_rank(), flush=True)
        print("environ", "untouched" if dict(os.environ) == before else "changed", flush=True)
        dist.destroy_process_group()


def lend_launcher_variables() -> None:
    """For tests/platform/test_init_distributed.py: DeepSpeed's variables inside the block, the
    environment as it was after it (a variable set before is kept; one changed inside is
    restored)."""
    from megatron_unihetero import parallel
    from megatron_unihetero.parallel.deepspeed_mpu import launcher_environment

    parallel.init_distributed(0.5)
    os.environ["WORLD_SIZE"] = "1"  # one of them set before: kept, and still set after
    before = dict(os.environ)
    with launcher_environment():
        print("inside", os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], flush=True)
        os.environ["LOCAL_RANK"] = "7"  # changed inside (DeepSpeed may): restored too
    print("after", "restored" if dict(os.environ) == before else "changed", flush=True)
    dist.destroy_process_group()


def rebuild_groups_over_a_world_that_stays() -> None:
    """For tests/platform/test_init_distributed.py: megatron-core's groups built five times over
    one world (a test process running the tools in turn); prints the process's thread count
    after the first build and after the last (gloo starts threads per group)."""
    from megatron_unihetero import parallel

    def threads() -> int:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))

    parallel.init_distributed(0.5)
    for build in range(5):
        parallel.initialize(1, 1, seed=build)
        if build == 0:
            first = threads()
    print("threads", first, threads(), flush=True)
    parallel.destroy()
    print("after destroy", threads(), flush=True)
    dist.destroy_process_group()
