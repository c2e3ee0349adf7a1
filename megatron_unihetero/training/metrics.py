"""Console, TensorBoard and (optional) W&B logging, plus a progress bar, on one rank.

The periodic line says where the run is and when it ends: ``step 120/300 | eta 2:41 | loss ...``,
the ETA from a smoothed wall time per step (evaluations and saves included). With a progress
bar on the terminal every line is written through tqdm, above the bar, never into it.

A resumed run logs on in the same places: metrics.jsonl is appended to (with a ``resume``
record: step, checkpoint, torchrun's restart count); TensorBoard writes into the same folder
with ``purge_step`` at the first step this process logs, so the steps an interrupted process
logged past its last checkpoint are hidden and each step shows once; W&B resumes the same run,
its id kept in ``LOGGING_DIR/wandb_run_id`` (``resume="allow"``; ``WANDB_MODE=offline`` needs
no network).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Dict, Optional

from megatron_unihetero.training.config import LoggingConfig


# Weight of the newest wall time per step in the smoothed one the ETA is computed from.
ETA_SMOOTHING = 0.1


def format_duration(seconds: float) -> str:
    """``M:SS`` under an hour, ``H:MM:SS`` from one hour on (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class MetricsLogger:
    def __init__(self, cfg: LoggingConfig, *, enabled: bool, total_steps: int):
        self.cfg = cfg
        self.enabled = enabled
        self.total_steps = total_steps
        self.tb = self.wandb = self.bar = None
        # Smoothed wall seconds per step, and the (step, time) of the last log_step call.
        self.step_time: Optional[float] = None
        self._samples = 0
        self._last: Optional[tuple] = None
        self.history_path = os.path.join(cfg.dir, "metrics.jsonl")
        self.started = False
        if not enabled:
            return
        os.makedirs(cfg.dir, exist_ok=True)
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def start(self, first_step: int = 1) -> None:
        """Open TensorBoard and W&B for a process whose first logged step is ``first_step`` (a
        resume from step S: S + 1); done at the first record otherwise."""
        if self.started or not self.enabled:
            return
        self.started = True
        cfg = self.cfg
        # Each logger is imported only when switched on: wandb is optional, and tensorboard's
        # import is slow enough to notice in a short run without it.
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides what earlier event files hold from this step on
            # (an interrupted process's steps past the checkpoint resumed from).
            self.tb = SummaryWriter(os.path.join(cfg.dir, "tensorboard"), purge_step=first_step)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                self.info("logging.wandb=true but wandb is not installed; W&B logging is off")
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, dir=cfg.dir,
                                        id=self._wandb_run_id(), resume="allow")

    def _wandb_run_id(self) -> str:
        """The W&B run of this logging folder: its id, made and kept on the first start."""
        path = os.path.join(self.cfg.dir, "wandb_run_id")
        if os.path.isfile(path):
            with open(path) as handle:
                run_id = handle.read().strip()
            if run_id:
                return run_id
        run_id = uuid.uuid4().hex[:16]
        with open(path + ".tmp", "w") as handle:
            handle.write(run_id + "\n")
        os.replace(path + ".tmp", path)
        return run_id

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[megatron_unihetero] {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)  # clears the bar, writes, redraws it below
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def _update_step_time(self, step: int, record: Dict[str, float]) -> None:
        """Smooth the wall time per step over the calls (evaluations and saves in between
        count: they are part of what is left). The first call has only its step's own time;
        the second replaces it (a first step is slow: warm-up, compilation)."""
        now = time.perf_counter()
        if self._last is not None and step > self._last[0]:
            sample = (now - self._last[1]) / (step - self._last[0])
        else:
            sample = record.get("step_time_s")
        self._last = (step, now)
        if not isinstance(sample, (int, float)) or not math.isfinite(sample) or sample < 0:
            return
        self._samples += 1
        if self.step_time is None or self._samples == 2:
            self.step_time = float(sample)
        else:
            self.step_time += ETA_SMOOTHING * (float(sample) - self.step_time)

    def eta_seconds(self, step: int) -> Optional[float]:
        if self.step_time is None:
            return None
        return max(self.total_steps - step, 0) * self.step_time

    def log_event(self, kind: str, step: int, record: Dict[str, object]) -> None:
        """A record of ``kind`` in metrics.jsonl only (a resume: step, checkpoint, restarts)."""
        if self.enabled:
            self._append(step, kind, record)

    def _append(self, step: int, kind: str, record: Dict[str, object]) -> None:
        with open(self.history_path, "a") as handle:
            handle.write(json.dumps({"step": step, "kind": kind, **record}) + "\n")

    def _write(self, step: int, record: Dict[str, float], prefix: str) -> None:
        self.start(step)
        self._append(step, prefix, record)
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
        self._update_step_time(step, record)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}")
        if step % self.cfg.log_interval == 0 or step == 1:
            parts = [f"step {step}/{self.total_steps}", f"eta {format_duration(self.eta_seconds(step))}"]
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

    def log_understanding(self, step: int, record: Dict[str, float]) -> None:
        """The run's own held-out evaluation (eval/understanding.py): an ``understanding``
        record in metrics.jsonl, TensorBoard's and W&B's ``understanding/SET/FIGURE``."""
        if not self.enabled:
            return
        self._write(step, record, "understanding")
        self.info(f"understanding at step {step} ({record.get('samples_seen', 0):.0f} samples seen): " +
                  " | ".join(f"{k} {v:.4g}" for k, v in record.items()
                             if k != "samples_seen" and not k.endswith("/num_questions")))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
