"""Pretrain a UniHetero model: ``python -m megatron_unihetero.pretrain --config RUN.yaml [--a.b=v ...]``.

Start it with torchrun (or the deepspeed launcher) for several processes; alone it runs as a
single process. Restarting the same command resumes from the newest complete checkpoint.
The libraries' warnings go to LOGGING_DIR/run.log, not the console (``--logging.verbose=true``:
both).

Exit codes: 0 done (or stopped on SIGTERM after saving), 2 a config error, 3 stopped after
``train.max_bad_steps`` consecutive steps with a non-finite loss or gradient norm (nothing saved
at the stop; ``latest`` still names the last finite checkpoint), 4 no checkpoint to resume from
verifies against its manifest (with ``checkpoint.fallback=false``: the newest one fails; the
message names the file), or a checkpoint could not be written (a full disk: the message names
the folder; ``latest`` still names the previous checkpoint), 5 a collective failed or timed out
after ``parallel.timeout_minutes`` (a hung or dead rank; the message names what the run was
doing).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_unihetero.platform import console

# The libraries' import-time warnings (megatron-core: TransformerEngine / apex absent, ...) are
# held until the run knows its log file (main), not printed.
with console.held_warnings() as _import_warnings:
    import torch.distributed as dist

    from megatron_unihetero import parallel
    from megatron_unihetero.config_io import ConfigLoadError, load_config, save_config
    from megatron_unihetero.models.config import ConfigError
    from megatron_unihetero.checkpointing.errors import CheckpointError
    from megatron_unihetero.training.config import RunConfig
    from megatron_unihetero.training.trainer import (
        CollectiveFailure,
        NonFiniteTrainingError,
        Trainer,
        write_summary,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="run config YAML (see examples/configs/)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        parser.error(f"unexpected arguments {bad}; overrides look like --section.key=value")
    return args, overrides


def main(argv=None) -> dict:
    """Run it. Library warnings (this process's imports' too) and this package's ``logging``
    records go to ``LOGGING_DIR/run.log`` (``run.rank{R}.log`` on global rank R > 0), not to
    the console; ``logging.verbose=true`` prints them as well (platform/console.py)."""
    args, overrides = parse_args(argv)
    held = list(_import_warnings)
    _import_warnings.clear()  # written into the first run's log of this process only
    with console.RunLog(held) as log:
        return _run(args, overrides, log)


def _run(args, overrides, log: console.RunLog) -> dict:
    try:
        cfg = load_config(RunConfig, args.config, overrides)
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigLoadError, ConfigError) as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    log.open(os.path.join(cfg.logging.dir, console.log_file_name(console.launcher_rank())),
             verbose=cfg.logging.verbose)

    parallel.init_distributed(cfg.parallel.timeout_minutes)
    parallel.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed,
                        vpp=cfg.parallel.virtual_pipeline, timeout_minutes=cfg.parallel.timeout_minutes)
    if dist.get_rank() == 0:
        os.makedirs(cfg.logging.dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.logging.dir, "config.yaml"))
    try:
        trainer = Trainer(cfg)
        trainer.install_signal_handler()
        result = trainer.train()
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
        print(f"[megatron_unihetero] done: checkpoint {result.get('checkpoint')}, "
              f"logs {cfg.logging.dir} (metrics.jsonl, tensorboard/)", flush=True)
    parallel.destroy()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
