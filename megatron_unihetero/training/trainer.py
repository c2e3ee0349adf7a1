"""The Trainer: the loop, checkpoints, resume, validation and metrics.

It owns *when* things happen (steps, logging, evaluation, saving, SIGTERM); the engine
(megatron or deepspeed) owns *how* a step runs. Restarting the same command resumes from
``checkpoint.dir/latest``: model, optimizer, LR schedule, loader position, RNG states and step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from typing import Dict, List, Optional

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_unihetero import parallel, platform
from megatron_unihetero.checkpointing import dist as dist_ckpt
from megatron_unihetero.config_io import save_config
from megatron_unihetero.data.loader import build_loader
from megatron_unihetero.eval import diagnostics
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.models.vision import image_normalization, load_hf_vision_config
from megatron_unihetero.training import checkpoint as ckpt
from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.flops import flop_terms, step_flops
from megatron_unihetero.training.metrics import MetricsLogger
from megatron_unihetero.training.optim import advance_lr


H100_BF16_PEAK_TFLOPS = 989.0


class NonFiniteTrainingError(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient norm."""


class CollectiveFailure(RuntimeError):
    """A collective timed out (``parallel.timeout_minutes``) or lost a peer; names what the run
    was doing."""


# What torch.distributed's backends say when a collective times out or a peer is gone (gloo
# raises RuntimeError / DistBackendError with these texts; NCCL's watchdog, "Timeout").
_COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed by peer",
                        "connection reset by peer", "broken pipe")


