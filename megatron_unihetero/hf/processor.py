"""The exported tokenizer and LlavaProcessor: inputs prepared the way training prepared them.

Training (data/preprocess) tokenizes a document as BOS + segments + EOS, each text segment
encoded on its own (so each gets SentencePiece's dummy prefix) and each image written as
``<image_start><image><image_end>``; the loader then repeats ``<image>`` ``tokens_per_image``
times. Images were resized (shorter side, bicubic), centre-cropped and normalised with the
ImageNet mean/std (data/image_transforms.py), whatever the encoder.

The chat template is data/conversation.py's, the one preprocessing renders question/answer rows
and LLaVA conversations with (``<s>[image] Question: q Answer: a</s>``): ``apply_chat_template``
gives the token ids training saw, and ``add_generation_prompt`` ends the prompt with
`` Answer:``, where training's answers begin.

A SentencePiece ``.model`` becomes a ``tokenizers`` fast tokenizer through transformers' own
SentencePiece-proto converter in "legacy" mode (every chunk between special tokens gets the
dummy prefix, like our per-segment encoding) with our special tokens registered at the same
ids; :func:`check_token_ids` proves the ids match on sample text before anything is written,
and :func:`check_image_tokens` that one ``<image>`` becomes tokens_per_image image tokens.
"""

from __future__ import annotations

from typing import List

import numpy as np
from sentencepiece import sentencepiece_model_pb2
from tokenizers.processors import TemplateProcessing
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

from megatron_unihetero.data import conversation
from megatron_unihetero.data import tokenizer as ours_lib
from megatron_unihetero.hf.configs import ConversionError, feature_select_strategy
from megatron_unihetero.models.config import ModelConfig
from megatron_unihetero.models.vision import (
    _HF_CLASSES, extra_tokens, image_normalization, load_hf_vision_config, tokens_per_image)

# One definition, shared with preprocessing (see the module docstring).
CHAT_TEMPLATE = conversation.chat_template()

SAMPLE_TEXTS = (
    "a large red circle at the top left",
    " leading space,  double  spaces and trailing ",
    "naïve 😀 ünïcödé\nnew line\ttab",
    f"red{ours_lib.IMAGE_TOKEN}top {ours_lib.IMAGE_START_TOKEN}{ours_lib.IMAGE_TOKEN}"
    f"{ours_lib.IMAGE_END_TOKEN} what is left of the blue square? 42",
)


def _sentencepiece_to_fast(ours: "ours_lib.SentencePieceTokenizer"):
    proto = sentencepiece_model_pb2.ModelProto()
    with open(ours.path, "rb") as handle:
        proto.ParseFromString(handle.read())
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise ConversionError(f"{ours.path}: SentencePiece model type {proto.trainer_spec.model_type} "
                              f"is not supported (unigram or bpe only)")
    if proto.trainer_spec.model_type == 1:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    else:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    bos = ours.sp.id_to_piece(ours.bos_id)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=ours.sp.id_to_piece(ours.eos_id),
        unk_token=ours.sp.id_to_piece(ours.sp.unk_id()), clean_up_tokenization_spaces=False)
    # Registering every special as an added token makes the tokenizer split on it before
    # normalising (as our encode does); trained-in specials keep their id, appended ones get
    # base, base+1, ... in SPECIAL_TOKENS order, the order our tokenizer appended them in.
    fast.add_tokens([t for t in ours_lib.SPECIAL_TOKENS if t not in ours.appended], special_tokens=True)
    fast.add_tokens(list(ours.appended), special_tokens=True)
    fast.pad_token = ours_lib.PAD_TOKEN if ours.pad_id == ours.special_ids[ours_lib.PAD_TOKEN] \
        else ours.sp.id_to_piece(ours.pad_id)
    return fast


def hf_tokenizer(path: str):
    """(our tokenizer, its HF equivalent) for a SentencePiece .model or an HF tokenizer folder."""
    try:
        ours = ours_lib.build_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"data.tokenizer {path!r} cannot be loaded: {exc}") from None
    if isinstance(ours, ours_lib.SentencePieceTokenizer):
        fast = _sentencepiece_to_fast(ours)
    else:
        fast = ours.tok  # already holds the specials our tokenizer added
    _start_with_bos(fast, ours)
    fast.image_token = ours_lib.IMAGE_TOKEN  # LlavaProcessor reads it from the tokenizer
    check_token_ids(ours, fast)
    return ours, fast


