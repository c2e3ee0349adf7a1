"""Config mapping: our ModelConfig <-> transformers' LlamaConfig / Qwen2Config, the vision
configs and LlavaConfig."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from transformers import LlamaConfig, LlavaConfig, Qwen2Config

from megatron_unihetero.hf.siglip2 import siglip_vision_config
from megatron_unihetero.models.config import LLAMA3_ROPE_KEYS, LLMConfig, ModelConfig, VisionConfig
from megatron_unihetero.models.vision import (
    _HF_CLASSES, HF_MODEL_TYPES, load_hf_vision_config, tokens_per_image)


class ConversionError(ValueError):
    """Wrong input for a conversion; the message names the folder, file or field."""


# config.json model_type -> our vision.model_type (full CLIP/SigLIP folders are not vision-only;
# SigLIP2's NaFlex releases ship as full Siglip2Model folders, whose vision half
# Siglip2VisionModel loads by itself: accepted too).
VISION_MODEL_TYPES = {**{hf: ours for ours, hf in HF_MODEL_TYPES.items()}, "siglip2": "siglip2"}
# Fields of a vision config that describe the saving code, not the model.
_VOLATILE_KEYS = ("transformers_version", "architectures", "model_type", "_name_or_path", "dtype",
                  "torch_dtype", "output_hidden_states", "return_dict", "id2label", "label2id")


def read_config_json(folder: str, role: str) -> Dict[str, Any]:
    """``folder/config.json`` as a dict, with errors that name the folder and its role."""
    if not os.path.isdir(folder):
        raise ConversionError(f"{role} folder {folder!r} does not exist (give a local folder; "
                              f"hub ids are never downloaded)")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{role} folder {folder!r} has no config.json: it is not a "
                              f"HuggingFace model folder")
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None


def vision_type_of(config: Dict[str, Any], folder: str, role: str = "--vision") -> str:
    model_type = config.get("model_type")
    if model_type not in VISION_MODEL_TYPES:
        raise ConversionError(
            f"{role} folder {folder!r} holds a {model_type!r} model "
            f"(architectures {config.get('architectures')}); expected a vision encoder: "
            f"{', '.join(sorted(VISION_MODEL_TYPES))} (Dinov2Model, Dinov2WithRegistersModel, "
            f"SiglipVisionModel, Siglip2VisionModel / Siglip2Model, CLIPVisionModel)")
    return VISION_MODEL_TYPES[model_type]


# config.json model_type of the LLM folders the importer reads -> our llm.family.
LLM_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}
_TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def rope_scaling_from_hf(text: Dict[str, Any], folder: str) -> Optional[Dict[str, Any]]:
    """Our ``llm.rope_scaling`` from a config's ``rope_parameters`` (transformers 5) or
    ``rope_scaling`` (4.x): None for plain RoPE, Llama-3.1's "llama3" parameters; any other
    type is refused by name."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type != "llama3":
        raise ConversionError(f"{folder}: config.json rope scaling rope_type={rope_type!r} is not "
                              f"supported (plain RoPE and Llama-3.1's 'llama3' are)")
    missing = [k for k in LLAMA3_ROPE_KEYS if rope.get(k) is None]
    if missing:
        raise ConversionError(f"{folder}: config.json rope scaling 'llama3' lacks {missing}")
    return {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}}


