"""The memory planner (megatron_unihetero/plan.py) against the measured peak memory of CPU
training steps, at two model widths: ``python benchmarks/memory_plan.py [--widths 256 512]``.

Each width runs in its own spawned process (one rank, megatron engine, fp32, the distributed
optimizer at DP = 1): after a warm-up step of a narrow model, the resident set size is read
just before the model is built, two training steps run (the second one with Adam's state
allocated), and the highest RSS meanwhile (sampled by a thread) minus that baseline is what
the planner's weights + gradients + optimizer state + activations (no recompute) should come
to. Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import threading

import torch

from megatron_unihetero.testing import run_distributed_test

SEQ, MICRO, LAYERS, VOCAB, IMAGE_TOKEN = 256, 4, 4, 512, 3


def run_config(width: int):
    from megatron_unihetero.models.config import LLMConfig, ModelConfig, SemanticGenConfig
    from megatron_unihetero.training.config import DataConfig, ParallelConfig, RunConfig, TrainConfig

    ffn = (8 * width // 3 + 63) // 64 * 64
    model = ModelConfig(
        llm=LLMConfig(num_layers=LAYERS, hidden_size=width, num_attention_heads=width // 64,
                      ffn_hidden_size=ffn, vocab_size=VOCAB, max_sequence_length=SEQ),
        semantic=SemanticGenConfig(weight=1.0), image_token_id=IMAGE_TOKEN)
    return RunConfig(model=model, data=DataConfig(seq_length=SEQ, micro_batch_size=MICRO),
                     parallel=ParallelConfig(), train=TrainConfig(dtype="fp32", warmup_steps=0))


def batches(images_per_row: int, tokens_per_image: int, image_size: int, seed: int):
    """One micro-batch of one document per row, ``images_per_row`` images in each."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, VOCAB, (MICRO, SEQ), generator=gen)
    for row in range(MICRO):
        for i in range(images_per_row):
            start = 8 + i * (tokens_per_image + 8)
            tokens[row, start:start + tokens_per_image] = IMAGE_TOKEN
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    return [dict(tokens=tokens, labels=labels, position_ids=torch.arange(SEQ).repeat(MICRO, 1),
                 segment_ids=torch.zeros(MICRO, SEQ, dtype=torch.int32),
                 images=torch.randn(MICRO * images_per_row, 3, image_size, image_size, generator=gen))]


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_job(width: int, images_per_row: int, out_path: str) -> None:
    from megatron_unihetero import parallel
    from megatron_unihetero.models.vision import load_hf_vision_config, tokens_per_image
    from megatron_unihetero.training.engine_megatron import MegatronEngine

    cfg = run_config(width)
    parallel.initialize(1, 1, seed=0)
    tokens = tokens_per_image(cfg.model.vision)
    image_size = load_hf_vision_config(cfg.model.vision).image_size
    steps = [batches(images_per_row, tokens, image_size, seed) for seed in range(2)]
    # A step of a narrow model first: the runtime's one-time allocations (thread pools, kernel
    # and autograd caches) are then in the baseline, not in the measured step.
    warmup = run_config(64)
    warmup_model = parallel.build_model(warmup.model)
    MegatronEngine(warmup_model, warmup).train_step(steps[0], {"text": 1.0, "semantic": 1.0})
    del warmup_model
    gc.collect()
    baseline = _rss()
    with _PeakSampler() as sampler:
        model = parallel.build_model(cfg.model, memory=cfg.activation_memory())
        engine = MegatronEngine(model, cfg)
        for step in steps:
            engine.train_step(step, {"text": 1.0, "semantic": 1.0})
    with open(out_path, "w") as handle:
        json.dump(dict(baseline=baseline, peak=sampler.peak), handle)
    parallel.destroy()


class _PeakSampler:
    """The highest RSS while the block runs, sampled every 0.2 ms by a thread (getrusage's
    ru_maxrss would also hold the warm-up's and the imports' peaks)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.0002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def planned(width: int, images_per_row: int) -> dict:
    from megatron_unihetero import parallel, plan

    cfg = run_config(width)
    with parallel.single_process():
        (rank,) = plan.plan(cfg, world_size=1, images_per_sample=images_per_row)
    return dict(params=rank.params, weights=rank.weights, grads=rank.grads, optimizer=rank.optimizer,
                activations=rank.activations["none"], total=rank.total("none"))


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--images-per-row", type=int, default=4)
    args = parser.parse_args(argv)
    # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay
    # in the heap and count in the RSS: fixed at 64 KiB (for the spawned workers, which read it
    # at start), every tensor of note is its own mapping and the RSS follows the live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rows = []
    for width in args.widths:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "measured.json")
            run_distributed_test(measure_job, 1, width, args.images_per_row, path)
            with open(path) as handle:
                measured = json.load(handle)
        delta = measured["peak"] - measured["baseline"]
        plan_row = planned(width, args.images_per_row)
        rows.append(dict(width=width, measured=delta, **plan_row))
        mb = 1024 ** 2
        print(f"width {width}: {plan_row['params'] / 1e6:.1f} M parameters; planner {plan_row['total'] / mb:.0f} MB "
              f"(weights {plan_row['weights'] / mb:.0f}, grads {plan_row['grads'] / mb:.0f}, optimizer "
              f"{plan_row['optimizer'] / mb:.0f}, activations {plan_row['activations'] / mb:.0f}); measured peak "
              f"RSS delta {delta / mb:.0f} MB; planner / measured = {plan_row['total'] / delta:.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
