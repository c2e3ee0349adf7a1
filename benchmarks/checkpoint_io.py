#!/usr/bin/env python
"""Checkpoint save / load figures at DP=2 on CPU (gloo): sync vs async torch_dist saves.

    python benchmarks/checkpoint_io.py [--hidden-size 64 --layers 2 --world 2 --optimizer-format F]

Trains the tiny run (megatron_unihetero.testing.runs, widened by the options) for 2 steps,
then per rank: the time of a synchronous save (write + commit: manifest, ``latest``), the
bytes each rank wrote, the time the step loop is blocked by an asynchronous save (planning +
fork) and the step times while its write runs, the time until it is committed, and the time
of a full resume (model + optimizer). Prints one table from rank 0.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from megatron_unihetero.testing import run_distributed_test  # noqa: E402


def _bytes_by_rank(iter_dir: str, world: int) -> list:
    folder = os.path.join(iter_dir, "dist")
    return [sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, f"__{r}_*.distcp")))
            for r in range(world)]


def job(data_prefix: str, run_dir: str, extra: dict) -> None:
    from megatron_unihetero import parallel
    from megatron_unihetero.config_io import load_config
    from megatron_unihetero.testing.runs import run_overrides
    from megatron_unihetero.training import checkpoint as ckpt
    from megatron_unihetero.training.config import RunConfig
    from megatron_unihetero.training.trainer import Trainer

    cfg = load_config(RunConfig, None, run_overrides(data_prefix, run_dir, **extra))
    parallel.initialize(1, 1, cfg.train.seed)
    trainer = Trainer(cfg)

    def step() -> float:
        start = time.perf_counter()
        trainer.engine.train_batch(trainer.next_batches(), trainer.step)
        trainer.step += 1
        return time.perf_counter() - start

    plain = [step() for _ in range(3)][1:]

    dist.barrier()
    start = time.perf_counter()
    trainer.save()  # the first also starts megatron's writer-results manager process (once)
    first_s = time.perf_counter() - start
    step()
    dist.barrier()
    start = time.perf_counter()
    sync_dir = trainer.save()
    sync_s = time.perf_counter() - start
    sync_bytes = _bytes_by_rank(sync_dir, dist.get_world_size())

    trainer.cfg.checkpoint.async_save = True  # a manager that writes in a forked process
    trainer.checkpoints = ckpt.CheckpointManager(trainer.cfg, log=lambda message: None)
    step()
    dist.barrier()
    start = time.perf_counter()
    trainer.save()
    blocked_s = time.perf_counter() - start
    during, committed_after = [], None
    for _ in range(6):
        during.append(step())
        if trainer.checkpoints.poll() is not None:
            committed_after = time.perf_counter() - start
            break
    if committed_after is None:
        trainer.checkpoints.wait()
        committed_after = time.perf_counter() - start

    dist.barrier()
    start = time.perf_counter()
    trainer.engine.load(sync_dir)
    load_s = time.perf_counter() - start
    if dist.get_rank() == 0:
        params = sum(p.numel() for p in trainer.model.parameters())
        print(f"model: {params / 1e6:.2f} M parameters, world {dist.get_world_size()} (DP), "
              f"fp32, distributed optimizer ({cfg.checkpoint.optimizer_format})")
        print(f"step time, no save in flight:           {sum(plain) / len(plain) * 1e3:8.1f} ms")
        print(f"first save (+ writer manager start):    {first_s * 1e3:8.1f} ms")
        print(f"sync save (write + commit):             {sync_s * 1e3:8.1f} ms")
        print(f"bytes written per rank:                 {', '.join(f'{b / 2**20:.2f} MiB' for b in sync_bytes)}")
        print(f"async save, loop blocked (plan + fork): {blocked_s * 1e3:8.1f} ms")
        print(f"step time while the async write runs:   {', '.join(f'{t * 1e3:.1f}' for t in during)} ms")
        print(f"async save committed after:             {committed_after * 1e3:8.1f} ms")
        print(f"resume (model + optimizer, load):       {load_s * 1e3:8.1f} ms")
    trainer.checkpoints.close()
    parallel.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--optimizer-format", default="fully_reshardable",
                        choices=["fully_reshardable", "dp_reshardable"])
    args = parser.parse_args()
    from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "synthetic")
        write_synthetic_dataset(prefix, num_samples=200, image_size=16, max_images=2, text_len=(4, 30))
        extra = {"model.llm.hidden_size": args.hidden_size, "model.llm.num_layers": args.layers,
                 "model.llm.ffn_hidden_size": args.hidden_size * 3 // 2 // 16 * 16,
                 "train.steps": 1000, "checkpoint.save_interval": 0, "checkpoint.keep_last": 5,
                 "logging.log_interval": 1000, "checkpoint.optimizer_format": args.optimizer_format}
        run_distributed_test(job, args.world, prefix, os.path.join(tmp, "run"), extra, timeout_s=1800)


if __name__ == "__main__":
    main()
