"""Data preparation and runs of the ablation; every run is a subprocess.

Data size (the paper's data-scale axis): N = the number of *unique* training image-text pairs
(rows of the demo data's train split; each row gives a caption document and a question/answer
document). A run at size N trains on the first N rows (nested subsets: the rows of a smaller
size are a subset of a larger one) for ``steps = max(min_steps, round(N * steps_per_sample))``
optimizer steps, so the compute per unique pair, and thus the number of passes over the data
(reported as ``epochs``), is the same at every size. More data therefore means both more unique
pairs and proportionally more samples seen, as in the paper's single-pass pretraining where
samples seen = data scale. Everything else (model, batch, lr schedule shape) is held fixed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import pyarrow.parquet as pq

from megatron_unihetero.ablation.arms import ARMS, REPO_ROOT

Log = Callable[[str], None]


def _run(cmd: List[str], log_path: str, env: Optional[dict] = None) -> float:
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    if proc.returncode != 0:
        with open(log_path) as handle:
            tail = handle.read()[-3000:]
        raise RuntimeError(f"command failed (rc {proc.returncode}): {' '.join(cmd)}\n"
                           f"log {log_path}:\n{tail}")
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def collect(spec: RunSpec, run_dir: str, data_dir: str, last_k: int = 10) -> dict:
    """One result row from a finished run folder (metrics.jsonl + eval.json)."""
    with open(os.path.join(run_dir, "eval.json")) as handle:
        ev = json.load(handle)
    records = _train_records(run_dir)
    tail = records[-last_k:]

    def tail_mean(key):
        vals = [r[key] for r in tail if key in r]
        return sum(vals) / len(vals) if vals else None

    docs_seen = sum(r.get("samples_per_s", 0.0) * r.get("step_time_s", 0.0) for r in records)
    docs = num_documents(data_dir, spec.data_size)
    probes = ev.get("probes") or {}
    probe = {a: (probes.get(a) or {}).get("test_accuracy") for a in ("shape", "colour", "position", "size")}
    probe_vals = [v for v in probe.values() if v is not None]
    retrieval = ev.get("semantic_retrieval") or {}
    return {
        "arm": spec.arm, "data_size": spec.data_size, "seed": spec.seed, "steps": spec.steps,
        "docs_seen": round(docs_seen), "epochs": docs_seen / docs if docs else None,
        "answer_accuracy": ev.get("answer_accuracy"), "caption_perplexity": ev.get("caption_perplexity"),
        **{f"probe_{a}": v for a, v in probe.items()},
        "probe_mean": sum(probe_vals) / len(probe_vals) if probe_vals else None,
        "retrieval_top1": retrieval.get("top1"),
        "final_loss": tail_mean("loss"), "final_text": tail_mean("text"),
        "final_semantic": tail_mean("semantic"), "final_pixel": tail_mean("pixel"),
    }


def run_one(spec: RunSpec, *, work_dir: str, data_dir: str, eval_samples: int,
            config_dir: Optional[str] = None, keep_checkpoints: bool = False,
            threads: Optional[int] = None, log: Log = print) -> dict:
    """Train + evaluate one (arm, size, seed) in its own folder; reuse a finished one."""
    run_dir = os.path.join(work_dir, spec.name)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.isfile(result_path):
        with open(result_path) as handle:
            log(f"[{spec.name}] already done, reusing {result_path}")
            return json.load(handle)
    os.makedirs(run_dir, exist_ok=True)
    arm = ARMS[spec.arm]
    config = arm.config if config_dir is None else os.path.join(config_dir, f"{spec.arm}.yaml")
    tokenizer = os.path.join(data_dir, "tokenizer.model")
    env = dict(os.environ)
    # Each run is its own single-process job: give it its own rendezvous port so that runs
    # side by side (--jobs > 1) or other jobs on the machine do not collide on 29500.
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(free_port())
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    warmup = max(1, int(round(0.1 * spec.steps)))
    train_cmd = [
        sys.executable, "-m", "megatron_unihetero.pretrain", "--config", config,
        f"--data.train=[{subset_prefix(data_dir, spec.data_size)}]", f"--data.tokenizer={tokenizer}",
        f"--train.steps={spec.steps}", f"--train.warmup_steps={warmup}", f"--train.seed={spec.seed}",
        f"--checkpoint.dir={os.path.join(run_dir, 'checkpoints')}", f"--logging.dir={run_dir}",
        "--logging.log_interval=1", "--logging.progress_bar=false", "--logging.tensorboard=false",
    ]
    log(f"[{spec.name}] training {spec.steps} steps")
    train_s = _run(train_cmd, os.path.join(run_dir, "train.log"), env)
    eval_cmd = [
        sys.executable, "-m", "megatron_unihetero.evaluate", "--load", os.path.join(run_dir, "checkpoints"),
        "--data", data_dir, "--tokenizer", tokenizer, "--max-samples", str(eval_samples),
        "--output", os.path.join(run_dir, "eval.json"),
    ]
    eval_s = _run(eval_cmd, os.path.join(run_dir, "eval.log"), env)
    result = collect(spec, run_dir, data_dir)
    result.update(train_wall_s=train_s, eval_wall_s=eval_s, wall_s=train_s + eval_s)
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=1)
    if not keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    log(f"[{spec.name}] answer accuracy {result['answer_accuracy']:.3f}, train {train_s:.0f}s, "
        f"eval {eval_s:.0f}s")
    return result


def chance_accuracy(data_dir: str, eval_samples: int) -> Optional[float]:
    """Expected answer accuracy of a uniform guess over each question's candidates."""
    path = os.path.join(data_dir, "valid.parquet")
    if not os.path.isfile(path):
        return None
    rows = pq.read_table(path, columns=["candidates"]).slice(0, eval_samples).to_pylist()
    vals = [1.0 / len(r["candidates"]) for r in rows if r.get("candidates")]
    return sum(vals) / len(vals) if vals else None


def load_finished(work_dir: str, specs: List[RunSpec]) -> List[dict]:
    out = []
    for spec in specs:
        path = os.path.join(work_dir, spec.name, "result.json")
        if os.path.isfile(path):
            with open(path) as handle:
                out.append(json.load(handle))
    return out


def describe(specs: List[RunSpec], data_dir: str) -> Dict[int, dict]:
    """Per data size: steps, documents in the shards."""
    return {s.data_size: {"steps": s.steps, "documents": num_documents(data_dir, s.data_size)} for s in specs}
