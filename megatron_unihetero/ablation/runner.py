"""Data preparation and runs of the ablation; every run is a subprocess (or a SLURM array task).

Data size (the paper's data-scale axis): N = the number of *unique* training samples a run may
see, always the first N of one ordered pool (nested subsets: the samples of a smaller size are a
subset of a larger one's). Two pools:

- the built-in shapes world (default): N = rows of the demo train split; each row gives a
  caption document and a question/answer document (``--template both``);
- ``--train-shards PREFIX ...`` (any preprocessed shards, tools/preprocess_data.py): N = the
  first N samples (documents) of the shards in the order given, copied into one subset shard
  per size (:func:`write_subset`).

A run at size N trains for ``steps = max(min_steps, round(N * steps_per_sample))`` optimizer
steps, so the compute per unique sample, and thus the number of passes over the data (reported
as ``epochs``), is the same at every size. More data therefore means both more unique samples
and proportionally more samples seen, as in the paper's single-pass pretraining where samples
seen = data scale. Everything else (model, batch, lr schedule shape) is held fixed.

Held-out evaluation: the demo data's valid.parquet, or any ``--held-out`` parquet in its layout
or multiple-choice TSV in VLMEvalKit's (eval/data.py), scored by likelihood.

Launchers: ``local`` (one process per run), ``torchrun`` (``--nproc-per-node`` data-parallel
ranks per run), ``slurm`` (one array task per arm x size x seed: :func:`sbatch_script`; each task
runs ``tools/run_ablation.py --run-task PLAN --task-index I``). A run whose folder has a
``result.json`` is finished: it is never run again, and a SLURM array holds only unfinished runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import pyarrow.parquet as pq

from megatron_unihetero.ablation.arms import ARMS, REPO_ROOT

Log = Callable[[str], None]
LAUNCHERS = ("local", "torchrun", "slurm")
RESULT = "result.json"
# What a launcher sets for its ranks: a sweep started under one (a SLURM task's torchrun) must
# not hand its own rank to the runs it starts.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _run(cmd: List[str], log_path: str, env: Optional[dict] = None) -> float:
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        with open(log_path) as handle:
            tail = handle.read()[-3000:]
        raise RuntimeError(f"command failed (rc {proc.returncode}): {shlex.join(cmd)}\n"
                           f"log {log_path}:\n{tail}")
    return time.perf_counter() - t0


# -- the training pool ---------------------------------------------------------------------
@dataclass
class DataSource:
    """Where a sweep's training subsets, tokenizer and held-out set come from.

    ``train_shards`` empty: the shapes world, made in ``data_dir`` when missing. Otherwise the
    subsets are written under ``data_dir/shards_<hash of the prefixes>/`` and ``tokenizer`` must
    be the one the shards were made with.
    """

    data_dir: str
    train_shards: List[str] = field(default_factory=list)
    tokenizer: Optional[str] = None
    held_out: Optional[str] = None
    num_demo_samples: Optional[int] = None

    def __post_init__(self):
        if self.train_shards and not self.tokenizer:
            raise ValueError("--train-shards needs --tokenizer (the tokenizer the shards were made with)")
        if self.train_shards and not self.held_out:
            raise ValueError("--train-shards needs --held-out (a parquet in the demo layout or a "
                             "VLMEvalKit multiple-choice .tsv)")

    @property
    def is_demo(self) -> bool:
        return not self.train_shards

    @property
    def subset_dir(self) -> str:
        if self.is_demo:
            return self.data_dir
        key = hashlib.sha256("\n".join(os.path.abspath(p) for p in self.train_shards).encode()).hexdigest()[:10]
        return os.path.join(self.data_dir, f"shards_{key}")

    def subset_prefix(self, size: int) -> str:
        return os.path.join(self.subset_dir, f"train_n{size}")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or os.path.join(self.data_dir, "tokenizer.model")

    @property
    def held_out_path(self) -> str:
        return self.held_out or os.path.join(self.data_dir, "valid.parquet")

    def prepare(self, sizes: Sequence[int], log: Log = print) -> None:
        if self.is_demo:
            prepare_data(self.data_dir, list(sizes), num_demo_samples=self.num_demo_samples, log=log)
            return
        os.makedirs(self.subset_dir, exist_ok=True)
        with open(os.path.join(self.subset_dir, "sources.json"), "w") as handle:
            json.dump({"train_shards": [os.path.abspath(p) for p in self.train_shards]}, handle, indent=1)
        for size in sizes:
            prefix = self.subset_prefix(size)
            if os.path.isfile(prefix + ".json"):
                continue
            log(f"writing the first {size} samples of {' '.join(self.train_shards)} -> {prefix}")
            write_subset(self.train_shards, size, prefix)

    def documents(self, size: int) -> Optional[int]:
        return num_documents(self.subset_dir, size) if self.is_demo else size

    def describe_pool(self) -> str:
        if self.is_demo:
            return ("first N rows of the shapes-world train split; each row gives a caption document "
                    "and a question/answer document")
        return f"first N samples (documents) of the shards {', '.join(self.train_shards)}"


def write_subset(prefixes: Sequence[str], size: int, output_prefix: str) -> dict:
    """Copy the first ``size`` samples of the dataset/shard ``prefixes`` (in order) into the single
    shard ``output_prefix`` (data/shards.py's reader and writer: any image store)."""
    from megatron_unihetero.data.shards import ShardReader, ShardWriter, list_shards

    shards = []
    for prefix in prefixes:
        found = list_shards(prefix)
        if not found:
            raise FileNotFoundError(f"--train-shards {prefix!r}: no finished shard ({prefix}.json or "
                                    f"{prefix}_NNNNN.json)")
        shards.extend(found)
    readers = [ShardReader(s) for s in shards]
    total = sum(len(r) for r in readers)
    if size > total:
        raise ValueError(f"data size {size} exceeds the {total} samples of --train-shards "
                         f"{' '.join(prefixes)}")
    first = readers[0].metadata
    store = first["image_store"]
    for r in readers[1:]:
        for key in ("image_store", "image_size", "feature_shape", "tokenizer"):
            mine, theirs = r.metadata.get(key), first.get(key)
            if key == "tokenizer":  # the path may differ between copies of one tokenizer
                mine = {k: v for k, v in (mine or {}).items() if k != "path"}
                theirs = {k: v for k, v in (theirs or {}).items() if k != "path"}
            if mine != theirs:
                raise ValueError(f"--train-shards: {r.prefix} differs from {shards[0]} in {key} "
                                 f"({mine!r} vs {theirs!r}); a subset needs one layout")
    with_mask = any(r.metadata.get("has_loss_mask") for r in readers)
    keep = ("tokenizer", "sample_config", "vision_model", "vision_model_type", "feature_source",
            "image_encoding")
    writer = ShardWriter(output_prefix, image_store=store, image_size=first.get("image_size"),
                         feature_shape=first.get("feature_shape"), with_loss_mask=with_mask,
                         metadata={k: first[k] for k in keep if k in first})
    written = 0
    with writer:
        for reader in readers:
            for i in range(len(reader)):
                if written == size:
                    break
                images = reader.encoded_images(i) if store == "encoded" else list(reader.images(i))
                writer.add_sample(reader.tokens(i), images, reader.loss_mask(i) if with_mask else None)
                written += 1
        meta = writer.finalize(sources=[os.path.abspath(p) for p in prefixes], subset_of=shards)
    with open(output_prefix + ".summary.json", "w") as handle:
        json.dump({"samples": written, "from": shards}, handle, indent=1)
    return meta


def subset_prefix(data_dir: str, size: int) -> str:
    return os.path.join(data_dir, f"train_n{size}")


def prepare_data(data_dir: str, sizes: List[int], *, num_demo_samples: Optional[int] = None,
                 seed: int = 0, image_size: int = 32, log: Log = print) -> None:
    """Demo data, tokenizer and one shard set per data size, each made only when missing."""
    os.makedirs(data_dir, exist_ok=True)
    train_parquet = os.path.join(data_dir, "train.parquet")
    if not (os.path.isfile(train_parquet) and os.path.isfile(os.path.join(data_dir, "valid.parquet"))):
        total = num_demo_samples or max(4400, int(math.ceil(max(sizes) / 0.9)) + 100)
        log(f"making demo data ({total} samples) in {data_dir}")
        _run([sys.executable, "tools/make_demo_data.py", "--output", data_dir, "--num-samples", str(total),
              "--seed", str(seed), "--image-size", str(image_size)], os.path.join(data_dir, "make_demo_data.log"))
    tokenizer = os.path.join(data_dir, "tokenizer.model")
    if not os.path.isfile(tokenizer):
        log("training the tokenizer (on the whole train split, shared by every size)")
        _run([sys.executable, "tools/train_tokenizer.py", "--input", train_parquet, "--vocab-size", "512",
              "--output", tokenizer], os.path.join(data_dir, "train_tokenizer.log"))
    table = None
    for size in sizes:
        prefix = subset_prefix(data_dir, size)
        if os.path.isfile(prefix + "_00000.json"):
            continue
        if table is None:
            table = pq.read_table(train_parquet)
        if size > table.num_rows:
            raise ValueError(f"data size {size} exceeds the {table.num_rows} training rows in "
                             f"{train_parquet}; make more demo data (--num-demo-samples)")
        pq.write_table(table.slice(0, size), prefix + ".parquet")
        log(f"preprocessing {size} training pairs -> {prefix}_*")
        _run([sys.executable, "tools/preprocess_data.py", "--input", prefix + ".parquet", "--output-prefix",
              prefix, "--tokenizer-model", tokenizer, "--template", "both", "--image-size", str(image_size),
              "--workers", "1", "--no-progress"], prefix + ".preprocess.log")


def num_documents(data_dir: str, size: int) -> Optional[int]:
    """Documents (caption + qa samples) in a size's shards, from the preprocess summary."""
    path = subset_prefix(data_dir, size) + ".summary.json"
    try:
        with open(path) as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return None
    for key in ("samples_written", "samples", "num_samples"):
        if isinstance(summary.get(key), (int, float)):
            return int(summary[key])
    return None


# -- the plan ------------------------------------------------------------------------------
@dataclass
class RunSpec:
    arm: str
    data_size: int
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.arm}/n{self.data_size}_seed{self.seed}_steps{self.steps}"


