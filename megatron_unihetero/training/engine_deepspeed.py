"""The DeepSpeed engine: ZeRO stage 0-3 data parallelism over megatron-core's TP groups (PP=1).

Same interface as :class:`~megatron_unihetero.training.engine_megatron.MegatronEngine`.
DeepSpeed owns backward, the DP gradient reduction (an average), clipping and the optimizer
step; the model forward is ours (``{objective: (loss_sum, count)}``). Loss normalisation is the
megatron engine's (DESIGN.md section 2, :mod:`~megatron_unihetero.training.step`): each
micro-batch's loss is ``sum_k w_k * loss_sum_k / global_count_k`` times ``dp_size`` (undoing the
DP average), and backward runs with ``scale_wrt_gas=False`` (no 1/gradient_accumulation).

Config: generated from the run config, or the user's JSON (``parallel.deepspeed_config``) with
our values filled in where it says "auto" or leaves a key out. The learning rate is set on the
optimizer every step (:func:`~megatron_unihetero.training.optim.lr_at`), so a DeepSpeed
"scheduler" section is dropped.

Checkpoints: ``engine.save_checkpoint`` writes optimizer state and ZeRO partitions to
``iter_dir/engine`` (tag "engine"). The model weights travel in our own model files; DeepSpeed's
copy of the module in its checkpoint is the same iteration's weights. ZeRO partitions are per
DP rank: resuming needs the same DP size (and TP size). To change the DP size, convert the
checkpoint with DeepSpeed's universal-checkpoint tool (``python -m
deepspeed.checkpoint.ds_to_universal --input_folder ITER/engine --output_folder ...``) and load
it with ``"checkpoint": {"load_universal": true}`` in a user config, or start from the weights
only (``--checkpoint.load=ITER --checkpoint.resume=false``), which resets the optimizer.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import warnings
from typing import Any, Dict, List, Mapping

import torch
import torch.distributed as dist

from megatron_unihetero import parallel, platform
from megatron_unihetero.training import step as step_lib
from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.optim import param_groups

_CKPT_TAG = "engine"


def _use_bf16(cfg: RunConfig) -> bool:
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and platform.has_cuda())


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
    from megatron_unihetero.models.config import ConfigError

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
        warnings.warn("deepspeed_config: the 'scheduler' section is ignored; the trainer sets the "
                      "learning rate every step (train.lr, train.warmup_steps, train.min_lr)")
        merged.pop("scheduler")
    merged.setdefault("zero_optimization", {})
    return merged


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model, cfg: RunConfig):
        import deepspeed
        from megatron.core import parallel_state

        from megatron_unihetero.parallel.deepspeed_mpu import megatron_mpu

        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("the deepspeed engine supports pipeline_parallel=1 only")
        if isinstance(model, (list, tuple)):  # the trainer passes its (single) chunk list
            (model,) = model
        self.model = model
        self.cfg = cfg
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
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.train.weight_decay),
            config=self.ds_config,
            mpu=megatron_mpu(),
            dist_init_required=False,
        )
        self.grad_accumulation = int(self.ds_config["gradient_accumulation_steps"])

    # -- steps -------------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        groups = list(self.optimizer.param_groups)
        basic = getattr(self.engine, "basic_optimizer", None)
        if basic is not None:
            groups += list(basic.param_groups)
        for group in groups:
            group["lr"] = lr

    def _run(self, batches: List[dict], weights: Mapping[str, float], backward: bool) -> Dict[str, float]:
        counts = step_lib.global_counts(batches, self.cfg.model.image_token_id, self.dp_group)
        device = next(self.model.parameters()).device
        summary: Dict[str, float] = {}
        for batch in batches:
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()
                      if k in step_lib._MODEL_INPUTS}
            outputs = self.engine(**inputs)
            total = torch.zeros((), device=device)
            for name, (loss_sum, _) in outputs.items():
                weight = weights.get(name, 1.0 if name == "text" else 0.0)
                if name != "text" and weight == 0.0:
                    continue
                denom = max(counts.get(name, 0), 1)
                total = total + weight * loss_sum / denom
                summary[name] = summary.get(name, 0.0) + float(loss_sum.detach()) / denom
            if backward:
                # The DP reduction averages gradients: multiply by dp_size to get the sum.
                self.engine.backward(total * self.dp_size, scale_wrt_gas=False)
                self.engine.step()  # steps the optimizer at the accumulation boundary only
        summary["loss"] = sum(weights.get(k, 1.0 if k == "text" else 0.0) * v
                              for k, v in summary.items())
        summary.update({f"count_{k}": float(v) for k, v in counts.items()})
        return summary

    def train_step(self, batches: List[dict], weights: Mapping[str, float], lr: float) -> Dict[str, float]:
        if len(batches) != self.grad_accumulation:
            raise ValueError(f"got {len(batches)} micro-batches; DeepSpeed is configured for "
                             f"gradient_accumulation_steps={self.grad_accumulation}")
        self._set_lr(lr)
        summary = self._run(batches, weights, backward=True)
        norm = self.engine.get_global_grad_norm()
        summary["grad_norm"] = float(norm) if norm is not None else float("nan")
        parallel.sync_semantic_targets(self.model)
        return summary

    @torch.no_grad()
    def eval_step(self, batches: List[dict], weights: Mapping[str, float]) -> Dict[str, float]:
        self.engine.eval()
        try:
            return self._run(batches, weights, backward=False)
        finally:
            self.engine.train()

    # -- checkpoint ----------------------------------------------------------------------------
    def model_state(self) -> Dict[str, torch.Tensor]:
        """This TP rank's full state dict (same keys as ``model.state_dict()``).

        Under ZeRO-3 the parameters are gathered over DP: a collective, so every DP rank of the
        TP group must call it (not only DP rank 0).
        """
        if self.zero_stage < 3:
            return self.model.state_dict()
        import deepspeed

        params = list(self.model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().clone() if torch.is_tensor(v) else v
                    for k, v in self.model.state_dict().items()}

    def model_states(self) -> List[Dict[str, torch.Tensor]]:
        """The trainer's interface: one state dict per model chunk (one here, PP=1)."""
        return [self.model_state()]

    def save(self, iter_dir: str) -> None:
        """Optimizer state and ZeRO partitions into ``iter_dir/engine``; collective (all ranks)."""
        self.engine.save_checkpoint(iter_dir, tag=_CKPT_TAG, client_state={}, save_latest=False)

    def _saved_dp_size(self, ckpt_dir: str) -> int:
        names = glob.glob(os.path.join(ckpt_dir, "*zero_pp_rank_*_mp_rank_*optim_states.pt"))
        ranks = {int(m.group(1)) for m in (re.search(r"zero_pp_rank_(\d+)_", os.path.basename(n))
                                           for n in names) if m}
        return len(ranks)

    def load(self, iter_dir: str) -> None:
        ckpt_dir = os.path.join(iter_dir, _CKPT_TAG)
        if not os.path.isdir(ckpt_dir):
            raise RuntimeError(
                f"{ckpt_dir} is missing: the checkpoint was saved by another engine. Start from its "
                f"weights instead with --checkpoint.load={iter_dir} --checkpoint.resume=false")
        if self.zero_stage > 0 and not self.ds_config.get("checkpoint", {}).get("load_universal"):
            saved = self._saved_dp_size(ckpt_dir)
            if saved and saved != self.dp_size:
                raise RuntimeError(
                    f"{ckpt_dir} holds ZeRO partitions for {saved} data-parallel ranks, this run has "
                    f"{self.dp_size}. Convert it with `python -m deepspeed.checkpoint.ds_to_universal` "
                    f"and set \"checkpoint\": {{\"load_universal\": true}} in parallel.deepspeed_config, "
                    f"or start from the weights only (--checkpoint.load={iter_dir} "
                    f"--checkpoint.resume=false)")
        path, _ = self.engine.load_checkpoint(
            iter_dir, tag=_CKPT_TAG, load_module_strict=False, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {ckpt_dir}")
