"""Model FLOPs per step, for MFU (the formula every figure in the logs uses).

A matmul of an [n, k] input with a [k, m] weight costs 2nkm in the forward; its backward costs
2nkm for the weight gradient (when the weight trains) and 2nkm for the input gradient (when
something before it needs one). So a trained layer inside the network costs 6 x params per
token, the first trained layer after frozen inputs 4 x, a frozen module run forward only 2 x.
Per micro-batch, with T the batch's (non-padding) tokens:

* LLM matmuls: 6 x P_llm x T, P_llm = the decoder's linear weights (QKV, output projection,
  SwiGLU's three matrices per layer) + the LM head; the embedding lookup is free.
* LLM attention (QK^T and AV), causal within each packed document of length n:
  6 x L x h x sum(n^2) (2 matmuls x 2 FLOPs x n^2 x h / 2 for causality, x 3 for fwd+bwd):
  the work of a causal varlen kernel, not of a dense mask.
* Vision encoder, per image (all its layers run, whichever ``feature_layer`` is read): the
  patch embedding, 4 d^2 + 2 d f weights per token and layer, and full (bidirectional)
  attention 4 x T_enc^2 x d per layer; x 1 when frozen, x 3 when trained. On the last
  stage of a pipeline with semantic generation the encoder runs again (it recomputes the
  targets: models/stage_plan.py), forward only, and so does the target projector where the
  stage plan keeps one (a mirror at PP > 1, an EMA copy).
* Projector (two linears) on every image token, and the semantic head on every semantic
  position.
* Pixel head on the semantic positions: the hetero routing's modality decoder (dense
  transformer layers over the whole rows, their masked attention computed in full, as the
  module does) and the denoiser on ``diffusion_batch_mul`` noisy copies of each position.
  Not counted: the VAE's encoding of the target latents (a frozen convolutional network
  that prepares targets, like the data pipeline) and elementwise work (norms, activations,
  softmax).

Recomputed activations (``train.recompute``) are not model FLOPs and are not counted.
MFU = achieved FLOP/s / peak FLOP/s. The peak is a setting (H100 SXM dense bf16: 989 TFLOP/s);
on CPU there is no meaningful peak and MFU is not reported.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_unihetero.models.config import ModelConfig
from megatron_unihetero.models.stage_plan import StagePlan
from megatron_unihetero.models.vae import PixelVAE, latent_token_dim, vision_grid
from megatron_unihetero.models.vision import image_normalization, load_hf_vision_config, tokens_per_image


def llm_matmul_params(cfg: ModelConfig) -> int:
    llm = cfg.llm
    h, f, heads, groups = llm.hidden_size, llm.ffn_hidden_size, llm.num_attention_heads, llm.num_query_groups
    d = llm.head_dim
    per_layer = h * (heads + 2 * groups) * d + heads * d * h + 3 * h * f
    return llm.num_layers * per_layer + h * llm.vocab_size


def vision_forward_flops(cfg: ModelConfig) -> tuple:
    """(forward FLOPs of the encoder on one image, of which the patch embedding's): a ViT
    (DINOv2, SigLIP, CLIP) of ``num_hidden_layers`` layers over its patches and CLS token."""
    hf = load_hf_vision_config(cfg.vision)
    d, layers = hf.hidden_size, hf.num_hidden_layers
    if cfg.vision.model_type in ("dinov2", "dinov2_with_registers"):
        # DINOv2 sizes its MLP by mlp_ratio (its config's intermediate_size is unused); the
        # giant model's SwiGLU has three matrices of a 2/3 width rounded up to 8.
        f = int(d * hf.mlp_ratio)
        mlp_weights = 3 * d * ((int(f * 2 / 3) + 7) // 8 * 8) if hf.use_swiglu_ffn else 2 * d * f
    else:
        mlp_weights = 2 * d * hf.intermediate_size
    patches = (hf.image_size // hf.patch_size) ** 2
    has_cls = cfg.vision.model_type in ("dinov2", "clip")
    seq = patches + int(has_cls)
    patch_embedding = 2.0 * patches * hf.num_channels * hf.patch_size ** 2 * d
    per_layer = 2.0 * seq * (4 * d * d + mlp_weights) + 4.0 * seq * seq * d
    return patch_embedding + layers * per_layer, patch_embedding


def flop_terms(cfg: ModelConfig, pipeline_parallel: int = 1) -> dict:
    """What :func:`step_flops` needs besides the batch, from the config alone (every rank
    agrees, whatever pipeline stage it holds)."""
    vision, patch_embedding = vision_forward_flops(cfg)
    d_enc, d = load_hf_vision_config(cfg.vision).hidden_size, cfg.llm.hidden_size
    last = StagePlan.build(cfg, pre_process=pipeline_parallel == 1, post_process=True)
    semantic = cfg.semantic
    head_weights = 0
    if semantic.enabled:
        target_dim = d_enc if semantic.target == "encoder_output" else d
        head_weights = d * target_dim + (d * d if semantic.head == "mlp" else 0)
    return dict(
        vision_flops=vision, vision_patch_flops=patch_embedding,
        vision_trainable=not cfg.vision.frozen,
        # The last stage's own encoder run (it recomputes the semantic targets) at PP > 1.
        vision_copy=last.vision and not last.pre_process,
        target_projector=last.target_projector is not None,
        projector_weights=(d_enc * d, d * d), projector_trainable=not cfg.projector.frozen,
        head_weights=head_weights, pixel=cfg.pixel.enabled,
    )


def _pixel_flops(cfg: ModelConfig, tokens: int, rows: int, seq: int, semantic_positions: int,
                 latent_dim: int) -> float:
    """Forward + backward of the pixel head (see the module docstring)."""
    pixel, h = cfg.pixel, cfg.llm.hidden_size
    flops = 0.0
    if pixel.routing == "hetero":
        # in_proj 3h^2, out_proj h^2, the 4h feed-forward 8h^2. The input is detached, but
        # the first pre-norm's affine weight trains: every matmul has its input gradient.
        weights = 12 * h * h
        flops += pixel.decoder_layers * (6.0 * weights * tokens + 3 * 4.0 * rows * seq * seq * h)
    width, depth, c = pixel.denoiser_width, pixel.denoiser_depth, latent_dim
    weights = c * width + 2 * width * width + h * width + depth * 5 * width * width \
        + 2 * width * width + width * c
    # The noisy latent and the timestep's sinusoid need no gradient: input_proj and the first
    # time_embed linear have none for their input.
    draws = pixel.diffusion_batch_mul * semantic_positions
    flops += draws * (6.0 * weights - 2.0 * c * width - 2.0 * width * width)
    return flops


def step_flops(cfg: ModelConfig, batch: Mapping[str, torch.Tensor], *, vision_flops: float,
               vision_patch_flops: float, vision_trainable: bool, vision_copy: bool,
               target_projector: bool, projector_weights: tuple, projector_trainable: bool,
               head_weights: int, pixel: bool) -> float:
    """Model FLOPs of forward + backward over one micro-batch (packing-aware attention)."""
    segment_ids, tokens_bs = batch["segment_ids"], batch["tokens"]
    valid = segment_ids >= 0
    tokens = int(valid.sum())
    doc_sq = 0
    for row in segment_ids:
        _, counts = torch.unique_consecutive(row[row >= 0], return_counts=True)
        doc_sq += int((counts.long() ** 2).sum())
    visual = (tokens_bs == cfg.image_token_id) & valid
    # Positions whose next position is visual, in the same document (interleaver.semantic_positions).
    semantic_positions = int((visual[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])).sum())
    images, features = batch.get("images"), batch.get("image_features")
    n_images = int((images if features is None else features).shape[0]) \
        if images is not None or features is not None else 0
    image_tokens = n_images * tokens_per_image(cfg.vision)
    llm = cfg.llm

    # A frozen LLM still backpropagates to its input when a module before it trains (the
    # projector, or the encoder on pixels): no weight gradients then, the input gradients
    # (attention's included) all the same; with nothing before it training, forward only.
    inputs_train = projector_trainable or (vision_trainable and features is None)
    llm_factor = 6.0 if not cfg.freeze_llm else (4.0 if inputs_train else 2.0)
    flops = llm_factor * llm_matmul_params(cfg) * tokens
    attention_factor = 6.0 if not cfg.freeze_llm or inputs_train else 2.0
    flops += attention_factor * llm.num_layers * llm.hidden_size * doc_sq
    if features is None and n_images:  # the encoder runs on pixels, not on given features
        if vision_trainable:  # the pixels need no gradient: the patch embedding has no dgrad
            flops += n_images * (3.0 * vision_flops - vision_patch_flops)
        else:
            flops += n_images * vision_flops
        if vision_copy:
            flops += n_images * vision_flops
    encoder_grad = vision_trainable and features is None
    fc1, fc2 = projector_weights
    flops += 2.0 * (fc1 + fc2) * image_tokens  # forward
    if projector_trainable:
        flops += 2.0 * (fc1 + fc2) * image_tokens  # weight gradients
    if projector_trainable or encoder_grad:
        flops += 2.0 * fc2 * image_tokens  # fc2's input gradient (fc1's weight, or beyond)
    if encoder_grad:
        flops += 2.0 * fc1 * image_tokens
    if target_projector:
        flops += 2.0 * (fc1 + fc2) * image_tokens
    flops += 6.0 * head_weights * semantic_positions
    if pixel:
        latent_dim = batch["image_latents"].shape[-1] if "image_latents" in batch else _latent_dim(cfg)
        rows, seq = tokens_bs.shape
        flops += _pixel_flops(cfg, tokens, rows, seq, semantic_positions, latent_dim)
    return flops


def _latent_dim(cfg: ModelConfig) -> int:
    """Values per latent token of the pixel objective (its VAE built on the meta device)."""
    if cfg.pixel.latent_channels is not None:
        return cfg.pixel.latent_channels
    hf = load_hf_vision_config(cfg.vision)
    with torch.device("meta"):
        vae = PixelVAE(cfg.pixel, vision_grid(tokens_per_image(cfg.vision)), hf.image_size,
                       *image_normalization(cfg.vision))
    return latent_token_dim(cfg.pixel, vae)
