"""Jobs for the trainer tests (module-level so spawned workers can import them)."""

import json
import os

from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset


def make_data(folder: str) -> str:
    prefix = os.path.join(folder, "synthetic")
    write_synthetic_dataset(prefix, num_samples=200, image_size=16, max_images=2, text_len=(4, 30))
    return prefix


def overrides(data_prefix: str, run_dir: str, **extra) -> list:
    base = {
        "model.image_token_id": 4,
        "model.llm.num_layers": 2, "model.llm.hidden_size": 64, "model.llm.num_attention_heads": 4,
        "model.llm.num_query_groups": 2, "model.llm.ffn_hidden_size": 96,
        "model.llm.vocab_size": 1024, "model.llm.max_sequence_length": 64,
        "model.llm.attention_impl": "torch",
        "model.vision.hf_config": ("{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                                   "intermediate_size: 64, image_size: 16, patch_size: 8}"),
        "model.semantic.weight": 1.0,
        "data.train": f"[{data_prefix}]", "data.seq_length": 64, "data.micro_batch_size": 2,
        "data.pack_window": 64,
        "train.steps": 6, "train.lr": 1e-3, "train.warmup_steps": 2,
        "checkpoint.dir": os.path.join(run_dir, "ckpt"), "checkpoint.save_interval": 3,
        "logging.dir": run_dir, "logging.log_interval": 1, "logging.eval_interval": 0,
        "logging.tensorboard": False, "logging.progress_bar": False,
    }
    base.update(extra)
    return [f"--{k}={v}" for k, v in base.items()]


def pretrain_job(args):
    from megatron_unihetero.pretrain import main

    main(args)


def train_losses(run_dir: str) -> dict:
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if record["kind"] == "train":
                losses[record["step"]] = record["loss"]
    return losses
