"""The megatron engine: megatron-core DDP + pipeline schedules + AdamW.

Gradients: megatron-core's ``DistributedDataParallel`` keeps them in contiguous fp32 buffers
(``param.main_grad``) and all-reduces them over the data-parallel group after the schedule.
The optimizer is torch AdamW over those gradients with model-parallel-aware clipping
(:mod:`megatron_unihetero.training.optim`); a bf16 model steps fp32 master weights
(``MasterWeightAdamW``). megatron-core's own (distributed) optimizer asserts CUDA tensors and
is not used yet: optimizer state is replicated over data-parallel ranks.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping

import torch

from megatron_unihetero import parallel
from megatron_unihetero.training import step as step_lib
from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.optim import MasterWeightAdamW, build_torch_optimizer, clip_grad_norm


class MegatronEngine:
    name = "megatron"

    def __init__(self, chunks, cfg: RunConfig):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        # A stage, or this rank's virtual-stage chunks (interleaved 1F1B): DDP wraps each.
        self.chunks = list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]
        self.model = self.chunks[0]
        self.cfg = cfg
        self.dp_group = parallel_state.get_data_parallel_group()
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=False,
                                                   average_in_collective=True)
        self.wrapped = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in self.chunks]
        for wrapped in self.wrapped:
            wrapped.broadcast_params()  # DP replicas start identical
        all_chunks = torch.nn.ModuleList(self.chunks)
        self.params = [p for p in all_chunks.parameters() if p.requires_grad]
        # bf16/fp16 models step fp32 master weights; fp32 models step their own parameters.
        self.master = any(p.dtype != torch.float32 for p in self.params)
        self.optimizer = (MasterWeightAdamW(all_chunks, cfg.train) if self.master
                          else build_torch_optimizer(all_chunks, cfg.train))

    def _step_model(self):
        return self.wrapped if len(self.wrapped) > 1 else self.wrapped[0]

    def train_step(self, batches: List[dict], weights: Mapping[str, float], lr: float) -> Dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for wrapped in self.wrapped:
            wrapped.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        summary = step_lib.forward_backward(
            self._step_model(), batches, weights=weights, image_token_id=self.cfg.model.image_token_id,
            dp_group=self.dp_group, grads_averaged_over_dp=True)
        for wrapped in self.wrapped:
            wrapped.finish_grad_sync()
        if self.master:
            to_clip = self.optimizer.load_gradients()
        else:
            for p in self.params:
                p.grad = p.main_grad
            to_clip = self.params
        summary["grad_norm"] = clip_grad_norm(to_clip, self.cfg.train.clip_grad)
        self.optimizer.step()
        parallel.sync_semantic_targets(self.chunks)
        return summary

    @torch.no_grad()
    def eval_step(self, batches: List[dict], weights: Mapping[str, float]) -> Dict[str, float]:
        for chunk in self.chunks:
            chunk.eval()
        try:
            return step_lib.forward_backward(
                self._step_model(), batches, weights=weights, image_token_id=self.cfg.model.image_token_id,
                forward_only=True, dp_group=self.dp_group, grads_averaged_over_dp=True)
        finally:
            for chunk in self.chunks:
                chunk.train()

    # -- checkpoint ----------------------------------------------------------------------------
    def model_states(self) -> List[Dict[str, torch.Tensor]]:
        """One state dict per chunk (local names)."""
        return [chunk.state_dict() for chunk in self.chunks]

    def _optim_path(self, iter_dir: str) -> str:
        from megatron.core import parallel_state

        return os.path.join(iter_dir, "engine", f"optim_tp{parallel_state.get_tensor_model_parallel_rank():02d}"
                                                f"_pp{parallel_state.get_pipeline_model_parallel_rank():02d}.pt")

    def save(self, iter_dir: str) -> None:
        """Optimizer state of this (TP, PP) rank; DP replicas hold the same, DP rank 0 writes."""
        from megatron.core import parallel_state

        if parallel_state.get_data_parallel_rank() != 0:
            return
        path = self._optim_path(iter_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(self.optimizer.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    def load(self, iter_dir: str) -> None:
        path = self._optim_path(iter_dir)
        if not os.path.isfile(path):
            raise RuntimeError(
                f"{path} is missing: the checkpoint was saved with another tensor/pipeline layout "
                f"or engine. Start from its weights instead with --checkpoint.load={iter_dir} "
                f"--checkpoint.resume=false")
        self.optimizer.load_state_dict(torch.load(path, weights_only=True))
