"""Logs that survive a resume (training/metrics.py): TensorBoard shows each step once, W&B goes on
in the same run, metrics.jsonl records the resume. (Through a real torchrun restart:
tests/faults/test_fault_tolerance.py.)"""

import json
import os

import pytest

from megatron_unihetero.training import metrics
from megatron_unihetero.training.config import LoggingConfig


def _logger(run_dir, **cfg):
    cfg = LoggingConfig(dir=str(run_dir), **dict({"log_interval": 100, "tensorboard": False,
                                                  "progress_bar": False}, **cfg))
    return metrics.MetricsLogger(cfg, enabled=True, total_steps=6)


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path):
    """A process logs steps 1-5 and dies; its last checkpoint was step 3. The resumed process
    logs 4-6 into the same folder: TensorBoard shows 1-3 of the first and 4-6 of the second."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _logger(tmp_path, tensorboard=True)
    first.start(first_step=1)
    for step in range(1, 6):
        first.log_step(step, {"loss": 10.0 + step})
    first.close()
    resumed = _logger(tmp_path, tensorboard=True)
    resumed.start(first_step=4)  # resumed from the checkpoint of step 3
    resumed.log_event("resume", 3, {"checkpoint": "iter_0000003", "restart_count": 0})
    for step in range(4, 7):
        resumed.log_step(step, {"loss": 20.0 + step})
    resumed.close()

    events = EventAccumulator(os.path.join(tmp_path, "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [(r["kind"], r["step"]) for r in records] == [("train", s) for s in range(1, 6)] + [
        ("resume", 3)] + [("train", s) for s in range(4, 7)]


def test_wandb_offline_resumes_the_same_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for steps in ((1, 2, 3), (3, 4)):
        logger = _logger(tmp_path, wandb=True, wandb_project="resume-test")
        logger.start(first_step=steps[0])
        for step in steps:
            logger.log_step(step, {"loss": float(step)})
        ids.append(logger.wandb.id)
        logger.close()
    assert ids[0] == ids[1]
    assert open(tmp_path / "wandb_run_id").read().strip() == ids[0]
    assert wandb.run is None  # finished
