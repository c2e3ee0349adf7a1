"""The DeepSpeed engine: ZeRO stage 0-3 data parallelism over megatron-core's TP groups (PP=1).

Same interface as :class:`~megatron_unihetero.training.engine_megatron.MegatronEngine`.
DeepSpeed owns backward, the DP gradient reduction (an average), clipping and the optimizer
step; the model forward is ours (``ModelLosses``: each objective's loss sum and count). Each micro-batch's loss
is the megatron engine's (:func:`~megatron_unihetero.training.losses.assemble_loss`: normalised
by the step's global token counts, so the step loss is the sum over micro-batches and DP
ranks); backward runs with ``scale_wrt_gas=False`` (no 1/gradient_accumulation) and the loss
times ``dp_size``, undoing DeepSpeed's DP average.

Config: generated from the run config, or the user's JSON (``parallel.deepspeed_config``) with
our values filled in where it says "auto" or leaves a key out. The learning rate and weight
decay come from megatron-core's scheduler over DeepSpeed's param groups, as in the megatron
engine (:func:`~megatron_unihetero.training.optim.build_lr_scheduler`), so a DeepSpeed
"scheduler" section is dropped.

Checkpoints: ``engine.save_checkpoint`` writes optimizer state and ZeRO partitions to
``iter_dir/engine`` (tag "engine"), module included: a resume reads that. The model weights are
also written as every checkpoint has them (``iter_dir/dist``, checkpointing/dist.py), which
export, evaluation and weights-only starts read. ZeRO partitions are per
DP rank: a resume at another DP size converts the checkpoint once with DeepSpeed's
universal-checkpoint tool (``deepspeed.checkpoint.ds_to_universal``, into
``ITER/engine_universal``, on global rank 0) and loads that (per-parameter fp32 weights and
Adam moments), for ZeRO 1, 2 and 3. The TP size must stay the same (TP-sliced universal
checkpoints need per-parameter patterns this engine does not write); to change it, start from
the weights only (``--checkpoint.load=ITER --checkpoint.resume=false``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import json
import os
import re
import shutil
import warnings
from typing import Any, Dict, List, Mapping

import torch
import deepspeed
import torch.distributed as dist
from deepspeed.checkpoint import ds_to_universal
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from megatron_unihetero import parallel, platform
from megatron_unihetero.checkpointing import dist as dist_ckpt
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.parallel.deepspeed_mpu import launcher_environment, megatron_mpu
from megatron_unihetero.training import losses
from megatron_unihetero.checkpointing import pickles
from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.training.config import RunConfig, resolve_dtype
from megatron_unihetero.training.engine import Engine
from megatron_unihetero.training.results import StepResult
from megatron_unihetero.training.optim import (
    apply_module_multipliers,
    build_lr_scheduler,
    param_groups,
    untie_step_counters,
)
from megatron_unihetero.training.step import all_finite, model_inputs

_CKPT_TAG = "engine"


def _use_bf16(cfg: RunConfig) -> bool:
    return resolve_dtype(cfg.train.dtype) == "bf16"


def generated_config(cfg: RunConfig, dp_size: int) -> Dict[str, Any]:
    """The DeepSpeed config our run config implies."""
    tr = cfg.train
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accumulation,
        "train_batch_size": cfg.data.micro_batch_size * tr.grad_accumulation * dp_size,
        "gradient_clipping": tr.clip_grad,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": _use_bf16(cfg)},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tr.lr,
                "betas": [tr.adam_beta1, tr.adam_beta2],
                "eps": 1e-8,
                "weight_decay": tr.weight_decay,
                # DeepSpeed's FusedAdam needs a CUDA build; torch's AdamW runs anywhere.
                "torch_adam": not platform.has_cuda(),
                "adam_w_mode": True,
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _fill(user: Any, ours: Any) -> Any:
    """User's values win; "auto" and missing keys take ours."""
    if isinstance(user, str) and user == "auto":
        return copy.deepcopy(ours)
    if isinstance(user, dict) and isinstance(ours, dict):
        merged = {k: copy.deepcopy(v) for k, v in ours.items()}
        for key, value in user.items():
            merged[key] = _fill(value, ours.get(key)) if key in ours else value
        return merged
    return user


