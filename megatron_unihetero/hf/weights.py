"""Tensor-name and layout mapping between our full state dict and HuggingFace Llava / Llama.

Our full (TP=1, PP=1) state dict (checkpointing/dist.load_full_model_state) has
``llm.*`` on megatron-core layers, ``vision.model.*`` (the HF vision model's own transformers-5
names), ``projector.linear_fc{1,2}.*`` and the generation heads. The HF side is written in the
transformers-4.x *on-disk* layout: transformers 5.x loads it through its
conversion mapping, and 4.57 only loads that layout (it silently re-initialises a vision tower
saved in the 5.x layout). The 4.x names per part:

* Llama:      ``language_model.model.{embed_tokens,layers.*,norm}``, ``language_model.lm_head``
* projector:  ``multi_modal_projector.linear_{1,2}``
* vision:     CLIP / SigLIP: ``vision_tower.vision_model.<5.x name>``; Dinov2 (with registers too):
              ``vision_tower.<name>`` with Dinov2's 4.x attention/MLP names
              (``attention.attention.query``, ...).

Megatron's fused layouts are undone here: ``linear_qkv`` holds, per query group, that group's
query heads then one key head then one value head (each ``head_dim`` rows), and its bias
(Qwen2) the same entries in the same order; SwiGLU's ``linear_fc1`` is ``[gate; up]``.

Qwen2 has Llama's names plus ``self_attn.{q,k,v}_proj.bias``. A tied LM head
(``llm.tie_word_embeddings``) has no ``lm_head.weight`` in HF; ours is the embedding.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

from megatron_unihetero.models.config import LLMConfig

State = Dict[str, torch.Tensor]

LLAVA_LM_HEAD = "language_model.lm_head.weight"
LLAVA_PROJECTOR = "multi_modal_projector."
LLAVA_VISION = "vision_tower."
# Everything in our state that is not part of a LlavaForConditionalGeneration.
HEAD_PREFIXES = ("semantic_head.", "target_projector.", "pixel_head.", "pixel_vae.")

_LAYER = re.compile(r"^llm\.decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# Per-layer tensors that map one-to-one (megatron local spec; TE's fused-norm names too).
_LAYER_RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_LOCAL_SPEC_RENAMES = {  # HF -> ours: we always write megatron's local-spec names
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}


# -- the LLM --------------------------------------------------------------------------------
def split_qkv(qkv: torch.Tensor, llm: LLMConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused ``linear_qkv`` weight [rows, hidden] or bias [rows] -> HF's q, k, v."""
    groups, head_dim = llm.num_query_groups, llm.head_dim
    per_group = llm.num_attention_heads // groups
    rest = qkv.shape[1:]  # (hidden,) for the weight, () for the bias
    grouped = qkv.reshape(groups, per_group + 2, head_dim, *rest)
    q = grouped[:, :per_group].reshape(groups * per_group * head_dim, *rest)
    k = grouped[:, per_group].reshape(groups * head_dim, *rest)
    v = grouped[:, per_group + 1].reshape(groups * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, llm: LLMConfig) -> torch.Tensor:
    """HF's q, k, v weights (or biases) -> megatron's per-query-group interleaved ``linear_qkv``."""
    groups, head_dim = llm.num_query_groups, llm.head_dim
    per_group = llm.num_attention_heads // groups
    rest = q.shape[1:]
    grouped = torch.cat([
        q.reshape(groups, per_group, head_dim, *rest),
        k.reshape(groups, 1, head_dim, *rest),
        v.reshape(groups, 1, head_dim, *rest),
    ], dim=1)
    return grouped.reshape(-1, *rest).contiguous()


# Whole-model tensors with a one-to-one name (ours -> HF Llama); the inverse serves the import.
_TOP_RENAMES = {
    "llm.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "llm.decoder.final_layernorm.weight": "model.norm.weight",
    "llm.output_layer.weight": "lm_head.weight",
}
_TOP_RENAMES_FROM_HF = {hf: ours for ours, hf in _TOP_RENAMES.items()}


def llm_to_hf(full: State, llm: LLMConfig) -> State:
    """Our ``llm.*`` tensors -> HF LlamaForCausalLM names (``model.*``, ``lm_head.weight``)."""
    out: State = {}
    for name, tensor in full.items():
        if not name.startswith("llm."):
            continue
        if name == "llm.output_layer.weight" and llm.tie_word_embeddings:
            continue  # the embedding (HF ties lm_head to embed_tokens on load)
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = tensor
        elif (match := _LAYER.match(name)):
            prefix, rest = f"model.layers.{match.group(1)}.", match.group(2)
            if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                kind = rest.rsplit(".", 1)[1]
                q, k, v = split_qkv(tensor, llm)
                out.update({f"{prefix}self_attn.q_proj.{kind}": q, f"{prefix}self_attn.k_proj.{kind}": k,
                            f"{prefix}self_attn.v_proj.{kind}": v})
            elif rest == "mlp.linear_fc1.weight":
                gate, up = tensor.chunk(2, dim=0)
                out[prefix + "mlp.gate_proj.weight"] = gate.contiguous()
                out[prefix + "mlp.up_proj.weight"] = up.contiguous()
            elif rest in _LAYER_RENAMES:
                out[prefix + _LAYER_RENAMES[rest]] = tensor
            else:
                raise KeyError(f"no HuggingFace Llama name for {name!r} (a bias or a layer type "
                               f"this converter does not know)")
        else:
            raise KeyError(f"no HuggingFace Llama name for {name!r}")
    return out