def _start_with_bos(fast, ours) -> None:
    """Training puts BOS at the start of every document: make ``fast(text)`` do the same."""
    if fast("x")["input_ids"][:1] == [ours.bos_id]:
        return
    backend = getattr(fast, "backend_tokenizer", None)
    if backend is None:
        raise ConversionError(f"tokenizer {ours.path!r} does not add BOS and is not a fast "
                              f"tokenizer whose post-processor could be set")
    bos = fast.convert_ids_to_tokens(ours.bos_id)
    backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, ours.bos_id)])
    if fast("x")["input_ids"][:1] != [ours.bos_id]:
        raise ConversionError(f"tokenizer {ours.path!r}: could not make it start with BOS")


def check_token_ids(ours, fast, texts=SAMPLE_TEXTS) -> None:
    """Raise unless the HF tokenizer gives our ids on sample text and for every special."""
    for name in ("bos_id", "eos_id", "pad_id", "image_token_id", "image_start_id", "image_end_id"):
        token = {"bos_id": fast.bos_token, "eos_id": fast.eos_token, "pad_id": fast.pad_token,
                 "image_token_id": ours_lib.IMAGE_TOKEN, "image_start_id": ours_lib.IMAGE_START_TOKEN,
                 "image_end_id": ours_lib.IMAGE_END_TOKEN}[name]
        hf_id = fast.convert_tokens_to_ids(token)
        if hf_id != getattr(ours, name):
            raise ConversionError(f"the exported tokenizer maps {token!r} to {hf_id}, ours to "
                                  f"{getattr(ours, name)} ({name}; tokenizer {ours.path!r})")
    for text in texts:
        expected: List[int] = ours.encode(text)
        got = fast.encode(text, add_special_tokens=False)
        if got != expected:
            raise ConversionError(f"the exported tokenizer encodes {text!r} as {got}, ours as "
                                  f"{expected} (tokenizer {ours.path!r})")


def image_processor(model: ModelConfig):
    """Resize + centre-crop to the size the model runs its encoder at (``vision.image_size``
    when set, else the encoder config's), then normalise like training."""
    # Lazy: without the optional torchvision, resolving this name logs a fallback warning, which
    # only the export (that builds the processor) should show.
    from transformers import CLIPImageProcessor

    size = load_hf_vision_config(model.vision).image_size
    mean, std = image_normalization(model.vision)
    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3,  # PIL bicubic, as preprocess
        do_center_crop=True, crop_size={"height": size, "width": size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(mean), image_std=list(std), do_convert_rgb=True,
    )


def llava_processor(model: ModelConfig, fast_tokenizer):
    """A LlavaProcessor that expands each ``<image>`` to ``tokens_per_image`` image tokens."""
    hf_vision = load_hf_vision_config(model.vision)
    has_cls = _HF_CLASSES[model.vision.model_type][2]
    fast_tokenizer.chat_template = CHAT_TEMPLATE  # tokenizer.apply_chat_template renders it too
    processor = LlavaProcessor(
        image_processor=image_processor(model), tokenizer=fast_tokenizer,
        patch_size=hf_vision.patch_size,
        # Llava counts (size/patch)^2 + additional tokens (CLS, DINOv2's registers), minus one
        # for "default" (CLS dropped).
        num_additional_image_tokens=int(has_cls) + extra_tokens(model.vision.model_type, hf_vision),
        vision_feature_select_strategy=feature_select_strategy(model.vision),
        chat_template=CHAT_TEMPLATE, image_token=ours_lib.IMAGE_TOKEN,
    )
    check_image_tokens(processor, model)
    return processor


def check_image_tokens(processor, model: ModelConfig) -> None:
    """Raise unless the processor turns one ``<image>`` into ``tokens_per_image`` copies of
    ``model.image_token_id`` (the positions our interleaver fills with the image's features)."""
    size = load_hf_vision_config(model.vision).image_size
    image = np.zeros((size, size, 3), dtype=np.uint8)
    ids = processor(text=ours_lib.IMAGE_TOKEN, images=image)["input_ids"][0]
    got = sum(1 for i in ids if i == model.image_token_id)
    expected = tokens_per_image(model.vision)
    if processor.image_token_id != model.image_token_id or got != expected:
        raise ConversionError(f"the exported processor places {got} tokens of id "
                              f"{processor.image_token_id} per image; the model expects "
                              f"{expected} of model.image_token_id={model.image_token_id}")
