"""The pretrain entry point end to end on CPU: engines, parallel layouts, resume, config errors."""

import os
import shutil

import pytest
import torch

from megatron_unihetero.config_io import ConfigLoadError, load_config
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.testing import run_distributed_test
from megatron_unihetero.training import checkpoint as ckpt
from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.stopping import EXIT_REQUEUE

from tests.training import _train_jobs as jobs


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return jobs.make_data(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """logging.eval_sets overrides: a demo held-out set scored inside the run at step 6."""
    return jobs.make_eval_set(str(tmp_path_factory.mktemp("eval_set")))


@pytest.mark.parametrize("dtype,distributed", [("bf16", True), ("bf16", False)],
                         ids=["bf16", "bf16-replicated-optimizer"])
def test_resume_gives_the_losses_of_an_uninterrupted_run(data_prefix, tmp_path, dtype, distributed):
    """bf16 runs step fp32 master weights; they travel in the optimizer state. (fp32 resumes,
    after kills at several points, are tests/faults/.)"""
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    over = {"train.dtype": dtype, "parallel.distributed_optimizer": distributed}
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


def _resume_copy(run_dir: str, into: str, iteration: str = "iter_0000003") -> None:
    """Copy ``run_dir``'s checkpoint ``iteration`` (model and optimizer state, as that run saved
    it mid-way) into a fresh ``into``/ckpt and name it ``latest``: the same command pointed at
    ``into`` then resumes from it."""
    ckpt_dir = os.path.join(into, "ckpt")
    shutil.copytree(os.path.join(run_dir, "ckpt", iteration), os.path.join(ckpt_dir, iteration))
    ckpt.mark_latest(ckpt_dir, os.path.join(ckpt_dir, iteration))


def test_megatron_engine_trains_with_model_parallelism(data_prefix, eval_set, tmp_path):
    """Trains at TP=2 x PP=2 with 2 virtual stages per pipeline rank (4 ranks, 4 layers: one a
    virtual stage, 2 micro-batches per step); then its step-3 checkpoint, model and optimizer
    state, resumes on one process (TP = PP = 1) with the losses the parallel run had; and the
    answer accuracy it logged on a held-out set at step 6 (logging.eval_sets) is evaluate.py's.

    Carries the assertions of the former parametrizations tp2, pp2 and pp2-interleaved (each
    a 2-rank run resumed on one process): the TP=2 and the PP=2 + VPP=2 splits of the model
    and of the distributed optimizer's state are both undone in this one resume. The plain
    (non-interleaved) PP=2 schedule through the trainer is test_compiled_layers_train_with_the_
    losses_of_eager_layers[megatron-pp2] below (its eager run, checkpoint at step 3 included);
    its losses and gradients against one rank are tests/models/test_parallel_parity.py's
    test_parallel_layout_matches_single_rank[pp2], and a TP=2 model checkpoint loading at
    PP=2 is tests/models/test_checkpoint_reshard.py."""
    run_dir = str(tmp_path / "run")
    extra = {"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2,
             "parallel.virtual_pipeline": 2, "model.llm.num_layers": 4,
             "train.grad_accumulation": 2, "checkpoint.optimizer_format": "fully_reshardable"}
    # The validation loss runs its batches in groups of PP (the interleaved schedule's
    # multiple); the held-out questions are padded to a multiple of PP.
    run_distributed_test(jobs.pretrain_job, 4, jobs.overrides(data_prefix, run_dir, **extra, **eval_set),
                         timeout_s=600)
    losses = jobs.train_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1]
    assert sorted(jobs.eval_losses(run_dir)) == [6]  # the validation loss ran under VPP
    ckpt_dir = os.path.join(run_dir, "ckpt")
    assert os.path.isfile(os.path.join(ckpt_dir, "iter_0000006", "dist", ".metadata"))

    single_dir = str(tmp_path / "single")
    _resume_copy(run_dir, single_dir)
    single = {k: v for k, v in extra.items() if k != "parallel.virtual_pipeline"}
    single.update({"parallel.tensor_parallel": 1, "parallel.pipeline_parallel": 1})
    evaluated = str(tmp_path / "evaluated.json")
    run_distributed_test(jobs.pretrain_then_evaluate_job, 1, jobs.overrides(data_prefix, single_dir, **single),
                         jobs.evaluate_argv(run_dir, eval_set, evaluated))
    resumed = jobs.train_losses(single_dir)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5), step
    # The held-out set scored inside the TP=2 x PP=2 (VPP=2) run, each pipeline's stages
    # passing the candidates' hidden states on: evaluate.py's figures on the same checkpoint.
    jobs.assert_same_understanding(run_dir, evaluated)
    full = ckpt.load_model_weights(os.path.join(ckpt_dir, "iter_0000006"))
    assert {f"llm.decoder.layers.{i}.mlp.linear_fc1.weight" for i in range(4)} <= set(full)


