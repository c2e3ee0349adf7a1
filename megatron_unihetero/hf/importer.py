"""HuggingFace weights -> a megatron_unihetero checkpoint at any TP/PP (no process group needed).

Two sources:
* ``--llm`` a LlamaForCausalLM folder and ``--vision`` a Dinov2 / SigLIP / CLIP vision folder:
  the projector and the semantic head are freshly initialised (seeded);
* ``--llm`` an exported LlavaForConditionalGeneration folder (export.py): everything, heads
  included when unihetero_heads.* is there, comes back (the round trip).

The checkpoint is the one the trainer writes: ``CKPT/iter_0000000/{config.yaml, model/}`` and
``CKPT/latest``. Each (TP, PP) rank's file holds exactly the names that rank's
UniHeteroModel has (:func:`stage_names`: the stage's models/stage_plan.py plan), split by
checkpointing/sharding.py's rules, so ``model_io.load_into_model`` loads it strictly.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional

import torch
import transformers
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from megatron_unihetero import config_io
from megatron_unihetero.checkpointing import model_io
from megatron_unihetero.checkpointing.sharding import RankLayout, shard_state_dict, to_local_name
from megatron_unihetero.hf import heads as heads_lib
from megatron_unihetero.hf.common import staged_output
from megatron_unihetero.hf.configs import (
    ConversionError, llm_config_from_hf, model_config_from_llava, read_config_json, vision_type_of)
from megatron_unihetero.hf.processor import hf_tokenizer
from megatron_unihetero.hf.weights import llava_module_state_to_full, llm_from_hf
from megatron_unihetero.models.config import ModelConfig, PixelGenConfig, SemanticGenConfig, VisionConfig
from megatron_unihetero.models.heads import SemanticHead
from megatron_unihetero.models.projector import Projector
from megatron_unihetero.models.stage_plan import TARGET_PROJECTOR_PREFIX, StagePlan, mirrored_prefixes
from megatron_unihetero.models.vision import _HF_CLASSES, load_hf_vision_config
from megatron_unihetero.training import checkpoint as ckpt
from megatron_unihetero.training.config import DataConfig, ParallelConfig, RunConfig

State = Dict[str, torch.Tensor]


def _from_pretrained(cls, folder: str, role: str):
    """Load a local HF model; refuse silently re-initialised (missing) weights."""
    try:
        model, info = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                          output_loading_info=True)
    except OSError as exc:  # no weight files, unreadable files
        raise ConversionError(f"{role} folder {folder!r} cannot be loaded: {exc}") from None
    missing = list(info.get("missing_keys", ()))
    if missing:
        raise ConversionError(f"{role} folder {folder!r}: weights missing from its files: "
                              f"{missing[:5]} (a different architecture or an incomplete folder)")
    return model


def _fresh_heads(model: ModelConfig, encoder_dim: int, seed: int) -> State:
    """Seeded fresh projector + semantic head (the way UniHeteroModel initialises them)."""
    out: State = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = Projector(encoder_dim, model.llm.hidden_size)
        out.update({"projector." + k: v for k, v in projector.state_dict().items()})
        semantic = model.semantic
        if semantic.enabled:
            target_dim = encoder_dim if semantic.target == "encoder_output" else model.llm.hidden_size
            head = SemanticHead(model.llm.hidden_size, target_dim, semantic.head)
            out.update({"semantic_head." + k: v for k, v in head.state_dict().items()})
            if semantic.target == "ema_input_embedding":  # the EMA starts equal to the projector
                out.update({"target_projector." + k: v.clone()
                            for k, v in projector.state_dict().items()})
    return out


def from_llama_and_vision(llm_dir: str, vision_dir: str, *, image_token_id: int,
                          semantic: SemanticGenConfig, seed: int,
                          max_sequence_length: Optional[int] = None):
    llm_json = read_config_json(llm_dir, "--llm")
    llm = llm_config_from_hf(llm_json, llm_dir, max_sequence_length)
    vision_json = read_config_json(vision_dir, "--vision")
    vision = VisionConfig(model_type=vision_type_of(vision_json, vision_dir),
                          path=os.path.abspath(vision_dir))
    model = ModelConfig(llm=llm, vision=vision, semantic=semantic, image_token_id=image_token_id)

    full = llm_from_hf(_from_pretrained(LlamaForCausalLM, llm_dir, "--llm").state_dict(), llm)
    _, model_cls, _ = _HF_CLASSES[vision.model_type]
    encoder = _from_pretrained(getattr(transformers, model_cls), vision_dir, "--vision")
    full.update({"vision.model." + k: v for k, v in encoder.state_dict().items()})
    full.update(_fresh_heads(model, load_hf_vision_config(vision).hidden_size, seed))
    return model, full


def from_llava(folder: str, llava_json: dict):
    """An exported Llava folder (+ its heads file) -> (ModelConfig, full state)."""
    model = model_config_from_llava(llava_json, folder)
    hf = _from_pretrained(LlavaForConditionalGeneration, folder, "--llm")
    full = llava_module_state_to_full(hf.state_dict(), model.llm)
    heads_json = os.path.join(folder, heads_lib.HEADS_CONFIG)
    if os.path.isfile(heads_json):
        with open(heads_json) as handle:
            meta = json.load(handle)
        model.semantic = config_io.from_dict(SemanticGenConfig, meta["semantic"], "semantic")
        if meta.get("pixel") is not None:
            model.pixel = config_io.from_dict(PixelGenConfig, meta["pixel"], "pixel")
        heads_state = load_file(os.path.join(folder, heads_lib.HEADS_WEIGHTS))
        full.update({k: v.float() if v.is_floating_point() else v for k, v in heads_state.items()})
    else:
        model.semantic = SemanticGenConfig(weight=0.0)  # the export had no heads
    return model, full


def check_parallel(model: ModelConfig, tp: int, pp: int) -> None:
    llm = model.llm
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp and --pp must be >= 1; got {tp} and {pp}")
    for field, value in (("num_attention_heads", llm.num_attention_heads),
                         ("num_query_groups (num_key_value_heads)", llm.num_query_groups),
                         ("ffn_hidden_size (intermediate_size)", llm.ffn_hidden_size),
                         ("vocab_size", llm.vocab_size)):
        if value % tp:
            raise ConversionError(f"--tp {tp} does not divide llm.{field} = {value}")
    if llm.num_layers % pp:
        raise ConversionError(f"--pp {pp} does not divide llm.num_layers "
                              f"(num_hidden_layers) = {llm.num_layers}")


def stage_names(full_names: Iterable[str], model: ModelConfig, pp_rank: int, pp: int) -> List[str]:
    """The local state names of pipeline stage ``pp_rank``: what its :class:`StagePlan` holds."""
    plan = StagePlan.build(model, pre_process=pp_rank == 0, post_process=pp_rank == pp - 1)
    holds = plan.holds_prefix()
    per_stage = model.llm.num_layers // pp
    names, has_target = [], False
    for name in full_names:
        if name.startswith("llm.decoder.layers."):
            local = to_local_name(name, pp_rank * per_stage, per_stage)
            if local is not None:
                names.append(local)
            continue
        prefix = next((p for p in holds if name.startswith(p)), None)
        if prefix is None:
            raise ConversionError(f"no pipeline stage holds {name!r}")
        if holds[prefix]:
            names.append(name)
            has_target |= prefix == TARGET_PROJECTOR_PREFIX
    if plan.target_projector is not None and not has_target:
        # The last stage's copy of the projector (sharding.py fills it from projector.*).
        names += [TARGET_PROJECTOR_PREFIX + n[len("projector."):] for n in full_names
                  if n.startswith("projector.")]
    return names


def write_checkpoint(full: State, model: ModelConfig, save: str, tp: int, pp: int,
                     tokenizer: Optional[str]) -> str:
    check_parallel(model, tp, pp)
    per_stage = model.llm.num_layers // pp
    with staged_output(save) as staging:
        iter_dir = ckpt.iteration_dir(staging, 0)
        model_dir = os.path.join(iter_dir, "model")
        for pp_rank in range(pp):
            local_names = stage_names(full.keys(), model, pp_rank, pp)
            for tp_rank in range(tp):
                layout = RankLayout(tp_rank, tp, pp_rank * per_stage)
                model_io.save_model_shard(shard_state_dict(full, local_names, layout),
                                          model_dir, layout, pp_rank)
        model_io.write_layout(model_dir, tp, pp, {r: r * per_stage for r in range(pp)},
                              mirrored_prefixes(model))
        run = RunConfig(model=model, data=DataConfig(tokenizer=tokenizer),
                        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
        config_io.save_config(run, os.path.join(iter_dir, "config.yaml"))
        ckpt.write_manifest(iter_dir)  # the trainer verifies it before loading
        ckpt.mark_latest(staging, iter_dir)
    return save


def import_hf(llm: str, save: str, *, vision: Optional[str] = None, tp: int = 1, pp: int = 1,
              tokenizer: Optional[str] = None, image_token_id: Optional[int] = None,
              semantic: Optional[SemanticGenConfig] = None, seed: int = 1234,
              max_sequence_length: Optional[int] = None) -> str:
    """Write checkpoint ``save`` from HF folders (see the module docstring); returns ``save``."""
    llm_json = read_config_json(llm, "--llm")
    kind = llm_json.get("model_type")
    if kind == "llava":
        if vision is not None:
            raise ConversionError(f"--llm {llm!r} is a Llava folder that holds its vision tower; "
                                  f"do not give --vision")
        model, full = from_llava(llm, llm_json)
        if tokenizer is None and os.path.isfile(os.path.join(llm, "tokenizer_config.json")):
            tokenizer = os.path.abspath(llm)
    elif kind == "llama":
        if vision is None:
            raise ConversionError("--vision is required with a Llama --llm folder")
        image_token_id, tokenizer_vocab = _resolve_image_token(image_token_id, tokenizer)
        model, full = from_llama_and_vision(
            llm, vision, image_token_id=image_token_id,
            semantic=semantic or SemanticGenConfig(weight=1.0), seed=seed,
            max_sequence_length=max_sequence_length)
        if tokenizer_vocab > model.llm.vocab_size:
            raise ConversionError(f"tokenizer {tokenizer!r} has {tokenizer_vocab} tokens but the "
                                  f"--llm vocab_size is {model.llm.vocab_size}: resize the LLM's "
                                  f"embeddings first")
    else:
        raise ConversionError(f"--llm folder {llm!r} holds a {kind!r} model (architectures "
                              f"{llm_json.get('architectures')}); expected 'llama' "
                              f"(LlamaForCausalLM) or 'llava' (an exported model)")
    if not 0 <= model.image_token_id < model.llm.vocab_size:
        raise ConversionError(f"image token id {model.image_token_id} is outside the vocabulary "
                              f"(llm.vocab_size = {model.llm.vocab_size})")
    return write_checkpoint(full, model, save, tp, pp, tokenizer)


def _resolve_image_token(image_token_id: Optional[int], tokenizer: Optional[str]):
    """(image token id, tokenizer vocab size or 0): --image-token-id, else the tokenizer's
    <image> id; one of them must say it."""
    if tokenizer is not None:
        ours, _ = hf_tokenizer(tokenizer)
        if image_token_id is not None and image_token_id != ours.image_token_id:
            raise ConversionError(f"--image-token-id {image_token_id} but tokenizer {tokenizer!r} "
                                  f"maps <image> to {ours.image_token_id}")
        return ours.image_token_id, ours.vocab_size
    if image_token_id is None:
        raise ConversionError("give --tokenizer (its <image> id is used) or --image-token-id")
    return image_token_id, 0
