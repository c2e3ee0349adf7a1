"""The run configuration: one YAML file, sections mirroring the system's parts.

Validated up front (:meth:`RunConfig.validate`) so a bad run fails before any rank builds a
model: TP must divide the heads, the world size must be TP x PP x DP, data paths must exist.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_unihetero import platform
from megatron_unihetero.models.config import ConfigError, ModelConfig

# The values of train.recompute* (RunConfig.activation_memory maps them onto megatron-core's
# TransformerConfig; kept here so that loading a config does not import megatron-core).
RECOMPUTE = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
# The values of train.exit_signal: signals a process can catch that no launcher sends for
# another reason (SIGINT is a terminal's ^C, SIGKILL / SIGSTOP cannot be caught).
EXIT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGTERM", "NONE")
# The modules train.module_lr names (training/optim.py module_of maps each parameter to one):
# the vision encoder, the projector, the LLM (its token embedding, layers, final norm and output
# layer: everything under model.llm) and the heads (semantic head, pixel head).
MODULES = ("vision", "projector", "llm", "heads")


@dataclass
class DataConfig:
    train: List[str] = field(default_factory=list)  # shard prefixes (PREFIX or PREFIX_00000...)
    weights: Optional[List[float]] = None  # blending weights, one per entry of `train`
    valid_fraction: float = 0.05
    seq_length: int = 128
    micro_batch_size: int = 4
    tokenizer: Optional[str] = None  # SentencePiece .model or a local HF tokenizer folder
    # Loader worker processes per rank (read, decode encoded images, collate); -1: auto (the
    # cores a rank's share of the node leaves, 0 on small machines; data/loader.auto_num_workers).
    num_workers: int = -1
    pack_window: int = 512


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Virtual pipeline stages per rank (interleaved 1F1B); None: plain 1F1B.
    virtual_pipeline: Optional[int] = None
    engine: str = "megatron"  # megatron | deepspeed
    # megatron engine: megatron-core's distributed optimizer (ZeRO-1: fp32 masters and Adam
    # moments sharded over data-parallel ranks). false: every DP rank holds the full state.
    distributed_optimizer: bool = True
    zero_stage: int = 1  # deepspeed engine only
    # megatron engine, TP > 1: split the activations outside the tensor-parallel regions
    # (norms, residuals, the decoder's input and output) along the sequence over the TP ranks
    # (megatron-core's sequence parallelism); at TP = 1 it changes nothing.
    sequence_parallel: bool = False
    # megatron engine: reduce (distributed optimizer: reduce-scatter) each gradient bucket over
    # DP while the backward is still running (megatron-core's DDP overlap_grad_reduce). megatron-
    # core launches a bucket when all its parameters have their gradient, so every trainable
    # parameter must get one in each step's last micro-batch (megatron-core's DDP asserts
    # otherwise): a last micro-batch without images leaves the projector out.
    overlap_grad_reduce: bool = False
    # Not supported (validate says why); kept so that the setting is refused by name.
    overlap_param_gather: bool = False
    deepspeed_config: Optional[str] = None  # a user's DeepSpeed JSON (overrides the generated one)
    # How long a collective of any process group waits before the run ends with an error
    # naming the operation (a hung or dead rank), instead of hanging.
    timeout_minutes: float = 30


@dataclass
class ModuleOptimConfig:
    """One module's multipliers (``train.module_lr.MODULE``): its param groups' learning rate
    is ``lr_mult`` x the schedule (train.lr, train.min_lr, warmup and cosine: each group its
    own ``max_lr`` / ``min_lr``), its weight decay ``wd_mult`` x train.weight_decay (norms and
    biases get none, whatever the multiplier)."""

    lr_mult: float = 1.0
    wd_mult: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    grad_accumulation: int = 1  # micro-batches per step on each data-parallel rank
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU: resolve_dtype) | bf16 | fp32
    # torch.compile each decoder layer (parallel.apply_compile; TP=1, local spec, not ZeRO-3).
    # The first step pays the compilation (a C++ compiler is needed on CPU).
    compile: bool = False
    # Activation recompute, megatron-core's (RunConfig.activation_memory): none | selective
    # (recompute_modules of every layer: core_attn by default, also mlp, layernorm) | full
    # (whole layers: recompute_method uniform, every chunk of recompute_num_layers layers; block,
    # the first recompute_num_layers layers of each pipeline stage). megatron engine only.
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])
    # Stop the run after this many consecutive steps skipped for a non-finite loss or gradient
    # norm (each such step is skipped, not applied); 0: never stop.
    max_bad_steps: int = 10
    # Stopping before train.steps for a requeue (training/stopping.py): after the current step
    # the run saves and exits with pretrain's requeue status (75; 0 under torchrun, see there).
    # A deadline: this many minutes after the process started (None: none) and, when the
    # environment has it, the job's end time from Slurm (SLURM_JOB_END_TIME); the run stops
    # once the next step, a save (the longest this process measured) and exit_margin_minutes
    # would not fit before the earlier of the two.
    exit_after_minutes: Optional[float] = None
    exit_margin_minutes: float = 5.0
    # The signal that asks for that stop (SIGTERM always does too); examples/launch/slurm.sbatch
    # has Slurm send it ahead of the time limit. none: SIGTERM only.
    exit_signal: str = "SIGUSR1"
    # Per-module learning rate and weight decay: {module: {lr_mult, wd_mult}} for the modules
    # of MODULES (vision | projector | llm | heads); a module not named has 1 and 1. Freezing
    # lives in the model config (model.vision.frozen, model.projector.frozen, model.freeze_llm):
    # a frozen module is in no param group, and its entry here changes nothing.
    module_lr: Dict[str, ModuleOptimConfig] = field(default_factory=dict)

    def module_multipliers(self, module: str) -> ModuleOptimConfig:
        """``module``'s multipliers (1 and 1 when ``module_lr`` does not name it)."""
        return self.module_lr.get(module, ModuleOptimConfig())


