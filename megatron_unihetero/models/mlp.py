"""megatron-core's MLP whose SwiGLU runs as :func:`megatron_unihetero.kernels.swiglu_linear`
on one tensor-parallel rank.

megatron-core computes fc1 as one GEMM into [N, 2F] and then ``silu(first half) * second
half`` on strided views, whose backward concatenates the halves' gradients. On one TP rank,
with the local spec's plain linear (models/linear.py) and a plain SwiGLU (silu gate, no bias,
no clamp, no offset, no fused bias-activation, no per-token scale), this MLP computes the same
thing with contiguous halves instead (kernels/swiglu.py says why that is cheaper). Everything else
(parameters, initialisation, ``linear_fc1.weight`` and its state-dict key, tensor-parallel
and every other activation path) is megatron-core's.

The layer spec names the class itself, not a ``ModuleSpec``: the submodules are this module's
linears, and megatron-core's TransformerLayer then builds it with its default TP group (the one
megatron-core's MLP gets too) instead of warning about an unknown MLP type.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer import mlp as megatron_mlp

from megatron_unihetero.kernels.swiglu import swiglu_linear
from megatron_unihetero.models import linear


def _plain_swiglu(mlp) -> bool:
    config, fc1 = mlp.config, mlp.linear_fc1
    return (isinstance(fc1, linear.ColumnParallelLinear) and fc1.plain_on_one_rank and fc1.bias is None
            and config.gated_linear_unit and mlp.activation_func is F.silu
            and not config.bias_activation_fusion and not config.use_te_activation_func
            and config.activation_func_clamp_value is None and config.glu_linear_offset == 0)


class MLP(megatron_mlp.MLP):
    def __init__(self, config, submodules=None, **kwargs):
        if submodules is None:
            submodules = megatron_mlp.MLPSubmodules(linear_fc1=linear.ColumnParallelLinear,
                                                    linear_fc2=linear.RowParallelLinear)
        kwargs.setdefault("ffn_hidden_size", config.ffn_hidden_size)  # megatron warns without it
        super().__init__(config, submodules, **kwargs)
        self.swiglu_on_one_rank = _plain_swiglu(self)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.swiglu_on_one_rank or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        return self.linear_fc2(swiglu_linear(hidden_states, self.linear_fc1.weight))
