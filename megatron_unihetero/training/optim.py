"""Learning-rate schedule and optimizers of the two engines.

Schedule: megatron-core's ``OptimizerParamScheduler`` (:func:`build_lr_scheduler`), for both
engines: linear warmup to ``train.lr`` over ``train.warmup_steps``, then cosine decay to
``train.min_lr`` at ``train.steps``; the weight decay is constant, times each param group's
``wd_mult``. The trainer advances it once per training step (:func:`advance_lr`) and keeps its
state in the checkpoint.

megatron engine: megatron-core's optimizer (:func:`build_megatron_optimizer`), by default its
distributed optimizer (ZeRO-1: fp32 master weights and Adam moments sharded over the
data-parallel ranks). It clips by the global gradient norm over TP x PP (x DP shards) and
keeps fp32 master weights for a bf16 model. On CPU it runs through the megatron-core CPU layer
(``platform/megatron_cpu.py``) with gloo.

deepspeed engine: DeepSpeed builds its own from :func:`param_groups`.

Both: no weight decay on norms and biases (1-D tensors), AdamW (decoupled weight decay).
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core.optimizer import ChainedOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import RunConfig, TrainConfig


def build_lr_scheduler(optimizer, train: TrainConfig):
    """megatron-core's ``OptimizerParamScheduler`` over ``optimizer``'s param groups.

    Step s of training (0-based) runs at ``lr * (s + 1) / warmup_steps`` while s < warmup_steps,
    then at ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2`` with
    ``p = min((s - warmup_steps) / max(steps - warmup_steps, 1), 1)``. megatron's warmup is
    ``init_lr + (max_lr - init_lr) * n / lr_warmup_steps`` at its step count n, so with
    ``init_lr = 0`` step s is the scheduler's n = s + 1 during warmup; its cosine starts at
    n = warmup_steps, and ours at s = warmup_steps (the peak a second time), so from there
    n = s: :func:`advance_lr` holds the count once, at s = warmup_steps. ``lr_decay_steps``
    (the end of the cosine) is ``steps``, at least one past the warmup (megatron requires
    it; a run that ends within its warmup never gets there).

    On resume the run config's schedule wins over the checkpoint's
    (``override_opt_param_scheduler``; the megatron engine resets its groups' ``max_lr`` /
    ``min_lr`` after a load): only the step count comes from the checkpoint, so a changed
    ``train.steps`` or ``train.lr`` applies from the next step on.
    """
    if not 0.0 <= train.min_lr <= train.lr:
        raise ConfigError(f"train.min_lr={train.min_lr} must be between 0 and train.lr={train.lr}")
    decay_steps = max(train.steps, train.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps, lr_decay_steps=decay_steps, lr_decay_style="cosine",
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=decay_steps,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True)


def advance_lr(scheduler, step: int, train: TrainConfig) -> float:
    """Set the param groups' learning rate (and weight decay) for training step ``step``.

    Call it once per training step, in order: from step 0 on a fresh scheduler, or from step k on
    one loaded with the state saved after step k - 1 (:func:`build_lr_scheduler` explains the
    held count). Returns the learning rate set (the first param group's; all groups share it).
    """
    scheduler.step(0 if step == train.warmup_steps else 1)
    return float(scheduler.optimizer.param_groups[0]["lr"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on matrices only: norms, biases (1-D tensors) get none.

    ``wd_mult`` is what the LR scheduler multiplies its weight decay by (as in megatron-core's
    own groups).
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0})
    return groups


def build_megatron_optimizer(wrapped_chunks: List[torch.nn.Module], cfg: RunConfig, params_dtype: torch.dtype):
    """megatron-core's optimizer over DDP-wrapped chunks (distributed when configured).

    Weight decay follows megatron-core's standard rule, which is ours: none on biases and 1-D
    tensors (``wd_mult`` 0). The learning rate and weight decay are set every step by the LR
    scheduler (:func:`build_lr_scheduler`).
    """
    train = cfg.train
    config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=1e-8,
        clip_grad=train.clip_grad if train.clip_grad > 0 else 0.0,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, list(wrapped_chunks))
    use_fused_torch_adam(optimizer)
    return optimizer


def megatron_optimizers(optimizer) -> list:
    """The optimizers a megatron-core optimizer is made of: the parts of a ChainedOptimizer
    (one per param-group kind), or the optimizer itself."""
    if isinstance(optimizer, ChainedOptimizer):
        return list(optimizer.chained_optimizers)
    return [optimizer]


def use_fused_torch_adam(optimizer) -> None:
    """Switch megatron-core's torch AdamW fallback (no TE/apex FusedAdam) to torch's fused kernel.

    megatron-core builds ``torch.optim.AdamW`` with its defaults, which on CPU is the
    for-loop implementation: about ten kernels and their Python per parameter tensor and step.
    torch's fused AdamW (CPU and CUDA) updates each tensor in one kernel. Same update rule;
    results differ in the last bits only (the order of the floating-point operations). Called
    again after a checkpoint load (whose param groups replace the optimizer's): existing step
    counters move to their parameter's device, where the fused kernel wants them.
    """
    inners = [opt.optimizer for opt in megatron_optimizers(optimizer)]
    for inner in inners:
        if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue  # TE's / apex's FusedAdam: fused already
        params = [p for group in inner.param_groups for p in group["params"]]
        if not all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params):
            continue
        for group in inner.param_groups:
            group["fused"], group["foreach"] = True, False
        for param, state in inner.state.items():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


@torch.no_grad()
def allocate_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter of a fresh torch Adam(W) its (zero) state before a checkpoint load.

    torch creates the state at the first step; megatron-core 0.16's optimizers, without TE or
    apex FusedAdam, read the ``step`` from it while they build the sharded state dict to load
    into (and fail on a fresh optimizer). The load then overwrites all of it. megatron-core's
    own way (``_init_optimizer_states_with_dummy_values``) takes a real step, which would
    move the parameters by weight decay until they are overwritten too.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def untie_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter state its own Adam ``step`` tensor.

    Some loaders restore one step tensor into every parameter's state (megatron-core 0.16's
    distributed optimizer without TE/apex, DeepSpeed's ZeRO-3 universal load); torch AdamW
    increments it in place, once per parameter (or ZeRO sub-group) and step, so the bias
    corrections after a resume would use step counts that run ahead.
    """
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = step.clone()
