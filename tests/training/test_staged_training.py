"""Staged training (LLaVA's recipe): stage 1 aligns the projector with the LLM and the encoder
frozen, stage 2 starts from its weights with a fresh optimizer and trains everything; per-module
learning rates (train.module_lr) and what the log shows of them."""

import os

import pytest
import torch

from megatron_unihetero.config_io import load_config
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.testing import run_distributed_test
from megatron_unihetero.training import checkpoint as ckpt
from megatron_unihetero.training.config import RunConfig

from tests.training import _stages_jobs as stages
from tests.training import _train_jobs as jobs

LR, WARMUP = 1e-3, 2  # the tiny run's train.lr and train.warmup_steps (testing/runs.py)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return jobs.make_data(str(tmp_path_factory.mktemp("data")))


def _lr_records(run_dir: str) -> dict:
    return {step: {k: v for k, v in record.items() if k == "lr" or k.startswith("lr/")}
            for step, record in jobs.train_records(run_dir).items()}


def test_stage1_at_pp2_trains_the_projector_only_and_stage2_starts_fresh_from_it(data_prefix, tmp_path):
    """Stage 1 at PP=2 (megatron engine, distributed optimizer): the LLM and the encoder frozen,
    semantic generation off, so the last stage holds nothing trainable (Megatron-LM issue
    #1166's empty optimizer); the projector's gradient comes back across the pipeline through
    the frozen layers. Every LLM and encoder weight stays bit-identical, the projector moves,
    only its parameters have Adam state, its decoupled weight decay is off (wd_mult 0) and the
    log shows its own rate (lr_mult 2). Its checkpoint saves, resumes on one process (PP=1)
    and is the start of stage 2.

    Stage 2 at another layout (PP=1, one process) loads stage 1's weights
    (checkpoint.load): it starts from exactly them, at step 0, with a fresh optimizer (Adam
    step counts 1..2, not 4..5) and the LR warmup from 0, and moves the encoder (unfrozen
    here), the projector and the LLM, each at its own rate. (The heads: the DeepSpeed test.)"""
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    out1.mkdir(), out2.mkdir()
    stage1_settings = {
        "model.freeze_llm": True, "model.semantic.weight": 0, "train.steps": 2,
        "train.module_lr": "{projector: {lr_mult: 2.0, wd_mult: 0.0}}",
        "checkpoint.optimizer_format": "fully_reshardable"}  # resumed below at PP=1
    run_distributed_test(stages.stage_job, 2, jobs.overrides(data_prefix, stage1, **dict(
        stage1_settings, **{"parallel.pipeline_parallel": 2})), str(out1))
    first, last = stages.read_reports(str(out1))
    assert first["submodules"] == {"vision": "identical", "projector": "moved", "llm": "identical"}
    assert last["submodules"] == {"llm": "identical"}
    assert first["adam_numel"] == first["trainable_numel"] == sum(
        p.numel() for p in torch.nn.Linear(32, 64).parameters()) + sum(
        p.numel() for p in torch.nn.Linear(64, 64).parameters())  # the projector: 32 -> 64 -> 64
    assert last["adam_numel"] == last["trainable_numel"] == 0
    for report in (first, last):  # every rank holds every group (empty on the last stage)
        assert {g["module"] for g in report["groups"]} == {"projector"}
        assert all(g["weight_decay"] == 0.0 for g in report["groups"])
    lrs = _lr_records(stage1)
    assert sorted(lrs) == [1, 2]
    for record in lrs.values():
        assert set(record) == {"lr", "lr/projector"}
        assert record["lr/projector"] == pytest.approx(2.0 * record["lr"], rel=1e-12)
    assert lrs[1]["lr"] == pytest.approx(LR / WARMUP)
    assert ckpt.latest_iteration_dir(os.path.join(stage1, "ckpt")) == os.path.join(stage1, "ckpt", "iter_0000002")

    # Stage 1 resumes (the same command, one more step) on one process: the optimizer saved
    # by the two stages, one of them without state, goes on (Adam's step 3) with its groups
    # (the projector's decayed and undecayed groups have equal multipliers: megatron-core
    # alone would mix them up) at their rates.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    run_distributed_test(stages.stage_job, 1, jobs.overrides(data_prefix, stage1, **dict(
        stage1_settings, **{"train.steps": 3})), str(resumed))
    (report,) = stages.read_reports(str(resumed))
    assert report["adam_steps"] == [3.0] and report["step"] == 3
    assert sorted((g["module"], g["decay"]) for g in report["groups"]) == [
        ("projector", False), ("projector", True)]
    lrs = _lr_records(stage1)
    assert sorted(lrs) == [1, 2, 3] and lrs[3]["lr/projector"] == pytest.approx(2.0 * lrs[3]["lr"], rel=1e-12)
    stage1_iter = os.path.join(stage1, "ckpt", "iter_0000003")
    assert ckpt.latest_iteration_dir(os.path.join(stage1, "ckpt")) == stage1_iter

    run_distributed_test(stages.stage_job, 1, jobs.overrides(data_prefix, stage2, **{
        "model.semantic.weight": 0, "model.vision.frozen": False,
        "checkpoint.load": os.path.join(stage1, "ckpt"),
        "train.module_lr": "{projector: {lr_mult: 2.0}, vision: {lr_mult: 0.1}}", "train.steps": 2}),
        str(out2), dump_start=True)
    (report,) = stages.read_reports(str(out2))
    assert report["submodules"] == {"vision": "moved", "projector": "moved", "llm": "moved"}
    assert report["adam_steps"] == [2.0]  # a fresh optimizer: stage 1's three steps are not in it
    assert report["adam_numel"] == report["trainable_numel"]
    start = torch.load(str(out2 / "start.pt"), weights_only=True)
    saved = ckpt.load_model_weights(stage1_iter)
    assert set(start) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(start[name], tensor), name
    lrs = _lr_records(stage2)
    assert sorted(lrs) == [1, 2]  # from step 0: no resume
    assert lrs[1]["lr"] == pytest.approx(LR / WARMUP) and lrs[2]["lr"] == pytest.approx(LR)
    for record in lrs.values():
        assert record["lr/llm"] == record["lr"]
        assert record["lr/projector"] == pytest.approx(2.0 * record["lr"], rel=1e-12)
        assert record["lr/vision"] == pytest.approx(0.1 * record["lr"], rel=1e-12)
    assert not jobs.train_records(stage2, kind="resume")


