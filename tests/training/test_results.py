"""Step results and their declared reductions (training/results.py), and the engine contract
(training/engine.py): what the trainer relies on whichever engine runs."""

import pytest
import torch

from megatron_unihetero.eval import diagnostics
from megatron_unihetero.testing import run_distributed_test
from megatron_unihetero.training import results
from megatron_unihetero.training.config import RunConfig, resolve_dtype
from megatron_unihetero.training.engine import Engine, engine_class, objective_weights
from megatron_unihetero.training.results import StepResult


def _result(rank: int) -> StepResult:
    p = torch.arange(6.0).reshape(3, 2) + rank
    return StepResult(losses={"text": 0.5 + rank, "loss": 1.0 + rank}, counts={"text": 7},
                      stats={"semantic": diagnostics.regression_stats(p, p * 0.5)},
                      grad_norm=2.0, skipped=False, lr=1e-3)


def reduction_job():
    import torch.distributed as dist

    rank = dist.get_rank()
    reduced = results.reduce_over_dp(_result(rank), dist.group.WORLD)
    # losses and statistics are summed, counts / grad_norm / lr are global and kept
    assert reduced.losses == {"text": 0.5 + 1.5, "loss": 1.0 + 2.0}, reduced.losses
    assert reduced.counts == {"text": 7} and reduced.grad_norm == 2.0 and reduced.lr == 1e-3
    both = _result(0).stats["semantic"] + _result(1).stats["semantic"]
    torch.testing.assert_close(reduced.stats["semantic"], both)
    # one declaration per figure: SUM and MAX each in one collective
    out = results.reduce_figures({"tokens": float(10 + rank), "time": float(rank + 1), "n": 3.0},
                                 {"tokens": results.SUM, "time": results.MAX, "n": results.GLOBAL},
                                 dist.group.WORLD)
    assert out == {"tokens": 21.0, "time": 2.0, "n": 3.0}, out


def test_each_field_reduces_over_data_parallel_ranks_as_declared():
    run_distributed_test(reduction_job, 2)


def test_figures_are_the_flat_record_and_evaluation_sums_batches():
    one = _result(0)
    record = one.figures()
    assert record["text"] == 0.5 and record["loss"] == 1.0 and record["grad_norm"] == 2.0
    assert record["skipped"] == 0.0 and record["lr"] == 1e-3
    assert record["semantic_r2"] == pytest.approx(
        diagnostics.regression_figures(one.stats["semantic"])["semantic_r2"])
    assert not any(k.startswith("stats/") for k in record)
    evaluation = StepResult(losses={"text": 1.0}, stats=dict(one.stats))
    total = StepResult().add(evaluation).add(evaluation).scaled(0.5)
    assert total.losses == {"text": 1.0}
    torch.testing.assert_close(total.stats["semantic"], 2 * one.stats["semantic"])
    assert set(total.figures(prefix="valid_")) >= {"valid_text", "valid_semantic_r2"}
    assert "grad_norm" not in total.figures()  # evaluation has no optimizer step


def test_every_engine_implements_the_contract():
    cfg = RunConfig()
    for name, expected_dtype in (("megatron", torch.float32), ("deepspeed", torch.float32)):
        cfg.parallel.engine = name
        cls = engine_class(cfg)
        assert issubclass(cls, Engine) and cls.name == name and not cls.__abstractmethods__
        if resolve_dtype("auto") == "fp32":
            assert cls.params_dtype(cfg) == expected_dtype
    cfg.train.dtype = "bf16"
    cfg.parallel.engine = "megatron"
    assert engine_class(cfg).params_dtype(cfg) == torch.bfloat16
    cfg.parallel.engine = "deepspeed"  # DeepSpeed keeps fp32 parameters and casts itself
    assert engine_class(cfg).params_dtype(cfg) == torch.float32


def test_auto_dtype_is_resolved_once_and_objective_weights_ramp():
    cfg = RunConfig()
    resolved = cfg.resolved()
    assert cfg.train.dtype == "auto" and resolved.train.dtype in ("bf16", "fp32")
    assert resolved.resolved().train.dtype == resolved.train.dtype
    cfg.model.semantic.weight, cfg.model.semantic.warmup_steps = 2.0, 4
    assert [objective_weights(cfg, s)["semantic"] for s in (0, 1, 3, 10)] == [0.5, 1.0, 2.0, 2.0]
