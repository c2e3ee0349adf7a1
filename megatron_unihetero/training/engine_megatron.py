"""The megatron engine: megatron-core DDP + pipeline schedules + megatron-core's optimizer.

Gradients: megatron-core's ``DistributedDataParallel`` keeps them in contiguous fp32 buffers
(``param.main_grad``). With the distributed optimizer (``parallel.distributed_optimizer``, the
default) they are reduce-scattered over the data-parallel group, each DP rank updates its
1/DP shard of the fp32 master weights and Adam moments (ZeRO-1), and the updated parameters
are all-gathered back. Without it they are all-reduced and every rank holds the full state.

Checkpoints (checkpointing/dist.py): the model chunks and megatron-core's optimizer sharded
state in one torch_dist checkpoint, every rank writing its own part. The optimizer's form is
``checkpoint.optimizer_format``: ``dp_reshardable`` (the default: each rank's flat buffers
as they are, no exchange and no extra memory; only the DP size may change at a resume) or
``fully_reshardable`` (model-space tensors, so a run resumes at another TP, PP and DP size; the
save gathers the state, onto DP rank 0 alone with ``checkpoint.optimizer_save_low_memory``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Dict, List, Mapping

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import (
    _allreduce_non_tensor_model_parallel_grads, _allreduce_word_embedding_grads)
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from megatron_unihetero import parallel, platform
from megatron_unihetero.checkpointing import dist as dist_ckpt
from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.training import step as step_lib
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import OPTIMIZER_FORMATS, RunConfig, resolve_dtype
from megatron_unihetero.training.engine import Engine
from megatron_unihetero.training.results import StepResult
from megatron_unihetero.training.optim import (
    allocate_adam_state,
    apply_module_multipliers,
    build_lr_scheduler,
    build_megatron_optimizer,
    megatron_optimizers,
    untie_step_counters,
    use_fused_torch_adam,
)


# The distributed optimizer's loaders of parameter state (one per checkpoint format).
_PARAM_STATE_LOADERS = ("load_parameter_state_from_fully_reshardable",
                        "load_parameter_state_from_dp_reshardable")


@contextlib.contextmanager
def _param_state_loads_skip_adam_steps(optimizers):
    """Work around megatron-core 0.16 for torch AdamW (the fallback without TE/apex).

    Its distributed optimizer copies *every* entry of a parameter's inner optimizer state from
    the checkpoint's parameter state, which holds param / exp_avg / exp_avg_sq only: right for
    TE/apex FusedAdam (the step lives in the param group), a KeyError on torch AdamW's
    per-parameter ``step``. Those steps were already restored from the param groups by the
    same ``load_state_dict``; during the parameter-state copy they are set aside (and untied
    after, see optim.untie_step_counters).
    """
    wrapped = [opt for opt in optimizers if isinstance(opt, DistributedOptimizer)]
    for opt in wrapped:
        for name in _PARAM_STATE_LOADERS:
            def load_without_steps(param_state, _load=getattr(opt, name), _inner=opt.optimizer):
                steps = {p: st.pop("step") for p, st in _inner.state.items() if "step" in st}
                try:
                    return _load(param_state)
                finally:
                    for param, step in steps.items():
                        _inner.state[param]["step"] = step
            setattr(opt, name, load_without_steps)  # shadows the method on this instance only
    try:
        yield
    finally:
        for opt in wrapped:
            for name in _PARAM_STATE_LOADERS:
                delattr(opt, name)


def _state_dict_without_parameter_state(opt: DistributedOptimizer, step: float) -> dict:
    """What megatron-core 0.16's ``DistributedOptimizer.state_dict`` returns (torch AdamW, no
    TE/apex), for a part that holds no parameter state: the param groups (no params) with
    the Adam step given, and the grad scaler's state."""
    inner = opt.optimizer.state_dict()
    state = {"optimizer": {key: value for key, value in inner.items() if key != "state"}}
    state["optimizer"]["param_groups"] = [
        dict({key: value for key, value in group.items() if key != "params"}, step=step)
        for group in inner["param_groups"]]
    if opt.grad_scaler:
        state["grad_scaler"] = opt.grad_scaler.state_dict()
    return state


