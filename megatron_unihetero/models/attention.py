"""Core attention for megatron-core layer specs: our kernel dispatcher in megatron's slot.

megatron-core's local ``DotProductAttention`` cannot attend over packed documents and its
fused softmax needs CUDA. This module takes its place in the layer spec (same constructor and
forward signature) and calls :func:`megatron_unihetero.kernels.attention.attention`, which
chooses FlashAttention / TransformerEngine on GPU and PyTorch SDPA on CPU.

Convention: the ``attention_mask`` argument megatron threads through the block carries
:class:`AttentionInputs`: the *segment ids* [b, s] of the packed documents (or None for one
causal document per row), from which the kernel builds block-causal attention, and the RoPE
cos/sin [s, b, 1, head_dim] at the tokens' position ids. The rotation is applied here, to q and
k, with :func:`megatron_unihetero.kernels.rope.apply_rope` (Triton on GPU); megatron's own rope
path is not used (the decoder passes ``rotary_pos_emb=None``). Why: megatron-core's unfused rope
recomputes cos/sin for q and k in every layer and copies both tensors twice (rotate-half, then
a concatenation with the empty non-rotated part); on CPU that was 11% of a training step of
the tiny config, the whole gap to a plain transformers Llava loop. cos/sin are now computed
once per forward and the rotation is one fused kernel on GPU.
(Megatron's activation recompute would need the slot to hold a tensor; it is not used here.)
The decoder's plain path (models/layer.py) calls :meth:`CoreAttention.rotate_batch_first` and
:meth:`CoreAttention.attend_batch_first` instead, with batch-first tensors.
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


class AttentionInputs(NamedTuple):
    """What travels in megatron's ``attention_mask`` slot from the decoder to CoreAttention."""

    segment_ids: Optional[torch.Tensor]  # [b, s] int, -1 = padding; None: one document per row
    # RoPE at each token's position id: [s, b, 1, head_dim] in megatron's layout, [b, s, 1,
    # head_dim] on the decoder's batch-first plain path (CoreAttention.rotate_batch_first).
    cos: torch.Tensor
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
        from megatron_unihetero.kernels.rope import apply_rope

        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("attention_bias / packed_seq_params are not used by UniHetero")
        if not isinstance(attention_mask, AttentionInputs):
            raise TypeError("CoreAttention expects AttentionInputs in megatron's attention_mask "
                            "slot (built by LlamaDecoder.forward)")
        # Rotated in megatron's contiguous [s, b, heads, d] layout (elementwise ops on the
        # transposed view are several times slower on CPU), then viewed as [b, s, heads, d].
        query = apply_rope(query, attention_mask.cos, attention_mask.sin)
        key = apply_rope(key, attention_mask.cos, attention_mask.sin)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        out = attention(q, k, v, segment_ids=attention_mask.segment_ids,
                        softmax_scale=self.softmax_scale, impl=self.impl)
        s, b = query.shape[0], query.shape[1]
        return out.transpose(0, 1).reshape(s, b, self.num_heads * self.head_dim)

    def rotate_batch_first(self, query, key, cos, sin):
        """RoPE on batch-first tensors (the decoder's plain path, models/layer.py): q
        [b, s, groups, queries per group, d] as split from the QKV output, k [b, s, groups, d],
        ``cos`` / ``sin`` [b, s, 1, d]; returns q as [b, s, heads, d] and the rotated k.

        q is rotated as [b * s, groups, queries per group, d], a view of the split (its heads
        are not evenly strided, so a [b, s, heads, d] view would be a copy); the rotation's
        contiguous output then views as [b, s, heads, d] for free.
        """
        from megatron_unihetero.kernels.rope import apply_rope

        b, s, d = query.shape[0], query.shape[1], query.shape[-1]
        flat_cos, flat_sin = cos.reshape(b * s, 1, 1, d), sin.reshape(b * s, 1, 1, d)
        query = apply_rope(query.view(b * s, *query.shape[2:]), flat_cos, flat_sin).view(b, s, -1, d)
        return query, apply_rope(key, cos, sin)

    def row_mask(self, segment_ids, like: torch.Tensor):
        """The mask this attention runs SDPA under for queries like ``like`` (dtype, device),
        when it attends on whole rows; None otherwise (kernels.attention.row_mask)."""
        from megatron_unihetero.kernels.attention import row_mask

        return row_mask(segment_ids, like.dtype, like.device, impl=self.impl)

    def attend_rows_batch_first(self, query, key, value, mask) -> torch.Tensor:
        """:meth:`attend_batch_first` under a mask from :meth:`row_mask`: no Python decisions,
        so a compiled layer takes it into its graph."""
        from megatron_unihetero.kernels.attention import attend_rows

        b, s = query.shape[0], query.shape[1]
        return attend_rows(query, key, value, mask, self.softmax_scale).reshape(b, s, self.num_heads * self.head_dim)

    def attend_batch_first(self, query, key, value, segment_ids) -> torch.Tensor:
        """Attention over the packed documents of rotated batch-first q [b, s, heads, d], k and
        v [b, s, groups, d]; returns [b, s, heads * d]."""
        from megatron_unihetero.kernels.attention import attention

        b, s = query.shape[0], query.shape[1]
        out = attention(query, key, value, segment_ids=segment_ids,
                        softmax_scale=self.softmax_scale, impl=self.impl)
        return out.reshape(b, s, self.num_heads * self.head_dim)
