"""Text generation from our model (UniHeteroModel) on one rank: greedy or sampled, KV-cached.

    params = SamplingParams(max_new_tokens=16)                        # greedy
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)       # sampled, reproducible
    prompt = prompt_sample(conversation.generation_prompt(messages), tokenizer, ...)
    new_ids = generate(model, prompt.tokens, prompt.images, eos_id=tokenizer.eos_id,
                       params=params, suppress_ids=...)

The prompt is the one template's (data/conversation.py :func:`generation_prompt`: the chat
rendered up to ``... Answer:``, what the exported processor's ``apply_chat_template(...,
add_generation_prompt=True)`` writes), tokenized like training (samples.encode_document, BOS
first unless the tokenizer has none, no EOS) with every image placeholder expanded to
``tokens_per_image`` copies.
Generation stops at EOS (kept in the output, as transformers' ``generate`` keeps it) or after
``max_new_tokens``, or when the sequence reaches ``model.llm.max_sequence_length``.

**The KV cache is megatron-core's** (``megatron.core.inference.contexts.
StaticInferenceContext``): passed as ``inference_context`` through UniHeteroModel and
LlamaDecoder to megatron's TransformerBlock, its SelfAttention keeps each layer's keys and
values in the context and hands the whole cache to our CoreAttention
(models/llm.py ``_cached_inputs`` says what changes there: keys rotated at their positions,
a decode-step layout). megatron-core's engines and text-generation controllers are not used:
they expect a GPTModel-shaped forward (tokens, position ids, attention mask), CUDA tensors
and their own tokenizer wrapper; the loop here is a few lines. ``use_cache=False`` recomputes
the whole sequence at each step (the reference the tests compare the cache with).

Sampling follows transformers' order: suppressed ids -> temperature -> top-k -> top-p ->
draw from a ``torch.Generator`` seeded with ``seed`` (on the model's device), so a seed gives
the same tokens with and without the cache. ``temperature == 0`` is greedy (argmax; the first
id on a tie, as torch.argmax).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    """New token ids (EOS included when generated), and the work done."""

    tokens: List[int]
    stopped_at_eos: bool
    prompt_length: int
    seconds: float = 0.0
    per_step_seconds: List[float] = field(default_factory=list)


def never_generated(tokenizer, vocab_size: int) -> List[int]:
    """Ids no generated text may hold: the vocabulary's padding rows past the tokenizer (padded
    for TP, never real text) and the image specials (an image placeholder without its image
    cannot be run, and its markers only ever enclose one). Our generation and the export's
    generation_config.json suppress the same list."""
    padding = list(range(tokenizer.vocab_size, vocab_size))
    return padding + [tokenizer.image_token_id, tokenizer.image_start_id, tokenizer.image_end_id]


def check_model(model, task: str = "text generation", loader: str = "evaluate.py") -> None:
    """Generation (text here, images in generation/sample.py) runs the whole model on one rank:
    refuse other layouts by name; ``loader`` is the tool that loads a checkpoint at PP=1."""
    if not (model.pre_process and model.post_process):
        raise ValueError(f"{task} needs the whole model on one rank (PP=1): this model is one "
                         f"pipeline stage; load the checkpoint at PP=1 ({loader} does)")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != 1:
        raise ValueError(f"{task} runs at TP=1 (the outputs are not gathered); tensor parallel "
                         f"size is {tp}")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] float logits after temperature, top-k and top-p (removed ids at -inf)."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # Keep the smallest set of most likely ids whose probability reaches top_p (at least
        # one): an id goes when the ids more likely than it already reach top_p.
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """The next id from one row of logits [V] (suppressed ids already at -inf)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits.float(), params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [V] (fp32) at the last position of hidden [s, 1, h]."""
    logits, _ = model.llm.output_layer(hidden[-1:])
    return logits[0, 0].float()


@torch.no_grad()
def generate(model, prompt: Sequence[int], images: Optional[torch.Tensor] = None, *,
             eos_id: int, params: SamplingParams = SamplingParams(),
             suppress_ids: Sequence[int] = (), use_cache: bool = True) -> Generation:
    """Continue ``prompt`` (expanded token ids: each image's placeholders already
    ``tokens_per_image`` copies, training's BOS first) given its ``images`` [n, 3, S, S]
    (normalised like training's). ``suppress_ids``: ids never generated (the image placeholder id always is:
    an ``<image>`` without its image cannot be run)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    check_model(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    limit = model.cfg.llm.max_sequence_length
    if len(prompt) >= limit:
        raise ValueError(f"the prompt is {len(prompt)} tokens; model.llm.max_sequence_length is {limit}")
    steps = min(params.max_new_tokens, limit - len(prompt))
    banned = torch.tensor(sorted(set(suppress_ids) | {model.cfg.image_token_id}), dtype=torch.long,
                          device=device)
    generator = None if params.greedy else torch.Generator(device=device).manual_seed(params.seed)
    if images is not None:
        images = images.to(device=device, dtype=dtype)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)

    def positions(start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=device)[None]

    context = StaticInferenceContext(max_batch_size=1, max_sequence_length=len(prompt) + steps) \
        if use_cache else None
    out: List[int] = []
    timings: List[float] = []
    start = time.perf_counter()
    step_input = tokens
    try:
        for _ in range(steps):
            tick = time.perf_counter()
            if context is None:  # the whole sequence again: the reference for the cache
                hidden = model(tokens, positions(0, tokens.shape[1]), images=images)
            else:
                offset = context.sequence_len_offset
                hidden = model(step_input, positions(offset, step_input.shape[1]),
                               images=images if offset == 0 else None, inference_context=context)
                context.increment_sequence_len_offset(step_input.shape[1])
                context.enable_decode_mode()
            logits = _last_logits(model, hidden)
            logits[banned[banned < logits.shape[0]]] = float("-inf")
            token = pick(logits, params, generator)
            out.append(token)
            timings.append(time.perf_counter() - tick)
            if token == eos_id:
                break
            step_input = torch.tensor([[token]], dtype=torch.long, device=device)
            tokens = torch.cat([tokens, step_input], dim=1)
    finally:
        model.train(was_training)
    return Generation(tokens=out, stopped_at_eos=bool(out) and out[-1] == eos_id,
                      prompt_length=len(prompt), seconds=time.perf_counter() - start,
                      per_step_seconds=timings)
