"""Jobs for the trainer tests (module-level so spawned workers can import them)."""

import os

from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset
from megatron_unihetero.testing.runs import run_overrides, train_records


def make_data(folder: str) -> str:
    prefix = os.path.join(folder, "synthetic")
    write_synthetic_dataset(prefix, num_samples=200, image_size=16, max_images=2, text_len=(4, 30))
    return prefix


overrides = run_overrides  # the tiny run's --key=value arguments (megatron_unihetero.testing.runs)


def pretrain_job(args):
    from megatron_unihetero.pretrain import main

    main(args)


def train_losses(run_dir: str) -> dict:
    return {step: record["loss"] for step, record in train_records(run_dir).items()}


def eval_losses(run_dir: str) -> dict:
    return {step: record["valid_loss"] for step, record in train_records(run_dir, kind="valid").items()}