def resolve_config(cfg: RunConfig, dp_size: int) -> Dict[str, Any]:
    ours = generated_config(cfg, dp_size)
    if not cfg.parallel.deepspeed_config:
        return ours
    with open(cfg.parallel.deepspeed_config) as handle:
        user = json.load(handle)
    merged = _fill(user, ours)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        if merged[key] != ours[key]:
            raise ConfigError(
                f"{cfg.parallel.deepspeed_config}: {key}={merged[key]} disagrees with the run config "
                f"({ours[key]} from data.micro_batch_size, train.grad_accumulation and DP size); "
                f"set it to \"auto\" or drop it")
    if merged.get("scheduler"):
        warnings.warn("deepspeed_config: the 'scheduler' section is ignored; the learning rate "
                      "follows train.lr, train.warmup_steps, train.min_lr and train.steps")
        merged.pop("scheduler")
    merged.setdefault("zero_optimization", {})
    return merged


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def forward_is_local(cls, cfg: RunConfig) -> bool:
        """ZeRO-3 gathers each layer's parameters from every DP rank in its forward."""
        return cfg.parallel.zero_stage != 3

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """What DeepSpeed takes (ZeRO stage, the user's JSON) and the megatron-engine options it
        cannot."""
        par, train = cfg.parallel, cfg.train
        if par.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0-3; got {par.zero_stage}")
        if par.pipeline_parallel > 1:
            raise ConfigError("parallel.engine=deepspeed supports pipeline_parallel=1 only "
                              "(use engine=megatron for pipeline parallelism)")
        if par.virtual_pipeline is not None:
            raise ConfigError("parallel.virtual_pipeline needs parallel.engine=megatron")
        if cfg.checkpoint.async_save:
            raise ConfigError("checkpoint.async_save needs parallel.engine=megatron: DeepSpeed "
                              "writes its own checkpoint in place")
        if train.compile and par.zero_stage == 3:
            raise ConfigError("train.compile does not support parallel.zero_stage=3: ZeRO-3 "
                              "gathers each parameter in module hooks inside the compiled layers")
        if train.recompute != "none":
            raise ConfigError("train.recompute needs parallel.engine=megatron: megatron-core's "
                              "recompute is checked under its own DDP only (ZeRO-3 gathers "
                              "parameters in module hooks that a recomputed forward runs again)")
        if par.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel needs parallel.engine=megatron (its grad "
                              "finalisation all-reduces the norms' gradients over TP)")
        if par.overlap_grad_reduce:
            raise ConfigError("parallel.overlap_grad_reduce is a megatron-engine option (megatron-"
                              "core's DDP); DeepSpeed has its own overlap_comm")
        if par.deepspeed_config and not os.path.isfile(par.deepspeed_config):
            raise ConfigError(f"parallel.deepspeed_config {par.deepspeed_config!r} does not exist")

    @classmethod
    def params_dtype(cls, cfg: RunConfig) -> torch.dtype:
        return torch.float32  # DeepSpeed keeps fp32 master weights and casts for bf16 itself

    def __init__(self, model, cfg: RunConfig):
        super().__init__(cfg)
        cfg = self.cfg
        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("the deepspeed engine supports pipeline_parallel=1 only")
        if isinstance(model, (list, tuple)):  # the trainer passes its (single) chunk list
            (model,) = model
        self.model = model
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_size = dist.get_world_size(self.dp_group)
        self.ds_config = resolve_config(cfg, self.dp_size)
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        # DP replicas start identical (DeepSpeed broadcasts too; this keeps stage 3 honest).
        with torch.no_grad():
            src = dist.get_global_rank(self.dp_group, 0)
            for tensor in model.state_dict().values():
                if torch.is_tensor(tensor) and tensor.is_floating_point():
                    dist.broadcast(tensor, src=src, group=self.dp_group)
        # DeepSpeed reads RANK / WORLD_SIZE / LOCAL_RANK from os.environ, in initialize and,
        # under ZeRO-3, at every step (its parameter coordinator's rank checks). A launcher sets
        # them; a process without one (a world of one) gets them lent by this engine, for its
        # lifetime, and close() gives the environment back as it was.
        self._environment = contextlib.ExitStack()
        self._environment.enter_context(launcher_environment())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.train),
            config=self.ds_config,
            mpu=megatron_mpu(),
            dist_init_required=False,
        )
        self.grad_accumulation = int(self.ds_config["gradient_accumulation_steps"])
        # DeepSpeed's optimizer wrappers (ZeRO, bf16) hand out the param groups of the torch
        # optimizer inside, whose lr and weight_decay its step reads; each group carries the
        # module, max_lr / min_lr and wd_mult of optim.param_groups. train_batch advances it
        # (optim.advance_lr).
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.train)
        self._own_skip = False  # whether the last step was skipped by _drop_non_finite_grads

    def close(self) -> None:
        self._environment.close()

    # -- steps -------------------------------------------------------------------------------
    def _library_skips_non_finite(self) -> bool:
        """Whether DeepSpeed's optimizer skips a step with non-finite gradients by itself.

        ZeRO 1-2 (an invalid global norm, or bf16's ``check_grad_overflow``), ZeRO-3 and the
        bf16 optimizer of ZeRO-0 do: they zero the gradients, leave parameters and optimizer
        state as they were, and ``engine.was_step_applied()`` says so. ZeRO-0 in fp32 steps
        the plain torch optimizer with no check at all.
        """
        return self.zero_stage > 0 or _use_bf16(self.cfg)

    def _run(self, batches: List[dict], weights: Mapping[str, float], backward: bool) -> StepResult:
        counts = losses.global_counts(batches, self.cfg.model.image_token_id, self.dp_group)
        device = next(self.model.parameters()).device
        reports = []
        loss_finite = True
        self._own_skip = False
        for index, batch in enumerate(batches):
            with self.timer.phase("forward_backward"):
                total, report = losses.assemble_loss(self.engine(**model_inputs(batch, device)), counts, weights)
                if backward:
                    if not total.requires_grad:
                        total = self._loss_reaching_nothing(total)
                    # DeepSpeed averages gradients over DP; the normalised losses must be
                    # summed (losses.py): times dp_size.
                    self.engine.backward(total * self.dp_size, scale_wrt_gas=False)
            reports.append(report)
            if backward:
                if not self._library_skips_non_finite():  # a device sync: only where it is used
                    loss_finite = loss_finite and bool(torch.isfinite(total))
                if index == len(batches) - 1 and not self._library_skips_non_finite():
                    self._own_skip = self._drop_non_finite_grads(loss_finite)
                with self.timer.phase("optimizer"):
                    self._step(self._own_skip)
        return losses.summarize(reports, counts, weights)

    def _loss_reaching_nothing(self, total: torch.Tensor) -> torch.Tensor:
        """A micro-batch whose loss reaches no trainable parameter (a frozen LLM, no image in
        it) still runs its backward, so that DeepSpeed's accumulation and its boundary
        reduction go on. ZeRO-2 reduces gradients bucket by bucket from the parameters'
        backward hooks and fails on a backward that gives none: there every trainable
        parameter gets a zero gradient. Elsewhere the backward runs through nothing (ZeRO-3
        holds only its partition of each parameter outside the forward)."""
        if self.zero_stage == 2:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            return total + 0.0 * torch.stack([p.sum() for p in trainable]).sum()
        return total.detach().requires_grad_()

    def _step(self, skipped: bool) -> None:
        """DeepSpeed's ``step()``: the optimizer steps at the accumulation boundary only."""
        if not skipped:
            self.engine.step()
            return
        # DeepSpeed's fp32 clipping indexes the first parameter with a gradient and fails when
        # there is none: nothing to clip in a skipped step. Its config is the only switch (as
        # for load_universal_checkpoint in load()).
        clip = self.engine._config.gradient_clipping
        self.engine._config.gradient_clipping = 0.0
        try:
            self.engine.step()
        finally:
            self.engine._config.gradient_clipping = clip

    @torch.no_grad()
    def _drop_non_finite_grads(self, loss_finite: bool) -> bool:
        """ZeRO-0 fp32 only (DeepSpeed has no check there): before the boundary ``step()``, if
        the step's loss or gradients are non-finite on any rank, drop every gradient, so the
        torch optimizer skips every parameter (no update, no change to its state) while
        DeepSpeed's step still advances its counters. The gradients are DP-reduced by the
        boundary backward; one MAX over the world gives every rank the same decision.
        Returns whether the step is skipped.
        """
        params = [p for p in self.model.parameters() if p.grad is not None]
        bad = not loss_finite or not all_finite(p.grad for p in params)
        flag = torch.tensor([1.0 if bad else 0.0], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return False
        for param in params:
            param.grad = None
        return True

    def train_step(self, batches: List[dict], weights: Mapping[str, float]) -> StepResult:
        """One optimizer step at the learning rate :attr:`lr_scheduler` last set.

        A step whose gradients are non-finite is skipped (parameters and optimizer state
        unchanged, ``skipped`` 1.0); the trainer still advances the LR schedule.
        """
        if len(batches) != self.grad_accumulation:
            raise ValueError(f"got {len(batches)} micro-batches; DeepSpeed is configured for "
                             f"gradient_accumulation_steps={self.grad_accumulation}")
        result = self._run(batches, weights, backward=True)
        result.skipped = self._own_skip or not self.engine.was_step_applied()
        norm = None if self._own_skip else self.engine.get_global_grad_norm()
        result.grad_norm = float(norm) if norm is not None else float("nan")
        if not result.skipped:  # a skipped step left the projector as it was: the copy stays too
            parallel.sync_semantic_targets(self.model)
        return result

    def parameters_are_finite(self) -> bool:
        """Whether every parameter this rank holds is finite (local: the caller all-reduces).
        Under ZeRO-3 a rank holds its partition of each parameter (``ds_tensor``)."""
        tensors = [p.ds_tensor if self.zero_stage == 3 else p for p in self.model.parameters()]
        return all_finite(tensors)

    @torch.no_grad()
    def eval_step(self, batches: List[dict], weights: Mapping[str, float]) -> StepResult:
        self.engine.eval()
        try:
            return self._run(batches, weights, backward=False)
        finally:
            self.engine.train()

    # -- checkpoint ----------------------------------------------------------------------------
    def save(self, iter_dir: str) -> AsyncRequest:
        """DeepSpeed's checkpoint (module, optimizer state, ZeRO partitions) into
        ``iter_dir/engine``, written now; returns the request that writes the model weights as
        every checkpoint has them (checkpointing/dist.py: what export, evaluation and
        weights-only starts read). Collective (all ranks)."""
        # Under ZeRO-3 each rank holds 1/DP of every parameter: gathered for the write (every
        # rank of the TP group takes part) and released after it, so the write is in place.
        # The write gets copies: ZeRO-3 must find its parameters as it left them.
        gathered = (deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
                    if self.zero_stage == 3 else contextlib.nullcontext())
        with gathered:
            state = dist_ckpt.model_sharded_state_dict([self.model])
            if self.zero_stage == 3:
                for sharded in nested_values(state):
                    if isinstance(sharded, (ShardedTensor, ShardedTensorFactory)):
                        sharded.data = sharded.data.detach().clone()
        self.engine.save_checkpoint(iter_dir, tag=_CKPT_TAG, client_state={}, save_latest=False)
        return dist_ckpt.save(state, dist_ckpt.dist_dir(iter_dir), content={"engine": self.name})

    def _saved_dp_size(self, ckpt_dir: str) -> int:
        names = glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_mp_rank_*optim_states.pt"))
        ranks = {int(m.group(1)) for m in (re.search(r"zero_pp_rank_(\d+)_", os.path.basename(n))
                                           for n in names) if m}
        return len(ranks)

    def _universal_checkpoint(self, iter_dir: str, ckpt_dir: str, saved_dp: int) -> str:
        """``iter_dir/engine_universal/engine``: DeepSpeed's universal form of ``ckpt_dir``.

        Converted by global rank 0 with ``deepspeed.checkpoint.ds_to_universal`` the first time
        a run resumes at another DP size; every rank waits for it. Returns the folder to load
        from (DeepSpeed's ``load_dir``; the tag is the same).
        """
        root = os.path.join(iter_dir, "engine_universal")
        target = os.path.join(root, _CKPT_TAG)
        done = os.path.join(root, "complete")
        if dist.get_rank() == 0 and not os.path.isfile(done):
            print(f"[deepspeed] {ckpt_dir} holds ZeRO partitions of {saved_dp} data-parallel ranks, "
                  f"this run has {self.dp_size}: converting it to a universal checkpoint in {target}")
            shutil.rmtree(root, ignore_errors=True)
            ds_to_universal.main(argparse.Namespace(
                input_folder=ckpt_dir, output_folder=target, num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True))
            open(done, "w").close()
        dist.barrier()
        return root

    def load(self, iter_dir: str) -> None:
        ckpt_dir = os.path.join(iter_dir, _CKPT_TAG)
        if not os.path.isdir(ckpt_dir):
            raise CheckpointError(
                f"{ckpt_dir} is missing: the checkpoint was saved by another engine. Start from its "
                f"weights instead with --checkpoint.load={iter_dir} --checkpoint.resume=false")
        # DeepSpeed unpickles its files with the full pickle (weights_only off), and so does its
        # universal-checkpoint converter: scanned first (checkpointing/pickles.py).
        pickles.check_torch_files(ckpt_dir)
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        saved_tp = len(glob.glob(os.path.join(ckpt_dir, "mp_rank_*_model_states.pt")))
        if saved_tp and saved_tp != tp_size:
            raise CheckpointError(
                f"{ckpt_dir} was saved at tensor-parallel size {saved_tp}, this run has {tp_size}: "
                f"the deepspeed engine resumes at the same TP size only. Start from the weights "
                f"with --checkpoint.load={iter_dir} --checkpoint.resume=false")
        saved = self._saved_dp_size(ckpt_dir) if self.zero_stage > 0 else 0
        if saved and saved != self.dp_size and not self.ds_config.get("checkpoint", {}).get("load_universal"):
            # ZeRO partitions are per DP rank: go through DeepSpeed's universal checkpoint
            # (per-parameter fp32 weights and optimizer states), converted once and kept beside.
            universal_root = self._universal_checkpoint(iter_dir, ckpt_dir, saved)
            pickles.check_torch_files(universal_root)
            # ZeRO-3's universal load copies the first param group's hyperparameters into every
            # group, which would put weight decay on norms and biases: keep ours.
            hyper = [{k: v for k, v in g.items() if k not in ("params", "step")}
                     for g in self.optimizer.param_groups]
            self.engine._config.load_universal_checkpoint = True
            try:
                path, _ = self.engine.load_checkpoint(
                    universal_root, tag=_CKPT_TAG, load_module_strict=False,
                    load_optimizer_states=True, load_lr_scheduler_states=False)
            finally:
                self.engine._config.load_universal_checkpoint = False
            for group, saved_hyper in zip(self.optimizer.param_groups, hyper):
                group.update(saved_hyper)
            inner = getattr(self.engine.optimizer, "optimizer", None)
            if isinstance(inner, torch.optim.Optimizer):
                untie_step_counters(inner)  # ZeRO-3 restores one step tensor for all sub-groups
        else:
            path, _ = self.engine.load_checkpoint(
                iter_dir, tag=_CKPT_TAG, load_module_strict=False, load_optimizer_states=True,
                load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load its checkpoint from {ckpt_dir}")
        # The loaded groups carry the saved run's max_lr / min_lr: this run's config wins.
        apply_module_multipliers(self.optimizer.param_groups, self.cfg.train)
