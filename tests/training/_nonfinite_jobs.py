"""Jobs for the non-finite guard tests (module-level so spawned workers can import them)."""

import os

import torch
import torch.distributed as dist

from megatron_unihetero.training import checkpoint as ckpt
from megatron_unihetero.training import losses


def nan_loss_at_call(call_index: int):
    """Make the ``call_index``-th micro-batch loss (0-based, counted per process) NaN on global
    rank 0 only: the other DP ranks see finite losses and must still skip the step with it.
    A monkeypatch of ``losses.assemble_loss``, which both engines call by module attribute."""
    original = losses.assemble_loss
    calls = {"n": 0}

    def assemble_loss(outputs, counts, weights):
        index = calls["n"]
        calls["n"] += 1
        if index == call_index and dist.get_rank() == 0:
            outputs = outputs._replace(objectives={
                k: (v[0] * float("nan"), v[1]) for k, v in outputs.objectives.items()})
        return original(outputs, counts, weights)

    losses.assemble_loss = assemble_loss


def faulty_pretrain_job(args, call_index: int):
    from megatron_unihetero.pretrain import main

    nan_loss_at_call(call_index)
    main(args)


def save_refusal_job(args):
    """A finite model saves; the same trainer with one NaN parameter refuses to, leaving
    ``latest`` and the earlier checkpoint as they were."""
    from megatron_unihetero import parallel
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.training.config import RunConfig
    from megatron_unihetero.training.trainer import Trainer

    cfg = load_config(RunConfig, None, args)
    parallel.initialize(1, 1, cfg.train.seed)
    try:
        trainer = Trainer(cfg)
        # One real step first: the distributed optimizer has no state to save before one.
        trainer.engine.train_batch(trainer.next_batches(), 0)
        trainer.step = 1
        good = trainer.save()
        assert good == ckpt.iteration_dir(cfg.checkpoint.dir, 1), good
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = float("nan")
        trainer.step = 2
        assert trainer.save() is None
        assert not os.path.exists(ckpt.iteration_dir(cfg.checkpoint.dir, 2))
        assert ckpt.latest_iteration_dir(cfg.checkpoint.dir) == good
    finally:
        parallel.destroy()


def model_is_finite(iter_dir: str) -> bool:
    state = ckpt.load_model_weights(iter_dir)
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