def llm_from_hf(hf: State, llm: LLMConfig) -> State:
    """HF Llama names (``model.*``, ``lm_head.weight``) -> our ``llm.*`` tensors."""
    out: State = {}
    layers: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, tensor in hf.items():
        if name in _TOP_RENAMES_FROM_HF:
            out[_TOP_RENAMES_FROM_HF[name]] = tensor
        elif name.startswith("model.") and (match := _HF_LAYER.match(name[len("model."):])):
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        elif name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope theta
        else:
            raise KeyError(f"unexpected HuggingFace Llama tensor {name!r}")
    if llm.tie_word_embeddings:
        # Our LM head is the embedding (an HF folder may still hold a tied lm_head copy).
        out["llm.output_layer.weight"] = out["llm.embedding.word_embeddings.weight"]
    elif "llm.output_layer.weight" not in out:
        raise KeyError("the HuggingFace model has no lm_head.weight but its config says "
                       "tie_word_embeddings=false")
    for index, parts in sorted(layers.items()):
        prefix = f"llm.decoder.layers.{index}."
        try:
            kinds = ("weight", "bias") if llm.qkv_bias else ("weight",)
            for kind in kinds:
                out[f"{prefix}self_attention.linear_qkv.{kind}"] = fuse_qkv(
                    parts.pop(f"self_attn.q_proj.{kind}"), parts.pop(f"self_attn.k_proj.{kind}"),
                    parts.pop(f"self_attn.v_proj.{kind}"), llm)
            out[prefix + "mlp.linear_fc1.weight"] = torch.cat(
                [parts.pop("mlp.gate_proj.weight"), parts.pop("mlp.up_proj.weight")], dim=0)
        except KeyError as exc:
            raise KeyError(f"HuggingFace Llama layer {index} has no {exc.args[0]!r}") from None
        for rest, tensor in parts.items():
            if rest not in _LOCAL_SPEC_RENAMES:
                raise KeyError(f"unexpected HuggingFace Llama tensor 'model.layers.{index}.{rest}' "
                               f"(biases other than Qwen2's q/k/v are not supported)")
            out[prefix + _LOCAL_SPEC_RENAMES[rest]] = tensor
    return out


# -- the vision tower -----------------------------------------------------------------------
_DINOV2_TO_4X: List[Tuple[str, str]] = [
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.down_proj.", ".mlp.weights_out."),
]


def _dinov2_to_4x(state: State) -> State:
    out: State = {}
    for name, tensor in state.items():
        if ".mlp.gate_proj." in name:
            # SwiGLU Dinov2 (giant): 4.x stores gate and up fused as weights_in.
            up = state[name.replace(".mlp.gate_proj.", ".mlp.up_proj.")]
            out[name.replace(".mlp.gate_proj.", ".mlp.weights_in.")] = torch.cat([tensor, up], dim=0)
            continue
        if ".mlp.up_proj." in name:
            continue
        for new, old in _DINOV2_TO_4X:
            name = name.replace(new, old)
        out[name] = tensor
    return out


# Dinov2 with registers has Dinov2's 4.x names (transformers' conversion mapping renames both).
_DINOV2_FAMILY = ("dinov2", "dinov2_with_registers")


def vision_disk_prefix(model_type: str) -> str:
    """Where the vision model's own names sit in a 4.x Llava checkpoint."""
    return LLAVA_VISION if model_type in _DINOV2_FAMILY else LLAVA_VISION + "vision_model."


def vision_to_disk(vision: State, model_type: str) -> State:
    """Our ``vision.model.*`` (transformers-5 names) -> 4.x Llava on-disk names."""
    own = {k[len("vision.model."):]: v for k, v in vision.items() if k.startswith("vision.model.")}
    if model_type in _DINOV2_FAMILY:
        own = _dinov2_to_4x(own)
    prefix = vision_disk_prefix(model_type)
    return {prefix + k: v for k, v in own.items()}


# -- whole models ---------------------------------------------------------------------------
def full_to_llava_disk(full: State, llm: LLMConfig, vision_type: str) -> State:
    """Our full state -> a LlavaForConditionalGeneration state dict in the 4.x on-disk layout."""
    out: State = {}
    for name, tensor in llm_to_hf(full, llm).items():
        out[LLAVA_LM_HEAD if name == "lm_head.weight" else "language_model." + name] = tensor
    out.update(vision_to_disk(full, vision_type))
    for i, ours in ((1, "linear_fc1"), (2, "linear_fc2")):
        for kind in ("weight", "bias"):
            out[f"{LLAVA_PROJECTOR}linear_{i}.{kind}"] = full[f"projector.{ours}.{kind}"]
    return out


def llava_module_state_to_full(state: State, llm: LLMConfig) -> State:
    """A loaded LlavaForConditionalGeneration's ``state_dict()`` (transformers-5 module names:
    ``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
    ``lm_head.weight``) -> our full-state names (LLM, vision, projector; no heads)."""
    llama: State = {}
    out: State = {}
    for name, tensor in state.items():
        if name.startswith("model.vision_tower."):
            out["vision.model." + name[len("model.vision_tower."):]] = tensor
        elif name.startswith("model.multi_modal_projector.linear_"):
            index, kind = name[len("model.multi_modal_projector.linear_"):].split(".", 1)
            out[f"projector.linear_fc{index}.{kind}"] = tensor
        elif name.startswith("model.language_model."):
            llama["model." + name[len("model.language_model."):]] = tensor
        elif name == "lm_head.weight":
            llama[name] = tensor
        else:
            raise KeyError(f"unexpected Llava tensor {name!r}")
    out.update(llm_from_hf(llama, llm))
    return out


def split_heads(full: State) -> Tuple[State, State]:
    """(the Llava part, the generation-head part) of our full state."""
    heads = {k: v for k, v in full.items() if k.startswith(HEAD_PREFIXES)}
    return {k: v for k, v in full.items() if k not in heads}, heads
