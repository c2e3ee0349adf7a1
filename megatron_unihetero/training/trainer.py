"""The Trainer: the loop, logging, evaluation, the checkpoint cadence and the early stop.

It owns *when* things happen; the engine (training/engine.py, the contract) owns *how* a step
runs, and the checkpoint manager (training/checkpoint.py) how a checkpoint is written and read.
The trainer never asks which engine it drives. Restarting the same command resumes from
``checkpoint.dir/latest``: model, optimizer, LR schedule, loader position, RNG states and step.
After every step the ranks agree whether to stop before ``train.steps`` (training/stopping.py:
the exit signal, SIGTERM, a deadline); a stopped run saves, and pretrain exits for a requeue.
"""

from __future__ import annotations

import json
import os
import time
from typing import List, Optional

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_unihetero import parallel, platform
from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.data.loader import build_loader
from megatron_unihetero.eval import understanding
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.models.vision import image_normalization, load_hf_vision_config
from megatron_unihetero.training import engine as engines
from megatron_unihetero.training import monitor
from megatron_unihetero.training import results
from megatron_unihetero.training import stopping as stops
from megatron_unihetero.training.checkpoint import CheckpointManager
from megatron_unihetero.training.config import RunConfig
from megatron_unihetero.training.flops import flop_terms, step_flops
from megatron_unihetero.training.metrics import MetricsLogger
from megatron_unihetero.training.results import StepResult


H100_BF16_PEAK_TFLOPS = 989.0


