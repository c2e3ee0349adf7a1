"""The vision encoder: a HuggingFace vision model (DINOv2 by default, DINOv2 with registers,
SigLIP, SigLIP2 or CLIP).

Built from a local folder (``from_pretrained`` with a path, never a hub id, never remote code)
or from a config dict for tests and tiny runs. The encoder is replicated on every rank that
needs it (it is small next to the LLM); it is frozen by default, as in the paper's setup.

``vision.image_size`` runs the encoder at another resolution than its config's (DINOv2-L is
released at 518 px; 224 px gives 256 patches instead of 1369) without touching its files: the
weights keep their shapes and transformers interpolates the position embeddings (bicubic, its
``interpolate_pos_encoding``; DINOv2 does it by itself for any input size, CLIP and SigLIP when
asked). Every count of image tokens (:func:`tokens_per_image`) and every image size reads
:func:`load_hf_vision_config`, which reports the run size.

SigLIP2 (``siglip2``: transformers' Siglip2VisionModel, the NaFlex releases) takes patches, not
images: ``pixel_values`` [n, N, C * p * p], a ``pixel_attention_mask`` and each image's
``spatial_shapes`` (patch rows, columns), and resizes its position-embedding grid to every
image by itself. Here it runs one fixed square grid at ``vision.image_size`` (default: its
``num_patches`` grid, sqrt(num_patches) x patch_size px): images are patchified as its image
processor does (``convert_image_to_patches``), every patch is real (mask of ones). Its
config has no ``image_size``: :func:`load_hf_vision_config` sets that size on it. The
fixed-resolution SigLIP2 releases are saved as ``siglip`` folders (SiglipVisionModel).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
from typing import Dict, Tuple

import torch
import transformers
from torch import nn

from megatron_unihetero.models.config import ConfigError, VisionConfig

_HF_CLASSES = {
    # model_type: (config class, model class, has a CLS token)
    "dinov2": ("Dinov2Config", "Dinov2Model", True),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", True),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel", False),
    "siglip2": ("Siglip2VisionConfig", "Siglip2VisionModel", False),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel", True),
}
# The config.json model_type of each family's vision-only folder.
HF_MODEL_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2_with_registers",
                  "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model",
                  "clip": "clip_vision_model"}
# Families whose forward needs ``interpolate_pos_encoding=True`` at a size other than their
# config's (CLIP raises, SigLIP fails on the shapes); DINOv2 always interpolates when the
# patch grid differs.
_NEEDS_INTERPOLATE_FLAG = {"dinov2": False, "dinov2_with_registers": False, "siglip": True,
                           "siglip2": False, "clip": True}
# Where each family's position embeddings live: (embeddings module path in the HF vision
# model, embeddings class (module, name), position parameter in that module).
_POSITION_EMBEDDINGS = {
    "dinov2": ("embeddings", ("dinov2.modeling_dinov2", "Dinov2Embeddings"), "position_embeddings"),
    "dinov2_with_registers": ("embeddings", ("dinov2_with_registers.modeling_dinov2_with_registers",
                                             "Dinov2WithRegistersEmbeddings"), "position_embeddings"),
    "siglip": ("embeddings", ("siglip.modeling_siglip", "SiglipVisionEmbeddings"),
               "position_embedding.weight"),
    "clip": ("embeddings", ("clip.modeling_clip", "CLIPVisionEmbeddings"),
             "position_embedding.weight"),
}


def _hf_classes(model_type: str):
    config_name, model_name, has_cls = _HF_CLASSES[model_type]
    return getattr(transformers, config_name), getattr(transformers, model_name), has_cls


# The normalisation each encoder family was pretrained with (its HF image processor's defaults).
_FAMILY_NORMALIZATION = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "dinov2_with_registers": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def image_normalization(config: VisionConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) in [0, 1] units that images are normalised with before the encoder."""
    mean, std = _FAMILY_NORMALIZATION[config.model_type]
    return tuple(config.image_mean or mean), tuple(config.image_std or std)


def native_hf_vision_config(config: VisionConfig):
    """The encoder's HF config as its folder (or ``hf_config``) says: the shapes of its weights."""
    config_cls, _, _ = _hf_classes(config.model_type)
    if config.path is None:
        return config_cls(**config.hf_config)
    if not os.path.isdir(config.path):
        raise ConfigError(f"vision.path {config.path!r} is not a local folder")
    return config_cls.from_pretrained(config.path)


def _siglip2_grid_size(hf) -> int:
    """SigLIP2's native square size: its ``num_patches`` position grid, in pixels."""
    side = math.isqrt(hf.num_patches)
    if side * side != hf.num_patches:
        raise ConfigError(f"SigLIP2 num_patches={hf.num_patches} is not a square grid")
    return side * hf.patch_size


def load_hf_vision_config(config: VisionConfig):
    """The HF config of the encoder *as this model runs it*: the native config with
    ``image_size`` replaced by ``vision.image_size`` when that is set. Everything that sizes
    images or counts image tokens reads this; only the weights keep the native shapes."""
    hf = native_hf_vision_config(config)
    if config.model_type == "siglip2":  # no image_size of its own (module docstring)
        hf = copy.deepcopy(hf)
        hf.image_size = _siglip2_grid_size(hf)
    if config.image_size is None or config.image_size == hf.image_size:
        return hf
    if config.image_size % hf.patch_size:
        where = config.path or "vision.hf_config"
        raise ConfigError(f"vision.image_size={config.image_size} is not a multiple of the "
                          f"encoder's patch_size={hf.patch_size} ({where})")
    hf = copy.deepcopy(hf)
    hf.image_size = config.image_size
    return hf


