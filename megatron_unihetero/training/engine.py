"""The engine contract: what the trainer drives, whichever engine runs the step.

Shaped as OLMo-core's ``TrainModule``. An engine owns *how* a step runs: the wrapped model,
the optimizer, the learning-rate schedule, the precision and the objectives' weights, each
resolved once when it is built. The trainer owns *when* things happen (the loop, logging,
evaluation, the checkpoint cadence, signals) and calls only what this class declares:

    Engine.check_config(cfg)       this engine's options (RunConfig.validate calls it, before
                                   any rank builds a model): ConfigError naming the key
    Engine.params_dtype(cfg)       the dtype to build the model in, before the engine wraps it
    train_batch(batches, step)     one optimizer step at step ``step``'s learning rate and
                                   objective weights -> StepResult (training/results.py)
    eval_batch(batches, step)      forward only -> StepResult
    save(iter_dir)                 plan this engine's checkpoint files -> megatron-core's save
                                   request (the checkpoint manager runs it, sync or async)
    load(iter_dir)                 resume model and optimizer from a checkpoint folder
    state_dict() / load_state_dict(state, step)
                                   the small state that rides in trainer.pt (the LR schedule)
    parameters_are_finite()        this rank's parameters (the caller all-reduces)
    Engine.forward_is_local(cfg)   whether a forward of the chunks is free of DP collectives
    close()                        give back what the engine holds for the run

The implementations: training/engine_megatron.py (megatron-core DDP, distributed optimizer,
pipeline schedules) and training/engine_deepspeed.py (ZeRO 0-3, PP=1). :func:`engine_class`
maps ``parallel.engine`` to one of them; nothing else in the package looks at the name.
"""

from __future__ import annotations

import abc
import importlib
from typing import ClassVar, Dict, List, Mapping, Type

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.optim import advance_lr, module_lrs
from megatron_unihetero.training.monitor import PhaseTimer
from megatron_unihetero.training.results import StepResult

# parallel.engine -> the module and class implementing it, imported on demand: importing
# DeepSpeed costs seconds (and on first use builds its ops), which a megatron run should not pay.
ENGINES: Dict[str, str] = {
    "megatron": "megatron_unihetero.training.engine_megatron:MegatronEngine",
    "deepspeed": "megatron_unihetero.training.engine_deepspeed:DeepSpeedEngine",
}


def engine_class(cfg: RunConfig) -> Type["Engine"]:
    module, name = ENGINES[cfg.parallel.engine].split(":")
    return getattr(importlib.import_module(module), name)


def objective_weights(cfg: RunConfig, step: int) -> Dict[str, float]:
    """The objectives' weights at step ``step`` (0-based: the step about to run), with the
    semantic objective's linear warmup (``model.semantic.warmup_steps``)."""
    sem = cfg.model.semantic
    ramp = min(1.0, (step + 1) / sem.warmup_steps) if sem.warmup_steps > 0 else 1.0
    return {"text": 1.0, "semantic": sem.weight * ramp, "pixel": cfg.model.pixel.weight}


class Engine(abc.ABC):
    name: ClassVar[str]

    @classmethod
    def forward_is_local(cls, cfg: RunConfig) -> bool:
        """Whether a forward of the model chunks needs no collective over the data-parallel
        ranks (the run's own evaluation generates text on each rank only then)."""
        return True

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg.resolved()  # a no-op for the trainer's (already resolved) config
        self.lr_scheduler = None  # set by the implementation once its optimizer exists
        # The implementations time their step's phases with it (training/monitor.py).
        self.timer = PhaseTimer(self.cfg.logging.time_breakdown)

    @classmethod
    @abc.abstractmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Check the options this engine owns or cannot take; ConfigError naming the key."""

    @classmethod
    @abc.abstractmethod
    def params_dtype(cls, cfg: RunConfig) -> torch.dtype:
        """The dtype the model's parameters are built in for this engine (``cfg`` resolved)."""

    # -- steps ---------------------------------------------------------------------------------
    def train_batch(self, batches: List[dict], step: int) -> StepResult:
        """Training step ``step`` (0-based) over this rank's micro-batches: sets the step's
        learning rate (the schedule advances once per step, skipped steps included, as
        megatron's training loop does), then :meth:`train_step`."""
        lr = advance_lr(self.lr_scheduler, step, self.cfg.train)
        result = self.train_step(batches, objective_weights(self.cfg, step))
        result.lr = lr
        result.module_lrs = module_lrs(self.lr_scheduler.optimizer.param_groups)
        result.times.update(self.timer.pop())
        return result

    def eval_batch(self, batches: List[dict], step: int) -> StepResult:
        """Forward only, with the objective weights of step ``step``."""
        result = self.eval_step(batches, objective_weights(self.cfg, step))
        self.timer.pop()  # an evaluation's phases are not the next training step's
        return result

    @abc.abstractmethod
    def train_step(self, batches: List[dict], weights: Mapping[str, float]) -> StepResult:
        """One optimizer step with the given objective weights at the learning rate the
        schedule last set; a step with a non-finite loss or gradient norm is skipped
        (``skipped``), leaving parameters and optimizer state as they were."""

    @abc.abstractmethod
    def eval_step(self, batches: List[dict], weights: Mapping[str, float]) -> StepResult:
        """Forward only (no gradients), the model back in training mode after."""

    @abc.abstractmethod
    def parameters_are_finite(self) -> bool:
        """Whether every parameter this rank holds is finite (local: the caller all-reduces)."""

    def close(self) -> None:
        """Give back what the engine holds for the run's lifetime (called once, at the end)."""

    # -- checkpoint ----------------------------------------------------------------------------
    @abc.abstractmethod
    def save(self, iter_dir: str) -> AsyncRequest:
        """Collective: write what must be written now and return the request that writes the
        rest (the model's torch_dist files, checkpointing/dist.py) for the checkpoint manager
        to run in place or in a forked writer."""

    @abc.abstractmethod
    def load(self, iter_dir: str) -> None:
        """Resume model and optimizer state from checkpoint folder ``iter_dir``; collective.
        A checkpoint this engine cannot resume raises CheckpointError naming the folder and
        what to do instead."""

    def state_dict(self) -> dict:
        """What rides in the checkpoint's trainer.pt for this engine: the LR schedule."""
        return {"lr_scheduler": self.lr_scheduler.state_dict()}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore :meth:`state_dict` saved after ``step`` steps (a checkpoint from before the
        schedule was saved: its steps are replayed)."""
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            return
        for past in range(step):
            advance_lr(self.lr_scheduler, past, self.cfg.train)