def steps_for(size: int, steps_per_sample: float, min_steps: int) -> int:
    return max(min_steps, int(round(size * steps_per_sample)))


def plan(arms: List[str], sizes: List[int], seeds: List[int], steps_per_sample: float,
         min_steps: int) -> List[RunSpec]:
    """Seed-major, then size, then arm: an interrupted sweep has whole seeds of every arm."""
    return [RunSpec(arm, n, s, steps_for(n, steps_per_sample, min_steps))
            for s in seeds for n in sizes for arm in arms]


def is_finished(work_dir: str, spec: RunSpec) -> bool:
    return os.path.isfile(os.path.join(work_dir, spec.name, RESULT))


@dataclass
class RunOptions:
    """Everything a run needs besides its spec (one JSON plan for SLURM array tasks)."""

    work_dir: str
    source: DataSource
    eval_samples: int = 300
    config_dir: Optional[str] = None
    keep_checkpoints: bool = False
    threads: Optional[int] = None
    launcher: str = "local"  # how a run trains: local | torchrun (slurm tasks use one of these)
    nproc_per_node: int = 1
    vision_encoder: Optional[str] = None
    overrides: List[str] = field(default_factory=list)  # "--section.key=value" for every run

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunOptions":
        data = dict(data)
        data["source"] = DataSource(**data["source"])
        return cls(**data)


