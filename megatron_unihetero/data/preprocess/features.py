"""Frozen vision-encoder features (``--precompute-features --vision-model LOCAL_DIR``).

With a frozen encoder, its output per image never changes during training, so computing it once
here saves the encoder forward in every epoch. The stored feature of an image is the model's
``last_hidden_state`` ``[tokens, dim]`` (CLS + patches for Dinov2/CLIP, patches for SigLIP),
as float16.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple

import numpy as np

# torch and transformers are imported where used: the preprocessing workers import this module,
# and only a run with --precompute-features needs them.

# model_type in config.json -> transformers class holding the vision tower only
_VISION_CLASSES = {
    "dinov2": "Dinov2Model",
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _normalisation(folder: str) -> Tuple[List[float], List[float]]:
    """The model's mean/std from its preprocessor_config.json, else the ImageNet values."""
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.exists(path):
        with open(path) as f:
            cfg = json.load(f)
        if "image_mean" in cfg and "image_std" in cfg:
            return list(cfg["image_mean"]), list(cfg["image_std"])
    return list(_IMAGENET[0]), list(_IMAGENET[1])


class FeatureExtractor:
    """Runs a frozen HF vision model from a local folder on batches of uint8 images."""

    def __init__(self, folder: str, image_size: int, num_threads: int = 0) -> None:
        import torch
        import transformers

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--vision-model {folder!r} is not a local folder (hub ids are not downloaded)")
        if num_threads:
            torch.set_num_threads(num_threads)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        cls_name = _VISION_CLASSES.get(config.model_type)
        if cls_name is None:
            raise ValueError(f"{folder}: model_type {config.model_type!r} is not supported; use one of {sorted(_VISION_CLASSES)}")
        model_cls = getattr(transformers, cls_name)
        self.model = model_cls.from_pretrained(folder, local_files_only=True, trust_remote_code=False).eval()
        vcfg = getattr(config, "vision_config", config)
        if config.model_type != "dinov2" and vcfg.image_size != image_size:
            # CLIP/SigLIP position embeddings are fixed-size: a mismatch would be silently
            # interpolated (or fail) and the features would not match what the model saw in training.
            raise ValueError(f"{folder}: the model expects {vcfg.image_size}px images but --image-size is {image_size}")
        mean, std = _normalisation(folder)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.folder = folder
        self.model_type = config.model_type

    def __call__(self, images: List[np.ndarray]) -> np.ndarray:
        """float16 ``[n, tokens, dim]`` for uint8 ``[S, S, 3]`` images."""
        import torch

        if not images:
            return np.zeros((0, 0, 0), dtype=np.float16)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        with torch.no_grad():
            out = self.model(pixel_values=x).last_hidden_state
        return out.to(torch.float16).numpy()

    def metadata(self) -> Dict[str, Any]:
        return {"vision_model": os.path.abspath(self.folder), "vision_model_type": self.model_type,
                "feature_source": "last_hidden_state"}