def trainable_modules(model: ModelConfig) -> Tuple[str, ...]:
    """The modules of MODULES with parameters that train under ``model``'s freezing (the heads:
    when semantic or pixel generation is on), in MODULES' order."""
    trains = {"vision": not model.vision.frozen, "projector": not model.projector.frozen,
              "llm": not model.freeze_llm, "heads": model.semantic.enabled or model.pixel.enabled}
    return tuple(m for m in MODULES if trains[m])


# megatron-core's distributed-optimizer checkpoint formats this project offers (engine_megatron).
OPTIMIZER_FORMATS = ("fully_reshardable", "dp_reshardable")


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    save_interval: int = 50
    keep_last: int = 2
    resume: bool = True  # restart the same command -> resume from `latest`
    load: Optional[str] = None  # start from this checkpoint (weights only) when not resuming
    # What a resume (and checkpoint.load) checks against the checkpoint's manifest.json before
    # loading: full (sizes and sha256 checksums, one read of each file) | sizes.
    verify: str = "full"
    # When the newest checkpoint fails verification, resume from the newest one that passes
    # (logged); false: stop with an error naming the file.
    fallback: bool = True
    # Write checkpoints in a forked process while training goes on (megatron-core's async
    # torch_dist save; megatron engine). A save is committed (`latest` moves) once every
    # rank's write has finished; the next save, the end of the run and SIGTERM wait for it.
    async_save: bool = False
    # The megatron engine's optimizer state on disk (megatron-core's distributed-optimizer
    # formats): dp_reshardable (each rank's own buffers, no exchange and no extra memory: the
    # default, since it is the one that fits; a resume may change the DP size only) |
    # fully_reshardable (model-space tensors: resumes at any TP, PP and DP, but a save gathers
    # the optimizer state: measured at the 7B widths, 2 layers, DP=2 on a 24 GB CPU machine,
    # rank 0 peaked at 12.6 GiB against 8.0 GiB, and was killed for memory; save once with it
    # before changing TP or PP).
    optimizer_format: str = "dp_reshardable"
    # fully_reshardable's exchange at a save: true gathers each optimizer buffer onto DP rank 0
    # alone, over gloo, and only rank 0 writes the optimizer (megatron-core's
    # distrib_optim_fully_reshardable_mem_efficient); false all-gathers every buffer onto every
    # DP rank (NCCL on GPU) so that all of them write a part: a faster save, but each rank then
    # holds the whole optimizer state at once. Either loads the same way, at any layout.
    optimizer_save_low_memory: bool = True


EVAL_SET_KINDS = ("auto", "demo", "tsv", "llava")


