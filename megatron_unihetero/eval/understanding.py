"""Understanding measured inside a training run: the held-out sets of ``logging.eval_sets``.

The trainer builds :class:`UnderstandingEval` once (the rows are read and tokenized then, so a
missing file fails before step 1) and calls :meth:`UnderstandingEval.evaluate` at
``logging.eval_interval``. Every training rank takes part, at any TP / PP / DP:

- answer accuracy by likelihood (eval/scoring.py, the scoring ``evaluate.py`` uses): questions
  dealt out over the data-parallel ranks, each DP replica's pipeline scoring its share, the
  counts all-reduced;
- with ``generate``: the exact match of greedy generated answers (VQA accuracy too) and, on a
  multiple-choice TSV, the accuracy of the option the answer names (eval/runners.py
  ``generative_figures``, generation/text.py). Text generation runs the whole model on one rank,
  so only at TP = PP = 1 (prompts dealt out over DP, the per-rank figures summed by count);
  at other layouts the generative figures are skipped, and the run says so once.

The record (one per evaluation) has, per set ``NAME``: ``NAME/accuracy``,
``NAME/chance_accuracy``, ``NAME/answer_logprob``, ``NAME/num_questions`` and with generation
``NAME/exact_match``, ``NAME/vqa_accuracy``, ``NAME/choice_accuracy``,
``NAME/num_generated``. The trainer adds ``samples_seen``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_unihetero.eval import runners, scoring
from megatron_unihetero.eval.data import build_eval_sets, build_generation_sets, eval_set_kind, read_eval_rows
from megatron_unihetero.models.config import ConfigError


class _Set:
    def __init__(self, cfg, questions, prompts):
        self.cfg = cfg
        self.questions = questions
        self.prompts = prompts


def generation_allowed() -> Optional[str]:
    """None when text generation can run on each rank (TP = PP = 1), else why not."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if tp == 1 and pp == 1:
        return None
    return f"text generation runs the whole model on one rank (TP=PP=1); this run is TP={tp}, PP={pp}"


class UnderstandingEval:
    """The run's held-out sets, tokenized once; :meth:`evaluate` scores them (collective)."""

    def __init__(self, eval_sets, tokenizer, *, tokens_per_image: int, image_size: int,
                 image_mean=None, image_std=None, dp_rank: int = 0, dp_size: int = 1,
                 dp_group=None, local_forward: bool = True, log: Callable[[str], None] = print):
        self.tokenizer = tokenizer
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        self.log = log
        self.sets: List[_Set] = []
        layout = dict(tokens_per_image=tokens_per_image, image_size=image_size,
                      image_mean=image_mean, image_std=image_std)
        no_generation = generation_allowed()
        if no_generation is None and not local_forward:
            no_generation = "this engine's forward needs every data-parallel rank (ZeRO-3)"
        for i, cfg in enumerate(eval_sets):
            key = f"logging.eval_sets[{i}] ({cfg.name})"
            try:
                rows = read_eval_rows(cfg.path, cfg.kind, cfg.max_rows, cfg.image_root)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{key}: {cfg.path} cannot be read as a {eval_set_kind(cfg.path, cfg.kind)} "
                                  f"set: {exc}") from exc
            sets = build_eval_sets(rows, tokenizer, **layout)
            prompts = []
            if cfg.generate:
                if no_generation:
                    log(f"{key}: generative figures skipped: {no_generation}")
                else:
                    prompts = [p for p in build_generation_sets(rows[:cfg.generate_rows], tokenizer, **layout)
                               if p.kind in ("qa", "choice")]
            if not sets.questions and not prompts:
                raise ConfigError(f"{key}: {cfg.path} has no question with candidate answers"
                                  + ("" if cfg.generate else " (a free-form QA set needs generate: true)"))
            self.sets.append(_Set(cfg, sets.questions, prompts))

    def evaluate(self, chunks) -> Optional[Dict[str, float]]:
        """Every set's figures on the last pipeline stage (None on the others); collective over
        the pipeline and data-parallel groups. ``chunks``: this rank's model chunks."""
        record: Dict[str, float] = {}
        last = parallel_state.is_pipeline_last_stage()
        for s in self.sets:
            name = s.cfg.name
            if s.questions:
                result = scoring.answer_accuracy(chunks, s.questions, dp_rank=self.dp_rank,
                                                 dp_size=self.dp_size, dp_group=self.dp_group)
                if result is not None:
                    for key in ("accuracy", "chance_accuracy", "answer_logprob", "num_questions"):
                        record[f"{name}/{key}"] = result[key]
            if s.prompts:
                record.update({f"{name}/{k}": v for k, v in self._generate(chunks[0], s).items()})
        return record if last else None

    def _generate(self, model, s: _Set) -> Dict[str, float]:
        """Greedy answers to this rank's share of the prompts, scored; the figures summed over
        DP by their counts."""
        from megatron_unihetero.generation.text import SamplingParams

        model = scoring._unwrap(model)
        mine = s.prompts[self.dp_rank::self.dp_size]
        was_training = model.training
        model.eval()
        try:
            figures = runners.generative_figures(model, mine, self.tokenizer,
                                                 SamplingParams(max_new_tokens=s.cfg.max_new_tokens))
        finally:
            model.train(was_training)
        qa, choice = figures.get("qa", {}), figures.get("choice", {})
        n_qa, n_choice = qa.get("num_questions", 0), choice.get("num_questions", 0)
        sums = torch.tensor([qa.get("exact_match", 0.0) * n_qa, qa.get("vqa_accuracy", 0.0) * n_qa, n_qa,
                             choice.get("accuracy", 0.0) * n_choice, n_choice], dtype=torch.float64)
        if self.dp_size > 1:
            sums = sums.to(next(model.parameters()).device)
            dist.all_reduce(sums, group=self.dp_group)
        em, vqa, n_qa, choice_right, n_choice = sums.tolist()
        out: Dict[str, float] = {"num_generated": int(n_qa + n_choice)}
        if n_qa:
            out.update(exact_match=em / n_qa, vqa_accuracy=vqa / n_qa)
        if n_choice:
            out["choice_accuracy"] = choice_right / n_choice
        return out


def build(cfg, model, *, dp_rank: int, dp_size: int, dp_group, local_forward: bool = True,
          log: Callable[[str], None] = print) -> Optional[UnderstandingEval]:
    """The run's :class:`UnderstandingEval` (None without ``logging.eval_sets``); ``cfg`` the
    resolved RunConfig, ``model`` this rank's first model chunk."""
    if not cfg.logging.eval_sets:
        return None
    from megatron_unihetero.data.tokenizer import build_tokenizer
    from megatron_unihetero.models.vision import image_normalization, load_hf_vision_config

    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.image_token_id != cfg.model.image_token_id:
        raise ConfigError(f"data.tokenizer {cfg.data.tokenizer!r} has <image> id {tokenizer.image_token_id}, "
                          f"model.image_token_id is {cfg.model.image_token_id}")
    mean, std = image_normalization(cfg.model.vision)
    return UnderstandingEval(cfg.logging.eval_sets, tokenizer, tokens_per_image=model.tokens_per_image,
                             image_size=int(load_hf_vision_config(cfg.model.vision).image_size),
                             image_mean=mean, image_std=std, dp_rank=dp_rank, dp_size=dp_size,
                             dp_group=dp_group, local_forward=local_forward, log=log)

