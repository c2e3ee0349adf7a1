"""The Llama-architecture LLM on megatron-core layers (tensor- and pipeline-parallel).

Model code here reads as single-device code: megatron-core's layers (column/row-parallel
linears, vocab-parallel embedding) take their tensor-parallel group from ``parallel_state``,
and the pipeline stage is given by ``pre_process`` / ``post_process``. Parallel state itself is
set up in one place, :mod:`megatron_unihetero.parallel`.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Mapping, Optional

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

from megatron_unihetero import platform
from megatron_unihetero.kernels.attention import attention_layout, cached_layout
from megatron_unihetero.models import linear
from megatron_unihetero.models.attention import AttentionInputs, CoreAttention
from megatron_unihetero.models.config import ConfigError, LLMConfig
from megatron_unihetero.models.mlp import MLP
from megatron_unihetero.models.norm import RMSNorm


def transformer_config(llm: LLMConfig, *, tp_size: int = 1, pp_size: int = 1,
                       params_dtype: torch.dtype = torch.float32,
                       vpp_size: int = None,
                       memory: Optional[Mapping[str, object]] = None) -> TransformerConfig:
    """The megatron-core TransformerConfig of a Llama model (no biases, RMSNorm, SwiGLU).

    ``memory``: megatron-core's activation recompute and sequence-parallelism fields
    (``recompute_granularity``, ``recompute_modules``, ``recompute_method``,
    ``recompute_num_layers``, ``sequence_parallel``), as ``RunConfig.activation_memory`` maps
    the run's ``train.recompute*`` and ``parallel.sequence_parallel`` onto them; none by default.
    Sequence parallelism is off at TP = 1, where it changes nothing (megatron's training
    arguments turn it off there too)."""
    memory = dict(memory or {})
    if tp_size == 1:
        memory["sequence_parallel"] = False
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
        add_qkv_bias=llm.qkv_bias,  # Qwen2: biases on q, k, v (fused in linear_qkv), none on o
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
        # Each micro-batch's loss arrives already normalised by the step's global token
        # counts (training/losses.py): megatron's schedule must not divide it by the number
        # of micro-batches, nor DDP average it over data-parallel ranks (it sums).
        calculate_per_token_loss=True,
        **memory,
    )
    return config


def _without_sequence_parallel(config: TransformerConfig) -> TransformerConfig:
    """``config`` for the LM head, which runs on the whole sequence under sequence parallelism
    (the decoder gathers the final hidden state before the heads). A shallow copy: megatron-
    core's linears read ``sequence_parallel`` from their config when they are built, and have
    no switch of their own (the embedding has one: ``scatter_to_sequence_parallel``)."""
    if not config.sequence_parallel:
        return config
    full = copy.copy(config)
    full.sequence_parallel = False
    return full


def layer_spec(llm: LLMConfig) -> ModuleSpec:
    """The decoder layer spec: TransformerEngine's when asked for and importable, else local.

    megatron-core's TransformerLayer and SelfAttention run every layer; speed-ups are modules
    chosen here. Both specs get our :class:`CoreAttention` (packed-document attention through
    our kernels, ``llm.attention_impl`` bound as its constructor argument: megatron-core calls
    the ``core_attention`` entry as a builder with its own keywords). The local spec also gets
    our RMSNorm (models/norm.py: kernels.rms_norm), megatron's parallel linears as one
    ``F.linear`` on one TP rank (models/linear.py) and megatron's MLP with its SwiGLU as one
    kernel there (models/mlp.py).
    """
    if llm.transformer_impl == "transformer_engine":
        if not platform.has_transformer_engine():
            raise ConfigError("llm.transformer_impl=transformer_engine but transformer_engine "
                              "is not importable on this machine (it needs CUDA)")
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
        attention = spec.submodules.self_attention.submodules
        attention.linear_qkv, attention.linear_proj = linear.ColumnParallelLinear, linear.RowParallelLinear
        spec.submodules.mlp = MLP
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        CoreAttention, impl=llm.attention_impl)
    return spec


def block_spec(llm: LLMConfig, config: TransformerConfig, vp_stage: int = None):
    """This stage's layers and the final norm: the local spec's RMSNorm there too (megatron-core
    would put its default norm class, TE's / apex's / torch's, after our layers)."""
    spec = layer_spec(llm)
    if llm.transformer_impl == "transformer_engine":
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=RMSNorm)