def train_command(spec: RunSpec, opts: RunOptions, run_dir: str) -> List[str]:
    arm = ARMS[spec.arm]
    config = arm.config if opts.config_dir is None else os.path.join(opts.config_dir, f"{spec.arm}.yaml")
    warmup = max(1, int(round(0.1 * spec.steps)))
    if opts.launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc-per-node={opts.nproc_per_node}", "-m", "megatron_unihetero.pretrain"]
    else:
        launch = [sys.executable, "-m", "megatron_unihetero.pretrain"]
    cmd = launch + [
        "--config", config,
        f"--data.train=[{opts.source.subset_prefix(spec.data_size)}]",
        f"--data.tokenizer={opts.source.tokenizer_path}",
        f"--train.steps={spec.steps}", f"--train.warmup_steps={warmup}", f"--train.seed={spec.seed}",
        f"--checkpoint.dir={os.path.join(run_dir, 'checkpoints')}", f"--logging.dir={run_dir}",
        "--logging.log_interval=1", "--logging.progress_bar=false", "--logging.tensorboard=false",
    ]
    if opts.vision_encoder:
        cmd.append(f"--model.vision.path={os.path.abspath(opts.vision_encoder)}")
    return cmd + list(opts.overrides)


def eval_command(opts: RunOptions, run_dir: str) -> List[str]:
    return [sys.executable, "-m", "megatron_unihetero.evaluate", "--load", os.path.join(run_dir, "checkpoints"),
            "--data", opts.source.held_out_path, "--tokenizer", opts.source.tokenizer_path,
            "--max-samples", str(opts.eval_samples), "--output", os.path.join(run_dir, "eval.json")]