@dataclass
class EvalSetConfig:
    """A held-out set the run evaluates itself on every ``logging.eval_interval`` steps
    (eval/understanding.py): answer accuracy by likelihood over each question's candidates,
    and with ``generate`` the exact match of generated answers (TP = PP = 1 only)."""

    name: str = ""
    path: str = ""
    # demo: a demo data folder (its valid.parquet) or a parquet in its layout; tsv: a VLMEvalKit
    # multiple-choice TSV; llava: LLaVA-style conversation JSON / JSON lines, the first question
    # and answer of each (optional "candidates": scored by likelihood too); auto: by the path.
    kind: str = "auto"
    max_rows: int = 200  # the first rows of the file
    image_root: Optional[str] = None  # llava: image paths are read under it (default: the file's folder)
    generate: bool = False  # also the exact match of greedy generated answers (TP = PP = 1)
    generate_rows: Optional[int] = None  # generate for the first N rows only (None: max_rows)
    max_new_tokens: int = 16


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 4
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron_unihetero"
    progress_bar: bool = True
    # The libraries' warnings (megatron-core's "TransformerEngine / apex not installed", torch's
    # deprecations, ...) and this package's log lines go to LOGGING_DIR/run.log (run.rank{R}.log
    # on rank R > 0); true: printed on the console as well (megatron_unihetero/console.py).
    verbose: bool = False
    # Peak dense TFLOP/s of one accelerator, for MFU (training/flops.py). None: 989 (H100 SXM
    # bf16) on GPU; no MFU on CPU.
    peak_tflops: Optional[float] = None
    # Each step's time by phase in metrics.jsonl (time_data_s, time_forward_backward_s,
    # time_optimizer_s, time_checkpoint_s; training/monitor.py). On a GPU each phase boundary
    # synchronises the device; false: no phase timers.
    time_breakdown: bool = True
    # [first, last]: torch.profiler over those steps (1-based, inclusive) on profile_ranks,
    # traces under LOGGING_DIR/profile/ (TensorBoard's profiler plugin, Perfetto) with the
    # window's memory (CUDA memory history on GPU, peak RSS on CPU). None: no profiling.
    profile_steps: Optional[List[int]] = None
    profile_ranks: List[int] = field(default_factory=lambda: [0])
    # Held-out sets evaluated inside the run at eval_interval (EvalSetConfig; needs
    # data.tokenizer): a "understanding" record per evaluation in metrics.jsonl, against step
    # and samples_seen (tools/plot_understanding.py draws it).
    eval_sets: List[EvalSetConfig] = field(default_factory=list)


def exit_signal_name(value: str) -> str:
    """``train.exit_signal`` spelled as :data:`EXIT_SIGNALS` spell it (``usr1`` -> ``SIGUSR1``)."""
    name = str(value).strip().upper()
    return name if name == "NONE" or name.startswith("SIG") else "SIG" + name


