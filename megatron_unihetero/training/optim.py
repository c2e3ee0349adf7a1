"""Optimizer, learning-rate schedule and model-parallel gradient clipping.

On GPU the megatron engine uses megatron-core's optimizer (the distributed optimizer = ZeRO-1).
megatron-core's optimizer asserts CUDA tensors (DESIGN.md section 4), so on CPU the same
semantics are built from torch AdamW: fp32 everywhere, the gradient norm taken over the whole
model (each tensor-parallel shard once, replicated tensors once, all pipeline stages), and no
weight decay on norms and biases.
"""

from __future__ import annotations

import math
from typing import Iterable, List

import torch
import torch.distributed as dist

from megatron_unihetero.training.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """Weight decay on matrices only: norms, biases (1-D tensors) get none."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_torch_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)


def _counts_once(param: torch.nn.Parameter, tp_rank: int) -> bool:
    """A tensor-parallel shard counts on every TP rank; a replicated tensor on TP rank 0 only."""
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Clip gradients by the global L2 norm over TP x PP; returns the norm before clipping."""
    from megatron.core import parallel_state

    params = [p for p in params if p.grad is not None]
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    device = params[0].grad.device if params else torch.device("cpu")
    squared = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if _counts_once(p, tp_rank):
            squared += p.grad.detach().float().pow(2).sum()
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        dist.all_reduce(squared, group=group)
    norm = float(squared.sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm


class MasterWeightAdamW:
    """AdamW on fp32 master copies of low-precision (bf16/fp16) model parameters.

    The model computes in its own dtype; gradients arrive in fp32 (megatron DDP's
    ``main_grad`` buffers with ``grad_reduce_in_fp32``); the update is applied to the fp32
    masters and copied back into the model, so small updates are not lost to bf16 rounding.
    Masters keep the tensor-parallel attributes of their parameters for the gradient norm.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.masters = []
        for p in self.model_params:
            master = torch.nn.Parameter(p.detach().float().clone())
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                if hasattr(p, attr):
                    setattr(master, attr, getattr(p, attr))
            self.masters.append(master)
        decay = [m for m in self.masters if m.dim() >= 2]
        no_decay = [m for m in self.masters if m.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.inner = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)

    @property
    def param_groups(self) -> List[dict]:
        # A property, not an alias: torch's load_state_dict replaces the inner group list.
        return self.inner.param_groups

    def load_gradients(self) -> List[torch.nn.Parameter]:
        """Move the model's gradients onto the masters (fp32); returns the masters to clip."""
        for p, m in zip(self.model_params, self.masters):
            grad = getattr(p, "main_grad", None)
            grad = grad if grad is not None else p.grad
            m.grad = None if grad is None else grad.float()
        return self.masters

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        for p, m in zip(self.model_params, self.masters):
            p.copy_(m.to(p.dtype))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p in self.model_params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masters": [m.detach() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        for p, m, saved in zip(self.model_params, self.masters, state["masters"]):
            m.copy_(saved)
            p.copy_(saved.to(p.dtype))