def _train_records(run_dir: str) -> List[dict]:
    records = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if rec.get("kind") == "train":
                    records.append(rec)
    return records


# Training diagnostics (eval/diagnostics.py) kept per run: the mean over the last steps.
TRAIN_DIAGNOSTICS = ("semantic_r2", "semantic_cos", "semantic_baseline_cos", "semantic_mse",
                     "semantic_baseline_mse", "semantic_pred_var", "pixel_r2", "pixel_baseline",
                     "embed_norm_visual", "embed_norm_text")


def collect(spec: RunSpec, run_dir: str, documents: Optional[int] = None, last_k: int = 10) -> dict:
    """One result row from a finished run folder (metrics.jsonl + eval.json). ``documents``:
    the unique samples in the run's training subset (for ``epochs``)."""
    with open(os.path.join(run_dir, "eval.json")) as handle:
        ev = json.load(handle)
    records = _train_records(run_dir)
    tail = records[-last_k:]

    def tail_mean(key):
        vals = [r[key] for r in tail if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return sum(vals) / len(vals) if vals else None

    docs_seen = sum(r.get("samples_per_s", 0.0) * r.get("step_time_s", 0.0) for r in records)
    probes = ev.get("probes") or {}
    probe = {a: (probes.get(a) or {}).get("test_accuracy") for a in ("shape", "colour", "position", "size")}
    probe_vals = [v for v in probe.values() if v is not None]
    retrieval = ev.get("semantic_retrieval") or {}
    return {
        "arm": spec.arm, "data_size": spec.data_size, "seed": spec.seed, "steps": spec.steps,
        "docs_seen": round(docs_seen), "epochs": docs_seen / documents if documents else None,
        "answer_accuracy": ev.get("answer_accuracy"), "caption_perplexity": ev.get("caption_perplexity"),
        **{f"probe_{a}": v for a, v in probe.items()},
        "probe_mean": sum(probe_vals) / len(probe_vals) if probe_vals else None,
        "retrieval_top1": retrieval.get("top1"), "retrieval_top5": retrieval.get("top5"),
        "retrieval_r2": retrieval.get("r2"), "retrieval_cos": retrieval.get("cos"),
        "retrieval_baseline_cos": retrieval.get("baseline_cos"),
        "final_loss": tail_mean("loss"), "final_text": tail_mean("text"),
        "final_semantic": tail_mean("semantic"), "final_pixel": tail_mean("pixel"),
        **{f"final_{k}": tail_mean(k) for k in TRAIN_DIAGNOSTICS},
    }


def run_one(spec: RunSpec, opts: RunOptions, log: Log = print) -> dict:
    """Train + evaluate one (arm, size, seed) in its own folder; reuse a finished one."""
    run_dir = os.path.join(opts.work_dir, spec.name)
    result_path = os.path.join(run_dir, RESULT)
    if os.path.isfile(result_path):
        with open(result_path) as handle:
            log(f"[{spec.name}] already done, reusing {result_path}")
            return json.load(handle)
    os.makedirs(run_dir, exist_ok=True)
    # A local run and the evaluation are single processes: they join a world of one over an
    # in-memory store (parallel.init_distributed), so runs side by side need no ports; torchrun
    # runs use --standalone (a free rendezvous port of its own).
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    log(f"[{spec.name}] training {spec.steps} steps ({opts.launcher})")
    train_s = _run(train_command(spec, opts, run_dir), os.path.join(run_dir, "train.log"), env)
    eval_s = _run(eval_command(opts, run_dir), os.path.join(run_dir, "eval.log"), env)
    result = collect(spec, run_dir, opts.source.documents(spec.data_size))
    result.update(train_wall_s=train_s, eval_wall_s=eval_s, wall_s=train_s + eval_s)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as handle:  # written whole, then renamed: a result.json is never partial
        json.dump(result, handle, indent=1)
    os.replace(tmp, result_path)
    if not opts.keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    log(f"[{spec.name}] answer accuracy {result['answer_accuracy']:.3f}, train {train_s:.0f}s, "
        f"eval {eval_s:.0f}s")
    return result


# -- SLURM ---------------------------------------------------------------------------------
@dataclass
class SlurmOptions:
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "02:00:00"
    gpus_per_task: int = 0
    cpus_per_task: int = 4
    mem: Optional[str] = None
    max_parallel: Optional[int] = None  # the array's %K: at most K tasks at once
    extra: List[str] = field(default_factory=list)  # more "#SBATCH ..." options, e.g. "--qos=low"


def write_plan(path: str, specs: Sequence[RunSpec], opts: RunOptions) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"runs": [asdict(s) for s in specs], "options": opts.to_json()}, handle, indent=1)