def resolve_dtype(dtype: str) -> str:
    """``train.dtype`` decided for this machine: ``auto`` is bf16 where CUDA is, else fp32.
    The one place ``auto`` is read (:meth:`RunConfig.resolved`, the memory planner)."""
    if dtype == "auto":
        return "bf16" if platform.has_cuda() else "fp32"
    return dtype


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def resolved(self) -> "RunConfig":
        """A copy with every machine-dependent value decided (``train.dtype``); the trainer
        and the engines read only resolved configs, and a checkpoint saves this one."""
        return dataclasses.replace(self, train=dataclasses.replace(
            self.train, dtype=resolve_dtype(self.train.dtype)))

    def activation_memory(self) -> dict:
        """``train.recompute*`` and ``parallel.sequence_parallel`` as the megatron-core
        TransformerConfig fields they set (models/llm.py transformer_config takes them): the
        one place the options meet megatron's names."""
        train = self.train
        fields = {"sequence_parallel": self.parallel.sequence_parallel}
        if train.recompute == "selective":
            fields.update(recompute_granularity="selective", recompute_modules=list(train.recompute_modules))
        elif train.recompute == "full":
            fields.update(recompute_granularity="full", recompute_method=train.recompute_method,
                          recompute_num_layers=train.recompute_num_layers)
        return fields

    def _validate_bounds(self) -> None:
        """Every numeric option in its range, named by its key (a negative learning rate or a
        zero micro-batch would otherwise fail deep inside a rank, or train silently wrong)."""
        data, train, ck, log = self.data, self.train, self.checkpoint, self.logging
        checks = [
            ("data.micro_batch_size", data.micro_batch_size, data.micro_batch_size >= 1, ">= 1"),
            ("data.seq_length", data.seq_length, data.seq_length >= 1, ">= 1"),
            ("data.pack_window", data.pack_window, data.pack_window >= 1, ">= 1"),
            ("data.valid_fraction", data.valid_fraction, 0.0 <= data.valid_fraction < 1.0, "in [0, 1)"),
            ("data.num_workers", data.num_workers, data.num_workers >= -1, ">= 0, or -1 (auto)"),
            ("train.steps", train.steps, train.steps >= 1, ">= 1"),
            ("train.grad_accumulation", train.grad_accumulation, train.grad_accumulation >= 1, ">= 1"),
            ("train.lr", train.lr, math.isfinite(train.lr) and train.lr > 0, "> 0"),
            ("train.min_lr", train.min_lr, 0 <= train.min_lr <= train.lr, f"in [0, train.lr={train.lr}]"),
            ("train.warmup_steps", train.warmup_steps, train.warmup_steps >= 0, ">= 0"),
            ("train.weight_decay", train.weight_decay, train.weight_decay >= 0, ">= 0"),
            ("train.adam_beta1", train.adam_beta1, 0 <= train.adam_beta1 < 1, "in [0, 1)"),
            ("train.adam_beta2", train.adam_beta2, 0 <= train.adam_beta2 < 1, "in [0, 1)"),
            ("train.clip_grad", train.clip_grad, train.clip_grad >= 0, ">= 0 (0: no clipping)"),
            ("train.exit_after_minutes", train.exit_after_minutes,
             train.exit_after_minutes is None or (math.isfinite(train.exit_after_minutes)
                                                  and train.exit_after_minutes > 0),
             "> 0, or null (no deadline)"),
            ("train.exit_margin_minutes", train.exit_margin_minutes,
             math.isfinite(train.exit_margin_minutes) and train.exit_margin_minutes >= 0, ">= 0"),
            ("checkpoint.save_interval", ck.save_interval, ck.save_interval >= 0, ">= 0 (0: at the end only)"),
            ("checkpoint.keep_last", ck.keep_last, ck.keep_last >= 0, ">= 0 (0: keep all)"),
            ("logging.log_interval", log.log_interval, log.log_interval >= 1, ">= 1"),
            ("logging.eval_interval", log.eval_interval, log.eval_interval >= 0, ">= 0 (0: never)"),
            ("logging.eval_batches", log.eval_batches, log.eval_batches >= 0, ">= 0"),
            ("parallel.timeout_minutes", self.parallel.timeout_minutes, self.parallel.timeout_minutes > 0, "> 0"),
            ("model.semantic.weight", self.model.semantic.weight, self.model.semantic.weight >= 0, ">= 0"),
            ("model.semantic.warmup_steps", self.model.semantic.warmup_steps,
             self.model.semantic.warmup_steps >= 0, ">= 0"),
            ("model.pixel.weight", self.model.pixel.weight, self.model.pixel.weight >= 0, ">= 0"),
        ]
        for key, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{key} must be {expected}; got {value}")
        self._validate_modules()
        if exit_signal_name(train.exit_signal) not in EXIT_SIGNALS:
            raise ConfigError(f"train.exit_signal must be one of {' | '.join(EXIT_SIGNALS)}; got "
                              f"{train.exit_signal!r}")
        if data.weights is not None and (any(w < 0 for w in data.weights) or not sum(data.weights) > 0):
            raise ConfigError(f"data.weights must be >= 0 with a positive sum; got {data.weights}")
        window = log.profile_steps
        if window is not None and not (len(window) == 2 and all(isinstance(s, int) for s in window)
                                       and 1 <= window[0] <= window[1]):
            raise ConfigError(f"logging.profile_steps must be [first, last] with 1 <= first <= last; got {window}")
        if not all(isinstance(r, int) and r >= 0 for r in log.profile_ranks):
            raise ConfigError(f"logging.profile_ranks must be global ranks (ints >= 0); got {log.profile_ranks}")
        names = set()
        for i, eval_set in enumerate(log.eval_sets):
            key = f"logging.eval_sets[{i}]"
            if not eval_set.name or not eval_set.name.replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"{key}.name must be a name of letters, digits, - and _; got {eval_set.name!r}")
            if eval_set.name in names:
                raise ConfigError(f"{key}.name {eval_set.name!r} is used twice")
            names.add(eval_set.name)
            if not eval_set.path:
                raise ConfigError(f"{key}.path is empty")
            if eval_set.kind not in EVAL_SET_KINDS:
                raise ConfigError(f"{key}.kind must be one of {' | '.join(EVAL_SET_KINDS)}; got {eval_set.kind!r}")
            if eval_set.max_rows < 1 or eval_set.max_new_tokens < 1 or (eval_set.generate_rows or 1) < 1:
                raise ConfigError(f"{key}.max_rows, .generate_rows and .max_new_tokens must be >= 1")
        if log.eval_sets and not data.tokenizer:
            raise ConfigError("logging.eval_sets needs data.tokenizer (the held-out rows are tokenized in the run)")

    def _validate_modules(self) -> None:
        """``train.module_lr``'s names and multipliers, and that something trains at all."""
        for name, mults in self.train.module_lr.items():
            key = f"train.module_lr.{name}"
            if name not in MODULES:
                raise ConfigError(f"{key}: unknown module {name!r}; the modules are "
                                  f"{' | '.join(MODULES)}")
            if not (math.isfinite(mults.lr_mult) and mults.lr_mult > 0):
                raise ConfigError(f"{key}.lr_mult must be > 0 (to keep a module as it is, freeze "
                                  f"it in the model config); got {mults.lr_mult}")
            if not (math.isfinite(mults.wd_mult) and mults.wd_mult >= 0):
                raise ConfigError(f"{key}.wd_mult must be >= 0; got {mults.wd_mult}")
        if not trainable_modules(self.model):
            raise ConfigError("nothing trains: model.vision.frozen, model.projector.frozen and "
                              "model.freeze_llm are all true and neither semantic nor pixel "
                              "generation (whose heads would train) is on")

    def validate(self, world_size: int) -> None:
        """Check what needs the world: parallel layout, data paths, engine options."""
        self._validate_bounds()
        par, llm = self.parallel, self.model.llm
        tp, pp = par.tensor_parallel, par.pipeline_parallel
        if tp < 1 or pp < 1:
            raise ConfigError("parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not TP x PP x DP: it is not divisible "
                              f"by parallel.tensor_parallel x parallel.pipeline_parallel = {tp} x {pp}")
        if llm.num_attention_heads % tp or llm.num_query_groups % tp:
            raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.llm."
                              f"num_attention_heads={llm.num_attention_heads} and "
                              f"num_query_groups={llm.num_query_groups}")
        if llm.vocab_size % tp:
            # megatron-core splits the embedding and output layer by rows over TP.
            raise ConfigError(f"parallel.tensor_parallel={tp} does not divide model.llm."
                              f"vocab_size={llm.vocab_size}: pad the vocabulary (tools/"
                              f"convert_hf_to_checkpoint.py --vocab-divisible-by, default 1024, "
                              f"serves TP up to 8)")
        if llm.num_layers % pp:
            raise ConfigError(f"parallel.pipeline_parallel={pp} does not divide "
                              f"model.llm.num_layers={llm.num_layers}")
        vpp = par.virtual_pipeline
        if vpp is not None:
            if pp < 2 or vpp < 2:
                raise ConfigError("parallel.virtual_pipeline needs pipeline_parallel >= 2 and "
                                  "at least 2 virtual stages")
            if llm.num_layers % (pp * vpp):
                raise ConfigError(f"parallel.pipeline_parallel x virtual_pipeline = {pp} x {vpp} "
                                  f"does not divide model.llm.num_layers={llm.num_layers}")
        if pp > 1 and self.model.semantic.enabled and not self.model.vision.frozen:
            raise ConfigError("pipeline_parallel > 1 with semantic generation needs a frozen vision "
                              "encoder (model.vision.frozen=true): the last stage recomputes the "
                              "targets with its own copy of the encoder, which would go stale")
        # The engines' own options are checked by their engine (Engine.check_config); the
        # engine modules import this one, hence the import here.
        from megatron_unihetero.training.engine import ENGINES, engine_class

        if par.engine not in ENGINES:
            raise ConfigError(f"parallel.engine must be {' or '.join(ENGINES)}; got {par.engine!r}")
        engine_class(self).check_config(self)
        if self.train.compile:
            if tp > 1:
                raise ConfigError("train.compile needs parallel.tensor_parallel=1: the tensor-"
                                  "parallel linears' collectives would break every compiled graph")
            if llm.transformer_impl != "local":
                raise ConfigError("train.compile needs model.llm.transformer_impl=local: "
                                  "TransformerEngine's layers run their own fused kernels")
            if not platform.can_compile():
                raise ConfigError("train.compile on CPU needs a C++ compiler for TorchInductor's "
                                  "kernels: none on PATH (install g++ or set CXX)")
        self._validate_memory()
        if not self.data.train:
            raise ConfigError("data.train is empty: give one or more preprocessed shard prefixes")
        for prefix in self.data.train:
            if not (glob.glob(prefix + ".json") or glob.glob(prefix + "_[0-9]*.json")):
                raise ConfigError(f"data.train entry {prefix!r}: no shards found "
                                  f"({prefix}.json or {prefix}_00000.json)")
        if self.data.weights is not None and len(self.data.weights) != len(self.data.train):
            raise ConfigError(f"data.weights has {len(self.data.weights)} entries but data.train "
                              f"has {len(self.data.train)}")
        if self.data.seq_length > llm.max_sequence_length:
            raise ConfigError(f"data.seq_length={self.data.seq_length} exceeds "
                              f"model.llm.max_sequence_length={llm.max_sequence_length}")
        if self.train.max_bad_steps < 0:
            raise ConfigError(f"train.max_bad_steps must be >= 0 (0: never stop); got "
                              f"{self.train.max_bad_steps}")
        if self.checkpoint.verify not in ("full", "sizes"):
            raise ConfigError(f"checkpoint.verify must be full or sizes; got {self.checkpoint.verify!r}")
        if self.train.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.dtype must be auto, bf16 or fp32; got {self.train.dtype!r}")

    def _validate_memory(self) -> None:
        """Activation recompute, sequence parallelism and the DDP overlaps."""
        train, par, llm = self.train, self.parallel, self.model.llm
        if train.recompute not in RECOMPUTE:
            raise ConfigError(f"train.recompute must be one of {' | '.join(RECOMPUTE)}; got "
                              f"{train.recompute!r}")
        if train.recompute != "none" and train.compile:
            raise ConfigError("train.recompute does not combine with train.compile: the compiled "
                              "layers would run inside megatron-core's checkpoint function")
        if train.recompute == "full":
            if train.recompute_method not in RECOMPUTE_METHODS:
                raise ConfigError(f"train.recompute_method must be one of "
                                  f"{' | '.join(RECOMPUTE_METHODS)}; got {train.recompute_method!r}")
            per_chunk = llm.num_layers // (par.pipeline_parallel * (par.virtual_pipeline or 1))
            n = train.recompute_num_layers
            if not 1 <= n <= per_chunk:
                raise ConfigError(f"train.recompute_num_layers must be between 1 and the layers of "
                                  f"one pipeline stage ({per_chunk}); got {n}")
            if train.recompute_method == "uniform" and per_chunk % n:
                raise ConfigError(f"train.recompute_num_layers={n} must divide the layers of one "
                                  f"pipeline stage ({per_chunk}) with recompute_method=uniform")
        if train.recompute == "selective":
            bad = sorted(set(train.recompute_modules) - set(RECOMPUTE_MODULES))
            if bad or not train.recompute_modules:
                raise ConfigError(f"train.recompute_modules must be a non-empty subset of "
                                  f"{', '.join(RECOMPUTE_MODULES)}; got {train.recompute_modules}")
            if "layernorm" in train.recompute_modules and not platform.has_transformer_engine():
                raise ConfigError("train.recompute_modules: layernorm needs TransformerEngine: "
                                  "megatron-core 0.16's output-discarding checkpoint (its norm "
                                  "recompute) reads TransformerEngine's FP8 state even without FP8")
        if par.overlap_param_gather:
            raise ConfigError(
                "parallel.overlap_param_gather is not supported: megatron-core then all-gathers the "
                "updated parameter shards in forward pre-hooks of the next step, but this engine "
                "reads the parameters between steps (the semantic-target projector sync right after "
                "each optimizer step, the finiteness check, evaluation and checkpoint saving), which "
                "would see stale shards. Use parallel.overlap_grad_reduce for the backward overlap")