@pytest.mark.parametrize("low_memory", [True, False], ids=["gather-on-rank0", "all-gather"])
def test_data_parallel_run_resumes_at_another_data_parallel_size(data_prefix, eval_set, tmp_path, low_memory):
    """DP=2 with the distributed optimizer saves at step 3; DP=1 resumes from that checkpoint
    with 2 micro-batches per step (the same global batch) and continues the losses of the
    uninterrupted DP=2 run: both DP ranks' optimizer shards are in the checkpoint and reshard
    to one, whichever exchange the save used (checkpoint.optimizer_save_low_memory). (The
    step-3 checkpoint is the uninterrupted run's own, copied; a run stopped by train.steps and
    resumed by the same command is test_resume_gives_the_losses_of_an_uninterrupted_run above.)

    The DP=2 run also scores a held-out set inside the run (logging.eval_sets, questions dealt
    over the two DP ranks): its step-6 answer accuracy is evaluate.py's on its step-6
    checkpoint (run in the resumed run's process), and samples_seen resumes from trainer.pt."""
    straight, resized = str(tmp_path / "straight"), str(tmp_path / "resized")
    run_distributed_test(jobs.pretrain_job, 2, jobs.overrides(
        data_prefix, straight, **{"checkpoint.optimizer_format": "fully_reshardable",
                                  "checkpoint.optimizer_save_low_memory": str(low_memory).lower()}, **eval_set))
    _resume_copy(straight, resized)
    evaluated = str(tmp_path / "evaluated.json")
    run_distributed_test(jobs.pretrain_then_evaluate_job, 1,
                         jobs.overrides(data_prefix, resized, **{"train.grad_accumulation": 2}),
                         jobs.evaluate_argv(straight, eval_set, evaluated))
    full, resumed = jobs.train_losses(straight), jobs.train_losses(resized)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    jobs.assert_same_understanding(straight, evaluated)
    records = jobs.understanding_records(straight)
    assert sorted(records) == [0, 6] and records[0]["samples_seen"] == 0
    samples = {s: r["samples_seen"] for s, r in jobs.train_records(straight).items()}
    assert records[6]["samples_seen"] == samples[6] > samples[3] > 0
    assert jobs.train_records(resized)[4]["samples_seen"] == samples[4]


# ZeRO-2's partitioning sits between 1 and 3 (optimizer state + gradients); its DP change goes
# through the same universal conversion, and tests/training/test_deepspeed_engine.py resumes it.
@pytest.mark.parametrize("stage,tp", [(3, 1), (1, 2)], ids=["zero3", "zero1-tp2"])
def test_deepspeed_run_resumes_at_another_data_parallel_size(data_prefix, tmp_path, stage, tp):
    """ZeRO partitions of DP=2 (the uninterrupted run's step-3 checkpoint) are converted to
    DeepSpeed's universal checkpoint on the fly and loaded at DP=1 (with TP=2 too: each TP
    rank's slices): the losses continue those of the uninterrupted DP=2 run.

    The former zero1 case (ZeRO-1 at TP=1) is the zero1-tp2 case with one TP slice: the same
    stage-1 universal conversion and DP=2 -> 1 load, here with TP's slicing on top; ZeRO-1/2/3
    saving and resuming at the same DP size, against the megatron engine's losses, is
    tests/training/test_deepspeed_engine.py's test_deepspeed_zero_matches_megatron_engine."""
    straight, resized = str(tmp_path / "straight"), str(tmp_path / "resized")
    over = {"parallel.engine": "deepspeed", "parallel.zero_stage": stage, "parallel.tensor_parallel": tp}
    run_distributed_test(jobs.pretrain_job, 2 * tp, jobs.overrides(data_prefix, straight, **over), timeout_s=600)
    _resume_copy(straight, resized)
    run_distributed_test(jobs.pretrain_job, tp, jobs.overrides(
        data_prefix, resized, **dict(over, **{"train.grad_accumulation": 2})), timeout_s=600)
    full, resumed = jobs.train_losses(straight), jobs.train_losses(resized)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), step
    assert os.path.isfile(os.path.join(resized, "ckpt", "iter_0000003", "engine_universal", "complete"))


@pytest.mark.requires_compiler
@pytest.mark.parametrize("world,engine", [
    (1, {"parallel.engine": "deepspeed", "parallel.zero_stage": 2}),
    (2, {"parallel.pipeline_parallel": 2})], ids=["deepspeed-zero2", "megatron-pp2"])