class NonFiniteTrainingError(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had a non-finite loss or gradient norm."""


class CollectiveFailure(RuntimeError):
    """A collective timed out (``parallel.timeout_minutes``) or lost a peer; names what the run
    was doing."""


# gloo (torch 2.13) raises a plain RuntimeError carrying its transport's message ("[.../gloo/
# transport/tcp/unbound_buffer.cc:78] Timed out waiting ...", "... Connection closed by peer"):
# no type to tell it by, so its own texts are matched, and only in gloo's messages.
_GLOO_FAILURES = ("timed out", "connection closed by peer", "connection reset by peer",
                  "broken pipe")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that timed out or lost a peer: torch's DistError types
    (NCCL's watchdog and the stores raise DistBackendError / DistNetworkError / DistStoreError),
    or gloo's RuntimeError, which has no type of its own."""
    if isinstance(exc, dist.DistError):
        return True
    message = str(exc).lower()
    return (isinstance(exc, RuntimeError) and "gloo" in message
            and any(text in message for text in _GLOO_FAILURES))


class Trainer:
    def __init__(self, cfg: RunConfig, stopping: Optional[stops.StopPolicy] = None):
        self.cfg = cfg = cfg.resolved()
        # When to stop before train.steps (launch.run builds it first, when the process starts).
        self.stopping = stopping or stops.StopPolicy(cfg.train)
        engine_class = engines.engine_class(cfg)
        # This rank's model chunks: one per virtual pipeline stage (one without interleaving).
        self.chunks = parallel.build_model_chunks(cfg.model, params_dtype=engine_class.params_dtype(cfg),
                                                 compile_layers=cfg.train.compile,
                                                 memory=cfg.activation_memory())
        self.model = self.chunks[0]
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.is_logger = (parallel_state.is_pipeline_last_stage()
                          and parallel_state.get_tensor_model_parallel_rank() == 0
                          and self.dp_rank == 0)
        self.metrics = MetricsLogger(cfg.logging, enabled=self.is_logger, total_steps=cfg.train.steps)
        # The data first: what the config asks of it is checked before the run takes the
        # checkpoint directory (a ConfigError leaves nothing behind).
        self.train_loader = self._loader("train")
        check_tokenizer_matches(cfg, self.train_loader.datasets)
        self.valid_loader_factory = lambda: self._loader("valid")
        # logging.eval_sets, read and tokenized now (eval/understanding.py): scored at eval_interval.
        self.understanding = understanding.build(
            cfg, self.model, dp_rank=self.dp_rank, dp_size=self.dp_size, dp_group=self.dp_group,
            local_forward=engine_class.forward_is_local(cfg), log=self.metrics.info)
        # Takes the checkpoint directory, decides the resume point (collective) and loads
        # checkpoint.load's weights into the bare chunks, before the engine wraps them.
        self.checkpoints = CheckpointManager(cfg, log=self.metrics.info)
        try:
            self.checkpoints.load_initial_weights(self.chunks)
            self.engine = engine_class(self.chunks, cfg)
        except BaseException:
            self.checkpoints.release()
            raise
        self.step = 0
        self.samples_seen = 0  # documents trained on, all DP ranks (kept in trainer.pt)
        self.stopped: Optional[str] = None  # why the run stopped before train.steps
        # Steps skipped for a non-finite loss or gradient norm (the engine did not apply them).
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.last_good_step = 0
        self._flop_terms = flop_terms(cfg.model, pipeline_parallel=cfg.parallel.pipeline_parallel)
        self.phase = "starting"  # what the loop is doing, for errors (a timed-out collective)
        # The loop's own phases (data, checkpoint); the engine times forward_backward and
        # optimizer. A save's time is reported with the step after it.
        self.timer = monitor.PhaseTimer(cfg.logging.time_breakdown)
        self.profile = monitor.ProfileWindow(cfg.logging.profile_steps, cfg.logging.profile_ranks,
                                             cfg.logging.dir)

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
            image_size=int(load_hf_vision_config(self.cfg.model.vision).image_size),
            image_mean=mean, image_std=std,
            # The validation loader is rebuilt for every evaluation: no worker start-up for it.
            num_workers=data.num_workers if split == "train" else 0,
        )

    def install_signal_handler(self) -> None:
        """The exit signal and SIGTERM stop the run after the step it is in (StopPolicy)."""
        self.stopping.install()

    def save(self) -> Optional[str]:
        """Save this step's checkpoint (:meth:`CheckpointManager.save`); collective. Its time
        is kept for the margin before a deadline."""
        start = time.perf_counter()
        with self.timer.phase("checkpoint"):
            saved = self.checkpoints.save(self.step, self.engine, self.train_loader,
                                          progress={"samples_seen": self.samples_seen})
        self.stopping.note_save(time.perf_counter() - start)
        return saved

    # -- the loop ------------------------------------------------------------------------------
    def next_batches(self) -> List[dict]:
        return [next(self.train_loader) for _ in range(self.cfg.train.grad_accumulation)]

    def train(self) -> dict:
        """The loop; a collective that times out or loses a peer ends it as a
        :class:`CollectiveFailure` that says what the run was doing (:attr:`phase`)."""
        try:
            return self._train()
        except (NonFiniteTrainingError, CheckpointError):
            raise
        except RuntimeError as exc:
            if not is_collective_failure(exc):
                raise
            raise CollectiveFailure(
                f"a collective failed while {self.phase} (parallel.timeout_minutes="
                f"{self.cfg.parallel.timeout_minutes}; another rank is hung or gone): "
                f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.checkpoints.release()  # the checkpoint directory is free for the next run

    def _train(self) -> dict:
        cfg = self.cfg
        self.phase = "resuming"
        self.step = self.checkpoints.load(self.engine, self.train_loader)
        self.samples_seen = int(self.checkpoints.progress.get("samples_seen", 0))
        self._log_start()
        for chunk in self.chunks:
            chunk.train()
        final: dict = {}
        if self.step == 0 and cfg.logging.eval_interval:
            self.phase = "evaluating the held-out sets before step 1"
            self.evaluate_understanding()  # the curve's first point: nothing seen yet
        if cfg.train.compile and self.step < cfg.train.steps:
            self.metrics.info("train.compile: the first step compiles the decoder layers")
        while self.step < cfg.train.steps:
            self.profile.step_begins(self.step + 1)
            start = time.perf_counter()
            self.phase = f"loading the batches of step {self.step + 1}"
            with self.timer.phase("data"):
                batches = self.next_batches()
            self.phase = (f"running train step {self.step + 1} (forward, backward, gradient "
                          f"reduction, optimizer step)")
            result = self.engine.train_batch(batches, self.step)
            result.times.update(self.timer.pop())  # data, and the save after the step before
            elapsed = time.perf_counter() - start
            self.step += 1
            self.phase = f"logging step {self.step} (the loss reduction over data-parallel ranks)"
            self.checkpoints.poll()  # an asynchronous save that has finished
            final = self._log_step(result, batches, elapsed)
            self._stop_if_too_many_bad_steps()
            if cfg.logging.eval_interval and self.step % cfg.logging.eval_interval == 0:
                self.phase = f"evaluating at step {self.step}"
                final.update(self.evaluate())
            self.phase = f"agreeing whether to stop after step {self.step}"
            stop = self.stopping.agree(step_s=time.perf_counter() - start)
            if (cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0) \
                    or self.step == cfg.train.steps or stop:
                self.phase = f"saving the checkpoint of step {self.step}"
                self.save()
            self.profile.step_ends(self.step)
            if stop:
                if self.step < cfg.train.steps:
                    self.stopped = stop
                    self.metrics.info(f"stopping at step {self.step} of {cfg.train.steps}: {stop}")
                break
        self.profile.close()
        if self.profile.written:
            self.metrics.info(f"profile of steps {cfg.logging.profile_steps}: {', '.join(self.profile.written)}")
        self.phase = "finishing the last checkpoint"
        self.checkpoints.close()  # the last save is committed before the run ends
        if self.stopped:
            self.checkpoints.mark_requeue(self.step, self.stopped)
        self.engine.close()
        self.metrics.close()
        final["checkpoint"] = self.checkpoints.last_committed
        if self.stopped:
            final.update(stopped=self.stopped, step=self.step)
        return final

    def _log_start(self) -> None:
        """Open the loggers at the step the run goes on from; a resume (or a torchrun restart)
        is logged and recorded in metrics.jsonl."""
        self.metrics.start(first_step=self.step + 1)
        restarts, _ = stops.torchrun_restarts()  # launch.run has logged it
        if self.checkpoints.resume_dir is not None or restarts:
            self.metrics.log_event("resume", self.step, {
                "checkpoint": self.checkpoints.resume_dir, "restart_count": restarts,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)})

    def _count_skipped(self, result: StepResult) -> None:
        """Every rank counts (the engine's decision is the same on all): the stop is collective."""
        if result.skipped:
            self.skipped_steps += 1
            self.bad_steps_in_a_row += 1
            values = ", ".join(f"{k} {v}" for k, v in (("loss", result.losses.get("loss")),
                                                        ("grad_norm", result.grad_norm)) if v is not None)
            self.metrics.info(f"WARNING: step {self.step} skipped (not applied): non-finite loss or "
                              f"gradient norm ({values}); {self.bad_steps_in_a_row} in a row")
        else:
            self.bad_steps_in_a_row = 0
            self.last_good_step = self.step

    def _stop_if_too_many_bad_steps(self) -> None:
        limit = self.cfg.train.max_bad_steps
        if limit and self.bad_steps_in_a_row >= limit:
            self.checkpoints.close()  # a save in flight is of finite weights: let it commit
            self.metrics.close()
            raise NonFiniteTrainingError(
                f"stopping: {self.bad_steps_in_a_row} consecutive steps with a non-finite loss or "
                f"gradient norm (last good step {self.last_good_step}); the last checkpoint is "
                f"{self.checkpoints.latest_name()}")

    def _log_step(self, result: StepResult, batches, elapsed) -> dict:
        result = results.reduce_over_dp(result, self.dp_group)
        self._count_skipped(result)
        # Work of the whole step: this rank's batches, summed over the data-parallel ranks.
        work = results.reduce_figures({
            "tokens": sum(int((b["segment_ids"] >= 0).sum()) for b in batches),
            "documents": sum(int(b.get("num_documents", 0)) for b in batches),
            "flops": sum(step_flops(self.cfg.model, b, **self._flop_terms) for b in batches),
        }, results.WORK, self.dp_group)
        self.samples_seen += int(work["documents"])
        if self.step % self.cfg.logging.log_interval == 0:  # every rank at the same steps
            self.phase = f"comparing the ranks' step times at step {self.step}"
            stragglers = monitor.slowest_rank(elapsed)
        else:
            stragglers = {}
        record = dict(result.figures(), **stragglers, **{f"count_{k}": float(v) for k, v in result.counts.items()},
                      skipped_steps=self.skipped_steps,
                      bad_steps_in_a_row=self.bad_steps_in_a_row, samples_seen=self.samples_seen,
                      step_time_s=elapsed,
                      tokens_per_s=work["tokens"] / elapsed, samples_per_s=work["documents"] / elapsed,
                      tflops_per_s=work["flops"] / elapsed / 1e12 / dist.get_world_size(),
                      memory_gb=_memory_gb())
        peak = self.cfg.logging.peak_tflops or (H100_BF16_PEAK_TFLOPS if platform.has_cuda() else None)
        if peak:
            record["mfu"] = record["tflops_per_s"] / peak
        self.metrics.log_step(self.step, record)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """``logging.eval_batches`` batches of the validation split: the mean losses and the
        diagnostics' figures over all of them (statistics summed, so exact over the split);
        then the held-out sets of ``logging.eval_sets`` (:meth:`evaluate_understanding`)."""
        loader = self.valid_loader_factory()
        total = StepResult()
        n = 0
        # megatron-core's interleaved schedule (virtual pipeline stages) runs a multiple of PP
        # micro-batches per call: the batches go in groups of PP there, one at a time elsewhere
        # (eval_batches rounded up to whole groups; a group the split cannot fill is not run).
        group = self.cfg.parallel.pipeline_parallel if self.cfg.parallel.virtual_pipeline else 1
        for _ in range(-(-self.cfg.logging.eval_batches // group)):
            try:
                batches = [next(loader) for _ in range(group)]
            except StopIteration:
                break
            total = total.add(results.reduce_over_dp(self.engine.eval_batch(batches, self.step),
                                                     self.dp_group))
            n += 1
        loader.close()
        result = total.scaled(1.0 / max(n, 1)).figures(prefix="valid_")
        self.metrics.log_eval(self.step, result)
        return dict(result, **self.evaluate_understanding())

    def evaluate_understanding(self) -> dict:
        """Answer accuracy (and generated answers' exact match) on ``logging.eval_sets``, logged
        against the step and the samples seen; collective (eval/understanding.py)."""
        if self.understanding is None:
            return {}
        record = self.understanding.evaluate(self.chunks)
        if record is None:  # not the last pipeline stage
            return {}
        record = {"samples_seen": self.samples_seen, **record}
        self.metrics.log_understanding(self.step, record)
        return {f"understanding/{k}": v for k, v in record.items()}


def check_tokenizer_matches(cfg: RunConfig, datasets) -> None:
    """The shards' tokenizer must agree with the model's image token, vocabulary and (for
    condition dropout) documents_start_with_bos."""
    for dataset in datasets:
        ids = dataset.tokenizer_ids
        image_id = ids.get("image_token_id")
        if image_id is not None and image_id != cfg.model.image_token_id:
            raise ConfigError(f"data {dataset.name!r} was tokenized with <image> = {image_id}, but "
                              f"model.image_token_id = {cfg.model.image_token_id}")
        # Condition dropout keeps a document's first token when it is BOS (models/interleaver.py
        # condition_positions): whether it is must be what the shards' tokenizer wrote.
        has_bos = ids["bos_id"] is not None if "bos_id" in ids else None
        if cfg.model.pixel.cond_dropout > 0 and has_bos not in (None, cfg.model.documents_start_with_bos):
            raise ConfigError(f"data {dataset.name!r} was tokenized {'with' if has_bos else 'without'} a "
                              f"BOS token, but model.documents_start_with_bos = "
                              f"{cfg.model.documents_start_with_bos}: condition dropout would "
                              f"{'null BOS' if has_bos else 'keep the caption first token'}; set "
                              f"model.documents_start_with_bos: {str(has_bos).lower()}")
        vocab = ids.get("vocab_size")
        if vocab is not None and vocab > cfg.model.llm.vocab_size:
            raise ConfigError(f"data {dataset.name!r} uses a tokenizer of {vocab} tokens, more than "
                              f"model.llm.vocab_size = {cfg.model.llm.vocab_size}")


def _memory_gb() -> float:
    if platform.has_cuda():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def write_summary(path: str, record: dict) -> None:
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1, default=str)
