"""Model FLOPs per step, for MFU (the formula every figure in the logs uses).

Per training step, with forward = 2 x params x tokens and backward = 2 x forward:

* LLM matmuls: 6 x P_llm x T_tokens, P_llm = the decoder's linear weights (QKV, output
  projection, SwiGLU's three matrices per layer) + the LM head; the embedding lookup is free.
* Attention scores (QK^T and AV), causal within each packed document of length n:
  6 x L x h x sum(n^2)  (2 matmuls x 2 FLOPs x n^2 x h / 2 for causality, x 3 for fwd+bwd).
* Vision encoder: 2 x P_vis per patch token when frozen (forward only), 6 x P_vis if trained.
* Projector (6 x P_proj per visual token) and semantic head (6 x P_head per semantic position).

MFU = achieved FLOP/s / peak FLOP/s. The peak is a setting (H100 SXM dense bf16: 989 TFLOP/s);
on CPU there is no meaningful peak and MFU is not reported.
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_unihetero.models.config import ModelConfig
from megatron_unihetero.models.vision import VisionEncoder, load_hf_vision_config, tokens_per_image


def llm_matmul_params(cfg: ModelConfig) -> int:
    llm = cfg.llm
    h, f, heads, groups = llm.hidden_size, llm.ffn_hidden_size, llm.num_attention_heads, llm.num_query_groups
    d = llm.head_dim
    per_layer = h * (heads + 2 * groups) * d + heads * d * h + 3 * h * f
    return llm.num_layers * per_layer + h * llm.vocab_size


def step_flops(cfg: ModelConfig, batch: Mapping[str, torch.Tensor], vision_params: int,
               vision_tokens_per_image: int, projector_params: int, head_params: int,
               vision_trainable: bool) -> float:
    """FLOPs of forward + backward over one micro-batch (packing-aware attention term)."""
    segment_ids = batch["segment_ids"]
    valid = segment_ids >= 0
    tokens = int(valid.sum())
    doc_sq = 0
    for row in segment_ids:
        _, counts = torch.unique(row[row >= 0], return_counts=True)
        doc_sq += int((counts.long() ** 2).sum())
    visual = int(((batch["tokens"] == cfg.image_token_id) & valid).sum())
    images = batch.get("images")
    n_images = int(images.shape[0]) if images is not None else 0
    flops = 6.0 * llm_matmul_params(cfg) * tokens
    flops += 6.0 * cfg.llm.num_layers * cfg.llm.hidden_size * doc_sq
    flops += (6.0 if vision_trainable else 2.0) * vision_params * n_images * vision_tokens_per_image
    flops += 6.0 * projector_params * visual + 6.0 * head_params * visual
    return flops


def flop_terms(cfg: ModelConfig) -> dict:
    """The non-LLM parameter counts :func:`step_flops` needs, from the config alone (every
    rank agrees, whatever pipeline stage it holds)."""
    with torch.device("meta"):
        vision_params = sum(p.numel() for p in VisionEncoder(cfg.vision).parameters())
    d_enc, d = load_hf_vision_config(cfg.vision).hidden_size, cfg.llm.hidden_size
    projector_params = d_enc * d + d + d * d + d
    head_params = 0
    if cfg.semantic.enabled:
        target_dim = d_enc if cfg.semantic.target == "encoder_output" else d
        head_params = d * target_dim + target_dim + ((d * d + d) if cfg.semantic.head == "mlp" else 0)
    return dict(vision_params=vision_params, projector_params=projector_params,
                head_params=head_params, vision_tokens_per_image=tokens_per_image(cfg.vision),
                vision_trainable=not cfg.vision.frozen)