def is_collective_failure(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistError) or any(t in str(exc).lower() for t in _COLLECTIVE_FAILURES)


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.ps = parallel_state
        # This rank's model chunks: one per virtual pipeline stage (one without interleaving).
        self.chunks = parallel.build_model_chunks(cfg.model, params_dtype=_params_dtype(cfg),
                                                 compile_layers=cfg.train.compile,
                                                 memory=parallel.activation_memory(cfg))
        self.model = self.chunks[0]
        self._weights_loaded = self._load_initial_weights()
        self.engine = _build_engine(self.chunks, cfg)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.train_loader = self._loader("train")
        check_tokenizer_matches(cfg, self.train_loader.datasets)
        self.valid_loader_factory = lambda: self._loader("valid")
        self.step = 0
        self._stop_requested = False
        # Steps skipped for a non-finite loss or gradient norm (the engine did not apply them).
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.last_good_step = 0
        self.is_logger = (parallel_state.is_pipeline_last_stage()
                          and parallel_state.get_tensor_model_parallel_rank() == 0
                          and self.dp_rank == 0)
        self.metrics = MetricsLogger(cfg.logging, enabled=self.is_logger, total_steps=cfg.train.steps)
        self._flop_terms = self._count_flop_terms()
        ck = cfg.checkpoint
        self.writer = ckpt.CheckpointWriter(ck.dir, ck.keep_last, async_save=ck.async_save)
        self.last_committed: Optional[str] = None
        self.phase = "starting"  # what the loop is doing, for errors (a timed-out collective)

    # -- setup ---------------------------------------------------------------------------------
    def _loader(self, split: str):
        data = self.cfg.data
        mean, std = image_normalization(self.cfg.model.vision)
        return build_loader(
            data.train, split=split, valid_fraction=data.valid_fraction,
            split_seed=self.cfg.train.seed, weights=data.weights,
            seq_length=data.seq_length, micro_batch_size=data.micro_batch_size,
            tokens_per_image=self.model.tokens_per_image, dp_rank=self.dp_rank,
            dp_size=self.dp_size, seed=self.cfg.train.seed, pack_window=data.pack_window,
            image_size=_encoder_image_size(self.model, self.cfg), image_mean=mean, image_std=std,
            # The validation loader is rebuilt for every evaluation: no worker start-up for it.
            num_workers=data.num_workers if split == "train" else 0,
        )

    def _count_flop_terms(self) -> dict:
        return flop_terms(self.cfg.model, pipeline_parallel=self.cfg.parallel.pipeline_parallel)

    def install_signal_handler(self) -> None:
        """SIGTERM (a scheduler's preemption) -> save a checkpoint at the end of this step."""
        def handler(signum, frame):
            self._stop_requested = True
        signal.signal(signal.SIGTERM, handler)

    # -- checkpoints ---------------------------------------------------------------------------
    def _latest(self):
        """The checkpoint to resume from, or None. Global rank 0 verifies its manifest
        (``checkpoint.verify``), takes the newest that passes with ``checkpoint.fallback`` and
        broadcasts the choice, so every rank loads the same one; the files are read once."""
        ck = self.cfg.checkpoint
        if not ck.resume:
            return None
        return ckpt.agree_on_resume(ck.dir, ck.verify, ck.fallback, repoint=True)

    def _load_initial_weights(self) -> bool:
        """``checkpoint.load`` (weights only) when not resuming; before the engine wraps the model."""
        # Decided once: verification reads the checkpoint, and maybe_resume needs the same answer.
        self._resume_dir = self._latest()
        if self._resume_dir is None and self.cfg.checkpoint.load:
            self.load(_resolve_load(self.cfg.checkpoint.load, self.cfg.checkpoint), full=False)
            return True
        return False

    def maybe_resume(self) -> None:
        latest = self._resume_dir
        if latest is not None:
            self.load(latest, full=True)
            self.metrics.info(f"resumed from {latest} at step {self.step}")
        elif self._weights_loaded:
            self.metrics.info(f"initialised weights from {self.cfg.checkpoint.load}")

    def load(self, iter_dir: str, full: bool) -> None:
        if not full:
            dist_ckpt.load_model(self.chunks, dist_ckpt.dist_dir(iter_dir))
            return
        self.engine.load(iter_dir)
        state = ckpt.load_trainer_state(iter_dir)
        self.step = int(state["step"])
        if "lr_scheduler" in state:
            self.engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
        else:  # a checkpoint from before the scheduler was saved: replay its steps
            for step in range(self.step):
                advance_lr(self.engine.lr_scheduler, step, self.cfg.train)
        self.train_loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])

    def _model_is_finite(self) -> bool:
        """Whether every parameter of every rank is finite (collective: all ranks call it)."""
        flag = torch.tensor([1.0 if self.engine.parameters_are_finite() else 0.0], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def save(self) -> Optional[str]:
        """Save a checkpoint of this step; returns its folder, committed as ``latest`` now or,
        with ``checkpoint.async_save``, by a later :meth:`CheckpointWriter.poll`. None (nothing
        written, ``latest`` and older checkpoints untouched) when the model is non-finite."""
        ck = self.cfg.checkpoint
        if not self._model_is_finite():
            # A NaN/Inf model must never become `latest` (a restart would resume from it) nor
            # make pruning delete the good checkpoints before it.
            self.metrics.info(f"not saving a checkpoint at step {self.step}: the model has "
                              f"non-finite parameters; latest stays {self._last_checkpoint()}")
            return None
        self._log_commit(self.writer.wait())  # one save in flight: the previous one commits first
        iter_dir = ckpt.iteration_dir(ck.dir, self.step)
        if self._last_checkpoint() == iter_dir:
            return iter_dir  # this step is the checkpoint resumed from (a SIGTERM right after)
        if dist.get_rank() == 0:
            # Whatever an earlier, uncommitted save of this step left (a crash, a full disk)
            # must not end up in this checkpoint's manifest.
            shutil.rmtree(iter_dir, ignore_errors=True)
            os.makedirs(iter_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(iter_dir, "config.yaml"))
        ckpt.barrier()
        with ckpt.naming_failures(iter_dir):
            request = self.engine.save(iter_dir)  # collective; None: already written
            if dist.get_rank() == 0:
                ckpt.save_trainer_state(iter_dir, {"step": self.step, "loader": self.train_loader.state_dict(),
                                                   "rng": ckpt.rng_state(),
                                                   "lr_scheduler": self.engine.lr_scheduler.state_dict()})
        # Written in place (then committed: manifest, `latest`, prune) or in a forked writer
        # (checkpoint.async_save: committed by a later poll, training goes on meanwhile).
        self.writer.write(iter_dir, request)
        self._log_commit(None if self.writer.in_flight else iter_dir)
        return iter_dir

    def _log_commit(self, iter_dir: Optional[str]) -> None:
        if iter_dir is not None:
            self.last_committed = iter_dir
            self.metrics.info(f"saved checkpoint {iter_dir}")

    # -- the loop ------------------------------------------------------------------------------
    def objective_weights(self) -> Dict[str, float]:
        sem = self.cfg.model.semantic
        ramp = min(1.0, (self.step + 1) / sem.warmup_steps) if sem.warmup_steps > 0 else 1.0
        return {"text": 1.0, "semantic": sem.weight * ramp, "pixel": self.cfg.model.pixel.weight}

    def next_batches(self) -> List[dict]:
        return [next(self.train_loader) for _ in range(self.cfg.train.grad_accumulation)]

    def train(self) -> dict:
        """The loop; a collective that times out or loses a peer ends it as a
        :class:`CollectiveFailure` that says what the run was doing (:attr:`phase`)."""
        try:
            return self._train()
        except (NonFiniteTrainingError, ckpt.CheckpointError):
            raise
        except RuntimeError as exc:
            if not is_collective_failure(exc):
                raise
            raise CollectiveFailure(
                f"a collective failed while {self.phase} (parallel.timeout_minutes="
                f"{self.cfg.parallel.timeout_minutes}; another rank is hung or gone): "
                f"{type(exc).__name__}: {exc}") from exc

    def _train(self) -> dict:
        cfg = self.cfg
        self.phase = "resuming"
        self.maybe_resume()
        for chunk in self.chunks:
            chunk.train()
        final: dict = {}
        if cfg.train.compile and self.step < cfg.train.steps:
            self.metrics.info("train.compile: the first step compiles the decoder layers")
        while self.step < cfg.train.steps:
            start = time.perf_counter()
            self.phase = f"loading the batches of step {self.step + 1}"
            batches = self.next_batches()
            lr = advance_lr(self.engine.lr_scheduler, self.step, cfg.train)
            self.phase = (f"running train step {self.step + 1} (forward, backward, gradient "
                          f"reduction, optimizer step)")
            summary = self.engine.train_step(batches, self.objective_weights())
            elapsed = time.perf_counter() - start
            self.step += 1
            self.phase = f"logging step {self.step} (the loss reduction over data-parallel ranks)"
            self._log_commit(self.writer.poll())  # an asynchronous save that has finished
            final = self._log_step(summary, batches, lr, elapsed)
            self._stop_if_too_many_bad_steps()
            if cfg.logging.eval_interval and self.step % cfg.logging.eval_interval == 0:
                self.phase = f"evaluating at step {self.step}"
                final.update(self.evaluate())
            stop = self._stop_agreed()
            if (cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0) \
                    or self.step == cfg.train.steps or stop:
                self.phase = f"saving the checkpoint of step {self.step}"
                self.save()
            if stop:
                self.metrics.info(f"stopping at step {self.step} on SIGTERM")
                break
        self.phase = "finishing the last checkpoint"
        self._log_commit(self.writer.close())  # the last save is committed before the run ends
        self.metrics.close()
        final["checkpoint"] = self.last_committed
        return final

    def _count_skipped(self, summary: Dict[str, float]) -> None:
        """Every rank counts (the engine's decision is the same on all): the stop is collective."""
        if summary.get("skipped", 0.0) > 0:
            self.skipped_steps += 1
            self.bad_steps_in_a_row += 1
            values = ", ".join(f"{k} {summary[k]}" for k in ("loss", "grad_norm") if k in summary)
            self.metrics.info(f"WARNING: step {self.step} skipped (not applied): non-finite loss or "
                              f"gradient norm ({values}); {self.bad_steps_in_a_row} in a row")
        else:
            self.bad_steps_in_a_row = 0
            self.last_good_step = self.step

    def _last_checkpoint(self) -> str:
        ck_dir = self.cfg.checkpoint.dir
        latest = ckpt.latest_iteration_dir(ck_dir) if os.path.isdir(ck_dir) else None
        return latest or "none"

    def _stop_if_too_many_bad_steps(self) -> None:
        limit = self.cfg.train.max_bad_steps
        if limit and self.bad_steps_in_a_row >= limit:
            self.writer.close()  # a save in flight is of finite weights: let it commit
            self.metrics.close()
            raise NonFiniteTrainingError(
                f"stopping: {self.bad_steps_in_a_row} consecutive steps with a non-finite loss or "
                f"gradient norm (last good step {self.last_good_step}); the last checkpoint is "
                f"{self._last_checkpoint()}")

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1 if self._stop_requested else 0], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _reduce_over_dp(self, summary: Dict[str, float]) -> Dict[str, float]:
        """Each DP rank holds its share (sum / global count): the step mean is their sum.
        The diagnostics' statistics (``stats/*``, vectors of sums) ride in the same all-reduce."""
        keys = sorted(k for k in summary if k not in ("grad_norm", "skipped") and not k.startswith("count_"))
        if not keys:
            return summary
        parts = [torch.as_tensor(summary[k], dtype=torch.float64).reshape(-1).to(platform.device())
                 for k in keys]
        values = torch.cat(parts)
        if self.dp_size > 1:
            dist.all_reduce(values, group=self.ps.get_data_parallel_group())
        out = dict(summary)
        for key, part in zip(keys, values.split([p.numel() for p in parts])):
            out[key] = part.cpu() if diagnostics.is_stats(key) else float(part)
        return out

    def _log_step(self, summary, batches, lr, elapsed) -> dict:
        summary = self._reduce_over_dp(summary) if summary else summary
        summary = diagnostics.finish(summary)  # the step's statistics -> R², baselines, norms
        self._count_skipped(summary)
        # Work of the whole step: this rank's batches, summed over the data-parallel ranks.
        work = torch.tensor([
            sum(int((b["segment_ids"] >= 0).sum()) for b in batches),
            sum(int(b.get("num_documents", 0)) for b in batches),
            sum(step_flops(self.cfg.model, b, **self._flop_terms) for b in batches),
        ], dtype=torch.float64, device=platform.device())
        if self.dp_size > 1:
            dist.all_reduce(work, group=self.ps.get_data_parallel_group())
        tokens, docs, flops = work.tolist()
        record = dict(summary, lr=lr, skipped_steps=self.skipped_steps,
                      bad_steps_in_a_row=self.bad_steps_in_a_row, step_time_s=elapsed, tokens_per_s=tokens / elapsed,
                      samples_per_s=docs / elapsed, tflops_per_s=flops / elapsed / 1e12 / dist.get_world_size(),
                      memory_gb=_memory_gb())
        peak = self.cfg.logging.peak_tflops or (H100_BF16_PEAK_TFLOPS if platform.has_cuda() else None)
        if peak:
            record["mfu"] = record["tflops_per_s"] / peak
        self.metrics.log_step(self.step, record)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        loader = self.valid_loader_factory()
        totals: Dict[str, float] = {}
        stats: Dict[str, torch.Tensor] = {}
        n = 0
        for _ in range(self.cfg.logging.eval_batches):
            try:
                batch = next(loader)
            except StopIteration:
                break
            summary = self.engine.eval_step([batch], self.objective_weights())
            summary = self._reduce_over_dp(summary) if summary else summary
            for k, v in summary.items():
                if diagnostics.is_stats(k):  # summed over every batch: exact over the split
                    stats[k] = diagnostics.add_stats(stats.get(k), v)
                elif not k.startswith("count_"):
                    totals[k] = totals.get(k, 0.0) + v
            n += 1
        loader.close()
        result = {f"valid_{k}": v / max(n, 1) for k, v in totals.items()}
        result.update(diagnostics.finish(stats, prefix="valid_"))
        self.metrics.log_eval(self.step, result)
        return result


