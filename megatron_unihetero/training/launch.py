"""One pretraining run, from the command line's config and overrides to its exit code: what
``python -m megatron_unihetero.pretrain`` runs (the exit codes are listed there).

Kept apart from pretrain.py so that the entry module imports nothing heavy (see there).
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from megatron_unihetero import parallel
from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.config_io import ConfigLoadError, load_config, save_config
from megatron_unihetero.data.shards import ShardError
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero import console
from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.stopping import StopPolicy, requeue_exit_status, torchrun_restarts
from megatron_unihetero.training.trainer import (
    CollectiveFailure,
    NonFiniteTrainingError,
    Trainer,
    write_summary,
)


def run(config_path, overrides, log: console.RunLog) -> dict:
    """Load and check the config (exit 2), join the process groups, train; the errors that end
    a run become its exit code (pretrain.py's docstring)."""
    try:
        cfg = load_config(RunConfig, config_path, overrides)
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigLoadError, ConfigError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    log.open(os.path.join(cfg.logging.dir, console.log_file_name(console.launcher_rank())),
             verbose=cfg.logging.verbose)
    # The deadline counts from here, and the stop signals are caught from here on: one that
    # arrives while the model is built stops the run after its first step.
    stopping = StopPolicy(cfg.train)
    stopping.install()
    restarts, most = torchrun_restarts()
    if restarts and console.launcher_rank() == 0:
        print(f"[megatron_unihetero] torchrun restart {restarts} of at most {most}: resuming from "
              f"the newest checkpoint that verifies", flush=True)

    parallel.init_distributed(cfg.parallel.timeout_minutes)
    parallel.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed,
                        vpp=cfg.parallel.virtual_pipeline, timeout_minutes=cfg.parallel.timeout_minutes)
    if dist.get_rank() == 0:
        os.makedirs(cfg.logging.dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.logging.dir, "config.yaml"))
    try:
        trainer = Trainer(cfg, stopping)
        result = trainer.train()
    except (ConfigError, ShardError) as exc:
        # What the config asks of the data and the model, checked once they exist (the
        # tokenizer against the vocabulary, seq_length against the samples), and data that
        # cannot be used (a damaged shard, an unfinished preprocessing run): every rank
        # decides the same from the same files.
        if dist.get_rank() == 0:
            kind = "config" if isinstance(exc, ConfigError) else "data"
            print(f"{kind} error: {exc}", file=sys.stderr, flush=True)
        parallel.destroy()
        dist.destroy_process_group()
        raise SystemExit(2) from exc
    except CollectiveFailure as exc:
        # A peer is hung or gone: the process groups cannot be torn down collectively.
        print(f"[megatron_unihetero] rank {dist.get_rank()}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(5) from exc
    except (NonFiniteTrainingError, CheckpointError) as exc:
        # Every rank took the same decision (the skip flags are all-reduced; rank 0's choice of
        # checkpoint is broadcast), so every rank gets here: the process groups can be torn
        # down cleanly before the exit.
        if dist.get_rank() == 0:
            print(f"[megatron_unihetero] {exc}", file=sys.stderr, flush=True)
        parallel.destroy()
        dist.destroy_process_group()
        raise SystemExit(3 if isinstance(exc, NonFiniteTrainingError) else 4) from exc
    if trainer.is_logger:
        write_summary(os.path.join(cfg.logging.dir, "train_summary.json"), result)
        if trainer.stopped:
            print(f"[megatron_unihetero] stopped at step {trainer.step} of {cfg.train.steps} "
                  f"({trainer.stopped}): checkpoint {result.get('checkpoint')}; run the same "
                  f"command again to go on", flush=True)
        else:
            print(f"[megatron_unihetero] done: checkpoint {result.get('checkpoint')}, "
                  f"logs {cfg.logging.dir} (metrics.jsonl, tensorboard/)", flush=True)
    parallel.destroy()
    dist.destroy_process_group()
    if trainer.stopped and requeue_exit_status():
        raise SystemExit(requeue_exit_status())
    return result
