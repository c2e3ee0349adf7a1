"""A SigLIP2 (NaFlex) tower at its one fixed square grid, written as a SigLIP tower.

transformers' Llava calls its vision tower with ``pixel_values`` only, so a
``Siglip2VisionModel`` (which also needs ``pixel_attention_mask`` and ``spatial_shapes``)
cannot be its tower. At the fixed grid our encoder runs it at (models/vision.py: every image
``g x g`` patches, every patch real) it computes exactly what a ``SiglipVisionModel`` of
``image_size = g * patch_size`` computes, given:

* the patch embedding as a ``Conv2d``: Siglip2's ``Linear`` over a patch flattened as
  (row, column, channel) (its image processor's ``convert_image_to_patches``, and
  models/vision.py's ``_naflex_inputs``) is reordered to the conv's [D, C, p, p];
* the position embeddings at ``g x g``: Siglip2 resizes its ``num_patches`` grid to each
  image (``resize_positional_embeddings``, bilinear with antialias); that resize, done once
  here by transformers' own function, is the ``g * g``-row table SigLIP adds by position;
* everything else by the same names and shapes (encoder layers, post_layernorm, the
  pooling head). The all-ones attention mask changes nothing: the encoder's bidirectional
  mask of an unpadded row masks nothing, and SigLIP runs without one.

The export (hf/export.py) writes such a tower; re-importing that export gives a ``siglip``
model, the same function.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
from transformers import SiglipVisionConfig
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

from megatron_unihetero.models.config import VisionConfig
from megatron_unihetero.models.vision import load_hf_vision_config, native_hf_vision_config

PATCH_EMBEDDING = "embeddings.patch_embedding.weight"
POSITION_EMBEDDING = "embeddings.position_embedding.weight"


def siglip_vision_config(vision: VisionConfig) -> SiglipVisionConfig:
    """The SiglipVisionConfig of a siglip2 encoder at the size this model runs it."""
    run = load_hf_vision_config(vision)
    fields = {k: v for k, v in run.to_dict().items()
              if k not in ("model_type", "architectures", "_name_or_path", "num_patches",
                           "transformers_version")}
    fields["image_size"] = run.image_size  # set by load_hf_vision_config: the run grid in px
    return SiglipVisionConfig(**fields)


def siglip2_state_as_siglip(vision: VisionConfig, state: Dict[str, torch.Tensor]
                            ) -> Dict[str, torch.Tensor]:
    """A Siglip2VisionModel's state (its own names) -> a SiglipVisionModel's at the run grid
    (:func:`siglip_vision_config`)."""
    native, run = native_hf_vision_config(vision), load_hf_vision_config(vision)
    p, channels = native.patch_size, native.num_channels
    out = dict(state)
    linear = state[PATCH_EMBEDDING]  # [D, p * p * C], input index (row * p + col) * C + c
    out[PATCH_EMBEDDING] = linear.reshape(-1, p, p, channels).permute(0, 3, 1, 2).contiguous()
    side = math.isqrt(native.num_patches)  # a square grid (load_hf_vision_config checked it)
    grid = run.image_size // p
    table = state[POSITION_EMBEDDING]
    with torch.no_grad():
        resized = Siglip2VisionEmbeddings.resize_positional_embeddings(
            table.reshape(side, side, -1), torch.tensor([[grid, grid]]), max_length=grid * grid)
    out[POSITION_EMBEDDING] = resized[0].contiguous()
    return out
