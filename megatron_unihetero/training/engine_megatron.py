"""The megatron engine: megatron-core DDP + pipeline schedules + megatron-core's optimizer.

Gradients: megatron-core's ``DistributedDataParallel`` keeps them in contiguous fp32 buffers
(``param.main_grad``). With the distributed optimizer (``parallel.distributed_optimizer``, the
default) they are reduce-scattered over the data-parallel group, each DP rank updates its
1/DP shard of the fp32 master weights and Adam moments (ZeRO-1), and the updated parameters
are all-gathered back. Without it they are all-reduced and every rank holds the full state.

Checkpoint of the optimizer, one file per (TP, PP) rank written by DP rank 0: the state that
does not depend on DP (param groups, step) plus, for the distributed optimizer, the parameter
state gathered from all DP shards into megatron-core's "dp_zero" layout (each buffer without
its DP-dependent padding). It is scattered again on load, so a run resumes at another
data-parallel size.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, List, Mapping

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import DistributedOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from megatron_unihetero import parallel, platform
from megatron_unihetero.training import step as step_lib
from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.optim import (
    build_lr_scheduler,
    build_megatron_optimizer,
    megatron_optimizers,
    untie_step_counters,
    use_fused_torch_adam,
)

OPTIMIZER_FORMAT = "megatron_unihetero.megatron_optimizer.v1"


@contextlib.contextmanager
def _step_counters_set_aside(inner: torch.optim.Optimizer):
    """Hide torch Adam's per-parameter ``step`` while megatron-core restores a shard's state.

    megatron-core 0.16 copies every entry of a parameter's optimizer state from the dp_zero
    tensors, which hold only param / exp_avg / exp_avg_sq: right for TE/apex FusedAdam (step
    in the param group), a KeyError for torch AdamW, its fallback without them. The step
    counters were already restored from the param groups by ``load_state_dict`` (as one tensor
    shared by every parameter: untied after).
    """
    steps = {param: state.pop("step") for param, state in inner.state.items() if "step" in state}
    try:
        yield
    finally:
        for param, step in steps.items():
            inner.state[param]["step"] = step
        untie_step_counters(inner)


class MegatronEngine:
    name = "megatron"

    def __init__(self, chunks, cfg: RunConfig):
        # A stage, or this rank's virtual-stage chunks (interleaved 1F1B): DDP wraps each.
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.model = self.chunks[0]
        self.cfg = cfg
        self.distributed = cfg.parallel.distributed_optimizer
        self.dp_group = parallel_state.get_data_parallel_group()
        # Summing, not averaging, over DP: each rank's loss is already divided by the step's
        # global token counts (training/losses.py), and megatron-core requires it with the
        # model's calculate_per_token_loss.
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=self.distributed,
                                                   average_in_collective=False)
        self.wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in self.chunks]
        for wrapped in self.wrapped:
            wrapped.broadcast_params()  # DP replicas start identical, before masters are copied
        params_dtype = next(p.dtype for p in self.model.parameters())
        self.optimizer = build_megatron_optimizer(self.wrapped, cfg, params_dtype)
        # Sets each param group's learning rate and weight decay (times its wd_mult: none on
        # biases and norms) on every step; the trainer advances it (optim.advance_lr).
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.train)

    def _step_model(self):
        return self.wrapped if len(self.wrapped) > 1 else self.wrapped[0]

    def train_step(self, batches: List[dict], weights: Mapping[str, float]) -> Dict[str, float]:
        """One optimizer step at the learning rate :attr:`lr_scheduler` last set."""
        for wrapped in self.wrapped:
            wrapped.zero_grad_buffer()
        self.optimizer.zero_grad()
        # No finalize_model_grads_func for the schedule: its per-token scaling divides every
        # gradient by one token count, while each objective here is normalised by its own
        # (up front, in the loss); the DP reduction is finish_grad_sync below.
        summary = step_lib.forward_backward(
            self._step_model(), batches, weights=weights, image_token_id=self.cfg.model.image_token_id,
            dp_group=self.dp_group)
        for wrapped in self.wrapped:
            wrapped.finish_grad_sync()
        grad_norm, skipped = self._optimizer_step(summary.get("loss"))
        summary["grad_norm"] = grad_norm
        summary["skipped"] = 1.0 if skipped else 0.0
        if not skipped:  # a skipped step left the projector as it was: the copy stays too
            parallel.sync_semantic_targets(self.chunks)
        return summary

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
    def eval_step(self, batches: List[dict], weights: Mapping[str, float]) -> Dict[str, float]:
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
    def model_states(self) -> List[Dict[str, torch.Tensor]]:
        """One state dict per chunk (local names)."""
        return [chunk.state_dict() for chunk in self.chunks]

    def _optim_path(self, iter_dir: str) -> str:
        return os.path.join(iter_dir, "engine", f"optim_tp{parallel_state.get_tensor_model_parallel_rank():02d}"
                                                f"_pp{parallel_state.get_pipeline_model_parallel_rank():02d}.pt")

    def _sharded_optimizers(self) -> list:
        return [opt for opt in megatron_optimizers(self.optimizer) if isinstance(opt, DistributedOptimizer)]

    def save(self, iter_dir: str) -> None:
        """Collective over the DP group (the distributed optimizer gathers its shards)."""
        payload = {"format": OPTIMIZER_FORMAT, "distributed": self.distributed,
                   "data_parallel_size": parallel_state.get_data_parallel_world_size(),
                   "common": self.optimizer.state_dict()}
        if self.distributed:
            payload["param_state"] = [opt.get_parameter_state_dp_zero() for opt in self._sharded_optimizers()]
        if parallel_state.get_data_parallel_rank() != 0:
            return
        path = self._optim_path(iter_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(payload, path + ".tmp")
        os.replace(path + ".tmp", path)

    def load(self, iter_dir: str) -> None:
        path = self._optim_path(iter_dir)
        if not os.path.isfile(path):
            raise RuntimeError(
                f"{path} is missing: the checkpoint was saved with another tensor/pipeline layout "
                f"or engine. Start from its weights instead with --checkpoint.load={iter_dir} "
                f"--checkpoint.resume=false")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != OPTIMIZER_FORMAT:
            raise RuntimeError(f"{path} is not a megatron-engine optimizer state "
                               f"(format {OPTIMIZER_FORMAT} expected)")
        if payload["distributed"] != self.distributed:
            saved = "on" if payload["distributed"] else "off"
            raise RuntimeError(
                f"{path} was saved with parallel.distributed_optimizer {saved}; this run has it "
                f"{'on' if self.distributed else 'off'}. Resume with the same setting, or start "
                f"from the weights with --checkpoint.load={iter_dir} --checkpoint.resume=false")
        self.optimizer.load_state_dict(payload["common"])
        # The loaded param groups carry the saved run's max_lr / min_lr, which the LR scheduler
        # reads: this run's config wins, as for the rest of the schedule (optim.build_lr_scheduler).
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = self.cfg.train.lr, self.cfg.train.min_lr
        if self.distributed:
            # DP rank 0 scatters the gathered state to the current DP ranks (any DP size).
            # no_grad: for fp32 models the master shards are views of the parameters.
            first = parallel_state.get_data_parallel_rank() == 0
            with torch.no_grad():
                for opt, state in zip(self._sharded_optimizers(), payload["param_state"]):
                    with _step_counters_set_aside(opt.optimizer):
                        opt.load_parameter_state_from_dp_zero(state if first else None)
        use_fused_torch_adam(self.optimizer)  # the loaded param groups replaced its switch
