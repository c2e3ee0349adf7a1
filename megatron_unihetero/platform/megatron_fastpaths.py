"""Two fast paths for megatron-core, installed by ``platform.prepare_megatron``.

1. Faster stand-ins for megatron-core's pure-torch multi-tensor fallbacks. Without
TransformerEngine or apex (every CPU run, and GPU installs without either), megatron-core's
optimizer falls back to ``megatron.core.utils.local_multi_tensor_scale`` and
``local_multi_tensor_l2_norm`` for gradient clipping and for copying main params into a 16-bit
model: Python loops that allocate a scaled copy of every gradient, and a norm per tensor
collected into a Python list. torch's ``_foreach`` ops do the same arithmetic in one call per
list, without the Python loop and the per-tensor temporaries.

They are swapped in where, and only where, megatron-core chose its local fallbacks; TE's and
apex's kernels are left alone. The signatures are those of apex's ``amp_C`` kernels, which
megatron-core calls through ``multi_tensor_applier(op, noop_flag, tensor_lists, *args)``.

2. No collective where there is nothing to exchange: with the distributed optimizer at
data-parallel size 1, megatron-core's DDP still reduce-scatters the gradient buffer and
all-gathers the parameter buffer every step, each onto itself (this rank's shard is the whole
buffer). On gloo that is two copies of the model through the backend per step, for nothing.
A call on a one-rank group whose input and output are the same memory is an identity, and is
skipped; every other call goes to torch.distributed.
Likewise the gradient norm: megatron-core all-reduces each rank's squared norm over the
model-parallel group, which at TP = PP = 1 is this rank alone, and even a one-element gloo
all-reduce onto itself has a fixed cost per step. There the norm is computed locally (the
same ``_foreach`` norm as 1.); any other group, a norm other than L2, or DTensor (FSDP)
gradients take megatron-core's function.
"""

from __future__ import annotations

from typing import List, Sequence

import megatron.core.distributed.param_and_grad_buffer as buffers
import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.optimizer as optimizer
import torch
from megatron.core import utils

from megatron_unihetero import platform


def foreach_scale(chunk_size: int, noop_flag, tensor_lists: Sequence[List[torch.Tensor]],
                  scale: float) -> None:
    """dst[i] = src[i] * scale for ``tensor_lists = [src, dst]`` (in place when they alias)."""
    src, dst = tensor_lists
    if not dst:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def foreach_l2_norm(chunk_size: int, noop_flag, tensor_lists: Sequence[List[torch.Tensor]],
                    per_tensor: bool, *args):
    """(the L2 norm over every tensor of every list as a 1-element fp32 tensor, None)."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=platform.device()), None
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _skip_self_exchange(collective):
    """``collective(output, input, ..., group=...)`` that returns at once when it is an identity."""

    def call(output, input, *args, group=None, **kwargs):
        one_rank = group is not None and group.size() == 1
        if one_rank and output.data_ptr() == input.data_ptr() and output.numel() == input.numel():
            return None  # what a synchronous call returns; megatron waits on handles only if set
        return collective(output, input, *args, group=group, **kwargs)

    call.skips_self_exchange = True
    return call


def _local_norm_when_alone(get_grad_norm_fp32):
    """megatron-core's ``get_grad_norm_fp32``, without collectives when the group is one rank."""

    def call(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        grads = [grads_for_norm] if isinstance(grads_for_norm, torch.Tensor) else list(grads_for_norm)
        alone = grad_stats_parallel_group is not None and grad_stats_parallel_group.size() == 1
        if not alone or float(norm_type) != 2.0 or any(type(g) is not torch.Tensor for g in grads):
            return get_grad_norm_fp32(grads_for_norm, norm_type, grad_stats_parallel_group)
        return float(foreach_l2_norm(0, None, [grads], False)[0])

    call.local_when_alone = True
    return call


def install() -> None:
    for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
        collective = getattr(buffers, name)
        if not getattr(collective, "skips_self_exchange", False):
            setattr(buffers, name, _skip_self_exchange(collective))

    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = foreach_scale
    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    for module in (clip_grads, optimizer):  # optimizer.py imported the function by name
        if not getattr(module.get_grad_norm_fp32, "local_when_alone", False):
            module.get_grad_norm_fp32 = _local_norm_when_alone(module.get_grad_norm_fp32)