def read_plan(path: str):
    with open(path) as handle:
        data = json.load(handle)
    return [RunSpec(**s) for s in data["runs"]], RunOptions.from_json(data["options"])


def sbatch_script(specs: Sequence[RunSpec], plan_path: str, slurm: SlurmOptions, *,
                  log_dir: str, job_name: str = "unihetero_ablation") -> str:
    """An sbatch array script, one task per run of ``specs`` (task i = run i of the plan)."""
    if not specs:
        raise ValueError("no runs to submit")
    array = f"0-{len(specs) - 1}" + (f"%{slurm.max_parallel}" if slurm.max_parallel else "")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --array={array}",
             "#SBATCH --nodes=1", "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
             f"#SBATCH --time={slurm.time}",
             f"#SBATCH --output={os.path.join(os.path.abspath(log_dir), '%x_%A_%a.out')}"]
    if slurm.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={slurm.gpus_per_task}")
    for key in ("partition", "account", "mem"):
        if getattr(slurm, key):
            lines.append(f"#SBATCH --{key}={getattr(slurm, key)}")
    lines += [f"#SBATCH {opt}" for opt in slurm.extra]
    lines += ["", "# One run (arm x data size x seed) per array task; the task index selects it from the",
              "# plan. A task whose run already has a result.json exits at once (resume).", "#"]
    lines += [f"# task {i}: {s.name}" for i, s in enumerate(specs)]
    lines += ["", "set -euo pipefail", f"cd {shlex.quote(REPO_ROOT)}",
              f"exec {shlex.quote(sys.executable)} tools/run_ablation.py --run-task {shlex.quote(os.path.abspath(plan_path))} "
              "--task-index \"$SLURM_ARRAY_TASK_ID\"", ""]
    return "\n".join(lines)


def submit(script_path: str) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", script_path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script_path} failed (rc {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


# -- results -------------------------------------------------------------------------------
def chance_accuracy(held_out: str, eval_samples: int) -> Optional[float]:
    """Expected answer accuracy of a uniform guess over each question's candidates."""
    if not os.path.isfile(held_out):
        return None
    if held_out.endswith(".tsv"):
        from megatron_unihetero.eval.data import read_vlmeval_tsv

        rows = read_vlmeval_tsv(held_out, eval_samples)
    else:
        rows = pq.read_table(held_out, columns=["candidates"]).slice(0, eval_samples).to_pylist()
    vals = [1.0 / len(r["candidates"]) for r in rows if r.get("candidates")]
    return sum(vals) / len(vals) if vals else None


def load_finished(work_dir: str, specs: List[RunSpec]) -> List[dict]:
    out = []
    for spec in specs:
        path = os.path.join(work_dir, spec.name, RESULT)
        if os.path.isfile(path):
            with open(path) as handle:
                out.append(json.load(handle))
    return out


def describe(specs: List[RunSpec], source: DataSource) -> Dict[int, dict]:
    """Per data size: steps, documents in the shards."""
    return {s.data_size: {"steps": s.steps, "documents": source.documents(s.data_size)} for s in specs}
