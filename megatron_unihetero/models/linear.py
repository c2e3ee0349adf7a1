"""megatron-core's tensor-parallel linears, computed as one ``F.linear`` on a single TP rank.

At tensor-parallel size 1 megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` still
run three autograd functions per call, each with a Python forward and backward: the copy into
(or reduction from) the tensor-parallel region, an identity on one rank, and the linear with
its gradient-accumulation / async all-reduce machinery, a matmul and its two gradient matmuls
when none of that machinery is on. Four linears per layer make that twelve Python autograd
nodes per layer and step, which on CPU cost about as much as the small layers' arithmetic.

These subclasses keep megatron-core's parameters, initialisation, state dicts and every
tensor-parallel path, and take the shortcut only when it computes the same thing: one TP rank,
no sequence parallelism, no fused gradient accumulation into ``main_grad`` (the weight
gradient lands in ``.grad``, where megatron's DDP hook picks it up either way), no deferred
embedding wgrad, no expert communication, no CPU offloading.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.utils import get_pg_size


def _single_rank_plain(linear) -> bool:
    config = linear.config
    return (get_pg_size(linear.tp_group) == 1 and not linear.sequence_parallel
            and not linear.gradient_accumulation_fusion and not linear.explicit_expert_comm
            and not config.defer_embedding_wgrad_compute and not config.cpu_offloading)


def _plain_forward(linear, input_):
    """(output, output bias) as megatron's forward returns them, through one F.linear."""
    if linear.skip_bias_add:
        return F.linear(input_, linear.weight), linear.bias
    return F.linear(input_, linear.weight, linear.bias), None


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain_on_one_rank = _single_rank_plain(self)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.plain_on_one_rank or weight is not None:
            return super().forward(input_, weight, runtime_gather_output)
        return _plain_forward(self, input_)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plain_on_one_rank = _single_rank_plain(self)

    def forward(self, input_):
        if not self.plain_on_one_rank:
            return super().forward(input_)
        return _plain_forward(self, input_)
