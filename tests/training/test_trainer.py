"""The pretrain entry point end to end on CPU: engines, parallel layouts, resume, config errors."""

import os

import pytest

from megatron_unihetero.config_io import ConfigLoadError, load_config
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.testing import run_distributed_test
from megatron_unihetero.training.config import RunConfig

from tests.training import _train_jobs as jobs


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return jobs.make_data(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(data_prefix, tmp_path, dtype):
    """bf16 runs step fp32 master weights; they travel in the optimizer state."""
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    over = {"train.dtype": dtype}
    run_distributed_test(jobs.pretrain_job, 1, jobs.overrides(data_prefix, straight, **over))
    # Stop after step 3 (a checkpoint is saved there), then run the same command again.
    run_distributed_test(jobs.pretrain_job, 1, jobs.overrides(data_prefix, stopped, **dict(over, **{"train.steps": 3})))
    run_distributed_test(jobs.pretrain_job, 1, jobs.overrides(data_prefix, stopped, **over))
    full, resumed = jobs.train_losses(straight), jobs.train_losses(stopped)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    assert full[6] < full[1]
    assert open(os.path.join(stopped, "ckpt", "latest")).read().strip() == "iter_0000006"


@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (1, 2, 2)],
                         ids=["tp2", "pp2", "pp2-interleaved"])
def test_megatron_engine_trains_with_model_parallelism(data_prefix, tmp_path, tp, pp, vpp):
    run_dir = str(tmp_path / "run")
    extra = {"parallel.tensor_parallel": tp, "parallel.pipeline_parallel": pp}
    if vpp:  # 4 layers: 2 ranks x 2 virtual stages of one layer, 2 micro-batches per step
        extra.update({"parallel.virtual_pipeline": vpp, "model.llm.num_layers": 4,
                      "train.grad_accumulation": 2})
    args = jobs.overrides(data_prefix, run_dir, **extra)
    run_distributed_test(jobs.pretrain_job, 2, args)
    losses = jobs.train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    model_dir = os.path.join(run_dir, "ckpt", "iter_0000006", "model")
    assert os.path.isfile(os.path.join(model_dir, "layout.json"))
    if vpp:
        # Resume from the interleaved checkpoint, and read it back as one full model.
        from megatron_unihetero.checkpointing.model_io import load_full_state

        args = jobs.overrides(data_prefix, run_dir, **dict(extra, **{"train.steps": 8}))
        run_distributed_test(jobs.pretrain_job, 2, args)
        assert sorted(jobs.train_losses(run_dir))[-2:] == [7, 8]
        full = load_full_state(model_dir)
        assert {f"llm.decoder.layers.{i}.mlp.linear_fc1.weight" for i in range(4)} <= set(full)


def test_data_parallel_run_resumes_at_another_data_parallel_size(data_prefix, tmp_path):
    run_dir = str(tmp_path / "run")
    run_distributed_test(jobs.pretrain_job, 2, jobs.overrides(data_prefix, run_dir, **{"train.steps": 3}))
    run_distributed_test(jobs.pretrain_job, 1, jobs.overrides(data_prefix, run_dir))
    assert sorted(jobs.train_losses(run_dir)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("override,message", [
    ("--parallel.tensor_parallel=3", "does not divide model.llm.num_attention_heads"),
    ("--parallel.pipeline_parallel=3", "does not divide model.llm.num_layers"),
    ("--data.train=[/nonexistent/prefix]", "no shards found"),
    ("--parallel.engine=fsdp", "parallel.engine must be megatron or deepspeed"),
    ("--parallel.pipeline_parallel=2 --model.vision.frozen=false", "needs a frozen vision encoder"),
])
def test_config_errors_are_clear(override, message):
    cfg = load_config(RunConfig, "examples/configs/tiny_cpu.yaml", override.split())
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=12)


def test_config_load_errors_name_the_key():
    with pytest.raises(ConfigLoadError, match="model.llm.num_layer"):
        load_config(RunConfig, None, ["--model.llm.num_layer=2"])
    with pytest.raises(ConfigLoadError, match="train.steps must be an integer"):
        load_config(RunConfig, None, ["--train.steps=abc"])
    with pytest.raises(ConfigLoadError, match="does not exist"):
        load_config(RunConfig, "/nonexistent.yaml")


def test_world_size_must_be_a_multiple_of_tp_times_pp(data_prefix):
    cfg = load_config(RunConfig, None, ["--parallel.tensor_parallel=2", f"--data.train=[{data_prefix}]"])
    with pytest.raises(ConfigError, match="world size 3 is not TP x PP x DP"):
        cfg.validate(world_size=3)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_prefix, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **{"train.steps": 100000, "checkpoint.save_interval": 0})
    proc = subprocess.Popen([sys.executable, "-m", "megatron_unihetero.pretrain", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    assert "stopping at step" in output
    latest = open(os.path.join(run_dir, "ckpt", "latest")).read().strip()
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert latest == f"iter_{max(steps):07d}"


def test_master_weights_keep_updates_that_bf16_would_round_away():
    import torch

    from megatron_unihetero.training.config import TrainConfig
    from megatron_unihetero.training.optim import MasterWeightAdamW

    model = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = MasterWeightAdamW(model, TrainConfig(lr=1e-4, weight_decay=0.0))
    for _ in range(20):
        model.weight.main_grad = torch.ones(4, 4)  # what megatron DDP leaves (fp32)
        opt.load_gradients()
        opt.step()
    master = opt.masters[0]
    assert master.dtype == torch.float32
    # 20 Adam steps of ~1e-4 each: kept in fp32, below bf16's spacing at 1.0 (2^-7).
    assert abs(float(master[0, 0]) - (1.0 - 20 * 1e-4)) < 1e-5
    assert torch.equal(model.weight, master.to(torch.bfloat16))
    # The learning rate set through param_groups reaches the optimizer after a state reload.
    opt.load_state_dict(opt.state_dict())
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = master.detach().clone()
    model.weight.main_grad = torch.ones(4, 4)
    opt.load_gradients()
    opt.step()
    assert torch.equal(opt.masters[0], before)
