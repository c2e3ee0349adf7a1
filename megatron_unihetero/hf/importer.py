"""HuggingFace weights -> a megatron_unihetero checkpoint, which any TP / PP / DP layout loads.

Two sources:
* ``--llm`` a LlamaForCausalLM (Llama-2, Llama-3.x: GQA, "llama3" RoPE scaling, tied or
  untied embeddings) or Qwen2ForCausalLM (Qwen2 / 2.5: q/k/v biases, full attention only)
  folder and ``--vision`` a Dinov2 (with registers too) / SigLIP / SigLIP2 / CLIP vision
  folder: the projector and the semantic head are freshly initialised (seeded);
* ``--llm`` an exported LlavaForConditionalGeneration folder (export.py): everything, heads
  included when unihetero_heads.* is there, comes back (the round trip).

The vocabulary: the tokenizer (by default the ``--llm`` folder's own) appends the special
tokens it lacks (<image>, <image_start>, <image_end>, <pad>: data/tokenizer.py); the embedding
and LM head grow to hold them, with transformers' ``resize_token_embeddings`` (mean init), and
are padded to a multiple of ``vocab_divisible_by`` (default 128 x 8, so TP = 1..8 split the
rows evenly). ``model.llm.vocab_size`` in the checkpoint's config is that padded size, and
:func:`training_settings` lists what a training config must say to load the checkpoint.

The checkpoint is the one the trainer writes: ``CKPT/iter_0000000/{config.yaml, dist/,
manifest.json}`` and ``CKPT/latest``. The converted state dict is loaded strictly into the
whole model (TP = PP = 1, on this one process) and written through its sharded state dict
(checkpointing/dist.py), so a run at any layout loads it (``checkpoint.load``) without a
conversion per layout.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

import torch
import transformers
import yaml
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, Qwen2ForCausalLM

from megatron_unihetero import config_io, parallel
from megatron_unihetero.checkpointing import dist as dist_ckpt
from megatron_unihetero.hf import heads as heads_lib
from megatron_unihetero.hf.common import staged_output
from megatron_unihetero.hf.configs import (
    LLM_MODEL_TYPES, ConversionError, llm_config_from_hf, model_config_from_llava, read_config_json,
    vision_type_of)
from megatron_unihetero.hf.processor import hf_tokenizer
from megatron_unihetero.hf.weights import llava_module_state_to_full, llm_from_hf
from megatron_unihetero.models.config import ModelConfig, PixelGenConfig, SemanticGenConfig, VisionConfig
from megatron_unihetero.models.heads import SemanticHead
from megatron_unihetero.models.projector import Projector
from megatron_unihetero.models.stage_plan import TARGET_PROJECTOR_PREFIX
from megatron_unihetero.models.vision import _HF_CLASSES, load_hf_vision_config, tokens_per_image
from megatron_unihetero.training import checkpoint as ckpt
from megatron_unihetero.training.config import DataConfig, RunConfig

State = Dict[str, torch.Tensor]

logger = logging.getLogger(__name__)

# Our LLM family -> the transformers class its HF folder is loaded with.
_CAUSAL_LM_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}

# Megatron pads the vocabulary to make-vocab-size-divisible-by (128) x TP. A checkpoint here
# has no TP, so the padding must suit every TP a run may use: 128 x 8 serves TP = 1, 2, 4, 8.
DEFAULT_VOCAB_DIVISIBLE_BY = 128 * 8


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
                          tokenizer_vocab: int, vocab_divisible_by: int,
                          semantic: SemanticGenConfig, seed: int,
                          max_sequence_length: Optional[int] = None,
                          image_size: Optional[int] = None):
    llm_json = read_config_json(llm_dir, "--llm")
    llm = llm_config_from_hf(llm_json, llm_dir, max_sequence_length)
    vision_json = read_config_json(vision_dir, "--vision")
    vision = VisionConfig(model_type=vision_type_of(vision_json, vision_dir),
                          path=os.path.abspath(vision_dir), image_size=image_size)
    tokens_per_image(vision)  # a bad --image-size fails before the weights are read
    hf_llm = _from_pretrained(_CAUSAL_LM_CLASSES[llm.family], llm_dir, "--llm")
    llm.vocab_size = grow_vocabulary(hf_llm, tokenizer_vocab, vocab_divisible_by, seed, llm_dir)
    model = ModelConfig(llm=llm, vision=vision, semantic=semantic, image_token_id=image_token_id)

    full = llm_from_hf(hf_llm.state_dict(), llm)
    del hf_llm
    _, model_cls, _ = _HF_CLASSES[vision.model_type]
    encoder = _from_pretrained(getattr(transformers, model_cls), vision_dir, "--vision")
    full.update({"vision.model." + k: v for k, v in encoder.state_dict().items()})
    full.update(_fresh_heads(model, load_hf_vision_config(vision).hidden_size, seed))
    return model, full


def from_llava(folder: str, llava_json: dict, *, tokenizer_vocab: int = 0,
               vocab_divisible_by: int = 1, seed: int = 1234, image_size: Optional[int] = None):
    """An exported Llava folder (+ its heads file) -> (ModelConfig, full state)."""
    model = model_config_from_llava(llava_json, folder)
    model.vision.image_size = image_size
    hf = _from_pretrained(LlavaForConditionalGeneration, folder, "--llm")
    model.llm.vocab_size = grow_vocabulary(hf, tokenizer_vocab, vocab_divisible_by, seed, folder)
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


def padded_vocab_size(needed: int, divisible_by: int) -> int:
    """``needed`` rounded up to a multiple of ``divisible_by``."""
    return -(-needed // divisible_by) * divisible_by


def grow_vocabulary(hf_model, tokenizer_vocab: int, divisible_by: int, seed: int, folder: str) -> int:
    """Make the HF model's embedding and LM head hold the tokenizer's vocabulary (its appended
    specials: <image>, ...), padded to a multiple of ``divisible_by``; returns the new size.

    transformers' own ``resize_token_embeddings(mean_resizing=True)`` does it: new rows are
    drawn around the mean of the existing rows (a normal of 1e-9 x their covariance), so the
    new tokens barely move the next-token distribution of the pretrained model. The padding
    rows beyond the tokenizer get the same init; no text ever holds their ids. Never shrinks:
    rows beyond the tokenizer the checkpoint already has are kept. Seeded, so an import is
    reproducible."""
    if divisible_by < 1:
        raise ConversionError(f"--vocab-divisible-by must be >= 1; got {divisible_by}")
    current = hf_model.get_input_embeddings().weight.shape[0]
    target = padded_vocab_size(max(current, tokenizer_vocab), divisible_by)
    if target != current:
        logger.info("%s: embedding and LM head grow from %d to %d rows (tokenizer: %d tokens, "
                    "padded to a multiple of %d)", folder, current, target, tokenizer_vocab,
                    divisible_by)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf_model.resize_token_embeddings(target, mean_resizing=True)
    return target


def write_checkpoint(full: State, model: ModelConfig, save: str, tokenizer: Optional[str]) -> str:
    """``save/iter_0000000``: ``full`` loaded strictly into the model ``model`` describes and
    written as the trainer writes weights (checkpointing/dist.py), which any TP / PP / DP
    layout loads; then the run config, the manifest and ``latest``."""
    with staged_output(save) as staging:
        iter_dir = ckpt.iteration_dir(staging, 0)
        with parallel.single_process():
            stage = parallel.build_model(model)
            missing, unexpected = stage.load_state_dict(full, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            # A fresh EMA target projector starts as the projector (what training does too).
            fresh_ema = [k for k in missing if k.startswith(TARGET_PROJECTOR_PREFIX)]
            if sorted(missing) != sorted(fresh_ema) or unexpected:
                raise ConversionError(f"the converted weights do not fit the model: missing "
                                      f"{[k for k in missing if k not in fresh_ema][:5]}, "
                                      f"unexpected {unexpected[:5]}")
            if fresh_ema:
                parallel.sync_semantic_targets([stage], ema=False)
            dist_ckpt.save_weights([stage], iter_dir)
            run = RunConfig(model=model, data=DataConfig(tokenizer=tokenizer))
            config_io.save_config(run, os.path.join(iter_dir, "config.yaml"))
            ckpt.write_manifest(iter_dir)  # the trainer verifies it before loading
        ckpt.mark_latest(staging, iter_dir)
    return save


def default_tokenizer(llm_dir: str) -> Optional[str]:
    """The LLM folder's own tokenizer: its SentencePiece ``tokenizer.model`` (what Llama-2
    ships, read exactly as preprocessing reads it), else its HF tokenizer (``tokenizer.json``:
    the folder); None when it has neither."""
    sentencepiece = os.path.join(llm_dir, "tokenizer.model")
    if os.path.isfile(sentencepiece):
        return os.path.abspath(sentencepiece)
    if os.path.isfile(os.path.join(llm_dir, "tokenizer.json")):
        return os.path.abspath(llm_dir)
    return None


def import_hf(llm: str, save: str, *, vision: Optional[str] = None,
              tokenizer: Optional[str] = None, image_token_id: Optional[int] = None,
              semantic: Optional[SemanticGenConfig] = None, seed: int = 1234,
              max_sequence_length: Optional[int] = None,
              vocab_divisible_by: int = DEFAULT_VOCAB_DIVISIBLE_BY,
              image_size: Optional[int] = None) -> str:
    """Write checkpoint ``save`` from HF folders (see the module docstring); returns ``save``.

    ``tokenizer``: default the ``--llm`` folder's own (:func:`default_tokenizer`). Its specials
    that the LLM has no rows for are added to the embedding and LM head, and the vocabulary is
    padded to a multiple of ``vocab_divisible_by`` (:func:`grow_vocabulary`). ``image_size``:
    the resolution the encoder runs at (``model.vision.image_size``)."""
    llm_json = read_config_json(llm, "--llm")
    kind = llm_json.get("model_type")
    if kind == "llava":
        if vision is not None:
            raise ConversionError(f"--llm {llm!r} is a Llava folder that holds its vision tower; "
                                  f"do not give --vision")
        if tokenizer is None and os.path.isfile(os.path.join(llm, "tokenizer_config.json")):
            tokenizer = os.path.abspath(llm)
        ours = _our_tokenizer(tokenizer)
        tokenizer_vocab = _tokenizer_vocab(ours, tokenizer, llm_json.get("image_token_index"))
        model, full = from_llava(llm, llm_json, tokenizer_vocab=tokenizer_vocab,
                                 vocab_divisible_by=vocab_divisible_by, seed=seed,
                                 image_size=image_size)
    elif kind in LLM_MODEL_TYPES:
        if vision is None:
            raise ConversionError(f"--vision is required with a {kind} --llm folder")
        tokenizer = tokenizer or default_tokenizer(llm)
        if tokenizer is None and image_token_id is None:
            raise ConversionError(f"--llm folder {llm!r} has no tokenizer (tokenizer.model or "
                                  f"tokenizer.json): give --tokenizer (its <image> id is used) "
                                  f"or --image-token-id")
        ours = _our_tokenizer(tokenizer)
        image_token_id, tokenizer_vocab = _resolve_image_token(image_token_id, ours, tokenizer)
        model, full = from_llama_and_vision(
            llm, vision, image_token_id=image_token_id, tokenizer_vocab=tokenizer_vocab,
            vocab_divisible_by=vocab_divisible_by,
            semantic=semantic or SemanticGenConfig(weight=1.0), seed=seed,
            max_sequence_length=max_sequence_length, image_size=image_size)
    else:
        raise ConversionError(f"--llm folder {llm!r} holds a {kind!r} model (architectures "
                              f"{llm_json.get('architectures')}); expected 'llama' "
                              f"(LlamaForCausalLM), 'qwen2' (Qwen2ForCausalLM) or 'llava' (an "
                              f"exported model)")
    if not 0 <= model.image_token_id < model.llm.vocab_size:
        raise ConversionError(f"image token id {model.image_token_id} is outside the vocabulary "
                              f"(llm.vocab_size = {model.llm.vocab_size})")
    tokens_per_image(model.vision)  # a bad --image-size fails here, naming the patch size
    if ours is not None:  # a tokenizer without BOS (Qwen2's): documents start with their text
        model.documents_start_with_bos = ours.bos_id is not None
    return write_checkpoint(full, model, save, tokenizer)


# What a training config must say to train from an imported checkpoint (checkpoint.load).
TRAINING_KEYS = ("model.llm.vocab_size", "model.image_token_id", "model.documents_start_with_bos",
                 "model.vision.model_type", "model.vision.path", "model.vision.image_size",
                 "data.tokenizer")


def training_settings(save: str) -> Dict[str, object]:
    """``{dotted key: value}`` of checkpoint ``save``'s model and tokenizer that a run with
    ``checkpoint.load=save`` must use (printed by tools/convert_hf_to_checkpoint.py)."""
    with open(os.path.join(ckpt.iteration_dir(save, 0), "config.yaml")) as handle:
        run = yaml.safe_load(handle)
    out: Dict[str, object] = {}
    for key in TRAINING_KEYS:
        value = run
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def _our_tokenizer(tokenizer: Optional[str]):
    """Our tokenizer at ``tokenizer`` (checked against its HF form: hf_tokenizer), or None."""
    return None if tokenizer is None else hf_tokenizer(tokenizer)[0]


def _tokenizer_vocab(ours, tokenizer: Optional[str], image_token_id: Optional[int]) -> int:
    if ours is None:
        return 0
    if image_token_id is not None and ours.image_token_id != image_token_id:
        raise ConversionError(f"tokenizer {tokenizer!r} maps <image> to {ours.image_token_id} but "
                              f"the Llava config's image_token_index is {image_token_id}")
    return ours.vocab_size


def _resolve_image_token(image_token_id: Optional[int], ours, tokenizer: Optional[str]):
    """(image token id, tokenizer vocab size or 0): --image-token-id, else the tokenizer's
    (``ours``, read from path ``tokenizer``) <image> id; one of them must say it."""
    if ours is not None:
        if image_token_id is not None and image_token_id != ours.image_token_id:
            raise ConversionError(f"--image-token-id {image_token_id} but tokenizer {tokenizer!r} "
                                  f"maps <image> to {ours.image_token_id}")
        return ours.image_token_id, ours.vocab_size
    if image_token_id is None:
        raise ConversionError("give --tokenizer (its <image> id is used) or --image-token-id")
    return image_token_id, 0