def extra_tokens(model_type: str, hf) -> int:
    """Tokens besides the patches and the CLS that the encoder outputs (DINOv2's registers)."""
    return int(hf.num_register_tokens) if model_type == "dinov2_with_registers" else 0


def tokens_per_image(config: VisionConfig) -> int:
    """How many LLM positions one image takes: the patches, the registers (DINOv2 with
    registers: they sit between CLS and the patches, so dropping the CLS keeps them, as
    Llava's "default" feature selection does), plus the CLS if kept."""
    hf = load_hf_vision_config(config)
    has_cls = _HF_CLASSES[config.model_type][2]
    return ((hf.image_size // hf.patch_size) ** 2 + extra_tokens(config.model_type, hf)
            + int(has_cls and not config.drop_cls_token))


def position_embeddings_at_run_size(config: VisionConfig, vision_state: Dict[str, torch.Tensor]
                                    ) -> Dict[str, torch.Tensor]:
    """The HF vision model's state (its own names) with the position embeddings replaced by
    the ones transformers computes at ``vision.image_size`` (its family's own
    ``interpolate_pos_encoding``): a model built from :func:`load_hf_vision_config` then runs
    natively, without interpolating, exactly as the native model does at that size. The
    export uses it (Llava cannot pass ``interpolate_pos_encoding`` to its tower)."""
    native, run = native_hf_vision_config(config), load_hf_vision_config(config)
    if config.model_type == "siglip2":
        raise ConfigError("SigLIP2 resizes its position embeddings per image itself; it has no "
                          "fixed-size table to write (hf/siglip2.py writes the SigLIP tower it "
                          "equals at one grid)")
    if native.image_size == run.image_size:
        return dict(vision_state)
    prefix, (module, name), param = _POSITION_EMBEDDINGS[config.model_type]
    embeddings = getattr(importlib.import_module(f"transformers.models.{module}"), name)(native)
    own = {k[len(prefix) + 1:]: v for k, v in vision_state.items() if k.startswith(prefix + ".")}
    embeddings.load_state_dict(own)  # strict: every tensor of the embeddings is there
    has_cls = _HF_CLASSES[config.model_type][2]
    positions = (run.image_size // run.patch_size) ** 2 + int(has_cls)
    with torch.no_grad():
        dummy = torch.zeros(1, positions, native.hidden_size, dtype=own[param].dtype)
        table = embeddings.interpolate_pos_encoding(dummy, run.image_size, run.image_size)
    key = f"{prefix}.{param}"
    out = dict(vision_state)
    out[key] = table.reshape(vision_state[key].shape[:-2] + table.shape[-2:]).contiguous()
    return out


class VisionEncoder(nn.Module):
    """Images [n, 3, H, W] -> patch features [n, tokens_per_image, encoder_dim]."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        _, model_cls, self.has_cls_token = _hf_classes(config.model_type)
        # The weights keep the folder's shapes; images of vision.image_size are run with
        # interpolated position embeddings (transformers' own interpolate_pos_encoding).
        hf_config = native_hf_vision_config(config)
        if config.path is not None:
            self._check_folder_type(hf_config, config.path)
            self.model = model_cls.from_pretrained(config.path, config=hf_config)
        else:
            self.model = model_cls(hf_config)
        hf = self.model.config
        self.image_size = load_hf_vision_config(config).image_size
        self.patch_size = hf.patch_size
        self.hidden_size = hf.hidden_size
        self._forward_kwargs = ({"interpolate_pos_encoding": True}
                                if _NEEDS_INTERPOLATE_FLAG[config.model_type]
                                and self.image_size != hf.image_size else {})
        if config.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def _check_folder_type(self, hf_config, path: str) -> None:
        model_type = hf_config.model_type
        if model_type not in (HF_MODEL_TYPES[self.config.model_type], self.config.model_type):
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
            inputs = (self._naflex_inputs(images) if self.config.model_type == "siglip2"
                      else {"pixel_values": images})
            out = self.model(**inputs, output_hidden_states=True, **self._forward_kwargs)
            features = out.hidden_states[self.config.feature_layer]
            if self.has_cls_token and self.config.drop_cls_token:
                features = features[:, 1:]
        return features

    def _naflex_inputs(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """SigLIP2's inputs for images [n, C, S, S] on one square grid: patches [n, N, p*p*C]
        in its image processor's order (row-major patches, each patch's pixels row-major with
        the channels last), every patch real, every image ``(S / p, S / p)`` patches."""
        n, channels, height, width = images.shape
        p = self.patch_size
        rows, cols = height // p, width // p
        patches = images.reshape(n, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
        patches = patches.reshape(n, rows * cols, p * p * channels)
        return {"pixel_values": patches,
                "pixel_attention_mask": torch.ones(n, rows * cols, dtype=torch.int32, device=images.device),
                "spatial_shapes": torch.tensor([[rows, cols]] * n, dtype=torch.long, device=images.device)}
