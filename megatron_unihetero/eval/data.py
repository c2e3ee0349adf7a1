"""Evaluation samples from the demo data's held-out split (valid.parquet).

Reuses the preprocessing's own templates (data/preprocess/samples.py) so a question is scored
in exactly the layout the model was trained on (``[image] "Question: q Answer:" " a"``), the
placeholder expansion of the loader (data/collate.py) and the training image normalisation
(data/image_transforms.py).

Columns used: image, caption, question, answer, candidates, and the first object's attributes
shape, colour, position, size (probe labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import pyarrow.parquet as pq

from megatron_unihetero.data.collate import expand_sample
from megatron_unihetero.data.image_transforms import ImageNormalizer
from megatron_unihetero.data.preprocess.samples import SampleConfig, documents, encode_document
from megatron_unihetero.eval.runners import QuestionSample, TextSample

PROBE_ATTRIBUTES = ("shape", "colour", "position", "size")


@dataclass
class EvalSets:
    questions: List[QuestionSample] = field(default_factory=list)
    captions: List[TextSample] = field(default_factory=list)  # one per image: probes, retrieval
    attributes: Dict[str, List[str]] = field(default_factory=dict)


def read_rows(path: str, max_samples: Optional[int] = None) -> List[dict]:
    table = pq.read_table(path)
    if max_samples is not None:
        table = table.slice(0, max_samples)
    return table.to_pylist()


def _text_sample(doc, tokenizer, cfg: SampleConfig, tokens_per_image: int,
                 normalize: ImageNormalizer) -> TextSample:
    sample = encode_document(doc, tokenizer, cfg)
    tokens, mask = expand_sample(sample, tokenizer.image_token_id, tokens_per_image)
    # A caption shard has no loss mask (every token is a target in training, image markers
    # included); the metrics score text only: never the image tokens, their markers or BOS.
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
    sets = EvalSets(attributes={name: [] for name in PROBE_ATTRIBUTES})
    for row in rows:
        candidates = list(row["candidates"])
        if row["answer"] not in candidates:
            raise ValueError(f"row {row.get('id')}: answer {row['answer']!r} is not among the "
                             f"candidates {candidates}")
        # The qa template's last segment is " <answer>" with a target mask; scoring a candidate
        # is scoring the sample whose answer is that candidate (its tokens and EOS).
        options = [_text_sample(documents({**row, "answer": c}, qa_cfg)[0], tokenizer, qa_cfg,
                                tokens_per_image, normalize) for c in candidates]
        sets.questions.append(QuestionSample(options, candidates.index(row["answer"])))
        doc = documents(row, caption_cfg)[0]
        sets.captions.append(_text_sample(doc, tokenizer, caption_cfg, tokens_per_image, normalize))
        for name in PROBE_ATTRIBUTES:
            sets.attributes[name].append(row[name])
    return sets
