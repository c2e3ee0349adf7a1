"""Answer accuracy by likelihood at any layout: the one scoring path of ``evaluate.py`` and of
the training run's own evaluation (eval/understanding.py).

A question is scored as one micro-batch: its candidates' sequences (eval/runners.py
``QuestionSample``), padded to the set's longest sequence and to the set's largest number of
candidates, so every micro-batch has the same shape (megatron-core's pipeline schedule sends
tensors of one shape) and a question is scored by the same arithmetic at any TP, PP and DP.
The micro-batches go through megatron-core's forward-only schedule (``get_forward_backward_func``,
interleaved chunks included); on the last pipeline stage each row's summed log-probability of
its masked tokens comes from the vocab-parallel cross-entropy of the LM head (TP: the logits
stay sharded). Questions are dealt out over the data-parallel ranks (question ``i`` to rank
``i % dp``, each rank padded to the same count with a copy that is not counted) and the counts
are all-reduced over the data-parallel group.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_unihetero.eval import metrics


def token_logprobs(output_layer, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, j] | tokens[:, :j]) for j >= 1, [B, S - 1] fp32, from the last stage's
    hidden states [S, B, H] (the LM head vocab-parallel under TP)."""
    logits, _ = output_layer(hidden[:-1])  # [S - 1, B, V / tp]: position j predicts j + 1
    targets = tokens[:, 1:].t().contiguous().to(logits.device)  # [S - 1, B]
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets).t()


def masked_logprob_sums(output_layer, hidden: torch.Tensor, tokens: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its masked tokens [B] (``mask[:, 0]`` ignored:
    nothing predicts the first token), fp32 on the hidden states' device."""
    picked = token_logprobs(output_layer, hidden, tokens)
    return (picked * mask[:, 1:].to(picked.device, picked.dtype)).sum(dim=1)


def _pad_length(length: int) -> int:
    """Sequence lengths a multiple of TP (sequence parallelism splits the sequence)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return -(-length // tp) * tp


def question_batch(question, width: int, length: int) -> dict:
    """One question as a micro-batch of ``width`` rows x ``length`` tokens: its candidates,
    then copies of the first one (``rows`` says how many are real); right-padded with 0 (causal
    attention: padding after a row never reaches its scored positions)."""
    rows = list(question.candidates)
    real = len(rows)
    rows += [rows[0]] * (width - real)
    tokens = torch.zeros((width, length), dtype=torch.long)
    mask = torch.zeros((width, length), dtype=torch.bool)
    for i, sample in enumerate(rows):
        tokens[i, :len(sample.tokens)] = torch.tensor(sample.tokens, dtype=torch.long)
        if sample.target_mask:
            mask[i, :len(sample.target_mask)] = torch.tensor(sample.target_mask, dtype=torch.bool)
    images = [s.images for s in rows if s.images is not None and s.images.shape[0]]
    return {"tokens": tokens, "mask": mask, "rows": real,
            "position_ids": torch.arange(length)[None].expand(width, length).contiguous(),
            "images": torch.cat(images) if images else None}


@torch.no_grad()
def candidate_scores(chunks, batches: List[dict]) -> Optional[List[torch.Tensor]]:
    """Each micro-batch's rows' summed masked log-probabilities, through megatron-core's
    forward-only schedule over this rank's model ``chunks`` (one per virtual stage); a list of
    [width] tensors on the last pipeline stage, None on the others. Collective over the
    pipeline group."""
    chunks = _chunk_list(chunks)
    if not batches:
        return [] if parallel_state.is_pipeline_last_stage() else None
    device = next(chunks[0].parameters()).device
    dtype = next(chunks[0].parameters()).dtype
    was_training = [c.training for c in chunks]
    for chunk in chunks:
        chunk.eval()

    def forward_step(data_iterator, stage_model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device)
        images = batch["images"]
        if images is not None:
            images = images.to(device=device, dtype=dtype)
        hidden = stage_model(tokens, batch["position_ids"].to(device), images=images)

        def score(output):
            head = _unwrap(stage_model).llm.output_layer
            sums = masked_logprob_sums(head, output, tokens, batch["mask"])
            return output.sum() * 0.0, torch.tensor(0, dtype=torch.int), {"scores": sums.double().cpu()}

        return hidden, score

    first = batches[0]
    try:
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
            model=chunks, num_microbatches=len(batches),
            seq_length=first["tokens"].shape[1], micro_batch_size=first["tokens"].shape[0],
            forward_only=True)
    finally:
        for chunk, training in zip(chunks, was_training):
            chunk.train(training)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [report["scores"] for report in reports]


def _chunk_list(chunks) -> list:
    return list(chunks) if isinstance(chunks, (list, tuple)) else [chunks]


def _unwrap(module):
    while hasattr(module, "module"):  # megatron DDP / Float16Module wrappers
        module = module.module
    return module


def answer_accuracy(chunks, questions: Sequence, *, dp_rank: int = 0, dp_size: int = 1,
                    dp_group=None) -> Optional[Dict[str, object]]:
    """Answer accuracy by likelihood over ``questions`` (the same list on every rank): the
    candidate with the highest summed log-probability is the model's answer. On the last
    pipeline stage: ``accuracy``, ``chance_accuracy`` (the mean of 1 / candidates),
    ``answer_logprob`` (the mean log-probability of the right answer's tokens),
    ``num_questions`` (all ranks') and ``predictions`` (this rank's questions', in order);
    None on other stages. Collective over the pipeline and data-parallel groups."""
    questions = list(questions)
    if not questions:
        raise ValueError("no questions to score")
    width = max(len(q.candidates) for q in questions)
    length = _pad_length(max(len(s.tokens) for q in questions for s in q.candidates))
    mine = list(range(dp_rank, len(questions), dp_size))
    per_rank = -(-len(questions) // dp_size)
    if len(_chunk_list(chunks)) > 1:  # the interleaved schedule takes a multiple of PP micro-batches
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        per_rank = -(-per_rank // pp) * pp
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))  # same count on every rank
    batches = [question_batch(questions[i], width, length) for i in padded]
    scores = candidate_scores(chunks, batches)
    if scores is None:
        return None
    predictions, sums = [], torch.zeros(4, dtype=torch.float64)  # right, n, answer logprob, chance
    for index, row_scores in zip(mine, scores):
        question = questions[index]
        picked = metrics.pick_candidate(row_scores[:len(question.candidates)].tolist())
        predictions.append(picked)
        sums += torch.tensor([float(picked == question.answer), 1.0,
                              float(row_scores[question.answer]), 1.0 / len(question.candidates)],
                             dtype=torch.float64)
    if dp_size > 1:
        device = next(_chunk_list(chunks)[0].parameters()).device  # NCCL reduces on the device
        sums = sums.to(device)
        dist.all_reduce(sums, group=dp_group)
    right, n, logprob, chance = sums.tolist()
    return {"accuracy": right / n, "chance_accuracy": chance / n, "answer_logprob": logprob / n,
            "num_questions": int(n), "predictions": predictions}
