"""The learning-rate schedule through megatron-core's OptimizerParamScheduler gives, at every
step, the values of the formula it replaced (``_former_lr``, copied here as the reference),
applies each group's wd_mult, and resumes from its state dict."""

import math

import pytest
import torch

from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import TrainConfig
from megatron_unihetero.training.optim import advance_lr, build_lr_scheduler


def _former_lr(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def _optimizer(weight_decay=0.1):
    decay, no_decay = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [decay], "weight_decay": weight_decay, "wd_mult": 1.0},
                              {"params": [no_decay], "weight_decay": 0.0, "wd_mult": 0.0}], lr=1.0)


CONFIGS = {
    "no_warmup": TrainConfig(steps=20, lr=3e-4, min_lr=0.0, warmup_steps=0),
    "warmup": TrainConfig(steps=20, lr=3e-4, min_lr=0.0, warmup_steps=5),
    "min_lr": TrainConfig(steps=17, lr=1e-3, min_lr=1e-4, warmup_steps=3),
    "steps_equal_warmup": TrainConfig(steps=6, lr=1e-3, min_lr=1e-5, warmup_steps=6),
    "one_step_of_decay": TrainConfig(steps=5, lr=1e-3, min_lr=1e-4, warmup_steps=4),
    "single_step": TrainConfig(steps=1, lr=1e-3, min_lr=1e-4, warmup_steps=0),
    "defaults": TrainConfig(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_step_has_the_former_learning_rate(name):
    cfg = CONFIGS[name]
    optimizer = _optimizer(cfg.weight_decay)
    scheduler = build_lr_scheduler(optimizer, cfg)
    # Past the end too: the former formula holds min_lr there.
    for step in range(cfg.steps + 3):
        lr = advance_lr(scheduler, step, cfg)
        expected = _former_lr(step, cfg)
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-18), (step, lr, expected)
        assert all(group["lr"] == lr for group in optimizer.param_groups)
        decay, no_decay = optimizer.param_groups
        assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["warmup", "min_lr", "steps_equal_warmup"])
def test_resume_from_the_state_dict_continues_the_schedule(name, tmp_path):
    cfg = CONFIGS[name]
    running = build_lr_scheduler(_optimizer(), cfg)
    for stop in range(cfg.steps + 1):  # a checkpoint after `stop` steps, for every stop
        if stop > 0:
            advance_lr(running, stop - 1, cfg)
        path = tmp_path / f"state_{stop}.pt"
        torch.save({"lr_scheduler": running.state_dict()}, path)  # as the trainer state holds it
        resumed = build_lr_scheduler(_optimizer(), cfg)
        resumed.load_state_dict(torch.load(path, weights_only=True)["lr_scheduler"])
        for step in range(stop, cfg.steps):
            assert advance_lr(resumed, step, cfg) == pytest.approx(_former_lr(step, cfg), rel=1e-12)


def test_megatron_scheduler_settings_follow_the_run_config():
    cfg = CONFIGS["min_lr"]
    scheduler = build_lr_scheduler(_optimizer(), cfg)
    assert (scheduler.lr_warmup_steps, scheduler.lr_decay_steps, scheduler.lr_decay_style) == \
        (3, 17, "cosine")
    assert (scheduler.init_lr, scheduler.max_lr, scheduler.min_lr) == (0.0, 1e-3, 1e-4)


def test_min_lr_above_lr_is_a_clear_error():
    with pytest.raises(ConfigError, match="train.min_lr"):
        build_lr_scheduler(_optimizer(), TrainConfig(lr=1e-4, min_lr=1e-3))
