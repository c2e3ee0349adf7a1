"""Training throughput: our trainer step vs a plain loop over transformers' Llava, same size.

    python benchmarks/train_throughput.py [--config examples/configs/tiny_cpu.yaml] [--steps 20]

Both sides train the same architecture (Llama decoder + DINOv2 encoder + 2-layer projector) on
the same batch shape (micro_batch x seq_length tokens with images), in fp32 on CPU with AdamW:

* ours: ``MegatronEngine.train_step`` (megatron-core layers, DDP buffers, the pipeline schedule,
  global-token loss normalisation, clipping), semantic generation off and on, eager;
* reference: ``LlavaForConditionalGeneration(input_ids, pixel_values, labels)`` -> backward ->
  clip -> AdamW, the loop a transformers user would write. It attends across the two documents
  packed in each row (plain causal attention);
* the same loop given the documents' block-causal mask and position ids: the same attention
  work as ours (shown for comparison; the target is the plain loop);
* ours with ``train.compile`` (torch.compile of the decoder layers), and, to compare like with
  like, the plain loop with its decoder layers compiled the same way. The first step of a
  compiled side compiles; its time is printed, and it is not one of the timed steps.

Prints tokens/s per side (median over steps after warm-up; the sides run interleaved, in a
shuffled order each round, so a shared machine's drifting load hits all of them alike) and the
ratio to the reference: the median over rounds of the two steps' time ratio within a round.
Config overrides pass through: `--parallel.distributed_optimizer=false`.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import time

import torch


def synthetic_batch(cfg, tokens_per_image: int, image_size: int, seed: int = 0) -> dict:
    """One packed micro-batch: each row holds two documents, each with one image."""
    gen = torch.Generator().manual_seed(seed)
    rows, seq = cfg.data.micro_batch_size, cfg.data.seq_length
    vocab, image_id = cfg.model.llm.vocab_size, cfg.model.image_token_id
    tokens = torch.randint(16, vocab, (rows, seq), generator=gen)
    half = seq // 2
    segment_ids = torch.zeros(rows, seq, dtype=torch.int32)
    segment_ids[:, half:] = 1
    position_ids = torch.cat([torch.arange(half), torch.arange(seq - half)]).repeat(rows, 1)
    for start in (1, half + 1):
        tokens[:, start:start + tokens_per_image] = image_id
    labels = torch.roll(tokens, -1, 1)
    labels[:, half - 1] = -100
    labels[:, -1] = -100
    images = torch.randn(rows * 2, 3, image_size, image_size, generator=gen)
    return dict(tokens=tokens, labels=labels, position_ids=position_ids, segment_ids=segment_ids,
                images=images, num_documents=rows * 2)


def time_interleaved(step_fns: dict, steps: int, warmup: int = 3, seed: int = 0) -> dict:
    """Seconds of each step of each function, run interleaved: one step of each per round, in a
    new random order every round (lists aligned by round).

    On a shared machine the neighbours' load drifts over seconds; interleaving makes every side
    see the same drift, so the ratios hold even when the absolute figures move. The order is
    shuffled because a call runs faster (4-7% for one layer's fwd+bwd) right after one of the same
    shapes, whose freed memory and warm caches it reuses: a fixed order favours whichever
    side follows its twin.
    """
    order = random.Random(seed)
    for _ in range(warmup):
        for fn in step_fns.values():
            fn()
    times = {name: [] for name in step_fns}
    for _ in range(steps):
        names = list(step_fns)
        order.shuffle(names)
        for name in names:
            fn = step_fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def run_first_step(step, side: str) -> None:
    """Run a compiled side's first step, which compiles (unless an earlier side compiled the same
    graphs), outside the timed rounds; print how long it took."""
    start = time.perf_counter()
    step()
    print(f"  ({side}: the first step, compiling, took {time.perf_counter() - start:.1f} s)")


def ours_step(cfg, semantic_weight: float, compile_layers: bool = False):
    """(step function, tokens per step) of our megatron engine on the config's batch shape;
    ``compile_layers``: with ``train.compile`` (compiled here, by a first step that is timed)."""
    from megatron_unihetero import parallel
    from megatron_unihetero.training.engine_megatron import MegatronEngine

    cfg = copy.deepcopy(cfg)
    cfg.model.semantic.weight = semantic_weight
    model = parallel.build_model(cfg.model, compile_layers=compile_layers)
    engine = MegatronEngine(model, cfg)
    batch = synthetic_batch(cfg, model.tokens_per_image, model.vision.image_size)
    weights = {"text": 1.0, "semantic": semantic_weight}

    def step():
        engine.train_step([batch], weights)

    if compile_layers:
        run_first_step(step, "train.compile")
    return step, batch["tokens"].numel()


def build_hf_llava(cfg):
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    llm = cfg.model.llm
    text = LlamaConfig(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                       intermediate_size=llm.ffn_hidden_size, num_hidden_layers=llm.num_layers,
                       num_attention_heads=llm.num_attention_heads,
                       num_key_value_heads=llm.num_query_groups, rms_norm_eps=llm.norm_epsilon,
                       max_position_embeddings=llm.max_sequence_length,
                       rope_theta=llm.rotary_base, tie_word_embeddings=False)
    vision = Dinov2Config(**cfg.model.vision.hf_config)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=cfg.model.image_token_id,
                         vision_feature_layer=cfg.model.vision.feature_layer,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    return model


def hf_step(cfg, tokens_per_image: int, image_size: int, document_mask: bool = False,
            compile_layers: bool = False):
    """(step function, tokens per step) of the plain transformers Llava loop; with
    ``document_mask`` it gets the packed documents' [b, 1, s, s] mask and position ids; with
    ``compile_layers`` its decoder layers are torch.compiled (as train.compile does ours)."""
    from megatron_unihetero.kernels.attention import block_causal_mask

    model = build_hf_llava(cfg)
    model.train()
    if compile_layers:
        for layer in model.model.language_model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.train.lr)
    batch = synthetic_batch(cfg, tokens_per_image, image_size)
    labels = batch["tokens"].clone()
    labels[labels == cfg.model.image_token_id] = -100
    packing = (dict(attention_mask=block_causal_mask(batch["segment_ids"]),
                    position_ids=batch["position_ids"]) if document_mask else {})

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=batch["tokens"], pixel_values=batch["images"], labels=labels, **packing)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()

    if compile_layers:
        run_first_step(step, "transformers, compiled layers")
    return step, batch["tokens"].numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. --parallel.distributed_optimizer=false")
    args, extra = parser.parse_known_args()
    args.overrides += extra
    torch.set_num_threads(args.threads)

    from megatron_unihetero import parallel
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.models.vision import load_hf_vision_config, tokens_per_image
    from megatron_unihetero.training.config import RunConfig

    cfg = load_config(RunConfig, args.config, ["--model.llm.attention_impl=auto", *args.overrides])
    os.environ.setdefault("MASTER_PORT", "29517")
    parallel.initialize(1, 1, seed=0)
    vision = load_hf_vision_config(cfg.model.vision)
    tpi = tokens_per_image(cfg.model.vision)

    sides = {"ours (megatron engine, text only)": ours_step(cfg, 0.0),
             "ours (megatron engine, + semantic)": ours_step(cfg, 1.0),
             "ours, text only, train.compile": ours_step(cfg, 0.0, compile_layers=True),
             "ours, + semantic, train.compile": ours_step(cfg, 1.0, compile_layers=True),
             "transformers LlavaForConditionalGeneration loop": hf_step(cfg, tpi, vision.image_size),
             "  the same, with the document mask (same work)": hf_step(cfg, tpi, vision.image_size,
                                                                        document_mask=True),
             "  the same, its decoder layers compiled": hf_step(cfg, tpi, vision.image_size,
                                                                compile_layers=True)}
    times = time_interleaved({name: fn for name, (fn, _) in sides.items()}, args.steps)
    print(f"config {args.config}: batch {cfg.data.micro_batch_size} x {cfg.data.seq_length} tokens, "
          f"{cfg.model.llm.num_layers} layers, hidden {cfg.model.llm.hidden_size}, "
          f"{torch.get_num_threads()} threads, {args.steps} interleaved rounds")
    print("  tokens/s: of the median step; ratio: the median over rounds of the reference step's "
          "time over this side's, in the same round (robust to the machine's drift)")
    reference = times["transformers LlavaForConditionalGeneration loop"]
    for name, (_, tokens) in sides.items():
        ratio = statistics.median(r / t for r, t in zip(reference, times[name]))
        print(f"  {name:<50s} {tokens / statistics.median(times[name]):10.0f} tokens/s   {ratio:5.2f}x")


if __name__ == "__main__":
    main()
