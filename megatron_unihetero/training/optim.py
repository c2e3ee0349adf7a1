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

Both: AdamW (decoupled weight decay); param groups per module and weight decay. Each trainable
parameter belongs to one module of ``train.module_lr`` (:func:`module_of`: vision, projector,
llm, heads) and is decayed or not (megatron-core's standard rule: no weight decay on biases and
1-D tensors); one param group per (decayed, module) pair, tagged with both (``"decay"``,
``"module"``). :func:`apply_module_multipliers` gives each group its module's ``max_lr`` /
``min_lr`` (train.lr / train.min_lr x ``lr_mult``), which the scheduler's curve runs between,
and ``wd_mult`` (the module's on decayed groups, 0 on the others). Frozen parameters are in no
group: no optimizer state, no weight decay.
"""

from __future__ import annotations

import functools
from typing import Dict, List

import torch
from megatron.core.optimizer import (
    ChainedOptimizer,
    OptimizerConfig,
    ParamKey,
    ParamWithNamePredicate,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import MODULES, RunConfig, TrainConfig

# UniHeteroModel's top-level submodules -> the module of train.module_lr that holds their
# parameters. The LLM's token embedding and output layer are the LLM's (they live in it, are
# pretrained with it and tied to its vocabulary). target_projector (a copy of the projector) and
# pixel_vae are always frozen: a trainable parameter outside this table is an error.
_MODULE_OF_SUBMODULE = {"vision": "vision", "projector": "projector", "llm": "llm",
                        "semantic_head": "heads", "pixel_head": "heads"}


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
    held count). Returns the schedule's base learning rate at this step: ``train.lr``'s curve,
    what a module with ``lr_mult`` 1 trains at (each group's is its module's ``lr_mult`` times
    it: :func:`module_lrs`).
    """
    scheduler.step(0 if step == train.warmup_steps else 1)
    return float(scheduler.get_lr({}))  # no group keys: the scheduler's own max_lr / min_lr


def module_of(name: str) -> str:
    """The module of ``train.module_lr`` (config.MODULES) that holds parameter ``name`` of
    UniHeteroModel (a DDP wrapper's ``module.`` prefixes dropped)."""
    while name.startswith("module."):
        name = name[len("module."):]
    module = _MODULE_OF_SUBMODULE.get(name.split(".", 1)[0])
    if module is None:
        raise ValueError(f"trainable parameter {name!r} belongs to no module of train.module_lr "
                         f"({' | '.join(MODULES)}): add its submodule to "
                         f"training/optim.py _MODULE_OF_SUBMODULE")
    return module


def _no_decay_keys() -> List[ParamKey]:
    """megatron-core's standard no-weight-decay rule (biases and 1-D tensors), as its keys."""
    standard = get_standard_config_overrides(OptimizerConfig(lr=1.0))
    return [key for key, override in standard.items() if override.get("wd_mult") == 0.0]


def is_decayed(param: torch.Tensor, name: str, no_decay_keys: List[ParamKey]) -> bool:
    """Whether weight decay applies to ``param`` (megatron-core's standard rule: not to biases
    and 1-D tensors)."""
    return not any(key.matches(param, name) for key in no_decay_keys)


def _in_group(module: str, decay: bool, no_decay_keys: List[ParamKey], param, name: str) -> bool:
    return module_of(name) == module and is_decayed(param, name, no_decay_keys) == decay


def module_overrides(config: OptimizerConfig, train: TrainConfig) -> dict:
    """megatron-core's param-group overrides (``get_megatron_optimizer(config_overrides=)``):
    its standard ones (no weight decay on biases and 1-D tensors; decoupled LR if configured)
    plus one key per (module, decayed) that tags the group (``"module"``, ``"decay"``) and
    sets the decayed groups' ``wd_mult`` to the module's.

    The learning rates are not overrides: megatron-core orders the groups by their sorted
    override items, and ``max_lr`` would sort before ``module``, so a resume with another
    ``lr_mult`` could reorder the groups against the checkpoint's. With ``decay`` and ``module``
    first the order is fixed by the model alone; :func:`apply_module_multipliers` sets the rates.
    """
    overrides = get_standard_config_overrides(config)
    no_decay = [key for key, override in overrides.items() if override.get("wd_mult") == 0.0]
    for module in MODULES:
        for decay in (True, False):
            predicate = ParamWithNamePredicate(
                name=f"{module}_{'decay' if decay else 'no_decay'}",
                fn=functools.partial(_in_group, module, decay, no_decay))
            override = {"module": module, "decay": decay}
            if decay:
                override["wd_mult"] = train.module_multipliers(module).wd_mult
            overrides[ParamKey(with_name_predicate=predicate)] = override
    return overrides


def apply_module_multipliers(groups: List[dict], train: TrainConfig) -> None:
    """Give each module-tagged param group its module's schedule and weight decay: ``max_lr``
    and ``min_lr`` (what megatron-core's OptimizerParamScheduler reads per group) are
    train.lr and train.min_lr times the module's ``lr_mult``; ``wd_mult`` is the module's on a
    decayed group, 0 on the others. Called when the optimizer is built and after a checkpoint
    load (whose groups carry the saved run's: this run's config wins, as for the rest of the
    schedule). megatron-core's own ``lr_mult`` key is left at 1: megatron-core matches saved
    param groups to the optimizer's by it (and ``wd_mult``) when it loads a checkpoint."""
    for group in groups:
        mults = train.module_multipliers(group["module"])
        group.update(max_lr=train.lr * mults.lr_mult, min_lr=train.min_lr * mults.lr_mult,
                     wd_mult=mults.wd_mult if group["decay"] else 0.0)


def module_lrs(groups: List[dict]) -> Dict[str, float]:
    """{module: the learning rate the scheduler last set} for the modules with param groups
    (those that train; megatron-core gives every rank every group, empty where a stage holds
    none of the module, so the last stage knows the first stage's projector)."""
    return {group["module"]: float(group["lr"]) for group in groups if "module" in group}


def param_groups(model: torch.nn.Module, train: TrainConfig) -> List[dict]:
    """The DeepSpeed engine's param groups: the megatron engine's (:func:`module_overrides`),
    built directly: one per (decayed, module) with parameters, in megatron-core's order
    (undecayed first, then by module name), ``wd_mult`` the module's on decayed groups and 0 on
    the others, the learning rates set by :func:`apply_module_multipliers`."""
    no_decay = _no_decay_keys()
    members: Dict[tuple, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (is_decayed(param, name, no_decay), module_of(name))
            members.setdefault(key, []).append(param)
    groups = []
    for decay, module in sorted(members):
        wd_mult = train.module_multipliers(module).wd_mult if decay else 0.0  # until the scheduler sets it
        groups.append({"params": members[(decay, module)], "module": module, "decay": decay,
                       "weight_decay": train.weight_decay * wd_mult})
    apply_module_multipliers(groups, train)
    return groups


def build_megatron_optimizer(wrapped_chunks: List[torch.nn.Module], cfg: RunConfig, params_dtype: torch.dtype):
    """megatron-core's optimizer over DDP-wrapped chunks (distributed when configured), its
    param groups per module and weight decay (:func:`module_overrides`). The learning rate and
    weight decay are set every step by the LR scheduler (:func:`build_lr_scheduler`).

    Every rank gets every group (megatron-core all-gathers the group keys, for the distributed
    checkpoint), empty where this rank holds none of its parameters: a pipeline stage with
    nothing trainable (a frozen LLM's last stage) still has an optimizer, with no state.
    """
    train = cfg.train
    config = OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=1e-8,
        clip_grad=train.clip_grad if train.clip_grad > 0 else 0.0,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, list(wrapped_chunks),
                                       config_overrides=module_overrides(config, train))
    apply_module_multipliers(optimizer.param_groups, train)
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
