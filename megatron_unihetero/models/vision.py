"""The vision encoder: a HuggingFace vision model (DINOv2 by default, SigLIP or CLIP).

Built from a local folder (``from_pretrained`` with a path, never a hub id, never remote code)
or from a config dict for tests and tiny runs. The encoder is replicated on every rank that
needs it (it is small next to the LLM); it is frozen by default, as in the paper's setup.
"""

from __future__ import annotations

import os
from typing import Tuple

import torch
import transformers
from torch import nn

from megatron_unihetero.models.config import ConfigError, VisionConfig

_HF_CLASSES = {
    # model_type: (config class, model class, has a CLS token)
    "dinov2": ("Dinov2Config", "Dinov2Model", True),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", False),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", True),
}


def _hf_classes(model_type: str):
    config_name, model_name, has_cls = _HF_CLASSES[model_type]
    return getattr(transformers, config_name), getattr(transformers, model_name), has_cls


# The normalisation each encoder family was pretrained with (its HF image processor's defaults).
_FAMILY_NORMALIZATION = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def image_normalization(config: VisionConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) in [0, 1] units that images are normalised with before the encoder."""
    mean, std = _FAMILY_NORMALIZATION[config.model_type]
    return tuple(config.image_mean or mean), tuple(config.image_std or std)


def load_hf_vision_config(config: VisionConfig):
    """The HF config of the encoder (from its local folder, or built from ``hf_config``)."""
    config_cls, _, _ = _hf_classes(config.model_type)
    if config.path is None:
        return config_cls(**config.hf_config)
    if not os.path.isdir(config.path):
        raise ConfigError(f"vision.path {config.path!r} is not a local folder")
    return config_cls.from_pretrained(config.path)


def tokens_per_image(config: VisionConfig) -> int:
    """How many LLM positions one image takes (patch tokens, plus CLS if kept)."""
    hf = load_hf_vision_config(config)
    has_cls = _HF_CLASSES[config.model_type][2]
    return (hf.image_size // hf.patch_size) ** 2 + int(has_cls and not config.drop_cls_token)


class VisionEncoder(nn.Module):
    """Images [n, 3, H, W] -> patch features [n, tokens_per_image, encoder_dim]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        _, model_cls, self.has_cls_token = _hf_classes(config.model_type)
        hf_config = load_hf_vision_config(config)
        if config.path is not None:
            self._check_folder_type(hf_config, config.path)
            self.model = model_cls.from_pretrained(config.path, config=hf_config)
        else:
            self.model = model_cls(hf_config)
        hf = self.model.config
        self.image_size = hf.image_size
        self.patch_size = hf.patch_size
        self.hidden_size = hf.hidden_size
        if config.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def _check_folder_type(self, hf_config, path: str) -> None:
        model_type = getattr(hf_config, "model_type", None)
        expected = {"dinov2": "dinov2", "siglip": "siglip_vision_model", "clip": "clip_vision_model"}
        if model_type not in (expected[self.config.model_type], self.config.model_type):
            raise ConfigError(
                f"vision.path {path!r} holds a {model_type!r} model, but vision.model_type is "
                f"{self.config.model_type!r}"
            )

    @property
    def tokens_per_image(self) -> int:
        return tokens_per_image(self.config)

    @property
    def expected_image_shape(self) -> Tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.frozen:
            self.model.eval()  # a frozen encoder stays in eval mode (dropout off)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.expected_image_shape:
            raise ValueError(
                f"images must have shape [n, {', '.join(map(str, self.expected_image_shape))}] "
                f"for this vision encoder; got {list(images.shape)}"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.frozen):
            out = self.model(pixel_values=images, output_hidden_states=True)
            features = out.hidden_states[self.config.feature_layer]
            if self.has_cls_token and self.config.drop_cls_token:
                features = features[:, 1:]
        return features
