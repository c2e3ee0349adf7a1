"""Core attention for megatron-core layer specs: our kernel dispatcher in megatron's slot.

megatron-core's local ``DotProductAttention`` cannot attend over packed documents and its
fused softmax needs CUDA. This module takes its place in the layer spec (same constructor and
forward signature) and calls :func:`megatron_unihetero.kernels.attention.attend`, which runs
FlashAttention / TransformerEngine / FlexAttention on GPU and PyTorch SDPA on CPU.

What travels in the ``packed_seq_params`` argument megatron threads through its block and
layers is :class:`AttentionInputs` (a ``PackedSeqParams``), built once per forward by the
decoder (models/llm.py): the attention layout of the batch's packed documents (the
implementation and its mask or cu_seqlens,
:func:`~megatron_unihetero.kernels.attention.attention_layout`) and the RoPE cos/sin at the
tokens' position ids. Not the ``attention_mask`` slot: megatron-core's activation recompute
(``recompute_granularity`` full or selective) hands that argument to its checkpoint function,
which saves it with ``save_for_backward`` and so takes tensors only; ``packed_seq_params``
reaches the recomputed layers and core attention as a closure variable, a structure of
tensors is fine there. ``attention_mask`` stays None.

The rotation is applied here, to q and k, with
:func:`megatron_unihetero.kernels.rope.apply_rope`; megatron's own rope path is not used (the
decoder passes ``rotary_pos_emb=None``): megatron-core's unfused rope recomputes cos/sin for q
and k in every layer and copies both tensors twice, where this computes them once per forward
and rotates in one kernel.

The attention implementation (``model.llm.attention_impl``) reaches this module as a param of
its ``ModuleSpec`` (models/llm.py ``layer_spec``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_unihetero.kernels.attention import AttentionLayout, attend
from megatron_unihetero.kernels.rope import apply_rope


@dataclass
class AttentionInputs(PackedSeqParams):
    """What travels in megatron's ``packed_seq_params`` slot from the decoder to CoreAttention.

    megatron-core's own fields stay unset (``qkv_format`` None: not its "thd" path; the
    hidden states stay [s, b, h]).
    """

    layout: Optional[AttentionLayout] = None  # the batch's documents, as the kernel needs them
    cos: Optional[torch.Tensor] = None  # [s, b, 1, head_dim]: RoPE at each token's position id
    sin: Optional[torch.Tensor] = None
    # Generation with megatron-core's KV cache (LlamaDecoder.forward, inference_context): the
    # keys are the cached ones plus this step's, [s_k, b, groups, d], longer than the queries;
    # their RoPE at their own positions. None: the keys are the queries' positions.
    key_cos: Optional[torch.Tensor] = None
    key_sin: Optional[torch.Tensor] = None


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
        if attention_bias is not None or attention_mask is not None:
            raise NotImplementedError("attention_bias / attention_mask are not used by UniHetero "
                                      "(the layout travels in packed_seq_params)")
        if not isinstance(packed_seq_params, AttentionInputs):
            raise TypeError("CoreAttention expects AttentionInputs in megatron's packed_seq_params "
                            "slot (built by LlamaDecoder.forward)")
        inputs = packed_seq_params
        # Rotated in megatron's contiguous [s, b, heads, d] layout (elementwise ops on the
        # transposed view are slower on CPU), then viewed as [b, s, heads, d].
        query = apply_rope(query, inputs.cos, inputs.sin)
        if inputs.key_cos is not None:  # keys from the KV cache: unrotated, rotated here
            key = apply_rope(key, inputs.key_cos, inputs.key_sin)
        else:
            key = apply_rope(key, inputs.cos, inputs.sin)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        out = attend(q, k, v, inputs.layout, self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s, b, self.num_heads * self.head_dim)