def test_compiled_layers_train_with_the_losses_of_eager_layers(data_prefix, tmp_path, world, engine):
    """train.compile: the same losses as eager layers, over batches of varying documents and
    through the validation pass (no grad) and the checkpoint at step 3; with PP=2 the compiled
    layers send their output across the stage boundary.

    The former megatron case (one rank, megatron engine) is megatron-pp2's path without the
    stage boundary (the same engine and apply_compile, each stage one rank); compiled layers
    against eager ones on one rank, outputs, gradients and evaluation, over the three attention
    layouts, is tests/models/test_heads_kernels.py's test_compiled_decoder_layers_equal_eager_layers."""
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    over = dict(engine, **{"logging.eval_interval": 3})
    run_distributed_test(jobs.pretrain_job, world, jobs.overrides(data_prefix, eager, **over), timeout_s=600)
    run_distributed_test(jobs.pretrain_job, world, jobs.overrides(
        data_prefix, compiled, **dict(over, **{"train.compile": True})), timeout_s=600)
    expected, losses = jobs.train_losses(eager), jobs.train_losses(compiled)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in losses:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
    expected, losses = jobs.eval_losses(eager), jobs.eval_losses(compiled)
    assert sorted(losses) == [3, 6]
    for step in losses:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5), step


def test_resumes_the_optimizer_state_cannot_take_are_clear_errors(data_prefix, tmp_path):
    run_dir = str(tmp_path / "run")
    dp_only = {"checkpoint.optimizer_format": "dp_reshardable"}
    run_distributed_test(jobs.pretrain_job, 1, jobs.overrides(data_prefix, run_dir, **dp_only, **{"train.steps": 3}))
    flipped = jobs.overrides(data_prefix, run_dir, **dp_only, **{"parallel.distributed_optimizer": False})
    with pytest.raises(RuntimeError, match="saved with parallel.distributed_optimizer on"):
        run_distributed_test(jobs.pretrain_job, 1, flipped)
    wider = jobs.overrides(data_prefix, run_dir, **dp_only, **{"parallel.tensor_parallel": 2})
    with pytest.raises(RuntimeError, match="dp_reshardable at .TP, PP, VPP. = .1, 1, None.; this run has .2, 1, None."):
        run_distributed_test(jobs.pretrain_job, 2, wider)


@pytest.mark.parametrize("override,message", [
    ("--parallel.tensor_parallel=3", "does not divide model.llm.num_attention_heads"),
    ("--parallel.pipeline_parallel=3", "does not divide model.llm.num_layers"),
    ("--data.train=[/nonexistent/prefix]", "no shards found"),
    ("--parallel.engine=fsdp", "parallel.engine must be megatron or deepspeed"),
    ("--parallel.pipeline_parallel=2 --model.vision.frozen=false", "needs a frozen vision encoder"),
    ("--train.compile=true --parallel.tensor_parallel=2", "train.compile needs parallel.tensor_parallel=1"),
    ("--train.compile=true --model.llm.transformer_impl=transformer_engine",
     "train.compile needs model.llm.transformer_impl=local"),
    ("--train.compile=true --parallel.engine=deepspeed --parallel.zero_stage=3",
     "train.compile does not support parallel.zero_stage=3"),
    ("--checkpoint.optimizer_format=dp_zero", "checkpoint.optimizer_format must be one of"),
    ("--checkpoint.async_save=true --parallel.engine=deepspeed", "checkpoint.async_save needs parallel.engine=megatron"),
])
def test_config_errors_are_clear(override, message):
    cfg = load_config(RunConfig, "examples/configs/tiny_cpu.yaml", override.split())
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA torch.compile generates Triton kernels")
def test_compile_on_cpu_without_a_cpp_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    cfg = load_config(RunConfig, "examples/configs/tiny_cpu.yaml", ["--train.compile=true"])
    with pytest.raises(ConfigError, match="train.compile on CPU needs a C\\+\\+ compiler"):
        cfg.validate(world_size=1)


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


def test_sigterm_saves_a_checkpoint_and_exits_for_a_requeue(data_prefix, tmp_path):
    """SIGTERM (a preemption) mid-run: the run saves the step it is in and exits with the
    requeue status (75), recording why in CKPT_DIR/requeue.json. (The exit signal on one rank
    of two, a deadline and the resume's losses: tests/faults.)"""
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
    assert proc.returncode == EXIT_REQUEUE == 75, output
    assert "stopping at step" in output and "SIGTERM" in output
    latest = open(os.path.join(run_dir, "ckpt", "latest")).read().strip()
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert latest == f"iter_{max(steps):07d}"
    with open(os.path.join(run_dir, "ckpt", ckpt.REQUEUE)) as handle:
        record = json.load(handle)
    assert record["step"] == max(steps) and record["reason"] == "SIGTERM"
