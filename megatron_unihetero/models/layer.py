"""megatron-core's TransformerLayer and SelfAttention, with a plain, batch-first forward where it
computes the same thing.

megatron-core's layer forward serves every feature it has: inference KV caches and CUDA graphs,
cross-attention, activation recompute and CPU offloading of each piece, fused QKV + RoPE
kernels, q/k layernorms, output gates, MoE, FP8 contexts; and it works in megatron's
sequence-first [s, b, h] layout. A training (or evaluation) step of the local spec on one
tensor-parallel rank uses none of those features, and is

    h = x + proj(core_attention(split(qkv(norm1(x)))));   y = h + mlp(norm2(h))

which is what :meth:`TransformerLayer.plain_forward` runs, on batch-first [b, s, h] hidden
states: the same modules, parameters and kernels, without the generic code around them. The
decoder (models/llm.py) runs all its layers this way when every one of them can, transposing
once on the way in and out.

Why batch-first: the attention kernels read q, k and v per (row, head), and in megatron's
layout those are strided views of the QKV GEMM output, a row's consecutive tokens ``b`` QKV
widths apart; batch-first they are one QKV width apart, and the attention output is already in
the order the output projection reads. Measured on the tiny CPU config (one layer, fwd+bwd, paired and
shuffled): megatron's forward 13.8 ms, a plain sequence-first forward 0.22 ms less, this
batch-first one 0.48 ms less than that.

The plain path is taken only when every feature it skips is off, checked once at construction
(``plain_on_one_rank``); megatron-core's ``forward`` is unchanged for every other case. Our
CoreAttention applies RoPE itself (models/attention.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from megatron.core.transformer import attention as megatron_attention
from megatron.core.transformer import transformer_layer as megatron_layer
from megatron.core.transformer.identity_op import IdentityOp

from megatron_unihetero.kernels.attention import DenseMask
from megatron_unihetero.models.attention import AttentionInputs, CoreAttention


def _off(module) -> bool:
    return module is None or isinstance(module, IdentityOp)


class SelfAttention(megatron_attention.SelfAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        self.plain_on_one_rank = (
            getattr(self.linear_qkv, "plain_on_one_rank", False)
            and getattr(self.linear_proj, "plain_on_one_rank", False)
            and isinstance(self.core_attention, CoreAttention)
            and _off(self.q_layernorm) and _off(self.k_layernorm)
            and not config.attention_output_gate and not config.fused_single_qkv_rope
            and not config.test_mode and not self.checkpoint_core_attention
            and not (self.offload_qkv_linear or self.offload_core_attention or self.offload_attn_proj))

    def plain_qkv(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated q [b, s, heads, d], k and v [b, s, groups, d] from batch-first [b, s, h]
        hidden states (``cos`` / ``sin`` [b, s, 1, d]).

        The QKV split is megatron's: per query group, its query heads, then one key head and
        one value head (so checkpoints and the HF converters read the same weight layout).
        """
        mixed, _ = self.linear_qkv(hidden_states)
        b, s = mixed.shape[:2]
        groups, head_dim = self.num_query_groups_per_partition, self.hidden_size_per_attention_head
        queries_per_group = self.num_attention_heads_per_partition // groups
        query, key, value = torch.split(mixed.view(b, s, groups, (queries_per_group + 2) * head_dim),
                                        [queries_per_group * head_dim, head_dim, head_dim], dim=3)
        query = query.view(b, s, groups, queries_per_group, head_dim)
        query, key = self.core_attention.rotate_batch_first(query, key, cos, sin)
        return query, key, value


class TransformerLayer(megatron_layer.TransformerLayer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        self.plain_on_one_rank = (
            getattr(self.self_attention, "plain_on_one_rank", False)
            and _off(self.cross_attention) and _off(self.pre_cross_attn_layernorm)
            and not (self.recompute_input_layernorm or self.recompute_pre_mlp_layernorm
                     or self.recompute_mlp)
            and not (self.offload_attn_norm or self.offload_mlp_norm)
            and not self.is_moe_layer and not config.add_bias_linear and self.hidden_dropout == 0.0
            and config.cuda_graph_impl == "none" and not config.fp8 and not config.fp4
            and not config.inference_fuse_tp_communication)
        self.compiled_pieces: Optional[CompiledPieces] = None

    def plain_forward(self, hidden_states: torch.Tensor, inputs: AttentionInputs,
                      row_mask: Optional[DenseMask] = None) -> torch.Tensor:
        """The layer on batch-first [b, s, h] hidden states (``inputs``: cos/sin [b, s, 1, d]).

        As two pieces around the attention kernel, whose layout (plain causal, documents, a
        dense mask) follows each batch's documents and is chosen in Python. With ``row_mask``
        (the attention is SDPA on whole rows under it: CoreAttention.row_mask), as one piece.
        :meth:`compile_pieces` compiles the pieces.
        """
        pieces = self.compiled_pieces
        if row_mask is not None:
            whole = pieces.whole if pieces else self.plain_whole
            return whole(hidden_states, inputs.cos, inputs.sin, row_mask)
        attention_inputs = pieces.attention_inputs if pieces else self.plain_attention_inputs
        output = pieces.output if pieces else self.plain_output
        query, key, value = attention_inputs(hidden_states, inputs.cos, inputs.sin)
        context = self.self_attention.core_attention.attend_batch_first(query, key, value,
                                                                        inputs.segment_ids)
        return output(hidden_states, context)

    def plain_attention_inputs(self, hidden_states, cos, sin):
        """norm -> QKV -> split -> RoPE: the attention kernel's q, k, v."""
        return self.self_attention.plain_qkv(self.input_layernorm(hidden_states), cos, sin)

    def plain_output(self, hidden_states, context):
        """Output projection, residual, norm, MLP, residual: the layer's output."""
        attended, _ = self.self_attention.linear_proj(context)
        hidden_states = hidden_states + attended
        transformed, _ = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return hidden_states + transformed

    def plain_whole(self, hidden_states, cos, sin, row_mask: DenseMask):
        """The layer as one piece, its attention SDPA on whole rows under ``row_mask``."""
        query, key, value = self.plain_attention_inputs(hidden_states, cos, sin)
        context = self.self_attention.core_attention.attend_rows_batch_first(query, key, value, row_mask)
        return self.plain_output(hidden_states, context)

    def compile_pieces(self) -> None:
        """torch.compile the plain forward's pieces (``train.compile``: see
        LlamaDecoder.compile_layers). The uncompiled methods stay as they are (the compiled
        whole layer traces them)."""
        self.compiled_pieces = CompiledPieces(torch.compile(self.plain_attention_inputs),
                                              torch.compile(self.plain_output),
                                              torch.compile(self.plain_whole))


class CompiledPieces(NamedTuple):
    """A layer's plain pieces, torch.compiled (TransformerLayer.compile_pieces)."""

    attention_inputs: Callable
    output: Callable
    whole: Callable
