"""The non-finite guard: a step with a NaN/Inf loss or gradient norm is skipped, too many in a
row stop the run (exit code 3, nothing saved), and a non-finite model is never saved."""

import os
import re

import pytest
import torch

from megatron_unihetero.checkpointing.dist import read_all_tensors
from megatron_unihetero.testing import run_distributed_test, run_in_fresh_process
from megatron_unihetero.testing.runs import train_records

from tests.training import _nonfinite_jobs as nf
from tests.training import _train_jobs as jobs


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return jobs.make_data(str(tmp_path_factory.mktemp("data")))


def _assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_diverging_run_stops_without_saving_a_non_finite_model(data_prefix, tmp_path):
    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **{
        "train.lr": 1e4, "train.clip_grad": 0, "train.steps": 12, "train.max_bad_steps": 2,
        "checkpoint.save_interval": 1, "checkpoint.keep_last": 1})
    # pretrain.main in a new process (a forkserver worker; until now `python -m
    # megatron_unihetero.pretrain`): the exit code is main's SystemExit either way.
    proc = run_in_fresh_process(jobs.pretrain_job, args, timeout_s=600, stderr_to_stdout=True)
    assert proc.returncode == 3, proc.stdout
    match = re.search(r"stopping: 2 consecutive steps with a non-finite loss or gradient norm "
                      r"\(last good step (\d+)\); the last checkpoint is (\S+)", proc.stdout)
    assert match, proc.stdout
    assert "WARNING: step" in proc.stdout and "skipped" in proc.stdout
    records = train_records(run_dir)
    last = max(records)
    assert records[last]["bad_steps_in_a_row"] == 2 and records[last]["skipped"] == 1.0
    ckpt_dir = os.path.join(run_dir, "ckpt")
    iters = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("iter_")) if os.path.isdir(ckpt_dir) else []
    # No checkpoint at the stop, none with non-finite weights, and pruning kept the good one.
    assert f"iter_{last:07d}" not in iters
    for name in iters:
        assert nf.model_is_finite(os.path.join(ckpt_dir, name)), name
    latest_file = os.path.join(ckpt_dir, "latest")
    if match.group(2) == "none":
        assert not os.path.exists(latest_file)
    else:
        latest = open(latest_file).read().strip()
        assert match.group(2).endswith(latest) and latest in iters


@pytest.mark.parametrize("world,extra", [
    (1, {}),
    (2, {}),
    (1, {"parallel.engine": "deepspeed", "parallel.zero_stage": 2}),
    (1, {"parallel.engine": "deepspeed", "parallel.zero_stage": 0}),
], ids=["megatron-dp1", "megatron-dp2", "deepspeed-zero2", "deepspeed-zero0"])
def test_one_nan_step_is_skipped_and_training_continues(data_prefix, tmp_path, world, extra):
    run_dir = str(tmp_path / "run")
    args = jobs.overrides(data_prefix, run_dir, **dict(extra, **{
        "checkpoint.save_interval": 1, "checkpoint.keep_last": 0}))
    # Step 3's micro-batch (the third loss computed; no evaluation in this run) is NaN on rank 0.
    run_distributed_test(nf.faulty_pretrain_job, world, args, 2, timeout_s=600)
    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert [records[s]["skipped"] for s in range(1, 7)] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [records[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert records[3]["bad_steps_in_a_row"] == 1 and records[4]["bad_steps_in_a_row"] == 0
    for step in (1, 2, 4, 5, 6):
        assert torch.isfinite(torch.tensor(records[step]["loss"])), step
    assert not torch.isfinite(torch.tensor(records[3]["loss"]))
    ckpt_dir = os.path.join(run_dir, "ckpt")
    assert open(os.path.join(ckpt_dir, "latest")).read().strip() == "iter_0000006"
    # The skipped step changed nothing: the model (and the megatron optimizer state, in the
    # same torch_dist checkpoint) after step 3 are bitwise those after step 2.
    before, after = (os.path.join(ckpt_dir, f"iter_{s:07d}") for s in (2, 3))
    saved_before = read_all_tensors(os.path.join(before, "dist"))
    if extra.get("parallel.engine", "megatron") == "megatron":
        assert any(k.startswith("optimizer.") for k in saved_before)
    _assert_bitwise_equal(saved_before, read_all_tensors(os.path.join(after, "dist")))
    # ...while the next (finite) step was applied.
    assert not _same_model(before, os.path.join(ckpt_dir, "iter_0000004"))


def _same_model(a: str, b: str) -> bool:
    sa, sb = read_all_tensors(os.path.join(a, "dist")), read_all_tensors(os.path.join(b, "dist"))
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_refuses_a_non_finite_model(data_prefix, tmp_path):
    run_distributed_test(nf.save_refusal_job, 1, jobs.overrides(data_prefix, str(tmp_path / "run")))
