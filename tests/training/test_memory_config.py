"""Config errors of the memory settings name the field (training/config.py)."""

import pytest

from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import ParallelConfig, RunConfig, TrainConfig


@pytest.mark.parametrize("train,parallel,message", [
    (dict(recompute="all"), {}, "train.recompute must be one of"),
    (dict(recompute="full", recompute_num_layers=3), {}, "train.recompute_num_layers=3 must divide"),
    (dict(recompute="full", recompute_num_layers=0), {}, "train.recompute_num_layers must be between"),
    (dict(recompute="full", recompute_method="chunk"), {}, "train.recompute_method"),
    (dict(recompute="selective", recompute_modules=["moe"]), {}, "train.recompute_modules"),
    (dict(recompute="selective"), dict(engine="deepspeed"), "train.recompute needs parallel.engine"),
    ({}, dict(sequence_parallel=True, engine="deepspeed"), "parallel.sequence_parallel needs"),
    ({}, dict(overlap_param_gather=True), "parallel.overlap_param_gather is not supported"),
    ({}, dict(overlap_grad_reduce=True, engine="deepspeed"), "parallel.overlap_grad_reduce"),
])
def test_memory_settings_are_checked_by_name(train, parallel, message):
    from tests.models._parity_jobs import tiny_config

    cfg = RunConfig(model=tiny_config(), train=TrainConfig(**train), parallel=ParallelConfig(**parallel))
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world_size=1)