def rope_inverse_frequencies(head_dim: int, base: float, scaling: Optional[Mapping] = None) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2], fp32: plain, or scaled as Llama-3.1 does
    (``scaling`` of rope_type "llama3"), computed exactly as transformers'
    ``_compute_llama3_parameters``: wavelengths shorter than ``original / high_freq_factor``
    are kept, longer than ``original / low_freq_factor`` divided by ``factor``, those between
    interpolated smoothly. Its attention factor is 1 (cos/sin are not rescaled)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """RoPE cos/sin at explicit position ids, so packed documents restart at 0.

    Returns (cos, sin), each [s, b, 1, head_dim] in fp32 (megatron's layout; the rotate-half
    convention of HF Llama), computed once per forward and applied in every layer's
    CoreAttention (kernels/rope.py). ``scaling``: Llama-3.1's (rope_inverse_frequencies).
    """

    def __init__(self, head_dim: int, base: float, scaling: Optional[Mapping] = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, base, scaling),
                             persistent=False)

    def forward(self, position_ids: torch.Tensor):
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1).transpose(0, 1)[:, :, None, :]  # [s, b, 1, d]
        return emb.cos(), emb.sin()


def _tied_head_from_embedding(module, state_dict, prefix, *args) -> None:
    """A state dict that stores the tied LM head once, as the embedding (the sharded
    checkpoint: LlamaDecoder.sharded_state_dict), loads into both names of the one Parameter."""
    head, embedding = f"{prefix}output_layer.weight", f"{prefix}embedding.word_embeddings.weight"
    if head not in state_dict and embedding in state_dict:
        state_dict[head] = state_dict[embedding]


