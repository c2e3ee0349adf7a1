"""Typed configuration of the UniHetero model: LLM, vision encoder, projector and heads.

Each dataclass validates itself in ``__post_init__`` so that a bad value fails where it is
written, with the field named, instead of deep inside megatron-core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from megatron_unihetero.kernels import cross_entropy, regression
from megatron_unihetero.kernels.attention import IMPLS as _ATTENTION_KERNELS

IGNORE_INDEX = -100

# The loss kernels' implementation names (kernels/_dispatch.py), plus "megatron" for the text
# loss (megatron's output layer + vocab_parallel_cross_entropy, models/heads.text_loss).
ATTENTION_IMPLS = ("auto", *_ATTENTION_KERNELS)
TEXT_LOSS_IMPLS = ("auto", *cross_entropy.IMPLS, "megatron")
SEMANTIC_LOSS_IMPLS = ("auto", *regression.IMPLS)
# Names the kernels used before they shared one vocabulary: refused with the new name.
_RENAMED_ATTENTION_IMPLS = {"torch": "reference"}
_RENAMED_TEXT_LOSS_IMPLS = {"torch": "fused", "naive": "reference"}
_RENAMED_SEMANTIC_LOSS_IMPLS = {"torch": "reference"}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(name: str, value: str, valid: Sequence[str],
                  renamed: Optional[Mapping[str, str]] = None) -> None:
    """``value`` must be one of ``valid``; a name in ``renamed`` gets its new name in the error."""
    renamed = renamed or {}
    expected = " | ".join(valid)
    _check(value not in renamed,
           f"{name}: {value!r} is now {renamed.get(value)!r}; expected one of {expected}")
    _check(value in valid, f"{name} must be one of {expected}; got {value!r}")


# Llama-3.1's RoPE scaling (rope_type "llama3"): the keys its rope_scaling / rope_parameters holds.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
LLM_FAMILIES = ("llama", "qwen2")


@dataclass
class LLMConfig:
    """A Llama-architecture decoder (RMSNorm, SwiGLU, RoPE, GQA), as Llama-2/3 or Qwen2 have it.

    ``family``: ``llama`` (no biases) or ``qwen2`` (biases on the query, key and value
    projections, none on the output projection: megatron-core's ``add_qkv_bias``); the export
    writes that family's HF config. ``rope_scaling``: None (plain RoPE) or Llama-3.1's
    ``{"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}`` (models/llm.py rope_inverse_frequencies).
    ``tie_word_embeddings``: the LM head is the token embedding (Llama-3.2-1B/3B, small Qwen2);
    at PP > 1 the last stage holds a copy kept equal to it (models/llm.py LlamaDecoder).
    """

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (= num_attention_heads)
    ffn_hidden_size: int = 172
    vocab_size: int = 512
    max_sequence_length: int = 256
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    attention_impl: str = "auto"  # auto | reference | flash | te | flex (kernels/attention.py)
    # LM head + cross-entropy: auto | reference | fused | triton (kernels/cross_entropy.py), or
    # megatron (output layer + megatron-core's vocab-parallel cross-entropy).
    loss_impl: str = "auto"
    transformer_impl: str = "local"  # local | transformer_engine (GPU, when installed)
    family: str = "llama"  # llama | qwen2 (query/key/value biases)
    rope_scaling: Optional[Dict[str, Any]] = None  # None | Llama-3.1's "llama3" parameters
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _check_choice("llm.family", self.family, LLM_FAMILIES)
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            _check(rope_type == "llama3", f"llm.rope_scaling.rope_type must be 'llama3' (the one "
                                          f"scaling supported); got {rope_type!r}")
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            _check(not missing, f"llm.rope_scaling (llama3) lacks {missing}")
            unknown = sorted(set(self.rope_scaling) - {"rope_type", *LLAMA3_ROPE_KEYS})
            _check(not unknown, f"llm.rope_scaling: unknown keys {unknown}")
            _check(self.rope_scaling["high_freq_factor"] > self.rope_scaling["low_freq_factor"] > 0
                   and self.rope_scaling["factor"] > 0,
                   f"llm.rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0; "
                   f"got {self.rope_scaling}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"llm.hidden_size ({self.hidden_size}) must be divisible by "
               f"llm.num_attention_heads ({self.num_attention_heads})")
        _check(self.num_attention_heads % self.num_query_groups == 0,
               f"llm.num_attention_heads ({self.num_attention_heads}) must be divisible by "
               f"llm.num_query_groups ({self.num_query_groups})")
        _check(self.transformer_impl in ("local", "transformer_engine"),
               f"llm.transformer_impl must be 'local' or 'transformer_engine', "
               f"got {self.transformer_impl!r}")
        _check_choice("llm.attention_impl", self.attention_impl, ATTENTION_IMPLS,
                      _RENAMED_ATTENTION_IMPLS)
        _check_choice("llm.loss_impl", self.loss_impl, TEXT_LOSS_IMPLS, _RENAMED_TEXT_LOSS_IMPLS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"


@dataclass
class VisionConfig:
    """A HuggingFace vision encoder (Dinov2 by default), built from a config or a local folder."""

    model_type: str = "dinov2"  # dinov2 | dinov2_with_registers | siglip | siglip2 | clip
    path: Optional[str] = None  # local HF folder; None: build from `hf_config` (random init)
    hf_config: Dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8,
    ))
    # The side (px) images are fed at; None: the encoder config's image_size. Another size runs
    # the same weights with position embeddings interpolated the way transformers does
    # (DINOv2-L's folder says 518; 224 gives 16 x 16 patches). A multiple of the patch size.
    image_size: Optional[int] = None
    feature_layer: int = -1  # which hidden state feeds the projector (-1: last; -2: penultimate)
    drop_cls_token: bool = True  # keep only patch tokens (LLaVA's "patch" feature selection)
    frozen: bool = True
    # Pixel normalisation the encoder was trained with; None: its family's default
    # (DINOv2: ImageNet; SigLIP, SigLIP2: 0.5/0.5; CLIP: OpenAI CLIP's), see vision.image_normalization.
    image_mean: Optional[List[float]] = None
    image_std: Optional[List[float]] = None

    def __post_init__(self):
        _check(self.model_type in ("dinov2", "dinov2_with_registers", "siglip", "siglip2", "clip"),
               f"vision.model_type must be dinov2, dinov2_with_registers, siglip, siglip2 or clip; "
               f"got {self.model_type!r}")
        _check(self.image_size is None or self.image_size > 0,
               f"vision.image_size must be a positive number of pixels; got {self.image_size}")


@dataclass
class ProjectorConfig:
    """The LLaVA projector: Linear -> GELU -> Linear from encoder width to LLM width."""

    frozen: bool = False


@dataclass
class SemanticGenConfig:
    """Semantic generation: regress the next visual embedding from the LLM's hidden state."""

    weight: float = 0.0  # 0 disables the objective (und-only)
    loss: str = "mse"  # mse | smooth_l1 | cosine (kernels.regression.LOSSES)
    target: str = "input_embedding"  # input_embedding | ema_input_embedding | encoder_output
    head: str = "linear"  # linear | mlp
    ema_decay: float = 0.999
    warmup_steps: int = 0  # the weight ramps linearly from 0 over this many steps
    loss_impl: str = "auto"  # head + loss (kernels/regression.py): auto | reference | fused | triton

    def __post_init__(self):
        _check_choice("semantic.loss", self.loss, regression.LOSSES)
        _check_choice("semantic.loss_impl", self.loss_impl, SEMANTIC_LOSS_IMPLS,
                      _RENAMED_SEMANTIC_LOSS_IMPLS)
        _check(self.target in ("input_embedding", "ema_input_embedding", "encoder_output"),
               f"semantic.target must be input_embedding, ema_input_embedding or "
               f"encoder_output; got {self.target!r}")
        _check(self.head in ("linear", "mlp"), f"semantic.head must be linear or mlp; got {self.head!r}")
        _check(0.0 <= self.ema_decay < 1.0, f"semantic.ema_decay must be in [0, 1); got {self.ema_decay}")
        _check(self.weight >= 0.0, f"semantic.weight must be >= 0; got {self.weight}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0.0


@dataclass
class PixelGenConfig:
    """Pixel generation (the paper's ablation arm): a MAR-style diffusion head on VAE latents.

    Position i (whose next position is visual) predicts the VAE latent token of position i+1,
    like the semantic head. ``routing`` decides whether the pixel gradient reaches the LLM:
    ``shared`` feeds the LLM hidden state straight to the denoiser (the setting the paper says
    hurts understanding); ``hetero`` feeds *detached* hidden states through a separate small
    modality decoder (``decoder_layers`` transformer layers) first, so no pixel gradient
    reaches the LLM.
    """

    weight: float = 0.0  # 0 disables the objective
    routing: str = "hetero"  # shared | hetero
    decoder_layers: int = 2  # hetero only: layers of the modality decoder
    decoder_heads: int = 4  # hetero only: attention heads of the modality decoder
    denoiser_width: int = 256  # MAR's SimpleMLPAdaLN width (MAR's default: 1024)
    denoiser_depth: int = 3  # residual AdaLN blocks (MAR's default: 3)
    num_diffusion_steps: int = 1000  # training noise levels (MAR: 1000, cosine)
    num_sampling_steps: int = 50  # DDIM steps at generation time
    noise_schedule: str = "cosine"  # cosine | linear
    prediction: str = "epsilon"  # epsilon | v
    diffusion_batch_mul: int = 4  # noise draws per token per step (MAR: 4)
    # Where the latent targets come from: "vae" encodes the batch's images on the last stage;
    # "batch" reads precomputed ``image_latents`` [n_img, T, C_lat] from the batch.
    latent_source: str = "vae"
    vae_path: Optional[str] = None  # local diffusers AutoencoderKL folder (never a hub id)
    vae_config: Dict[str, Any] = field(default_factory=lambda: dict(
        block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, sample_size=32,
        layers_per_block=1, norm_num_groups=8,
    ))
    vae_image_size: Optional[int] = None  # pixels fed to the VAE; None: the vision image size
    latent_channels: Optional[int] = None  # C_lat per token; None: derived from the VAE
    # Classifier-free guidance (MAR / LlamaGen): in training, with this probability per
    # document whose first image follows text, that text (the caption the image is generated
    # from: every token before the <image_start> right before the image, BOS excepted, see
    # model.documents_start_with_bos) is fed as ``null_token_id`` instead, so the model also learns the
    # image unconditionally; generation (generation/sample.py) guides with the same null
    # prompt. Drawn on the first stage from torch's default generator (seeded with the run's
    # seed, identical on its TP ranks, saved with the checkpoint's RNG states).
    cond_dropout: float = 0.0
    # The null condition's token: the tokenizer's <pad> id (never a target, and its embedding
    # row is otherwise untrained). Needed when cond_dropout > 0.
    null_token_id: Optional[int] = None

    def __post_init__(self):
        _check(self.weight >= 0.0, f"pixel.weight must be >= 0; got {self.weight}")
        _check(0.0 <= self.cond_dropout < 1.0,
               f"pixel.cond_dropout must be in [0, 1); got {self.cond_dropout}")
        _check(self.cond_dropout == 0.0 or self.null_token_id is not None,
               "pixel.null_token_id must be set when pixel.cond_dropout > 0 (the tokenizer's "
               "<pad> id: the null condition the caption is replaced with)")
        _check(self.routing in ("shared", "hetero"),
               f"pixel.routing must be shared or hetero; got {self.routing!r}")
        _check(self.noise_schedule in ("cosine", "linear"),
               f"pixel.noise_schedule must be cosine or linear; got {self.noise_schedule!r}")
        _check(self.prediction in ("epsilon", "v"),
               f"pixel.prediction must be epsilon or v; got {self.prediction!r}")
        _check(self.latent_source in ("vae", "batch"),
               f"pixel.latent_source must be vae or batch; got {self.latent_source!r}")
        _check(self.diffusion_batch_mul >= 1,
               f"pixel.diffusion_batch_mul must be >= 1; got {self.diffusion_batch_mul}")
        _check(self.num_diffusion_steps >= 2 and 1 <= self.num_sampling_steps <= self.num_diffusion_steps,
               f"pixel: need num_diffusion_steps >= 2 and 1 <= num_sampling_steps <= "
               f"num_diffusion_steps; got {self.num_diffusion_steps}, {self.num_sampling_steps}")
        _check(self.routing == "shared" or self.decoder_layers >= 1,
               f"pixel.decoder_layers must be >= 1 with routing=hetero; got {self.decoder_layers}")
        _check(self.latent_source == "vae" or self.latent_channels is not None,
               "pixel.latent_channels must be set when pixel.latent_source=batch")

    @property
    def enabled(self) -> bool:
        return self.weight > 0.0


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    semantic: SemanticGenConfig = field(default_factory=SemanticGenConfig)
    pixel: PixelGenConfig = field(default_factory=PixelGenConfig)
    image_token_id: int = 3
    # Whether each document starts with the tokenizer's BOS (data/tokenizer.py bos_ids: false
    # for a tokenizer without one, as Qwen2's). Condition dropout keeps that first position
    # and nulls the caption after it (pixel.cond_dropout); the importer sets it from the
    # tokenizer and the trainer checks it against the shards when cond_dropout > 0.
    documents_start_with_bos: bool = True
    freeze_llm: bool = False

    def __post_init__(self):
        _check(0 <= self.image_token_id < self.llm.vocab_size,
               f"model.image_token_id ({self.image_token_id}) must be a token id below "
               f"llm.vocab_size ({self.llm.vocab_size})")
        _check(self.pixel.null_token_id is None or 0 <= self.pixel.null_token_id < self.llm.vocab_size,
               f"model.pixel.null_token_id ({self.pixel.null_token_id}) must be a token id below "
               f"llm.vocab_size ({self.llm.vocab_size})")
        _check(self.pixel.null_token_id != self.image_token_id,
               f"model.pixel.null_token_id must not be model.image_token_id ({self.image_token_id})")