def test_deepspeed_stage1_trains_projector_and_semantic_head_only(data_prefix, tmp_path):
    """The DeepSpeed engine (ZeRO-1, PP=1), stage 1 with semantic generation on: projector and
    semantic head train (each at its rate), the LLM and the encoder stay bit-identical and have
    no optimizer state."""
    run_dir, out = str(tmp_path / "run"), tmp_path / "out"
    out.mkdir()
    run_distributed_test(stages.stage_job, 1, jobs.overrides(data_prefix, run_dir, **{
        "parallel.engine": "deepspeed", "model.freeze_llm": True, "train.steps": 2,
        "train.module_lr": "{projector: {lr_mult: 4.0}, heads: {lr_mult: 0.5}}"}), str(out))
    (report,) = stages.read_reports(str(out))
    assert report["submodules"] == {"vision": "identical", "projector": "moved", "llm": "identical",
                                    "semantic_head": "moved"}
    assert {g["module"] for g in report["groups"]} == {"projector", "heads"}
    for step, record in _lr_records(run_dir).items():
        assert set(record) == {"lr", "lr/projector", "lr/heads"}, step
        assert record["lr/projector"] == pytest.approx(4.0 * record["lr"], rel=1e-12)
        assert record["lr/heads"] == pytest.approx(0.5 * record["lr"], rel=1e-12)


def test_param_groups_put_each_module_with_its_multipliers():
    run_distributed_test(stages.param_groups_job, 1)


@pytest.mark.parametrize("override,message", [
    ("--train.module_lr.encoder.lr_mult=2", "train.module_lr.encoder: unknown module 'encoder'"),
    ("--train.module_lr.llm.lr_mult=0", "train.module_lr.llm.lr_mult must be > 0"),
    ("--train.module_lr.heads.wd_mult=-1", "train.module_lr.heads.wd_mult must be >= 0"),
    ("--model.freeze_llm=true --model.projector.frozen=true --model.semantic.weight=0",
     "nothing trains"),
])
def test_module_settings_and_nothing_to_train_are_clear_config_errors(override, message):
    cfg = load_config(RunConfig, "examples/configs/tiny_cpu.yaml", override.split())
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=1)


def test_module_lr_entries_are_typed_sections():
    cfg = load_config(RunConfig, None, ["--train.module_lr.projector.lr_mult=10"])
    assert cfg.train.module_multipliers("projector").lr_mult == 10.0
    assert cfg.train.module_multipliers("projector").wd_mult == 1.0
    assert cfg.train.module_multipliers("llm").lr_mult == 1.0


@pytest.mark.parametrize("engine,zero_stage,text_only_last", [
    ("megatron", 1, True), ("deepspeed", 2, False), ("deepspeed", 2, True), ("deepspeed", 3, True)],
    ids=["megatron", "zero2-first", "zero2-last", "zero3-last"])
def test_a_micro_batch_reaching_nothing_trainable_still_steps(engine, zero_stage, text_only_last):
    """A frozen LLM and a micro-batch without an image: its loss reaches no trainable
    parameter (megatron-core's schedule skips such a backward; DeepSpeed needs one, and ZeRO-2
    one that gives every parameter a gradient); the step applies the other micro-batch's."""
    run_distributed_test(stages.text_only_micro_batch_job, 1, engine, zero_stage, text_only_last)


# A resume that trains other modules: the param groups in the checkpoint's common state say so
# before the load; dp_reshardable keeps them with the flat buffers, whose sizes differ first.
TRAINS_OTHER_MODULES = "it trains other modules"


@pytest.mark.parametrize("distributed,optimizer_format,refusal", [
    (False, "dp_reshardable", TRAINS_OTHER_MODULES),
    (True, "dp_reshardable", "Global shape mismatch"),
    (True, "fully_reshardable", TRAINS_OTHER_MODULES)],
    ids=["replicated", "distributed-dp", "distributed-fully"])
def test_a_checkpoint_saved_before_per_module_groups_resumes_exactly(
        data_prefix, tmp_path, distributed, optimizer_format, refusal):
    """megatron-core's two standard param groups in the checkpoint, per-module groups in the
    run: the resume continues the step, the data, the schedule and every Adam moment (the next
    step's loss and parameters are the legacy run's own), at this run's module rates. A
    checkpoint with per-module groups of other modules stays a CheckpointError."""
    # No clipping: the global grad norm sums over the param groups in their order, so the
    # legacy run's two groups and the resumed run's per-module ones differ in its last bit.
    settings = {"train.steps": 3, "checkpoint.save_interval": 2, "train.clip_grad": 0,
                "parallel.distributed_optimizer": distributed,
                "checkpoint.optimizer_format": optimizer_format}
    legacy, resumed = str(tmp_path / "legacy"), str(tmp_path / "resumed")
    run_distributed_test(stages.legacy_groups_resume_job, 1,
                         jobs.overrides(data_prefix, legacy, **settings),
                         jobs.overrides(data_prefix, resumed, **dict(
                             settings, **{"train.module_lr": "{projector: {lr_mult: 2.0}}"})),
                         resumed, refusal)