def llm_config_from_hf(text: Dict[str, Any], folder: str, max_sequence_length: Optional[int] = None
                       ) -> LLMConfig:
    """Our LLMConfig from a LlamaConfig (Llama-2/3.x) or Qwen2Config (Qwen2/2.5) dict; refuses
    what our decoder cannot represent, naming the field."""
    def need(key):
        if key not in text:
            raise ConversionError(f"{folder}: config.json has no {key!r}")
        return text[key]

    model_type = text.get("model_type", "llama")
    if model_type not in LLM_MODEL_TYPES:
        raise ConversionError(f"{folder}: config.json model_type={model_type!r}; expected one of "
                              f"{', '.join(LLM_MODEL_TYPES)}")
    family = LLM_MODEL_TYPES[model_type]
    for flag in ("attention_bias", "mlp_bias"):
        if text.get(flag):  # Llama's: biases on o_proj / the MLP too, which Qwen2 does not have
            raise ConversionError(f"{folder}: config.json sets {flag}=true; our Llama has no biases")
    if family == "qwen2":
        # Qwen2's sliding window (layers from max_window_layers on): our attention is full.
        sliding = [i for i, kind in enumerate(text.get("layer_types") or ()) if kind != "full_attention"]
        if text.get("use_sliding_window") or sliding:
            raise ConversionError(f"{folder}: config.json sets use_sliding_window=true (layers "
                                  f"{sliding or 'from max_window_layers'} use sliding-window "
                                  f"attention); only full attention is supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{folder}: hidden_act={text['hidden_act']!r}; our Llama uses silu")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = text.get("rope_theta", rope.get("rope_theta", 10000.0))
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = text.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(f"{folder}: head_dim={head_dim} x num_attention_heads={heads} != "
                              f"hidden_size={hidden}; our Llama needs head_dim = hidden/heads")
    return LLMConfig(
        num_layers=need("num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=text.get("num_key_value_heads") or heads,
        ffn_hidden_size=need("intermediate_size"), vocab_size=need("vocab_size"),
        max_sequence_length=max_sequence_length or text.get("max_position_embeddings", 2048),
        rotary_base=float(theta), norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
        init_method_std=float(text.get("initializer_range", 0.02)),
        family=family, rope_scaling=rope_scaling_from_hf(text, folder),
        # Absent from config.json: the config class's default (False for both).
        tie_word_embeddings=bool(text.get("tie_word_embeddings",
                                          _TEXT_CONFIGS[family]().tie_word_embeddings)),
    )


def vision_hf_config_dict(hf_vision) -> Dict[str, Any]:
    """A vision config as a plain dict for ``VisionConfig.hf_config`` (rebuildable, JSON-safe)."""
    data = hf_vision.to_dict()
    return {k: v for k, v in data.items() if k not in _VOLATILE_KEYS and not k.startswith("_")}


def text_config(llm: LLMConfig, **extra):
    """The HF text config of our LLM: a LlamaConfig, or a Qwen2Config for ``family: qwen2``
    (Llava builds its language model from it through AutoModel), with the RoPE scaling and
    the tie flag."""
    rope = {"rope_type": "default", "rope_theta": llm.rotary_base}
    if llm.rope_scaling is not None:
        rope = {**llm.rope_scaling, "rope_theta": llm.rotary_base}
    common = dict(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads, num_key_value_heads=llm.num_query_groups,
        hidden_act="silu", max_position_embeddings=llm.max_sequence_length,
        rms_norm_eps=llm.norm_epsilon, rope_parameters=rope,
        tie_word_embeddings=llm.tie_word_embeddings, initializer_range=llm.init_method_std, **extra,
    )
    if llm.family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    return LlamaConfig(head_dim=llm.head_dim, attention_bias=False, mlp_bias=False, **common)


def feature_select_strategy(vision: VisionConfig) -> str:
    """Llava's "default" drops the first token (the CLS); "full" keeps every token."""
    has_cls = _HF_CLASSES[vision.model_type][2]
    return "default" if has_cls and vision.drop_cls_token else "full"


def exported_vision_type(vision: VisionConfig) -> str:
    """Our vision.model_type of the tower an export writes: a siglip2 tower is written as the
    SigLIP tower it equals at its fixed grid (hf/siglip2.py), every other as itself."""
    return "siglip" if vision.model_type == "siglip2" else vision.model_type


def llava_config(model: ModelConfig, *, pad_token_id: Optional[int], bos_token_id: Optional[int],
                 eos_token_id: Optional[int], dtype: str):
    """The LlavaConfig of an exported model (the vision config from the encoder's own, at the
    size the model runs it: the export writes position embeddings of that size; a siglip2
    encoder's is the equal SiglipVisionConfig, :func:`exported_vision_type`)."""
    hf_vision = (siglip_vision_config(model.vision) if model.vision.model_type == "siglip2"
                 else load_hf_vision_config(model.vision))
    text = text_config(model.llm, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                        eos_token_id=eos_token_id)
    # Where the encoder came from is not part of the exported model (and would break the
    # round trip's equality of config.json).
    vision = {k: v for k, v in hf_vision.to_dict().items() if k not in ("architectures", "_name_or_path")}
    config = LlavaConfig(
        vision_config=vision, text_config=text.to_dict(),
        image_token_index=model.image_token_id,
        projector_hidden_act="gelu",  # our Projector uses exact (erf) GELU, as does HF "gelu"
        vision_feature_select_strategy=feature_select_strategy(model.vision),
        vision_feature_layer=model.vision.feature_layer,
        multimodal_projector_bias=True, tie_word_embeddings=model.llm.tie_word_embeddings,
        image_seq_length=tokens_per_image(model.vision),
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    config.text_config.dtype = dtype
    config.vision_config.dtype = dtype
    return config


def model_config_from_llava(config: Dict[str, Any], folder: str) -> ModelConfig:
    """Our ModelConfig from an exported Llava config.json (the round trip's way back)."""
    llava = LlavaConfig.from_dict(config)
    vision_type = vision_type_of(llava.vision_config.to_dict(), folder, "Llava vision_config of")
    if not isinstance(llava.vision_feature_layer, int):
        raise ConversionError(f"{folder}: vision_feature_layer={llava.vision_feature_layer!r}; "
                              f"only a single layer is supported")
    has_cls = _HF_CLASSES[vision_type][2]
    drop_cls = llava.vision_feature_select_strategy == "default"
    if drop_cls and not has_cls:
        raise ConversionError(f"{folder}: vision_feature_select_strategy='default' drops a CLS "
                              f"token, but a {vision_type} encoder has none")
    vision = VisionConfig(model_type=vision_type, path=None,
                          hf_config=vision_hf_config_dict(llava.vision_config),
                          feature_layer=llava.vision_feature_layer, drop_cls_token=drop_cls)
    llm = llm_config_from_hf(llava.text_config.to_dict(), folder + " (text_config)")
    return ModelConfig(llm=llm, vision=vision, image_token_id=llava.image_token_id)
