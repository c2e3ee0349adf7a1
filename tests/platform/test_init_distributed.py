"""How a process joins its process group (parallel.init_distributed), in fresh interpreters: a
process without a launcher is a world of one whatever rendezvous variables its shell left, and
its environment is left as it was; DeepSpeed's variables are lent around its calls only."""

import os
import subprocess
import sys

import pytest

# Joins twice: the second join (after a teardown, as in-process tests and tools do) must see the
# environment as the first found it; each join prints whether os.environ changed.
JOIN = ("import os, torch.distributed as dist; from megatron_unihetero import parallel\n"
        "before = dict(os.environ)\n"
        "for _ in range(2):\n"
        "    parallel.init_distributed(0.5); print('world', dist.get_world_size(), dist.get_rank())\n"
        "    print('environ', 'untouched' if dict(os.environ) == before else 'changed')\n"
        "    dist.destroy_process_group()")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _join(**env):
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run([sys.executable, "-c", JOIN], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("env", [{}, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}],
                         ids=["bare", "stray-master-addr"])
def test_a_process_without_a_launcher_is_a_world_of_one(env):
    # Port 1 cannot be bound: a process that tried the env:// rendezvous would fail.
    proc = _join(**env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("world 1 0") == 2
    # A world of one writes no RANK / WORLD_SIZE / LOCAL_RANK (nor anything else) into os.environ.
    assert proc.stdout.count("environ untouched") == 2, proc.stdout


def test_a_world_size_without_a_rank_is_refused_by_name():
    proc = _join(WORLD_SIZE="2")
    assert proc.returncode != 0
    assert "WORLD_SIZE=2 but RANK is not set" in proc.stderr


def test_deepspeed_variables_are_lent_for_the_block_and_restored():
    code = ("import os, torch.distributed as dist; from megatron_unihetero import parallel\n"
            "from megatron_unihetero.parallel.deepspeed_mpu import launcher_environment\n"
            "parallel.init_distributed(0.5)\n"
            "os.environ['WORLD_SIZE'] = '1'  # one of them set before: kept, and still set after\n"
            "before = dict(os.environ)\n"
            "with launcher_environment():\n"
            "    print('inside', os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK'])\n"
            "    os.environ['LOCAL_RANK'] = '7'  # changed inside (DeepSpeed may): restored too\n"
            "print('after', 'restored' if dict(os.environ) == before else 'changed')\n"
            "dist.destroy_process_group()")
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    proc = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "inside 0 1 0" in proc.stdout and "after restored" in proc.stdout, proc.stdout
