"""Core attention for megatron-core layer specs: our kernel dispatcher in megatron's slot.

megatron-core's local ``DotProductAttention`` cannot attend over packed documents and its
fused softmax needs CUDA. This module takes its place in the layer spec (same constructor and
forward signature) and calls :func:`megatron_unihetero.kernels.attention.attention`, which
chooses FlashAttention / TransformerEngine on GPU and PyTorch SDPA on CPU.

Convention: the ``attention_mask`` argument megatron threads through the block carries the
*segment ids* [b, s] of the packed documents (or None for one causal document per row); the
kernel builds block-causal attention from them.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class CoreAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs TransformerEngine attention (llm.transformer_impl)")
        tp_size = (pg_collection.tp.size() if pg_collection is not None
                   else parallel_state.get_tensor_model_parallel_world_size())
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        self.impl = getattr(config, "unihetero_attention_impl", "auto")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        from megatron_unihetero.kernels.attention import attention

        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention_bias / packed_seq_params are not used by UniHetero")
        # megatron layout [s, b, heads, d] -> kernel layout [b, s, heads, d]
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        out = attention(q, k, v, segment_ids=attention_mask, softmax_scale=self.softmax_scale,
                        impl=self.impl)
        s, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s, b, self.num_heads * self.head_dim)
