"""Core attention for megatron-core layer specs: our kernel dispatcher in megatron's slot.

megatron-core's local ``DotProductAttention`` cannot attend over packed documents and its
fused softmax needs CUDA. This module takes its place in the layer spec (same constructor and
forward signature) and calls :func:`megatron_unihetero.kernels.attention.attend`, which runs
FlashAttention / TransformerEngine / FlexAttention on GPU and PyTorch SDPA on CPU.

What travels in the ``attention_mask`` argument megatron threads through its block and layers
is :class:`AttentionInputs`, built once per forward by the decoder (models/llm.py): the
attention layout of the batch's packed documents (the implementation and its mask or
cu_seqlens, :func:`~megatron_unihetero.kernels.attention.attention_layout`) and the RoPE
cos/sin at the tokens' position ids. The rotation is applied here, to q and k, with
:func:`megatron_unihetero.kernels.rope.apply_rope`; megatron's own rope path is not used (the
decoder passes ``rotary_pos_emb=None``): megatron-core's unfused rope recomputes cos/sin for q
and k in every layer and copies both tensors twice, where this computes them once per forward
and rotates in one kernel.

The attention implementation (``model.llm.attention_impl``) reaches this module as a param of
its ``ModuleSpec`` (models/llm.py ``layer_spec``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_unihetero.kernels.attention import AttentionLayout, attend
from megatron_unihetero.kernels.rope import apply_rope


class AttentionInputs(NamedTuple):
    """What travels in megatron's ``attention_mask`` slot from the decoder to CoreAttention."""

    layout: AttentionLayout  # the batch's documents, as the chosen attention kernel needs them
    cos: torch.Tensor  # [s, b, 1, head_dim]: RoPE at each token's position id, megatron's layout
    sin: torch.Tensor


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
        impl: str = "auto",
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
        self.impl = impl  # what the decoder builds the layout for (LlamaDecoder.forward)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        """q [s, b, heads, d], k and v [s, b, groups, d] (megatron's layout) -> [s, b, heads * d]."""
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention_bias / packed_seq_params are not used by UniHetero")
        if not isinstance(attention_mask, AttentionInputs):
            raise TypeError("CoreAttention expects AttentionInputs in megatron's attention_mask "
                            "slot (built by LlamaDecoder.forward)")
        # Rotated in megatron's contiguous [s, b, heads, d] layout (elementwise ops on the
        # transposed view are slower on CPU), then viewed as [b, s, heads, d].
        query = apply_rope(query, attention_mask.cos, attention_mask.sin)
        key = apply_rope(key, attention_mask.cos, attention_mask.sin)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        out = attend(q, k, v, attention_mask.layout, self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s, b, self.num_heads * self.head_dim)
