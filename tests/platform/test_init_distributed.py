"""How a process joins its process group (parallel.init_distributed), in new processes that
have joined none: a process without a launcher is a world of one whatever rendezvous variables
its shell left, and its environment is left as it was; DeepSpeed's variables are lent by its
engine only (deepspeed_mpu.launcher_environment), and given back.

The processes are forkserver workers (megatron_unihetero.testing.run_in_fresh_process): new
processes with exactly the environment given, which have imported torch and the package but
never run a collective; until now each was a new interpreter started with ``python -c``, which
paid the import again and proved nothing more (init_distributed reads the environment when it
is called)."""

import os

import pytest

from megatron_unihetero.testing import run_in_fresh_process

from tests.platform import _helper_jobs as jobs

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _fresh(job, **env):
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return run_in_fresh_process(job, env={**base, **env}, timeout_s=120)


@pytest.mark.parametrize("env", [{}, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}],
                         ids=["bare", "stray-master-addr"])
def test_a_process_without_a_launcher_is_a_world_of_one(env):
    # Port 1 cannot be bound: a process that tried the env:// rendezvous would fail.
    proc = _fresh(jobs.join_twice, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("world 1 0") == 2
    # A world of one writes no RANK / WORLD_SIZE / LOCAL_RANK (nor anything else) into os.environ.
    assert proc.stdout.count("environ untouched") == 2, proc.stdout


def test_a_world_size_without_a_rank_is_refused_by_name():
    proc = _fresh(jobs.join_twice, WORLD_SIZE="2")
    assert proc.returncode != 0
    assert "WORLD_SIZE=2 but RANK is not set" in proc.stderr


def test_deepspeed_variables_are_lent_for_the_block_and_restored():
    proc = _fresh(jobs.lend_launcher_variables)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inside 0 1 0" in proc.stdout and "after restored" in proc.stdout, proc.stdout


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_rebuilt_groups_do_not_pile_up_over_a_world_that_stays():
    # megatron-core's destroy_model_parallel forgets its groups; torch kept them (about 50 gloo
    # threads per build) until parallel.destroy destroyed them: 4000 threads in the test process.
    proc = _fresh(jobs.rebuild_groups_over_a_world_that_stays)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, last = (int(n) for n in proc.stdout.split("threads", 1)[1].split()[:2])
    assert last <= first + 2, proc.stdout
    after = int(proc.stdout.split("after destroy", 1)[1].split()[0])
    assert after < first - 20, proc.stdout  # the groups' threads are gone