class LlamaDecoder(MegatronModule):
    """Embedding (first stage) -> transformer layers of this stage -> LM output layer (last).

    Hidden states are in megatron's sequence-first layout, [s, b, h], contiguous, everywhere:
    from the embedding, between stages, and out of the final norm to the heads; under
    sequence parallelism [s / tp, b, h] inside the decoder and between stages (forward()).
    """

    def __init__(self, llm: LLMConfig, config: TransformerConfig, *, pre_process: bool,
                 post_process: bool, vp_stage: int = None):
        super().__init__(config=config)
        self.llm = llm
        self.pre_process = pre_process
        self.post_process = post_process
        if pre_process:
            # Under sequence parallelism the embedding stays whole (megatron-core's own switch,
            # as its LLaVA does): the visual tokens are scattered into it first, then forward()
            # splits it along the sequence.
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=llm.vocab_size, max_sequence_length=llm.max_sequence_length,
                position_embedding_type="rope", scatter_to_sequence_parallel=False,
            )
        self.rotary = RotaryEmbedding(llm.head_dim, llm.rotary_base, llm.rope_scaling)
        self.decoder = TransformerBlock(config, block_spec(llm, config, vp_stage), pre_process=pre_process,
                                        post_process=post_process, vp_stage=vp_stage)
        # Tied embeddings (megatron-core's share_embeddings_and_output_weights): with both ends
        # on this stage the LM head's weight IS the embedding's Parameter, so every caller of
        # ``output_layer`` (the loss kernels, scoring, generation) uses it; the last stage of a
        # longer pipeline holds a copy, made equal to the first stage's at build time
        # (parallel.build_model_chunks: sync_tied_embeddings) and kept equal by the
        # all-reduce of their gradients over the embedding group (engine_megatron).
        self.share_embeddings_and_output_weights = llm.tie_word_embeddings
        if post_process:
            # The heads read the gathered hidden state (forward()): the LM head is not
            # sequence-parallel, its input is the whole sequence.
            tied_here = llm.tie_word_embeddings and pre_process
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                llm.hidden_size, llm.vocab_size, config=_without_sequence_parallel(config),
                init_method=config.init_method,
                bias=False, gather_output=False, skip_bias_add=True,
                skip_weight_param_allocation=tied_here,
            )
            if tied_here:
                self.output_layer.weight = self.embedding.word_embeddings.weight
                self.register_load_state_dict_pre_hook(_tied_head_from_embedding)
            elif llm.tie_word_embeddings:
                # megatron-core's marks: the grad norm counts the copy once (``shared``), and
                # the distributed optimizer gives it a bucket of its own (``shared_embedding``).
                self.output_layer.weight.shared = True
                self.output_layer.weight.shared_embedding = True
        if pre_process and llm.tie_word_embeddings and not post_process:
            self.embedding.word_embeddings.weight.shared_embedding = True

    def shared_embedding_or_output_weight(self) -> Optional[torch.Tensor]:
        """The tied weight this stage holds (megatron-core's name: its
        ``_allreduce_word_embedding_grads`` reduces its gradient over the embedding group)."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        if self.post_process:
            return self.output_layer.weight
        return None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> dict:
        """megatron-core's, with a tied LM head stored once, as the embedding (megatron-core's
        LanguageModule does the same): on a stage that holds both it is the same Parameter
        and is left out; on the last stage of a longer pipeline the copy is named as the
        embedding and marked as its replica, so it loads from it at any pipeline size."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        head_key = f"{prefix}output_layer.weight"
        if not (self.llm.tie_word_embeddings and head_key in state):
            return state
        if self.pre_process:
            del state[head_key]
            return state
        sharded = state[head_key]
        sharded.key = f"{prefix}embedding.word_embeddings.weight"
        sharded.replica_id = (1, *sharded.replica_id[1:])  # (pipeline copy, TP, DP)
        return state

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first receive their input from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings in megatron's [s, b, h] layout."""
        return self.embedding(tokens, position_ids=None)

    def forward(self, decoder_input, position_ids, segment_ids, inference_context=None) -> torch.Tensor:
        """Hidden states [s, b, h] (after the final norm on the last stage).

        ``inference_context``: megatron-core's ``StaticInferenceContext`` when generating with
        a KV cache (generation/text.py from token embeddings; generation/sample.py feeds the
        semantic head's predicted embeddings, and left-padded batches of prompts whose
        ``segment_ids`` then cover every key so far): megatron's SelfAttention appends this call's keys and
        values to the context's cache and hands the whole cache to our CoreAttention, which
        rotates the keys at their positions and attends under :meth:`_cached_inputs`' layout.
        The caller advances ``sequence_len_offset`` after each call, as megatron's own
        inference wrappers do.

        Sequence parallelism is applied here and nowhere else in the model: the first stage
        splits its input (the embeddings with the visual tokens in) along the sequence over
        the TP ranks, stages exchange [s / tp, b, h] (megatron's schedule sizes them so), and
        the last stage gathers the final hidden state back to [s, b, h] for the heads. The
        gather's backward keeps this rank's slice of the gradient (no reduction): every head
        gives each TP rank the full gradient of the gathered state (the LM head reduces its
        vocab-parallel part over TP itself; the semantic and pixel heads are replicated).
        """
        sequence_parallel = self.config.sequence_parallel
        if self.pre_process and sequence_parallel:
            decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
            if self.config.clone_scatter_output_in_embedding:
                # As megatron's embedding does: the split is a view that would keep the whole
                # [s, b, h] embedding alive for the backward.
                decoder_input = decoder_input.clone()
        hidden_in = decoder_input if self.pre_process else self.decoder.input_tensor
        # The batch's attention layout and RoPE tables, once for all layers of this stage,
        # handed down in megatron's packed_seq_params slot (models/attention.py says why).
        cos, sin = self.rotary(position_ids)
        if inference_context is None:
            inputs = AttentionInputs(layout=attention_layout(segment_ids, dtype=hidden_in.dtype,
                                                             device=hidden_in.device,
                                                             impl=self.llm.attention_impl),
                                     cos=cos, sin=sin)
        else:
            inputs = self._cached_inputs(inference_context, position_ids, segment_ids, hidden_in, cos, sin)
        hidden = self.decoder(hidden_states=decoder_input, attention_mask=None,
                              packed_seq_params=inputs, rotary_pos_emb=None,
                              inference_context=inference_context)
        if self.post_process and sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False)
        return hidden

    def _cached_inputs(self, context, position_ids, segment_ids, hidden_in, cos, sin) -> AttentionInputs:
        """The attention inputs of one call under a KV cache: one document per row, no
        packing. ``segment_ids``: None, or [b, offset + s] for every key so far (the cached and
        this call's) with -1 on a row's left padding and 0 on its document (a batch of prompts
        of different lengths, generation/sample.py); ``position_ids`` [b, s] must continue each
        row's document (offset - pad, offset - pad + 1, ...: its first real token is at 0).
        The prompt (offset 0) is attended as usual; later calls attend the cached keys plus
        their own (kernels.attention.cached_layout, the padding keys hidden), the keys rotated
        at their positions (the cache holds them unrotated: megatron-core writes it before core
        attention, where this model applies RoPE; its own static path rotates the whole cache
        each step too)."""
        if not context.is_static_batching():
            raise ValueError("generation with a KV cache takes megatron-core's StaticInferenceContext")
        if self.config.sequence_parallel or self.config.tensor_model_parallel_size != 1 \
                or not (self.pre_process and self.post_process):
            raise ValueError("generation with a KV cache runs on one rank (TP=1, PP=1)")
        offset = context.sequence_len_offset
        b, s = position_ids.shape
        device = position_ids.device
        pads = torch.zeros(b, 1, dtype=torch.long, device=device)
        if segment_ids is not None:
            pads = _left_padding(segment_ids, offset + s)
        expected = torch.arange(offset, offset + s, device=device)[None] - pads
        if not torch.equal(position_ids, expected.clamp(min=0)):
            raise ValueError(f"generation with a KV cache: position_ids must continue the cache "
                             f"({offset} .. {offset + s - 1}, less each row's left padding), got "
                             f"{position_ids[0].tolist()}")
        if offset == 0:
            layout = attention_layout(segment_ids if bool(pads.any()) else None, dtype=hidden_in.dtype,
                                      device=hidden_in.device, impl=self.llm.attention_impl)
            return AttentionInputs(layout=layout, cos=cos, sin=sin)
        keys = (torch.arange(offset + s, device=device)[None] - pads).clamp(min=0)
        key_cos, key_sin = self.rotary(keys)
        layout = cached_layout(s, offset + s, dtype=hidden_in.dtype, device=hidden_in.device,
                               key_valid=segment_ids >= 0 if bool(pads.any()) else None)
        return AttentionInputs(layout=layout, cos=cos, sin=sin, key_cos=key_cos, key_sin=key_sin)


def _left_padding(segment_ids: torch.Tensor, length: int) -> torch.Tensor:
    """[b, 1] each row's left padding, from cached generation's ``segment_ids`` [b, length]
    (-1: padding, then 0: the row's one document); anything else is refused by name."""
    if segment_ids.dim() != 2 or segment_ids.shape[1] != length:
        raise ValueError(f"generation with a KV cache: segment_ids must cover every key so far, "
                         f"[b, {length}]; got {tuple(segment_ids.shape)}")
    pads = (segment_ids < 0).sum(dim=1, keepdim=True)
    expected = torch.where(torch.arange(length, device=segment_ids.device)[None] < pads, -1, 0)
    if not torch.equal(segment_ids.to(expected.dtype), expected):
        raise ValueError("generation with a KV cache: segment_ids must be -1 on a row's left "
                         "padding and 0 after it (one document per row)")
    return pads
