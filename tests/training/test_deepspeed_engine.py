"""DeepSpeed engine (ZeRO 1/2/3, DP=2, gloo on CPU) against the megatron engine.

Same weights, same batches: the first step's loss equals the megatron engine's, later steps
track it (same AdamW, same clipping, same learning-rate schedule and weight decay), the loss
decreases, and the weights its checkpoint writes (``ITER/dist``, gathered in full under ZeRO-3)
are the trained model's.
The first DeepSpeed run on a machine builds its shared-memory comm op (once: it is cached in
~/.cache/torch_extensions).
"""

import pytest
import torch
import torch.distributed as dist

from megatron_unihetero.testing import run_distributed_test

STEPS = 3
LR = 2e-3
WEIGHTS = {"text": 1.0, "semantic": 1.0}


def _run_config(stage):
    from megatron_unihetero.training.config import DataConfig, ParallelConfig, RunConfig, TrainConfig
    from tests.models._parity_jobs import tiny_config

    return RunConfig(
        model=tiny_config(),
        data=DataConfig(micro_batch_size=2, seq_length=48),
        parallel=ParallelConfig(engine="deepspeed", zero_stage=stage),
        # The schedule's three phases within the test: warmup, the peak again, cosine decay.
        train=TrainConfig(grad_accumulation=2, lr=LR, weight_decay=0.1, clip_grad=1.0,
                          dtype="fp32", warmup_steps=1, steps=STEPS + 1, min_lr=LR / 10),
    )


def _global(value):
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _train(engine, batches, steps, first=0):
    from megatron_unihetero.training.optim import advance_lr

    losses, norms = [], []
    for step in range(first, first + steps):
        advance_lr(engine.lr_scheduler, step, engine.cfg.train)
        summary = engine.train_step(batches, WEIGHTS).figures()
        losses.append(summary["loss"])
        norms.append(summary["grad_norm"])
    return losses, norms


def zero_job(stage, tmp_dir):
    from megatron_unihetero import parallel
    from megatron_unihetero.checkpointing import dist as dist_ckpt
    from megatron_unihetero.training.engine_deepspeed import DeepSpeedEngine
    from megatron_unihetero.training.engine_megatron import MegatronEngine
    from tests.models._parity_jobs import make_batches

    cfg = _run_config(stage)
    parallel.initialize(1, 1, seed=7)
    rank = dist.get_rank()
    batches = make_batches(num_micro=2, batch=2, seed=100 + rank)  # each DP rank its own data

    model = parallel.build_model(cfg.model)
    init = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    ref_losses, ref_norms = _train(MegatronEngine(model, cfg), batches, STEPS)
    ref_state = {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}

    ds_model = parallel.build_model(cfg.model)
    ds_model.load_state_dict(init, strict=False)
    engine = DeepSpeedEngine(ds_model, cfg)
    losses, norms = _train(engine, batches, STEPS)

    # This rank's share of the loss, and the DP-global loss.
    assert abs(losses[0] - ref_losses[0]) <= 1e-5 * abs(ref_losses[0]), (losses, ref_losses)
    assert abs(norms[0] - ref_norms[0]) <= 1e-4 * abs(ref_norms[0]), (norms, ref_norms)
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= 1e-4 * abs(want), (stage, losses, ref_losses)
    global_losses = [_global(v) for v in losses]
    assert global_losses[-1] < global_losses[0], global_losses

    # Save and resume: a fresh engine loaded from the checkpoint (and the scheduler's state, as
    # the trainer keeps it) takes the same next step.
    engine.save(tmp_dir).execute_sync()  # the model files: a request the checkpoint manager runs
    scheduler_state = engine.lr_scheduler.state_dict()
    # The checkpoint's weights (ITER/dist, gathered in full under ZeRO-3) are the trained ones.
    saved = parallel.build_model(cfg.model)
    dist_ckpt.load_model([saved], dist_ckpt.dist_dir(tmp_dir))
    state = {k: v for k, v in saved.state_dict().items() if torch.is_tensor(v)}
    assert set(state) == set(ref_state), set(state) ^ set(ref_state)
    for key, want in ref_state.items():
        got = state[key]
        assert got.shape == want.shape, (key, got.shape, want.shape)
        err = float((got.float() - want.float()).norm())
        assert err <= 1e-4 * float(want.float().norm()) + 1e-6, (stage, key, err)
    (next_loss,), _ = _train(engine, batches, 1, first=STEPS)
    dist.barrier()
    resumed_model = parallel.build_model(cfg.model)
    resumed = DeepSpeedEngine(resumed_model, cfg)
    resumed.load(tmp_dir)
    resumed.lr_scheduler.load_state_dict(scheduler_state)
    (resumed_loss,), _ = _train(resumed, batches, 1, first=STEPS)
    assert resumed.optimizer.param_groups[0]["lr"] == engine.optimizer.param_groups[0]["lr"]
    assert abs(resumed_loss - next_loss) <= 1e-5 * abs(next_loss), (resumed_loss, next_loss)
    dist.barrier()
    parallel.destroy()


@pytest.mark.parametrize("stage", [1, 2, 3], ids=["zero1", "zero2", "zero3"])
def test_deepspeed_zero_matches_megatron_engine(stage, tmp_path):
    run_distributed_test(zero_job, 2, stage, str(tmp_path), timeout_s=600)
