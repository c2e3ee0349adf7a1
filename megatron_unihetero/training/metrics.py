"""Console, TensorBoard and (optional) W&B logging, plus a progress bar, on one rank."""

from __future__ import annotations

import json
import os
import sys
from typing import Dict

from megatron_unihetero.training.config import LoggingConfig


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, *, enabled: bool, total_steps: int):
        self.cfg = cfg
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        self.history_path = os.path.join(cfg.dir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(cfg.dir, exist_ok=True)
        # Each logger is imported only when switched on: wandb is optional, and tensorboard's
        # import is slow enough to notice in a short run without it.
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(cfg.dir, "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                self.info("logging.wandb=true but wandb is not installed; W&B logging is off")
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.dir)
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[megatron_unihetero] {message}", flush=True)

    def _write(self, step: int, record: Dict[str, float], prefix: str) -> None:
        with open(self.history_path, "a") as handle:
            handle.write(json.dumps({"step": step, "kind": prefix, **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in record.items()}, step=step)

    def log_step(self, step: int, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write(step, record, "train")
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}")
        if step % self.cfg.log_interval == 0 or step == 1:
            parts = [f"step {step}"]
            for key in ("loss", "text", "semantic", "semantic_r2", "pixel", "pixel_r2", "grad_norm",
                        "lr", "tokens_per_s",
                        "samples_per_s", "tflops_per_s", "mfu", "memory_gb"):
                if key in record:
                    parts.append(f"{key} {record[key]:.4g}")
            self.info(" | ".join(parts))

    def log_eval(self, step: int, record: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write(step, record, "valid")
        self.info(f"validation at step {step}: " +
                  " | ".join(f"{k} {v:.4g}" for k, v in record.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
