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
