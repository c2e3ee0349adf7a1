"""The exported tokenizer and LlavaProcessor: inputs prepared the way training prepared them.

Training (data/preprocess) tokenizes a document as BOS + segments + EOS (no BOS for a
tokenizer without one, e.g. Qwen2's: data/tokenizer.py), each text segment
encoded on its own (so each gets SentencePiece's dummy prefix) and each image written as
``<image_start><image><image_end>``; the loader then repeats ``<image>`` ``tokens_per_image``
times. Images were resized (shorter side, bicubic), centre-cropped and normalised with the
ImageNet mean/std (data/image_transforms.py), whatever the encoder.

The chat template is data/conversation.py's, the one preprocessing renders question/answer rows
and LLaVA conversations with (``<s>[image] Question: q Answer: a</s>``): ``apply_chat_template``
gives the token ids training saw, and ``add_generation_prompt`` ends the prompt with
`` Answer:``, where training's answers begin.

BOS: the template writes it (nothing when the tokenizer has none) and the tokenizer adds no
special tokens (``tokenizer(text)`` is ``add_special_tokens=False``'s ids), so every way of
calling the export gives the ids training used, with ONE BOS (or none, as training had none):
``apply_chat_template(tokenize=True)`` of the processor or the tokenizer (transformers 5 tokenizes
a rendered chat without special tokens there), and the usual two-step recipe (lmms-eval's
``llava_hf``, VLMEvalKit) that renders with ``tokenize=False`` and then calls
``processor(text=..., images=...)`` or ``tokenizer(text)``. A prompt written by hand, without
the template, starts with ``<s>`` itself (with nothing for a tokenizer without BOS).
:func:`check_calling_paths` proves the paths agree, and give the ids preprocessing writes, on
the saved folder before the export is published.

A SentencePiece ``.model`` becomes a ``tokenizers`` fast tokenizer through transformers' own
SentencePiece-proto converter in "legacy" mode (every chunk between special tokens gets the
dummy prefix, like our per-segment encoding) with our special tokens registered at the same
ids; :func:`check_token_ids` proves the ids match on sample text before anything is written,
and :func:`check_image_tokens` that one ``<image>`` becomes tokens_per_image image tokens.
"""

from __future__ import annotations

import io
from typing import List

import numpy as np
from sentencepiece import sentencepiece_model_pb2
from tokenizers.processors import TemplateProcessing
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter

from megatron_unihetero.data import conversation
from megatron_unihetero.data import tokenizer as ours_lib
from megatron_unihetero.data.preprocess.samples import SampleConfig, encode_document
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
    bos = None if ours.bos_id is None else ours.sp.id_to_piece(ours.bos_id)
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
    _no_automatic_specials(fast, ours)
    fast.image_token = ours_lib.IMAGE_TOKEN  # LlavaProcessor reads it from the tokenizer
    check_token_ids(ours, fast)
    return ours, fast


def _no_automatic_specials(fast, ours) -> None:
    """The chat template writes BOS: make ``fast(text)`` add no BOS/EOS of its own, so a rendered
    chat tokenized with the default ``add_special_tokens=True`` keeps its one BOS (or none)."""
    for flag in ("add_bos_token", "add_eos_token"):  # transformers' own switches, where it has them
        if getattr(fast, flag, False):
            setattr(fast, flag, False)
    if _adds_specials(fast):
        backend = getattr(fast, "backend_tokenizer", None)
        if backend is None:
            raise ConversionError(f"tokenizer {ours.path!r} adds special tokens and is not a fast "
                                  f"tokenizer whose post-processor could be set")
        backend.post_processor = TemplateProcessing(single="$A", pair="$A $B", special_tokens=[])
    if _adds_specials(fast):
        raise ConversionError(f"tokenizer {ours.path!r}: could not stop it adding special tokens")


def _adds_specials(fast) -> bool:
    text = "x"
    return fast(text)["input_ids"] != fast(text, add_special_tokens=False)["input_ids"]


