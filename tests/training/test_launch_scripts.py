"""The launch scripts in examples/launch/ and the paper-scale config (no GPU, no launch).

Scripts run with DRY_RUN=1, which prints the torchrun / deepspeed / srun command instead of
starting it, after the same topology check a real launch does.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_unihetero.config_io import load_config
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import RunConfig

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "examples" / "launch"
TINY = "examples/configs/tiny_cpu.yaml"
PAPER = REPO / "examples" / "configs" / "paper_7b.yaml"
SCRIPTS = ["torchrun_single_node.sh", "torchrun_multi_node.sh", "deepspeed_hostfile.sh",
           "slurm.sbatch", "_common.sh"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NNODES", "GPUS_PER_NODE",
                                     "DIST_TIMEOUT", "RDZV_", "HOSTFILE", "DRY_RUN"))}
    full_env.update(DRY_RUN="1", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=60)


def _command(proc: subprocess.CompletedProcess) -> list:
    """The printed command: the line after the DRY_RUN marker, shell-split."""
    lines = proc.stdout.splitlines()
    idx = next(i for i, line in enumerate(lines) if "DRY_RUN=1, would run" in line)
    return shlex.split(lines[idx + 1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    path = LAUNCH / script
    assert path.is_file(), path
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text()
    if script != "_common.sh":
        assert "set -euo pipefail" in text


def test_single_node_dry_run():
    proc = _run("torchrun_single_node.sh", TINY, "--train.steps=5", GPUS_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr
    assert "world size 2" in proc.stdout
    assert "TP=1 x PP=1 x DP=2" in proc.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in proc.stdout
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in proc.stdout
    cmd = _command(proc)
    assert cmd[0] == "torchrun"
    assert "--nproc_per_node=2" in cmd and "--nnodes=1" in cmd
    i = cmd.index("-m")
    assert cmd[i + 1:] == ["megatron_unihetero.pretrain", "--config", TINY, "--train.steps=5"]


def test_multi_node_dry_run_with_overrides_and_timeout():
    proc = _run("torchrun_multi_node.sh", TINY, "--parallel.tensor_parallel=2",
                NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="29400",
                GPUS_PER_NODE="4", DIST_TIMEOUT_MINUTES="45", RDZV_TIMEOUT_S="1200")
    assert proc.returncode == 0, proc.stderr
    assert "2 node(s) x 4 GPU(s)/node = world size 8" in proc.stdout
    assert "TP=2 x PP=1 x DP=4" in proc.stdout
    assert "NCCL 45 min" in proc.stdout
    cmd = _command(proc)
    assert cmd[0] == "torchrun"
    for flag in ("--nnodes=2", "--node_rank=1", "--nproc_per_node=4", "--master_addr=node0",
                 "--master_port=29400", "--rdzv_conf=timeout=1200"):
        assert flag in cmd, (flag, cmd)
    tail = cmd[cmd.index("-m") + 1:]
    # the timeout override goes first, so an explicit user override would still win
    assert tail == ["megatron_unihetero.pretrain", "--config", TINY,
                    "--parallel.timeout_minutes=45", "--parallel.tensor_parallel=2"]
    # and the printed overrides are ones pretrain accepts
    load_config(RunConfig, str(REPO / TINY), tail[3:])


def test_multi_node_requires_rendezvous_env():
    proc = _run("torchrun_multi_node.sh", TINY, NNODES="2", GPUS_PER_NODE="1")
    assert proc.returncode != 0
    assert "NODE_RANK" in proc.stderr


@pytest.mark.parametrize("script", ["torchrun_single_node.sh", "torchrun_multi_node.sh"])
def test_world_size_not_divisible_by_tp_pp_exits_2(script):
    proc = _run(script, TINY, "--parallel.tensor_parallel=2", "--parallel.pipeline_parallel=2",
                NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", GPUS_PER_NODE="6")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "world size 6" in proc.stderr
    assert "not divisible by TP x PP = 2 x 2 = 4" in proc.stderr
    assert "would run" not in proc.stdout


def test_bad_override_exits_2():
    proc = _run("torchrun_single_node.sh", TINY, "--no_such.key=1", GPUS_PER_NODE="1")
    assert proc.returncode == 2
    assert "unknown key" in proc.stderr


def test_deepspeed_dry_run(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode0 slots=4\nnode1 slots=4\n")
    proc = _run("deepspeed_hostfile.sh", TINY, "--train.steps=3", HOSTFILE=str(hostfile))
    assert proc.returncode == 0, proc.stderr
    assert "world size 8" in proc.stdout and "engine deepspeed" in proc.stdout
    cmd = _command(proc)
    assert cmd[:3] == ["deepspeed", "--hostfile", str(hostfile)]
    assert "--no_local_rank" in cmd  # pretrain treats every --x=y as a config override
    assert cmd[cmd.index("--num_nodes") + 1] == "2" and cmd[cmd.index("--num_gpus") + 1] == "4"
    assert cmd[cmd.index("--master_addr") + 1] == "node0"
    tail = cmd[cmd.index("--module") + 1:]
    assert tail == ["megatron_unihetero.pretrain", "--config", TINY,
                    "--parallel.engine=deepspeed", "--train.steps=3"]


def test_slurm_dry_run():
    proc = _run("slurm.sbatch", TINY, SLURM_JOB_ID="123", SLURM_NNODES="2",
                SLURM_JOB_NODELIST="gpu-a,gpu-b", SLURM_SUBMIT_DIR=str(REPO),
                SLURM_GPUS_ON_NODE="8", MASTER_ADDR="gpu-a")
    assert proc.returncode == 0, proc.stderr
    assert "world size 16" in proc.stdout
    cmd = _command(proc)
    assert cmd[0] == "srun" and "torchrun" in cmd
    for flag in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_id=123", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=gpu-a:29500"):
        assert flag in cmd, (flag, cmd)


# ---- the paper-scale config --------------------------------------------------------------

def test_paper_7b_config_loads_and_validates(tmp_path):
    cfg = load_config(RunConfig, str(PAPER))
    llm = cfg.model.llm
    assert (llm.num_layers, llm.hidden_size, llm.num_attention_heads, llm.num_query_groups,
            llm.ffn_hidden_size, llm.max_sequence_length) == (32, 4096, 32, 32, 11008, 4096)
    assert llm.vocab_size % 128 == 0 and llm.vocab_size >= 32000 + 4
    assert cfg.model.image_token_id == 32000
    assert llm.transformer_impl == "transformer_engine"
    assert cfg.model.vision.model_type == "dinov2" and cfg.model.vision.frozen
    assert cfg.model.vision.path  # a local folder (placeholder), never a hub id
    assert cfg.model.semantic.enabled and cfg.model.semantic.loss == "mse"
    assert cfg.checkpoint.save_interval == 1000 and cfg.checkpoint.keep_last == 3
    assert cfg.train.dtype == "bf16"

    world = 64
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    dp = world // (tp * pp)
    assert llm.vocab_size % tp == 0
    global_batch = cfg.data.micro_batch_size * cfg.train.grad_accumulation * dp
    assert 64 <= global_batch <= 1024  # packed 4096-token sequences (~1024 pairs, see comments)

    # As written, only the placeholder data path fails (TP/PP/heads/layers checks pass first).
    with pytest.raises(ConfigError, match="data.train"):
        cfg.validate(world)
    # With real shards it validates for 64 GPUs.
    prefix = tmp_path / "pairs"
    (tmp_path / "pairs_00000.json").write_text("{}")
    cfg = load_config(RunConfig, str(PAPER), [f"--data.train=[{prefix}]"])
    cfg.validate(world)
    # the deepspeed alternative in the comments validates too (it saves in place)
    load_config(RunConfig, str(PAPER), [f"--data.train=[{prefix}]", "--parallel.engine=deepspeed",
                                        "--parallel.tensor_parallel=2",
                                        "--checkpoint.async_save=false"]).validate(world)


def test_paper_7b_dry_run_on_8_nodes():
    proc = _run("torchrun_multi_node.sh", str(PAPER), NNODES="8", NODE_RANK="0",
                MASTER_ADDR="node0", GPUS_PER_NODE="8")
    assert proc.returncode == 0, proc.stderr
    assert "8 node(s) x 8 GPU(s)/node = world size 64" in proc.stdout
    assert "TP=2 x PP=1 x DP=32" in proc.stdout
