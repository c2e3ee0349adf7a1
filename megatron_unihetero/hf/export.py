"""Checkpoint (any TP/PP) -> a transformers LlavaForConditionalGeneration folder + heads file.

    export_checkpoint("runs/x/checkpoints", "hf_out")            # newest complete iteration
    export_checkpoint("runs/x/checkpoints", "hf_out", iteration=100, dtype="bf16")

The folder holds config.json (LlavaConfig), generation_config.json, model.safetensors (4.x
on-disk names; see weights.py), the tokenizer, the LlavaProcessor files (image processor +
chat template) and, when the model has them, unihetero_heads.{safetensors,json} (heads.py).

The vocabulary: config.json's text vocab_size is the model's (``model.llm.vocab_size``, padded
for TP), which is what the embedding and LM head hold; the tokenizer has the real tokens (its
length may be smaller: the rows past it are padding, which generation_config.json suppresses).
The vision tower is written at the size the model ran it (``vision.image_size``): its position
embeddings interpolated once, the LlavaConfig's vision image_size and the processor's crop that
size, so one ``<image>`` expands to the tokens_per_image the model was trained with.
A SigLIP2 (NaFlex) tower, which Llava cannot call, is written as the SigLIP tower it equals at
that size (hf/siglip2.py); the export then re-imports as ``siglip``.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
import yaml
from transformers import GenerationConfig

from megatron_unihetero import config_io
from megatron_unihetero.checkpointing import dist as dist_ckpt
from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.hf import heads as heads_lib
from megatron_unihetero.hf import processor as processor_lib
from megatron_unihetero.hf.common import DTYPES, cast_floats, save_hf_weights, staged_output
from megatron_unihetero.hf.configs import ConversionError, exported_vision_type, llava_config
from megatron_unihetero.hf.siglip2 import siglip2_state_as_siglip
from megatron_unihetero.hf.weights import full_to_llava_disk, split_heads
from megatron_unihetero.models.config import ModelConfig
from megatron_unihetero.models.vision import position_embeddings_at_run_size
from megatron_unihetero.training import checkpoint as ckpt

CONFIG_FILE = "config.yaml"


def iteration_dir(load: str, iteration: Optional[int] = None) -> str:
    """The iteration folder to export: ``iter_{N:07d}``, or the one ``latest`` names (the
    trainer's own lister, training/checkpoint.py)."""
    if not os.path.isdir(load):
        raise ConversionError(f"--load {load!r} is not a folder")
    if iteration is not None:
        path = ckpt.iteration_dir(load, iteration)
    else:
        path = ckpt.latest_iteration_dir(load)
        if path is None:
            raise ConversionError(f"{os.path.join(load, ckpt.LATEST)} is missing: {load!r} is not "
                                  f"a checkpoint folder (or give --iteration)")
    if not os.path.isdir(path):
        raise ConversionError(f"checkpoint iteration folder {path!r} does not exist")
    try:
        ckpt.verify_checkpoint(path, "sizes", require_manifest=False)
    except CheckpointError as exc:  # names the file; the converter reports ConversionErrors
        raise ConversionError(str(exc)) from None
    return path


def read_run_config(iter_dir: str) -> dict:
    path = os.path.join(iter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing: the checkpoint has no run config")
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if "model" not in data:
        raise ConversionError(f"{path} has no 'model' section")
    return data


def read_full_state(iter_dir: str, model: ModelConfig) -> Dict[str, torch.Tensor]:
    """The checkpoint's model as one TP=1/PP=1 state dict, whatever layout saved it."""
    try:
        return dist_ckpt.load_full_model_state(iter_dir, model)
    except CheckpointError as exc:
        raise ConversionError(str(exc)) from None


def export_checkpoint(load: str, save: str, iteration: Optional[int] = None, dtype: str = "fp32",
                      tokenizer: Optional[str] = None) -> str:
    """Write the HF folder ``save`` from checkpoint ``load``; returns ``save``."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    iter_dir = iteration_dir(load, iteration)
    run = read_run_config(iter_dir)
    model = config_io.from_dict(ModelConfig, run["model"], "model")
    tokenizer = tokenizer or (run.get("data") or {}).get("tokenizer")
    if not tokenizer:
        raise ConversionError(f"{os.path.join(iter_dir, CONFIG_FILE)}: data.tokenizer is empty; "
                              f"give the tokenizer with --tokenizer")
    ours_tok, fast_tok = processor_lib.hf_tokenizer(tokenizer)
    if ours_tok.vocab_size > model.llm.vocab_size:
        raise ConversionError(f"tokenizer {tokenizer!r} has {ours_tok.vocab_size} tokens but "
                              f"model.llm.vocab_size is {model.llm.vocab_size}")
    if ours_tok.image_token_id != model.image_token_id:
        raise ConversionError(f"tokenizer {tokenizer!r} maps <image> to {ours_tok.image_token_id} "
                              f"but model.image_token_id is {model.image_token_id}")

    full = read_full_state(iter_dir, model)
    llava_part, head_part = split_heads(_vision_at_run_size(full, model))
    unknown = sorted(k for k in llava_part if not k.startswith(("llm.", "vision.model.", "projector.")))
    if unknown:
        raise ConversionError(f"{iter_dir}: tensors with no place in the export: {unknown[:5]}")
    try:
        disk = full_to_llava_disk(llava_part, model.llm, exported_vision_type(model.vision))
    except KeyError as exc:
        raise ConversionError(f"{iter_dir}: {exc.args[0]}") from None
    target = DTYPES[dtype]
    config = llava_config(model, pad_token_id=ours_tok.pad_id, bos_token_id=ours_tok.bos_id,
                          eos_token_id=ours_tok.eos_id,
                          dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    hf_processor = processor_lib.llava_processor(model, fast_tok)

    with staged_output(save) as staging:
        config.save_pretrained(staging)
        _generation_config(ours_tok, model.llm.vocab_size).save_pretrained(staging)
        save_hf_weights(cast_floats(disk, target), staging)
        hf_processor.save_pretrained(staging)
        processor_lib.check_calling_paths(staging, model, ours_tok)  # as it will be loaded
        heads_lib.save_heads(staging, cast_floats(head_part, target), model)
    return save


def _vision_at_run_size(full: Dict[str, torch.Tensor], model: ModelConfig) -> Dict[str, torch.Tensor]:
    """The vision tower with position embeddings for ``vision.image_size`` (the LlavaConfig
    says that size): Llava calls its tower without ``interpolate_pos_encoding``, so the
    interpolation our encoder does at run time is done once here, by transformers' own code.
    A siglip2 tower becomes the SigLIP tower it equals at that grid (hf/siglip2.py)."""
    prefix = "vision.model."
    own = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if model.vision.model_type == "siglip2":
        resized = siglip2_state_as_siglip(model.vision, own)
    else:
        resized = position_embeddings_at_run_size(model.vision, own)
    out = {k: v for k, v in full.items() if not k.startswith(prefix)}
    out.update({prefix + k: v for k, v in resized.items()})
    return out


def _generation_config(tok, vocab_size: int):
    # What our generation never emits, transformers' generate does not either: the padding rows
    # past the tokenizer and the image specials (generation/text.never_generated).
    from megatron_unihetero.generation.text import never_generated

    return GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                            suppress_tokens=never_generated(tok, vocab_size))