def check_token_ids(ours, fast, texts=SAMPLE_TEXTS) -> None:
    """Raise unless the HF tokenizer gives our ids on sample text and for every special (and
    has a BOS exactly when ours has one: its chat template writes ``bos_token``)."""
    for name in ("bos_id", "eos_id", "pad_id", "image_token_id", "image_start_id", "image_end_id"):
        token = {"bos_id": fast.bos_token, "eos_id": fast.eos_token, "pad_id": fast.pad_token,
                 "image_token_id": ours_lib.IMAGE_TOKEN, "image_start_id": ours_lib.IMAGE_START_TOKEN,
                 "image_end_id": ours_lib.IMAGE_END_TOKEN}[name]
        hf_id = None if token is None else fast.convert_tokens_to_ids(token)
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


def sample_conversation(image) -> List[dict]:
    """A two-turn chat whose first turn holds ``image`` (its ``image`` key is what
    ``processor.apply_chat_template(tokenize=True)`` loads), ending in a user turn."""
    return [
        {"role": "user", "content": [{"type": "image", "image": image},
                                     {"type": "text", "text": "what is left of the blue square?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
        {"role": "user", "content": [{"type": "text", "text": "and below it?"}]},
    ]


def calling_paths(processor, messages, images, add_generation_prompt: bool = True) -> dict:
    """The ids of ``messages`` by each common way of calling the export: {path name: list of
    ids}. The processor's paths expand each image to its tokens, the tokenizer's do not."""
    prompt = {"add_generation_prompt": add_generation_prompt}
    text = processor.apply_chat_template(messages, tokenize=False, **prompt)
    text_items = [m if isinstance(m["content"], str) else  # the tokenizer loads no images
                  {**m, "content": [{k: v for k, v in it.items() if k != "image"} for it in m["content"]]}
                  for m in messages]
    one_call = processor.apply_chat_template(messages, tokenize=True, return_dict=True, **prompt)
    tokenizer_call = processor.tokenizer.apply_chat_template(text_items, tokenize=True, return_dict=True,
                                                             **prompt)
    return {
        "processor(rendered text)": list(processor(text=text, images=images)["input_ids"][0]),
        "processor.apply_chat_template(tokenize=True)": list(one_call["input_ids"][0]),
        "tokenizer(rendered text)": list(processor.tokenizer(text)["input_ids"]),
        "tokenizer.apply_chat_template(tokenize=True)": list(tokenizer_call["input_ids"]),
    }


def check_calling_paths(folder: str, model: ModelConfig, ours: "ours_lib.Tokenizer") -> None:
    """Raise unless the processor saved in ``folder`` gives the same ids whichever common way
    it is called (:func:`calling_paths`; the tokenizer's paths have one ``<image>`` per image),
    and they are the ids training writes (``ours``: its BOS, one at the start or none when it
    has none, then data/conversation.py's text). tests/data/test_llava_input.py checks the ids
    are the shard's."""
    from PIL import Image
    from transformers import AutoProcessor

    size = load_hf_vision_config(model.vision).image_size
    image = Image.new("RGB", (size, size))
    processor = AutoProcessor.from_pretrained(folder)
    paths = calling_paths(processor, sample_conversation(image), [image])
    expanded = paths["processor(rendered text)"]
    unexpanded = [i for n, i in enumerate(expanded)
                  if i != model.image_token_id or expanded[n - 1] != model.image_token_id]
    want = {name: unexpanded if name.startswith("tokenizer") else expanded for name in paths}
    bad = [name for name, ids in paths.items() if ids != want[name]]
    if bad:
        raise ConversionError(f"the exported processor's calling paths disagree ({', '.join(bad)}): "
                              + "; ".join(f"{name}: {ids[:8]}..." for name, ids in paths.items()))
    training = _training_prompt_ids(ours, image, size)
    if unexpanded != training:
        at = next((k for k, (a, b) in enumerate(zip(unexpanded, training)) if a != b),
                  min(len(unexpanded), len(training)))
        raise ConversionError(f"the exported processor's ids for the sample chat differ from "
                              f"training's at position {at}: {unexpanded[at:at + 8]} vs "
                              f"{training[at:at + 8]} (BOS id {ours.bos_id}; tokenizer {ours.path!r})")


def _training_prompt_ids(ours, image, size: int) -> List[int]:
    """The ids preprocessing writes for :func:`sample_conversation`'s generation prompt
    (samples.encode_document: BOS or none, images by id, text by ``encode_plain``), without the
    EOS that closes a document."""
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    segments = conversation.generation_prompt(sample_conversation(encoded.getvalue()))
    return encode_document(segments, ours, SampleConfig(template="qa", image_size=size)).tokens.tolist()[:-1]
