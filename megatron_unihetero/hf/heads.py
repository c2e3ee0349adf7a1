"""The UniHetero generation heads next to an exported LlavaForConditionalGeneration.

LlavaForConditionalGeneration has no place for the semantic-generation head (nor the pixel
head, nor the EMA target projector), so the exporter writes them beside it:

    HF_DIR/unihetero_heads.safetensors   the tensors, under their names in our model
                                         (semantic_head.*, pixel_head.*, target_projector.*, ...)
    HF_DIR/unihetero_heads.json          what is needed to rebuild them (see save_heads)

Usage (no trust_remote_code; the heads are plain torch modules from this package)::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from megatron_unihetero.hf.heads import load_unihetero_heads

    model = LlavaForConditionalGeneration.from_pretrained(HF_DIR)
    processor = AutoProcessor.from_pretrained(HF_DIR)
    heads = load_unihetero_heads(HF_DIR)
    # a prompt written by hand brings its own BOS <s> (apply_chat_template writes it for you;
    # a tokenizer without BOS, as Qwen2's, starts the prompt with its text)
    inputs = processor(text="<s><image> a red circle", images=image, return_tensors="pt")
    hidden = model.model(**inputs).last_hidden_state       # after the final RMSNorm
    next_visual = heads(hidden)                             # [B, S, target_dim]

``next_visual[:, i]`` is the prediction, made at position i, of the visual embedding at
position i+1: the projector output there (``target == "input_embedding"``), the EMA projector's
(``ema_input_embedding``) or the encoder feature (``encoder_output``), as trained.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from megatron_unihetero import config_io
from megatron_unihetero.models.config import ModelConfig, PixelGenConfig
from megatron_unihetero.models.heads import SemanticHead
from megatron_unihetero.models.pixel import PixelHead
from megatron_unihetero.models.projector import Projector

HEADS_WEIGHTS = "unihetero_heads.safetensors"
HEADS_CONFIG = "unihetero_heads.json"
FORMAT_VERSION = 1


def save_heads(folder: str, heads_state: Dict[str, torch.Tensor], model: ModelConfig) -> None:
    """Write the heads file pair (nothing when the model has no head tensors)."""
    if not heads_state:
        return
    meta: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "hidden_size": model.llm.hidden_size,
        "image_token_id": model.image_token_id,
        "semantic": config_io.to_dict(model.semantic),
        "pixel": config_io.to_dict(model.pixel),
        "modules": sorted({name.split(".", 1)[0] for name in heads_state}),
    }
    if "semantic_head.proj.weight" in heads_state:
        meta["semantic_target_dim"] = int(heads_state["semantic_head.proj.weight"].shape[0])
    save_file({k: v.contiguous() for k, v in heads_state.items()}, os.path.join(folder, HEADS_WEIGHTS))
    with open(os.path.join(folder, HEADS_CONFIG), "w") as handle:
        json.dump(meta, handle, indent=1)


class UniHeteroHeads(nn.Module):
    """The generation heads of one exported model.

    ``forward(hidden)`` returns the semantic head's prediction of the next visual embedding.
    ``pixel_head`` (a MAR-style diffusion head, models/pixel.py) and ``target_projector``
    (the EMA projector that made the semantic targets) are attributes when the model had them.
    """

    def __init__(self, meta: Dict[str, Any]):
        super().__init__()
        self.meta = meta
        self.semantic_head: Optional[nn.Module] = None
        self.pixel_head: Optional[nn.Module] = None
        modules = set(meta["modules"])
        if "semantic_head" in modules:
            self.semantic_head = SemanticHead(meta["hidden_size"], meta["semantic_target_dim"],
                                              meta["semantic"]["head"])
        if "target_projector" in modules:
            self.target_projector = Projector(meta["target_projector_in"], meta["hidden_size"])
        if "pixel_head" in modules:
            pixel = config_io.from_dict(PixelGenConfig, meta["pixel"])
            self.pixel_head = PixelHead(pixel, meta["hidden_size"], meta["pixel_token_dim"])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.semantic_head is None:
            raise RuntimeError("this model was trained without a semantic head")
        return self.semantic_head(hidden)


def load_unihetero_heads(folder: str, map_location: str = "cpu") -> UniHeteroHeads:
    """The heads saved beside an exported Llava model in ``folder`` (see the module docstring)."""
    config_path = os.path.join(folder, HEADS_CONFIG)
    weights_path = os.path.join(folder, HEADS_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: {folder!r} holds no UniHetero heads (the "
                                    f"model was exported without them, or is not an export)")
    with open(config_path) as handle:
        meta = json.load(handle)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}")
    state = load_file(weights_path, device=map_location)
    # Shapes the config does not spell out are read off the tensors.
    if "target_projector.linear_fc1.weight" in state:
        meta["target_projector_in"] = int(state["target_projector.linear_fc1.weight"].shape[1])
    if "pixel_head.denoiser.input_proj.weight" in state:
        meta["pixel_token_dim"] = int(state["pixel_head.denoiser.input_proj.weight"].shape[1])
    heads = UniHeteroHeads(meta)
    own = {k: v for k, v in state.items() if not k.startswith("pixel_vae.")}
    missing, unexpected = heads.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_path} does not fit {config_path}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    # The frozen VAE (pixel objective) is kept in the file for decoding latents to images; it
    # is rebuilt with models.vae.PixelVAE from meta["pixel"] when needed.
    heads.pixel_vae_state = {k[len("pixel_vae."):]: v for k, v in state.items()
                             if k.startswith("pixel_vae.")}
    return heads.eval()