def check_tokenizer_matches(cfg: RunConfig, datasets) -> None:
    """The shards' tokenizer must agree with the model's image token and vocabulary."""
    for dataset in datasets:
        ids = dataset.tokenizer_ids
        image_id = ids.get("image_token_id")
        if image_id is not None and image_id != cfg.model.image_token_id:
            raise ConfigError(f"data {dataset.name!r} was tokenized with <image> = {image_id}, but "
                              f"model.image_token_id = {cfg.model.image_token_id}")
        vocab = ids.get("vocab_size")
        if vocab is not None and vocab > cfg.model.llm.vocab_size:
            raise ConfigError(f"data {dataset.name!r} uses a tokenizer of {vocab} tokens, more than "
                              f"model.llm.vocab_size = {cfg.model.llm.vocab_size}")


def _params_dtype(cfg: RunConfig) -> torch.dtype:
    if cfg.parallel.engine == "deepspeed":
        return torch.float32  # DeepSpeed keeps fp32 master weights and casts for bf16 itself
    if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and platform.has_cuda()):
        return torch.bfloat16
    return torch.float32


def _encoder_image_size(model, cfg: RunConfig) -> int:
    return int(load_hf_vision_config(cfg.model.vision).image_size)


def _memory_gb() -> float:
    if platform.has_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _resolve_load(path: str, ck) -> str:
    """``checkpoint.load``: a checkpoint dir (its newest verified iteration; ``latest`` is not
    moved in another run's folder) or an iteration folder (verified when it has a manifest)."""
    if os.path.isfile(os.path.join(path, ckpt.LATEST)):
        return ckpt.agree_on_resume(path, ck.verify, ck.fallback)
    ckpt.agree_on_folder(path, ck.verify)
    return path


def _build_engine(model, cfg: RunConfig):
    # The engines are imported on demand: importing DeepSpeed costs seconds (and on first use
    # builds its ops), which a megatron-engine run should not pay.
    if cfg.parallel.engine == "deepspeed":
        from megatron_unihetero.training.engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg)
    from megatron_unihetero.training.engine_megatron import MegatronEngine

    return MegatronEngine(model, cfg)


def write_summary(path: str, record: dict) -> None:
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1, default=str)