@contextlib.contextmanager
def _stateless_parts_report_the_step(optimizers):
    """Work around megatron-core 0.16's distributed optimizer with torch AdamW (no TE/apex) on
    a rank that holds no trainable parameter (a pipeline stage of frozen modules: a frozen
    LLM's last stage).

    Its ``state_dict`` (called by every checkpoint save and load) reads the Adam step from the
    parameters' states and asserts there is exactly one: with no state at all it fails. Such a
    part reports the step of the ranks that have one instead (MAX over the world: every rank
    applies the same steps, the skip decision is global), so the param groups a checkpoint
    keeps (per stage for dp_reshardable, global rank 0's for fully_reshardable, whichever
    stage that is) carry the true step. Collective: every rank enters it.
    """
    wrapped = [opt for opt in optimizers if isinstance(opt, DistributedOptimizer)]
    if HAVE_APEX_OR_TE or not wrapped:  # TE / apex keep the step in the param groups
        yield
        return
    local = [max((float(state["step"]) for state in opt.optimizer.state.values() if "step" in state),
                 default=0.0) for opt in wrapped]
    steps = torch.tensor(local, dtype=torch.float64, device=platform.device())
    torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MAX)
    stateless = [opt for opt in wrapped if not opt.optimizer.state]
    for opt, step in zip(wrapped, steps.tolist()):
        if not opt.optimizer.state:
            # shadows the method on this instance only
            opt.state_dict = functools.partial(_state_dict_without_parameter_state, opt, step)
    try:
        yield
    finally:
        for opt in stateless:
            del opt.state_dict


def _is_legacy(groups: list) -> bool:
    """``groups`` are megatron-core's two standard param groups, untagged: a checkpoint saved
    before per-module param groups (wd_mult 1 on matrices, 0 on biases and 1-D tensors)."""
    return (len(groups) == 2 and not any("decay" in g or "module" in g for g in groups)
            and sorted(g.get("wd_mult") for g in groups) == [0.0, 1.0]
            and all(g.get("lr_mult") == 1.0 and not g.get("is_expert_parallel")
                    and not g.get("is_decoupled_lr") for g in groups))


def _per_module_groups(legacy: list, current: list) -> list:
    """A legacy checkpoint's two param groups laid out as the optimizer's per-module ones
    (``current``: its inner optimizer's state-dict groups): each group a copy of the legacy
    group of the same decay (its step and other hyperparameters), tagged and with the
    parameter indices of the current group."""
    by_decay = {group["wd_mult"] == 1.0: group for group in legacy}
    return [dict(by_decay[group["decay"]], decay=group["decay"], module=group["module"],
                 params=group["params"]) for group in current]


def _group_tags(groups: list) -> list:
    """The sorted (decay, module) tags of param groups."""
    return sorted({(group["decay"], group["module"]) for group in groups})


def _check_saved_tags(saved_groups: list, tags: list, folder: str) -> None:
    """A checkpoint's param groups are for this run's (decay, module) ``tags``, or a
    CheckpointError: the checkpoint trains other modules."""
    saved = {(group.get("decay"), group.get("module")) for group in saved_groups}
    if saved != set(tags):
        raise CheckpointError(
            f"{folder}: its optimizer has param groups for (decay, module) "
            f"{sorted(saved, key=str)}, this run {tags}: it trains other modules "
            f"(model.*.frozen, model.freeze_llm). Start from its weights with "
            f"--checkpoint.load={os.path.dirname(folder)} --checkpoint.resume=false")


@contextlib.contextmanager
def _matching_groups_by_tags(optimizer, train, folder: str):
    """Work around megatron-core 0.16's matching of a checkpoint's param groups to the
    optimizer's (both the float16 and the distributed optimizer): by their (wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr) alone. Two modules with equal multipliers have equal
    keys: the float16 optimizer then gives both groups one group's parameters (a size error),
    the distributed optimizer trades their "module" tags; a wd_mult changed since the save
    matches nothing.

    While loading, every group's ``lr_mult`` (which megatron-core 0.16's scheduler does not
    read: the rates are each group's max_lr / min_lr) is its position in the order of the
    (decay, module) tags, in the optimizer's groups and, through the function this yields, in
    the checkpoint's, which also get this run's wd_mult: the match is one to one. After the
    load ``lr_mult`` is 1 again. A checkpoint saved before per-module groups (megatron-core's
    two standard groups, untagged, :func:`_is_legacy`) is first laid out as this optimizer's
    groups (:func:`_per_module_groups`, from ``part``'s inner optimizer: the saved groups'
    part of the megatron optimizer).
    A checkpoint whose groups are other modules (freezing changed) is a CheckpointError.
    """
    tags = _group_tags(optimizer.param_groups)
    position = {tag: float(i + 1) for i, tag in enumerate(tags)}
    for group in optimizer.param_groups:
        group["lr_mult"] = position[(group["decay"], group["module"])]

    def mark_saved(groups: list, part) -> None:
        if _is_legacy(groups):
            groups[:] = _per_module_groups(groups, part.optimizer.state_dict()["param_groups"])
        _check_saved_tags(groups, tags, folder)
        apply_module_multipliers(groups, train)
        for group in groups:
            group["lr_mult"] = position[(group["decay"], group["module"])]

    try:
        yield mark_saved
    finally:
        for group in optimizer.param_groups:
            group["lr_mult"] = 1.0


