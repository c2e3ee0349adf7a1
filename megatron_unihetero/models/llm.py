"""The Llama-architecture LLM on megatron-core layers (tensor- and pipeline-parallel).

Model code here reads as single-device code: megatron-core's layers (column/row-parallel
linears, vocab-parallel embedding) take their tensor-parallel group from ``parallel_state``,
and the pipeline stage is given by ``pre_process`` / ``post_process``. Parallel state itself is
set up in one place, :mod:`megatron_unihetero.parallel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import make_viewless_tensor

from megatron_unihetero import platform
from megatron_unihetero.models import linear
from megatron_unihetero.models.attention import AttentionInputs, CoreAttention
from megatron_unihetero.models.config import ConfigError, LLMConfig
from megatron_unihetero.models.layer import SelfAttention, TransformerLayer
from megatron_unihetero.models.mlp import MLP
from megatron_unihetero.models.norm import RMSNorm


def transformer_config(llm: LLMConfig, *, tp_size: int = 1, pp_size: int = 1,
                       params_dtype: torch.dtype = torch.float32,
                       vpp_size: int = None) -> TransformerConfig:
    """The megatron-core TransformerConfig of a Llama model (no biases, RMSNorm, SwiGLU)."""
    if llm.num_attention_heads % tp_size or llm.num_query_groups % tp_size:
        raise ConfigError(
            f"tensor parallel size {tp_size} must divide llm.num_attention_heads "
            f"({llm.num_attention_heads}) and llm.num_query_groups ({llm.num_query_groups})"
        )
    if llm.num_layers % (pp_size * (vpp_size or 1)):
        raise ConfigError(f"pipeline parallel size {pp_size} x virtual stages {vpp_size or 1} must "
                          f"divide llm.num_layers ({llm.num_layers})")
    if llm.ffn_hidden_size % tp_size or llm.vocab_size % tp_size:
        raise ConfigError(
            f"tensor parallel size {tp_size} must divide llm.ffn_hidden_size ({llm.ffn_hidden_size}) "
            f"and llm.vocab_size ({llm.vocab_size})"
        )
    config = TransformerConfig(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        ffn_hidden_size=llm.ffn_hidden_size,
        kv_channels=llm.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=llm.init_method_std,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        virtual_pipeline_model_parallel_size=vpp_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        # The full weight is initialised on the CPU and then split, so a model has the same
        # weights whatever its tensor-parallel size (given the seed).
        use_cpu_initialization=True,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
    )
    config.unihetero_attention_impl = llm.attention_impl
    return config


def layer_spec(llm: LLMConfig) -> ModuleSpec:
    """The decoder layer spec: TransformerEngine's when asked for and importable, else local.

    Both get our :class:`CoreAttention` (packed-document attention through our kernels); the
    local one also gets our RMSNorm (models/norm.py: kernels.rms_norm), megatron's parallel
    linears with a plain ``F.linear`` on one TP rank (models/linear.py), megatron's MLP with
    its SwiGLU as one kernel there (models/mlp.py), and megatron's layer and self-attention
    with a plain batch-first forward, which the decoder runs there (models/layer.py).
    """
    if llm.transformer_impl == "transformer_engine":
        if not platform.has_transformer_engine():
            raise ConfigError("llm.transformer_impl=transformer_engine but transformer_engine "
                              "is not importable on this machine (it needs CUDA)")
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
        spec.module = TransformerLayer
        spec.submodules.self_attention.module = SelfAttention
        attention = spec.submodules.self_attention.submodules
        attention.linear_qkv, attention.linear_proj = linear.ColumnParallelLinear, linear.RowParallelLinear
        spec.submodules.mlp = MLP
    spec.submodules.self_attention.submodules.core_attention = CoreAttention
    return spec


def block_spec(llm: LLMConfig, config: TransformerConfig, vp_stage: int = None):
    """This stage's layers and the final norm: the local spec's RMSNorm there too (megatron-core
    would put its default norm class, TE's / apex's / torch's, after our layers)."""
    spec = layer_spec(llm)
    if llm.transformer_impl == "transformer_engine":
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=RMSNorm)


class RotaryEmbedding(torch.nn.Module):
    """RoPE cos/sin at explicit position ids, so packed documents restart at 0.

    Returns (cos, sin), each [s, b, 1, head_dim] in fp32 (megatron's layout; the rotate-half
    convention of HF Llama), computed once per forward and applied in every layer's
    CoreAttention.
    """

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor):
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1).transpose(0, 1)[:, :, None, :]  # [s, b, 1, d]
        return emb.cos(), emb.sin()


