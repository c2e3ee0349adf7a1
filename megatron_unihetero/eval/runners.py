"""Model runners: apply the metrics to a built UniHetero model on one rank (TP=1, PP=1).

Samples carry preprocessed inputs (``data.py`` builds them from the demo data): image tensors
normalised like training's, token ids with every image placeholder already expanded to
``tokens_per_image`` copies, and a mask of the tokens to score. Rows of a batch are right-padded;
with causal attention the padding never influences the scored positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_unihetero.eval import diagnostics, generation_metrics, metrics, probes, retrieval, scoring


@dataclass
class TextSample:
    """One sequence: its images [n_img, 3, S, S], expanded token ids and scoring mask."""

    images: torch.Tensor
    tokens: List[int]
    target_mask: List[bool] = field(default_factory=list)  # empty: score nothing


@dataclass
class QuestionSample:
    """A question scored over candidate answers: one TextSample per candidate (same image and
    question, the candidate's tokens masked) and the index of the right one."""

    candidates: List[TextSample]
    answer: int


@dataclass
class GenerationSample:
    """A prompt to generate from and what to score the text against (eval/data.py
    ``build_generation_sets``): ``kind`` is "qa" (short answer), "caption" or "choice"
    (multiple choice: the option letters and texts, the right option's index)."""

    kind: str
    id: str
    prompt: TextSample
    references: List[str]
    letters: List[str] = field(default_factory=list)
    options: List[str] = field(default_factory=list)
    answer_index: Optional[int] = None


def _check(model) -> None:
    if not (model.pre_process and model.post_process):
        raise ValueError("evaluation runners need the whole model on one rank (PP=1)")
    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("evaluation runners need TP=1 (the logits are not gathered)")


def _batch(samples: Sequence[TextSample], pad_id: int = 0):
    length = max(len(s.tokens) for s in samples)
    tokens = torch.full((len(samples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.bool)
    for row, sample in enumerate(samples):
        tokens[row, :len(sample.tokens)] = torch.tensor(sample.tokens, dtype=torch.long)
        if sample.target_mask:
            mask[row, :len(sample.target_mask)] = torch.tensor(sample.target_mask, dtype=torch.bool)
    images = [s.images for s in samples if s.images is not None and s.images.shape[0]]
    images = torch.cat(images) if images else None
    return tokens, mask, images


@torch.no_grad()
def hidden_states(model, tokens: torch.Tensor, images: Optional[torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden states [B, S, H] (after the final norm)."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens).contiguous()
    if images is not None:
        images = images.to(device=device, dtype=next(model.parameters()).dtype)
    return model(tokens, position_ids, images=images).transpose(0, 1)


@torch.no_grad()
def sequence_logprobs(model, samples: Sequence[TextSample]) -> torch.Tensor:
    """Sum of log-probs of each sample's masked tokens [len(samples)] (float64, on CPU), by
    the one scoring path (eval/scoring.py)."""
    tokens, mask, images = _batch(samples)
    hidden = hidden_states(model, tokens, images).transpose(0, 1)  # [S, B, H]
    return scoring.masked_logprob_sums(model.llm.output_layer, hidden, tokens, mask).double().cpu()


def answer_accuracy(model, questions: Sequence[QuestionSample]) -> Dict[str, object]:
    """Pick, per question, the candidate with the highest summed log-prob; report accuracy
    (eval/scoring.py ``answer_accuracy``, the training run's own evaluation's too)."""
    _check(model)
    return scoring.answer_accuracy([model], questions)


def caption_perplexity(model, samples: Sequence[TextSample], batch_size: int = 8) -> Dict[str, float]:
    """Perplexity of the masked (caption) tokens given the image and the tokens before."""
    _check(model)
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        nll -= float(sequence_logprobs(model, chunk).sum())
        count += sum(sum(bool(m) for m in s.target_mask[1:]) for s in chunk)
    return {"perplexity": metrics.perplexity(nll, count),
            "nll_per_token": nll / max(count, 1), "num_tokens": count}


@torch.no_grad()
def visual_hidden_means(model, samples: Sequence[TextSample], batch_size: int = 8) -> torch.Tensor:
    """Per image [n_img, H]: the mean last-layer hidden state over its visual positions."""
    _check(model)
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        tokens, _, images = _batch(chunk)
        hidden = hidden_states(model, tokens, images).float().cpu()
        layout = model._layout(tokens, None, 0 if images is None else images.shape[0])
        visual = hidden[layout.visual_mask]  # in order of the images' tokens
        out.append(visual.reshape(-1, model.tokens_per_image, visual.shape[-1]).mean(dim=1))
    return torch.cat(out)


def attribute_probes(model, samples: Sequence[TextSample], attributes: Dict[str, Sequence], *,
                     test_fraction: float = 0.3, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """A linear probe per attribute (one label per image) on the mean visual hidden states."""
    features = visual_hidden_means(model, samples)
    results = {}
    for name, labels in attributes.items():
        if len(labels) != features.shape[0]:
            raise ValueError(f"attribute {name!r}: {len(labels)} labels for {features.shape[0]} images")
        results[name] = probes.probe_accuracy(features, labels, test_fraction=test_fraction, seed=seed)
    return results


@torch.no_grad()
def semantic_retrieval(model, samples: Sequence[TextSample]) -> Dict[str, float]:
    """Retrieval of the true next visual target among the sample's own visual targets (top-1,
    top-5 and their chance rates), and the regression figures over every held-out prediction
    (eval/diagnostics.py: R² about the held-out mean target, cosine, and the mean predictor's
    figures as the baseline)."""
    _check(model)
    if model.semantic_head is None:
        raise ValueError("semantic retrieval needs the semantic head (model.semantic.weight > 0)")
    model.eval()
    hits, hits5, chance, chance5 = [], [], [], []
    stats = None
    for sample in samples:
        if sample.images is None or sample.images.shape[0] == 0:
            continue
        tokens, _, images = _batch([sample])
        hidden = hidden_states(model, tokens, images)
        layout = model._layout(tokens.to(hidden.device), None, images.shape[0])
        images = images.to(device=hidden.device, dtype=hidden.dtype)
        features = model.vision_features(images, None)
        bank = model.semantic_targets(features, model.projector(features))
        bank = bank.reshape(-1, bank.shape[-1])  # [n_img * T, D]: this sample's candidates
        predictions = model.semantic_head(hidden[0][layout.semantic_mask[0]])
        per_position = torch.full_like(tokens[0], -1).to(hidden.device)
        per_position[layout.visual_mask[0]] = layout.visual_index
        true_index = per_position[1:][layout.semantic_mask[0, :-1]]
        hits.append(retrieval.top1_hits(predictions, bank, true_index))
        hits5.append(retrieval.topk_hits(predictions, bank, true_index, 5))
        chance.append(torch.full((predictions.shape[0],), 1.0 / bank.shape[0]))
        chance5.append(torch.full((predictions.shape[0],), min(5, bank.shape[0]) / bank.shape[0]))
        stats = diagnostics.add_stats(stats, diagnostics.regression_stats(predictions, bank[true_index]))

    def mean(parts):
        return float(torch.cat(parts).double().mean()) if parts and len(torch.cat(parts)) else float("nan")

    result = {"top1": mean(hits), "chance": mean(chance), "top5": mean(hits5), "chance_top5": mean(chance5),
              "num_predictions": int(sum(len(h) for h in hits))}
    if stats is not None:
        result.update({k[len("semantic_"):]: v for k, v in diagnostics.regression_figures(stats).items()})
    return result


def generative_figures(model, samples: Sequence[GenerationSample], tokenizer, params,
                       *, num_examples: int = 3) -> Dict[str, object]:
    """Generate an answer for every sample (generation/text.py, KV-cached) and score it:
    short answers by exact match, VQA accuracy and ANLS; captions by BLEU-1..4 and CIDEr-D;
    multiple choice by the option the answer names (eval/generation_metrics.py). Padding rows
    of the vocabulary (past the tokenizer) and the image specials are never generated; a
    prompt as long as ``model.llm.max_sequence_length`` is skipped and counted."""
    from megatron_unihetero.generation import text as text_gen

    _check(model)
    vocab = model.cfg.llm.vocab_size
    suppress = text_gen.never_generated(tokenizer, vocab)
    by_kind: Dict[str, List] = {}
    tokens = seconds = 0.0
    limit = model.cfg.llm.max_sequence_length
    too_long = [s for s in samples if len(s.prompt.tokens) >= limit]
    for sample in samples:
        if len(sample.prompt.tokens) >= limit:
            continue
        result = text_gen.generate(model, sample.prompt.tokens, sample.prompt.images,
                                   eos_id=tokenizer.eos_id, params=params, suppress_ids=suppress)
        ids = result.tokens[:-1] if result.stopped_at_eos else result.tokens
        answer = tokenizer.decode(ids).strip()
        by_kind.setdefault(sample.kind, []).append((sample, answer))
        tokens += len(result.tokens)
        seconds += result.seconds
    figures: Dict[str, object] = {
        "settings": {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                     "top_k": params.top_k, "top_p": params.top_p, "seed": params.seed},
        "generated_tokens": int(tokens), "tokens_per_s": tokens / seconds if seconds else float("nan"),
        # Prompts the model cannot take (model.llm.max_sequence_length): not scored, counted.
        "skipped_long_prompts": len(too_long)}
    if "qa" in by_kind:
        pairs = by_kind["qa"]
        figures["qa"] = {**generation_metrics.answer_scores([a for _, a in pairs],
                                                            [s.references for s, _ in pairs]),
                         "num_questions": len(pairs)}
    if "caption" in by_kind:
        pairs = by_kind["caption"]
        figures["caption"] = {**generation_metrics.caption_scores([a for _, a in pairs],
                                                                  [s.references for s, _ in pairs]),
                              "num_captions": len(pairs)}
    if "choice" in by_kind:
        pairs = by_kind["choice"]
        picked = [generation_metrics.parse_choice(a, s.letters, s.options) for s, a in pairs]
        figures["choice"] = {
            "accuracy": generation_metrics.mean([float(p == s.answer_index) for (s, _), p in zip(pairs, picked)]),
            "unparsed": sum(p is None for p in picked) / len(pairs), "num_questions": len(pairs)}
    figures["examples"] = [{"id": s.id, "kind": s.kind, "generated": a, "references": s.references[:3]}
                           for kind in sorted(by_kind) for s, a in by_kind[kind][:num_examples]]
    return figures
