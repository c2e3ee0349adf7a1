"""Evaluation samples from held-out data: the demo data's split (valid.parquet), or a
multiple-choice TSV in VLMEvalKit's layout (:func:`read_vlmeval_tsv`).

Reuses the preprocessing's own templates (data/preprocess/samples.py) so a question is scored
in exactly the layout the model was trained on (``[image] "Question: q Answer:" " a"``), the
placeholder expansion of the loader (data/collate.py) and the training image normalisation
(data/image_transforms.py).

Columns used: image, caption, question, answer, candidates, and the first object's attributes
shape, colour, position, size (probe labels). A row without a caption (a TSV row) gives a
question only; a set without attributes gets no probes.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from PIL import Image

import numpy as np
import pyarrow.parquet as pq

from megatron_unihetero.data import conversation
from megatron_unihetero.data.collate import expand_sample
from megatron_unihetero.data.image_transforms import ImageNormalizer
from megatron_unihetero.data.preprocess.samples import SampleConfig, documents, encode_document
from megatron_unihetero.eval.runners import GenerationSample, QuestionSample, TextSample

PROBE_ATTRIBUTES = ("shape", "colour", "position", "size")


@dataclass
class EvalSets:
    questions: List[QuestionSample] = field(default_factory=list)
    captions: List[TextSample] = field(default_factory=list)  # one per image: probes, retrieval
    attributes: Dict[str, List[str]] = field(default_factory=dict)


def read_rows(path: str, max_samples: Optional[int] = None) -> List[dict]:
    """Rows of held-out data: a parquet file (the demo layout) or a VLMEvalKit TSV (``.tsv``)."""
    if path.endswith(".tsv"):
        return read_vlmeval_tsv(path, max_samples)
    table = pq.read_table(path)
    if max_samples is not None:
        table = table.slice(0, max_samples)
    return table.to_pylist()


OPTION_LETTERS = tuple("ABCDEFGHIJ")
_TSV_REQUIRED = ("index", "image", "question", "answer")


def read_vlmeval_tsv(path: str, max_samples: Optional[int] = None) -> List[dict]:
    """Multiple-choice rows of a VLMEvalKit TSV (MMBench / SEED-Bench / ScienceQA layout).

    Columns: ``index``, ``image`` (base64 image bytes; or, as VLMEvalKit writes repeated
    images, the ``index`` of an earlier row whose image it shares), ``question``, option
    columns ``A`` ``B`` ... (an empty cell: that option is absent), ``answer`` (the letter of
    the right option), optional ``hint`` (put before the question, as VLMEvalKit's prompt
    does). Returns rows in the demo layout: ``image`` bytes, ``question``, ``answer`` (the
    option's text) and ``candidates`` (the options' texts). Every image is decoded here (PIL,
    nothing else), so a bad row fails naming the file, the row and the field.
    """
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in _TSV_REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; a VLMEvalKit multiple-choice TSV "
                             f"has {list(_TSV_REQUIRED)} and option columns A, B, ...; got {header}")
        letters = [c for c in OPTION_LETTERS if c in header]
        if len(letters) < 2:
            raise ValueError(f"{path}: needs at least two option columns (A, B, ...); got {header}")
        rows, images = [], {}
        for line, rec in enumerate(reader, start=2):  # line 1 is the header
            if max_samples is not None and len(rows) >= max_samples:
                break
            where = f"{path}: line {line} (index {rec.get('index')!r})"
            if None in rec:  # more cells than header columns: a tab inside an unquoted field
                raise ValueError(f"{where}: {len(header) + len(rec[None])} fields for {len(header)} columns")
            index = (rec["index"] or "").strip()
            if not index:
                raise ValueError(f"{where}: field 'index' is empty")
            image = _tsv_image(rec.get("image"), images, where)
            images[index] = image
            options = [(c, (rec.get(c) or "").strip()) for c in letters]
            options = [(c, text) for c, text in options if text and text.lower() != "nan"]
            answer = (rec.get("answer") or "").strip()
            if answer not in dict(options):
                raise ValueError(f"{where}: field 'answer' is {answer!r}, not the letter of one of "
                                 f"the options {[c for c, _ in options]}")
            question = (rec.get("question") or "").strip()
            if not question:
                raise ValueError(f"{where}: field 'question' is empty")
            hint = (rec.get("hint") or "").strip()
            if hint and hint.lower() != "nan":
                question = f"{hint} {question}"
            texts = [text for _, text in options]
            if len(set(texts)) != len(texts):
                raise ValueError(f"{where}: two options have the same text {texts}: the answer "
                                 "could not be told apart by likelihood")
            rows.append({"id": index, "image": image, "question": question,
                         "answer": dict(options)[answer], "candidates": texts,
                         "answer_letter": answer, "candidate_letters": [c for c, _ in options]})
    return rows


def _tsv_image(value: Optional[str], earlier: Dict[str, bytes], where: str) -> bytes:
    value = (value or "").strip()
    if not value:
        raise ValueError(f"{where}: field 'image' is empty")
    if len(value) < 64 and value in earlier:  # VLMEvalKit's reference to a repeated image
        return earlier[value]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where}: field 'image' is not base64 ({exc}) nor the index of an "
                         "earlier row") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated image fails here, naming the row
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{where}: field 'image' does not decode as an image: {exc}") from None
    return data


def read_llava_qa(path: str, max_samples: Optional[int] = None,
                  image_root: Optional[str] = None) -> List[dict]:
    """Question-answer rows of LLaVA-style conversation data (a JSON array or JSON lines,
    data/preprocess/readers.py ``iter_llava``): per record its first user turn's text as
    ``question``, the reply after it as ``answer``, its (first) image read as preprocessing reads
    images (images.PathPolicy: inside ``image_root``, default the file's folder; regular files
    only; at most 64 MiB). The turns are checked by preprocessing's LLaVA reader
    (samples.llava_messages). Optional ``answers`` (references for VQA accuracy) and
    ``candidates`` (the record is then a question scored by likelihood too) are kept. A record
    that cannot be used is a ValueError naming the file, the record and what is wrong."""
    from megatron_unihetero.data.preprocess.images import ImageError, PathPolicy, read_image_value
    from megatron_unihetero.data.preprocess.readers import RowError, iter_llava
    from megatron_unihetero.data.preprocess.samples import RowReject, SampleConfig, llava_messages

    policy = PathPolicy(image_root or os.path.dirname(os.path.abspath(path)))
    rows: List[dict] = []
    for line, rec in iter_llava(path):
        if max_samples is not None and len(rows) >= max_samples:
            break
        where = f"{path}: record {line}"
        try:
            if isinstance(rec, RowError):
                raise RowReject(rec.reason, rec.detail)
            messages = llava_messages(rec, SampleConfig(template="conversation"))
            if len(messages) < 2 or messages[0]["role"] != "user" or messages[1]["role"] != "assistant":
                raise RowReject("bad_conversation", "needs a human turn and its reply in 'conversations'")
            question, reply = messages[0]["content"], messages[1]["content"]
            row = {"id": str(rec.get("id", line)),
                   "question": " ".join(it["text"] for it in question if it["type"] == "text"),
                   "answer": " ".join(it["text"] for it in reply if it["type"] == "text")}
            images = [it["image"] for it in question if it["type"] == "image"]
            if images:
                row["image"] = read_image_value(images[0], policy)
            for key in ("answers", "candidates"):
                if rec.get(key):
                    if not isinstance(rec[key], list):
                        raise RowReject("wrong_type", f"{key!r} must be a list of strings")
                    row[key] = [str(v) for v in rec[key]]
        except (RowReject, ImageError) as exc:
            raise ValueError(f"{where}: {exc.reason}: {exc}") from None
        rows.append(row)
    return rows


def eval_set_kind(path: str, kind: str = "auto") -> str:
    """demo | tsv | llava: ``kind``, or told by the path (``auto``)."""
    if kind != "auto":
        return kind
    if path.endswith(".tsv"):
        return "tsv"
    if path.endswith((".json", ".jsonl")):
        return "llava"
    return "demo"


def read_eval_rows(path: str, kind: str = "auto", max_samples: Optional[int] = None,
                   image_root: Optional[str] = None) -> List[dict]:
    """The rows of a held-out set of any kind (``eval_set_kind``)."""
    kind = eval_set_kind(path, kind)
    if kind == "llava":
        return read_llava_qa(path, max_samples, image_root)
    if kind == "tsv":
        return read_vlmeval_tsv(path, max_samples)
    return read_rows(held_out_path(path), max_samples)


def held_out_path(data: str) -> str:
    """``--data``: a demo data folder (its valid.parquet), a parquet file or a TSV."""
    return os.path.join(data, "valid.parquet") if os.path.isdir(data) else data


def _text_sample(doc, tokenizer, cfg: SampleConfig, tokens_per_image: int,
                 normalize: ImageNormalizer) -> TextSample:
    sample = encode_document(doc, tokenizer, cfg)
    tokens, mask = expand_sample(sample, tokenizer.image_token_id, tokens_per_image)
    # A caption shard has no loss mask (every token is a target in training, image markers
    # included); the metrics score text only: never the image tokens, their markers or the
    # first token (BOS, or the first text token without BOS: nothing before it predicts it).
    image_specials = [tokenizer.image_token_id, tokenizer.image_start_id, tokenizer.image_end_id]
    mask = mask & ~np.isin(tokens, image_specials)
    mask[0] = False
    images = normalize(np.stack(sample.images)) if sample.images else None
    return TextSample(images=images, tokens=tokens.tolist(), target_mask=mask.tolist())


def build_eval_sets(rows: List[dict], tokenizer, *, tokens_per_image: int, image_size: int,
                    image_mean=None, image_std=None) -> EvalSets:
    """Questions over their candidates, caption sequences, and first-object attribute labels.

    ``image_mean`` / ``image_std``: the encoder's normalisation (default ImageNet), as in training.
    """
    norm = {k: v for k, v in (("mean", image_mean), ("std", image_std)) if v is not None}
    normalize = ImageNormalizer(image_size=image_size, **norm)
    qa_cfg = SampleConfig(template="qa", image_size=image_size)
    caption_cfg = SampleConfig(template="caption", image_size=image_size)
    has_attributes = bool(rows) and all(name in rows[0] for name in PROBE_ATTRIBUTES)
    sets = EvalSets(attributes={name: [] for name in PROBE_ATTRIBUTES} if has_attributes else {})
    for row in rows:
        if not row.get("candidates"):  # a free-form answer (LLaVA QA): generation scores it
            continue
        candidates = list(row["candidates"])
        if row["answer"] not in candidates:
            raise ValueError(f"row {row.get('id')}: answer {row['answer']!r} is not among the "
                             f"candidates {candidates}")
        # The qa template's last segment is " <answer>" with a target mask; scoring a candidate
        # is scoring the sample whose answer is that candidate (its tokens and EOS).
        options = [_text_sample(documents({**row, "answer": c}, qa_cfg)[0], tokenizer, qa_cfg,
                                tokens_per_image, normalize) for c in candidates]
        sets.questions.append(QuestionSample(options, candidates.index(row["answer"])))
        if row.get("caption"):
            doc = documents(row, caption_cfg)[0]
            sets.captions.append(_text_sample(doc, tokenizer, caption_cfg, tokens_per_image, normalize))
        for name in sets.attributes:
            sets.attributes[name].append(row[name])
    return sets


# VLMEvalKit's (and LLaVA's) multiple-choice instruction: the options listed under the question.
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def choice_question(question: str, letters, options) -> str:
    """A multiple-choice question for generation: the question, one ``A. option`` line per
    option, then :data:`CHOICE_INSTRUCTION`."""
    lines = [question] + [f"{letter}. {text}" for letter, text in zip(letters, options)]
    return "\n".join(lines + [CHOICE_INSTRUCTION])


def _prompt_sample(segments, tokenizer, cfg: SampleConfig, tokens_per_image: int,
                   normalize: ImageNormalizer) -> TextSample:
    """A generation prompt tokenized like training (BOS unless the tokenizer has none, images
    by id, the text between two special tokens as one string) without the EOS a document ends
    with, placeholders expanded."""
    sample = encode_document(segments, tokenizer, cfg)
    sample.tokens = sample.tokens[:-1]  # encode_document closes the document with EOS
    sample.loss_mask = None
    tokens, _ = expand_sample(sample, tokenizer.image_token_id, tokens_per_image)
    images = normalize(np.stack(sample.images)) if sample.images else None
    return TextSample(images=images, tokens=tokens.tolist())


def build_generation_sets(rows: List[dict], tokenizer, *, tokens_per_image: int, image_size: int,
                          image_mean=None, image_std=None) -> List[GenerationSample]:
    """Prompts and references for generative evaluation, per row:

    - a question (demo parquet, or a row with ``question`` / ``answer``): ``qa``, the prompt
      ``[image] Question: q Answer:`` (data/conversation.py ``generation_prompt``); references
      the row's ``answers`` list when it has one (VQAv2-style), else ``[answer]``;
    - a multiple-choice TSV row: ``choice``, the question with its lettered options and
      :data:`CHOICE_INSTRUCTION`; scored by the option the answer names;
    - a caption (demo parquet): ``caption``, the caption template's prompt (``[image]``,
      what training's caption samples start with); references ``[caption]``.
    """
    norm = {k: v for k, v in (("mean", image_mean), ("std", image_std)) if v is not None}
    normalize = ImageNormalizer(image_size=image_size, **norm)
    cfg = SampleConfig(template="qa", image_size=image_size)
    out: List[GenerationSample] = []
    for row in rows:
        ident = str(row.get("id", len(out)))
        if "answer_letter" in row:
            letters = list(row.get("candidate_letters") or OPTION_LETTERS[:len(row["candidates"])])
            question = choice_question(row["question"], letters, row["candidates"])
            prompt = conversation.generation_prompt(conversation.question_messages(row["image"], question))
            out.append(GenerationSample(
                "choice", ident, _prompt_sample(prompt, tokenizer, cfg, tokens_per_image, normalize),
                references=[row["answer_letter"], row["answer"]], letters=letters,
                options=list(row["candidates"]), answer_index=letters.index(row["answer_letter"])))
            continue
        if row.get("question") and row.get("answer"):
            prompt = conversation.generation_prompt(conversation.question_messages(row["image"], row["question"]))
            references = list(row.get("answers") or [row["answer"]])
            out.append(GenerationSample(
                "qa", ident, _prompt_sample(prompt, tokenizer, cfg, tokens_per_image, normalize), references))
        if row.get("caption"):
            out.append(GenerationSample(
                "caption", ident, _prompt_sample([("image", row["image"])], tokenizer, cfg,
                                                 tokens_per_image, normalize), [row["caption"]]))
    return out
