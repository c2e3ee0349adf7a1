"""Scores of generated text against references (no model): short answers and captions.

Short answers (one string per question, one or more references):

- :func:`normalize_answer`: the VQA evaluation's normalisation: lowercase, punctuation removed
  (dropped next to a space, else a space: "red-blue" reads "red blue"), a period kept only
  between digits ("3.5"), number words to digits ("two" -> "2"), articles (a, an, the)
  removed, whitespace collapsed. Its contraction table ("dont" -> "don't") is left out.
- :func:`exact_match`: 1 when the normalised answer equals a normalised reference.
- :func:`vqa_accuracy`: min(#references matching / 3, 1) when there are several references
  (VQAv2 has ten per question), exact match when there is one.
- :func:`anls`: Average Normalised Levenshtein Similarity (ST-VQA, DocVQA): the best over the
  references of 1 - edit distance / the longer length (lowercased, whitespace collapsed),
  0 below 0.5.
- :func:`parse_choice`: which option a generated multiple-choice answer names (its letter, or
  an option's text).

Captions: :func:`caption_scores`, BLEU-1..4 and CIDEr(-D) through pycocoevalcap's own
``Bleu`` and ``Cider`` scorers (pure Python; only that package's METEOR and SPICE need Java,
and its PTB tokenizer, which is replaced here by :func:`caption_tokens`: lowercase, punctuation
removed, split on whitespace, what the PTB tokenizer's output looks like after coco-caption
drops its punctuation tokens). BLEU is corpus BLEU ("closest" reference length) and CIDEr-D's
document frequencies come from the references of the set being scored, as in coco-caption:
compare figures over the same set only.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!", ":", "*", "#", "%", "^", "&", "|", "~", "$")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    keep_commas = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or (p == "," and keep_commas):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    _need(references)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """min(#matching references / 3, 1) with several references; exact match with one."""
    _need(references)
    if len(references) == 1:
        return exact_match(prediction, references)
    pred = normalize_answer(prediction)
    return min(sum(pred == normalize_answer(r) for r in references) / 3.0, 1.0)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions; each costs 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Normalised Levenshtein similarity to the closest reference, 0 below ``threshold``."""
    _need(references)
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ref in references:
        ref = " ".join(ref.strip().lower().split())
        longest = max(len(ref), len(pred))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(pred, ref) / longest
        best = max(best, similarity)
    return best if best >= threshold else 0.0


_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)\s]|$)")


def parse_choice(generated: str, letters: Sequence[str], options: Sequence[str]) -> Optional[int]:
    """The index of the option ``generated`` names: a leading option letter ("B", "(B)",
    "B. text"), else an option's text (normalised, equal; else the one option whose text it
    contains); None when it names none or several."""
    text = generated.strip()
    match = _LETTER.match(text)
    if match and match.group(1) in letters:
        return list(letters).index(match.group(1))
    norm = normalize_answer(text)
    texts = [normalize_answer(o) for o in options]
    if norm in texts:
        return texts.index(norm)
    contained = [i for i, t in enumerate(texts) if t and re.search(rf"(^|\s){re.escape(t)}($|\s)", norm)]
    return contained[0] if len(contained) == 1 else None


def caption_tokens(text: str) -> str:
    """A caption as coco-caption scores it: lowercase words, punctuation removed, one space."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).replace("'", " '").split())


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D of ``predictions`` (one per image) against each image's
    references, through pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} captions for {len(references)} reference lists")
    if not predictions:
        return {}
    res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
    gts = {i: [caption_tokens(r) for r in refs] for i, refs in enumerate(references)}
    for i, refs in gts.items():
        _need(refs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["cider"] = float(cider)
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _need(references: Sequence[str]) -> None:
    if not references:
        raise ValueError("no references to score against")


def answer_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Mean exact match, VQA accuracy and ANLS of short answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} answers for {len(references)} reference lists")
    pairs: List = list(zip(predictions, references))
    return {"exact_match": mean([exact_match(p, r) for p, r in pairs]),
            "vqa_accuracy": mean([vqa_accuracy(p, r) for p, r in pairs]),
            "anls": mean([anls(p, r) for p, r in pairs])}