def _plain_block(block: TransformerBlock) -> bool:
    """Whether the block's layers can all run their plain batch-first forward (models/layer.py)
    and nothing megatron's TransformerBlock adds around them is on."""
    config = block.config
    return (all(getattr(layer, "plain_on_one_rank", False) for layer in block.layers)
            and config.recompute_granularity != "full" and not config.cpu_offloading
            and (block.final_layernorm is None or isinstance(block.final_layernorm, RMSNorm)))


class LlamaDecoder(MegatronModule):
    """Embedding (first stage) -> transformer layers of this stage -> LM output layer (last)."""

    def __init__(self, llm: LLMConfig, config: TransformerConfig, *, pre_process: bool,
                 post_process: bool, vp_stage: int = None):
        super().__init__(config=config)
        self.llm = llm
        self.pre_process = pre_process
        self.post_process = post_process
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=llm.vocab_size, max_sequence_length=llm.max_sequence_length,
                position_embedding_type="rope",
            )
        self.rotary = RotaryEmbedding(llm.head_dim, llm.rotary_base)
        self.decoder = TransformerBlock(config, block_spec(llm, config, vp_stage), pre_process=pre_process,
                                        post_process=post_process, vp_stage=vp_stage)
        self.plain_on_one_rank = _plain_block(self.decoder)
        self.layers_compiled = False
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                llm.hidden_size, llm.vocab_size, config=config, init_method=config.init_method,
                bias=False, gather_output=False, skip_bias_add=True,
            )

    def compile_layers(self) -> None:
        """torch.compile this stage's layers, torchtitan-style (``train.compile``).

        Each layer's plain forward (models/layer.py) is compiled whole when its attention is
        SDPA on whole rows (plain causal or a dense mask: the torch path, chosen here once per
        forward and passed in as a tensor), and otherwise as its two pieces around the
        attention kernel (the documents gathered into a padded batch; flash-attn, TE or
        FlexAttention on GPU). TorchInductor fuses the elementwise work (norms, rotations,
        SwiGLU, residual adds) into a few kernels, forward and backward; our kernels take their
        torch path inside (kernels/_dispatch.py); the GEMMs and the attention kernel are the
        same ones. The layers share their graphs (dynamo treats module parameters as inputs),
        so a deep model compiles each piece once.
        """
        if not self.plain_on_one_rank:
            raise ValueError(
                "train.compile compiles the decoder's plain one-rank layer path, which this model "
                "does not take: it needs parallel.tensor_parallel=1, model.llm.transformer_impl="
                "local, and none of megatron-core's recompute, offloading, bias, dropout, MoE or "
                "FP8 settings")
        for layer in self.decoder.layers:
            layer.compile_pieces()
        self.layers_compiled = True

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings in megatron's [s, b, h] layout."""
        return self.embedding(tokens, position_ids=None)

    def forward(self, decoder_input, position_ids, segment_ids) -> torch.Tensor:
        """Hidden states [s, b, h] (after the final norm on the last stage).

        On the last stage they may be a view of batch-first memory (the plain path below);
        readers that care about memory order check ``hidden.transpose(0, 1).is_contiguous()``.
        """
        cos, sin = self.rotary(position_ids)
        # RoPE is applied in CoreAttention (see models/attention.py), not by megatron's layers.
        if self.plain_on_one_rank:
            # The rotary tables are computed batch-major: these transposes are contiguous.
            return self._plain_forward(decoder_input, AttentionInputs(segment_ids, cos.transpose(0, 1),
                                                                      sin.transpose(0, 1)))
        return self.decoder(hidden_states=decoder_input,
                            attention_mask=AttentionInputs(segment_ids, cos, sin),
                            rotary_pos_emb=None)

    def _plain_forward(self, decoder_input, inputs: AttentionInputs) -> torch.Tensor:
        """This stage's layers through their plain batch-first forward (models/layer.py), in
        place of megatron's TransformerBlock: one transpose in, one out."""
        hidden = decoder_input if self.pre_process else self.decoder.input_tensor
        hidden = hidden.transpose(0, 1).contiguous()
        # Compiled layers take the attention into their graph when it is SDPA on whole rows.
        layers = self.decoder.layers
        row_mask = (layers[0].self_attention.core_attention.row_mask(inputs.segment_ids, hidden)
                    if self.layers_compiled and len(layers) else None)
        for layer in layers:
            hidden = layer.plain_forward(hidden, inputs, row_mask)
        if self.decoder.final_layernorm is not None:
            hidden = self.decoder.final_layernorm(hidden)
        if self.post_process:
            return hidden.transpose(0, 1)  # the heads read its rows in memory order
        # Sent to the next stage: megatron's p2p wants it contiguous and frees it after the send
        # (deallocate_output_tensor), which it refuses for a view.
        return make_viewless_tensor(hidden.transpose(0, 1).contiguous(), requires_grad=True,
                                    keep_graph=True)