def _saved_param_groups(state):
    """The lists of param groups in a loaded megatron-core optimizer state (one per part of
    the optimizer, wherever its sharded state dict nests them)."""
    if isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            yield state["param_groups"]
        for value in state.values():
            yield from _saved_param_groups(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_param_groups(value)


def _request_saved_groups(request: dict, common: dict, tags: list, folder: str,
                          distributed: bool) -> None:
    """Check the param groups in the checkpoint's common state (the float16 / fp32 optimizer's,
    the distributed optimizer's in fully_reshardable form) before the load: other modules'
    groups are the CheckpointError of :func:`_check_saved_tags` here, not megatron-core's
    merge or shape error. For the float16 / fp32 optimizer a legacy pair (:func:`_is_legacy`)
    is requested as two groups: megatron-core merges the saved groups into the requested list
    (the lengths must agree), their parameter indices are not saved (LocalNonpersistentObject),
    the state is keyed by parameter, and mark_saved lays the groups out again."""
    for requested, saved in zip(_saved_param_groups(request), _saved_param_groups(common)):
        if not _is_legacy(saved):
            _check_saved_tags(saved, tags, folder)
        elif not distributed:
            requested[:] = [{"params": LocalNonpersistentObject([])} for _ in saved]


class MegatronEngine(Engine):
    name = "megatron"

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        fmt = cfg.checkpoint.optimizer_format
        if fmt not in OPTIMIZER_FORMATS:
            raise ConfigError(f"checkpoint.optimizer_format must be one of "
                              f"{' | '.join(OPTIMIZER_FORMATS)}; got {fmt!r}")

    @classmethod
    def params_dtype(cls, cfg: RunConfig) -> torch.dtype:
        # bf16 parameters with fp32 master weights in megatron-core's optimizer.
        return torch.bfloat16 if resolve_dtype(cfg.train.dtype) == "bf16" else torch.float32

    def __init__(self, chunks, cfg: RunConfig):
        super().__init__(cfg)
        cfg = self.cfg
        # A stage, or this rank's virtual-stage chunks (interleaved 1F1B): DDP wraps each.
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.model = self.chunks[0]
        self.distributed = cfg.parallel.distributed_optimizer
        self.dp_group = parallel_state.get_data_parallel_group()
        # Summing, not averaging, over DP: each rank's loss is already divided by the step's
        # global token counts (training/losses.py), and megatron-core requires it with the
        # model's calculate_per_token_loss.
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                   overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
                                                   use_distributed_optimizer=self.distributed,
                                                   average_in_collective=False)
        self.wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in self.chunks]
        if ddp_config.overlap_grad_reduce:
            # What megatron's training loop sets up for its schedules: no DP reduction in the
            # backward of micro-batches before the last (no_sync), and with several chunks each
            # chunk's reduction launched as soon as its last backward is done (grad_sync).
            config = self.model.config
            no_sync = [wrapped.no_sync for wrapped in self.wrapped]
            grad_sync = [wrapped.start_grad_sync for wrapped in self.wrapped]
            config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
        for wrapped in self.wrapped:
            wrapped.broadcast_params()  # DP replicas start identical, before masters are copied
        params_dtype = next(p.dtype for p in self.model.parameters())
        self.optimizer = build_megatron_optimizer(self.wrapped, cfg, params_dtype)
        # Sets each param group's learning rate (its module's max_lr / min_lr) and weight decay
        # (times its wd_mult: none on biases and norms) on every step; train_batch advances it
        # (optim.advance_lr).
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.train)

    def _step_model(self):
        return self.wrapped if len(self.wrapped) > 1 else self.wrapped[0]

    def train_step(self, batches: List[dict], weights: Mapping[str, float]) -> StepResult:
        """One optimizer step at the learning rate :attr:`lr_scheduler` last set."""
        for wrapped in self.wrapped:
            wrapped.zero_grad_buffer()
        self.optimizer.zero_grad()
        # No finalize_model_grads_func for the schedule: its per-token scaling divides every
        # gradient by one token count, while each objective here is normalised by its own
        # (up front, in the loss); the gradient finalisation is _finalize_grads below.
        with self.timer.phase("forward_backward"):  # the DP gradient reduction included
            result = step_lib.forward_backward(
                self._step_model(), batches, weights=weights, image_token_id=self.cfg.model.image_token_id,
                dp_group=self.dp_group)
            self._finalize_grads()
        with self.timer.phase("optimizer"):
            result.grad_norm, result.skipped = self._optimizer_step(result.losses.get("loss"))
        if not result.skipped:  # a skipped step left the projector as it was: the copy stays too
            parallel.sync_semantic_targets(self.chunks)
        return result

    def _finalize_grads(self) -> None:
        """The parts of megatron-core's ``finalize_model_grads`` this model needs: the DP
        reduction (``finish_grad_sync``: waits for the buckets already reducing with
        ``parallel.overlap_grad_reduce``), then the TP all-reduce of the gradients of
        parameters marked ``sequence_parallel`` (the norms, under sequence parallelism; a no-op
        otherwise), then, with tied embeddings at PP > 1, the all-reduce of the embedding's and
        the last stage's LM-head copy's gradients over the embedding group (megatron-core's
        ``_allreduce_word_embedding_grads``, reading UniHeteroModel's
        ``shared_embedding_or_output_weight``; a no-op at PP = 1). ``finalize_model_grads``
        itself is not called: it would divide by the schedule's token count (train_step says why).
        """
        for wrapped in self.wrapped:
            wrapped.finish_grad_sync()
        _allreduce_non_tensor_model_parallel_grads(self.wrapped, self.model.config,
                                                   parallel_state.get_tensor_model_parallel_group())
        if self.cfg.model.llm.tie_word_embeddings:
            _allreduce_word_embedding_grads(self.wrapped, self.model.config)

    @torch.no_grad()
    def _optimizer_step(self, loss) -> tuple:
        """megatron-core's ``optimizer.step()``, taken apart to skip a non-finite step.

        ``step()`` only skips on the fp16 loss scaler's found-inf; in bf16/fp32 it would apply
        a NaN update. Its own parts are run here instead (as ``ChainedOptimizer.step`` runs
        them): ``prepare_grads`` (main grads; fp16's found-inf), ``get_grad_norm`` (global over
        TP x PP and the distributed optimizer's DP shards), then, only when the step's loss and
        norm are finite on every rank, the clip and ``step_with_ready_grads`` (Adam step, copy
        to the model, DP all-gather). A skipped step changes neither the parameters nor the
        optimizer state (Adam's moments and step count); the trainer still advances the LR
        schedule, as megatron's training loop does for skipped steps.
        Returns (grad_norm, skipped).
        """
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm()) if not found_inf else float("inf")
        # The loss lives on the last pipeline stage only, and a DP rank's loss share can be
        # NaN while the norm is finite elsewhere: one MAX over the world makes every rank take
        # the same decision (the norm alone is already global).
        bad = found_inf or not math.isfinite(grad_norm) or (loss is not None and not math.isfinite(loss))
        flag = torch.tensor([1.0 if bad else 0.0], device=platform.device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            return grad_norm, True
        if self.cfg.train.clip_grad > 0:
            for opt in megatron_optimizers(self.optimizer):
                params = [] if opt.is_stub_optimizer else opt.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(
                        params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                        use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        if not self.optimizer.step_with_ready_grads():
            raise RuntimeError("megatron-core's optimizer did not apply a step with finite gradients")
        return grad_norm, False

    def parameters_are_finite(self) -> bool:
        """Whether every parameter this rank holds is finite (local: the caller all-reduces)."""
        return step_lib.all_finite(p for chunk in self.chunks for p in chunk.parameters())

    @torch.no_grad()
    def eval_step(self, batches: List[dict], weights: Mapping[str, float]) -> StepResult:
        for chunk in self.chunks:
            chunk.eval()
        try:
            return step_lib.forward_backward(
                self._step_model(), batches, weights=weights, image_token_id=self.cfg.model.image_token_id,
                forward_only=True, dp_group=self.dp_group)
        finally:
            for chunk in self.chunks:
                chunk.train()

    # -- checkpoint ----------------------------------------------------------------------------
    def _sharded_state_dict(self, optimizer_format: str, is_loading: bool = False) -> dict:
        """Model chunks and optimizer as megatron-core sharded state (checkpointing/dist.py)."""
        metadata = {"distrib_optim_sharding_type": optimizer_format,
                    "distrib_optim_fully_reshardable_mem_efficient": self.cfg.checkpoint.optimizer_save_low_memory,
                    # one naming of the optimizer's parts whatever the number of sub-optimizers
                    "chained_optim_avoid_prefix": True}
        state = dist_ckpt.model_sharded_state_dict(self.chunks)
        with _stateless_parts_report_the_step(megatron_optimizers(self.optimizer)):
            state["optimizer"] = self.optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                                   metadata=metadata)
        return state

    def save(self, iter_dir: str) -> AsyncRequest:
        """Plan the save of model and optimizer into ``iter_dir/dist``; collective. The
        checkpoint manager runs the returned request (in place, or asynchronously) and commits
        it."""
        fmt = self.cfg.checkpoint.optimizer_format
        return dist_ckpt.save(self._sharded_state_dict(fmt), dist_ckpt.dist_dir(iter_dir),
                              content={"engine": self.name, "optimizer_format": fmt,
                                       "distributed_optimizer": self.distributed,
                                       "tensor_parallel": self.cfg.parallel.tensor_parallel,
                                       "pipeline_parallel": self.cfg.parallel.pipeline_parallel,
                                       "virtual_pipeline": self.cfg.parallel.virtual_pipeline})

    def load(self, iter_dir: str) -> None:
        """Resume model and optimizer from ``iter_dir`` saved at any TP / PP / DP size."""
        folder = dist_ckpt.dist_dir(iter_dir)
        saved = dist_ckpt.content(folder)
        restart = (f"Start from its weights instead with --checkpoint.load={iter_dir} "
                   f"--checkpoint.resume=false")
        if saved.get("engine") != self.name:
            raise CheckpointError(
                f"{folder} was saved by the {saved.get('engine')!r} engine, this run uses "
                f"{self.name!r}: its optimizer state does not transfer. {restart}")
        if saved["distributed_optimizer"] != self.distributed:
            was = "on" if saved["distributed_optimizer"] else "off"
            raise CheckpointError(
                f"{folder} was saved with parallel.distributed_optimizer {was}; this run has it "
                f"{'on' if self.distributed else 'off'}. Resume with the same setting, or "
                f"{restart[0].lower() + restart[1:]}")
        for opt in megatron_optimizers(self.optimizer):
            if not opt.is_stub_optimizer:
                allocate_adam_state(opt.optimizer)
        saved_layout = tuple(saved.get(k) for k in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline"))
        par = self.cfg.parallel
        layout = (par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline)
        if saved["optimizer_format"] == "dp_reshardable" and saved_layout != layout:
            raise CheckpointError(
                f"{folder} holds the optimizer state as checkpoint.optimizer_format="
                f"dp_reshardable at (TP, PP, VPP) = {saved_layout}; this run has {layout}: that "
                f"format reshards over data-parallel ranks only. Resume at the saved layout (and "
                f"save with fully_reshardable to change it), or {restart[0].lower() + restart[1:]}")
        # megatron-core 0.16 matches the checkpoint's param groups to the optimizer's by their
        # (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) alone, in this sharded state
        # dict already: _matching_groups_by_tags makes that one to one (module, decay).
        # A checkpoint saved before per-module param groups has megatron-core's two standard
        # groups; they are laid out as this optimizer's after reading (mark_saved), the
        # float16 / fp32 optimizer's request asks for two (_request_saved_groups).
        parts = megatron_optimizers(self.optimizer)
        with _matching_groups_by_tags(self.optimizer, self.cfg.train, folder) as mark_saved:
            request = self._sharded_state_dict(saved["optimizer_format"], is_loading=True)
            _request_saved_groups(request["optimizer"], dist_ckpt.load_common(folder).get("optimizer", {}),
                                  _group_tags(self.optimizer.param_groups), folder, self.distributed)
            state = dist_ckpt.load(request, folder)
            for i, chunk in enumerate(self.chunks):
                dist_ckpt.load_model_state(chunk, state[dist_ckpt.model_key(i, len(self.chunks))], folder)
            loaded = list(_saved_param_groups(state["optimizer"]))
            if len(loaded) != len(parts):
                raise CheckpointError(f"{folder}: its optimizer has {len(loaded)} parts, this "
                                      f"run's {len(parts)}. {restart}")
            for groups, part in zip(loaded, parts):
                mark_saved(groups, part)
            with torch.no_grad(), _param_state_loads_skip_adam_steps(megatron_optimizers(self.optimizer)):
                # no_grad: for fp32 models the master shards are views of the parameters
                self.optimizer.load_state_dict(state["optimizer"])
        # The loaded param groups carry the saved run's max_lr / min_lr, which the LR scheduler
        # reads: this run's config wins, as for the rest of the schedule (optim.build_lr_scheduler).
        apply_module_multipliers(self.optimizer.param_groups, self.cfg.train)
        for opt in megatron_optimizers(self.optimizer):
            untie_step_counters(opt.optimizer)  # restored as one tensor shared by every parameter
        use_fused_torch_adam(self.optimizer)  # the loaded param groups replaced its switch
