"""A tiny end-to-end pretraining run's settings, and reading a run's metrics back.

Shared by the trainer tests (tests/training) and the GPU check (benchmarks/gpu_train_check.py),
so both exercise the same model: 2 layers x 64 wide, a 1-layer 16 px vision encoder, semantic
generation on, 6 steps, a checkpoint every 3.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

TINY_RUN: Dict[str, object] = {
    "model.image_token_id": 4,
    "model.llm.num_layers": 2, "model.llm.hidden_size": 64, "model.llm.num_attention_heads": 4,
    "model.llm.num_query_groups": 2, "model.llm.ffn_hidden_size": 96,
    "model.llm.vocab_size": 1024, "model.llm.max_sequence_length": 64,
    "model.vision.hf_config": ("{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                               "intermediate_size: 64, image_size: 16, patch_size: 8}"),
    "model.semantic.weight": 1.0,
    "data.seq_length": 64, "data.micro_batch_size": 2, "data.pack_window": 64,
    "train.steps": 6, "train.lr": 1e-3, "train.warmup_steps": 2,
    "checkpoint.save_interval": 3,
    "logging.log_interval": 1, "logging.eval_interval": 0,
    "logging.tensorboard": False, "logging.progress_bar": False,
}


def run_overrides(data_prefix: str, run_dir: str, settings: Dict[str, object] = TINY_RUN,
                  **extra) -> List[str]:
    """``--key=value`` arguments for ``megatron_unihetero.pretrain``: ``settings`` + ``extra``,
    training on ``data_prefix``, writing checkpoints and logs under ``run_dir``."""
    values = dict(settings)
    values.update({"data.train": f"[{data_prefix}]", "checkpoint.dir": os.path.join(run_dir, "ckpt"),
                   "logging.dir": run_dir})
    values.update(extra)
    return [f"--{k}={v}" for k, v in values.items()]


def train_records(run_dir: str, kind: str = "train") -> Dict[int, dict]:
    """{step: logged record} of one kind ("train", "valid") from the run's metrics.jsonl."""
    records = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if record["kind"] == kind:
                records[record["step"]] = record
    return records
