"""Preprocessing driver: inputs -> chunks -> workers -> shards, rejects and a summary.

Why it is shaped this way:
  * Order and determinism: rows are cut into fixed-size chunks and results are consumed in
    chunk order, so the shards are byte-identical for any ``--workers``. (Known exception:
    ``--precompute-features`` runs torch with cpu_count/workers threads per worker, and a
    different thread count may change float16 features in the last bit.)
  * Bounded memory: at most ``window`` chunks are in flight (``Pool.imap`` would read the
    whole input ahead), and readers stream their files.
  * Robustness: each bad row is skipped, counted by reason and listed in
    ``PREFIX.rejects.jsonl``; shards are only renamed to final names when whole.
  * Many machines: ``num_shards=K, shard_index=I`` makes this run job I of K independent
    jobs. Job I takes a contiguous block of the input files (``split_by="files"``, the
    default when there are at least K files) or of the rows (``"rows"``: one counting pass
    over non-parquet inputs) and writes its own dataset, ``part_prefix(PREFIX, I, K)``; the K
    parts concatenated in index order (tools/merge_shards.py --num-parts K) are exactly the
    samples one job would have written.
"""

from __future__ import annotations

import array
import collections
import hashlib
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from megatron_unihetero.data.preprocess import worker as W
from megatron_unihetero.data.preprocess.features import FeatureExtractor
from megatron_unihetero.data.preprocess.readers import UTF8_ERRORS, RowRange, count_rows, detect_format, iter_records
from megatron_unihetero.data.preprocess.samples import SampleConfig

IMAGE_STORES = ("encoded", "pixels", "features")
SPLIT_BY = ("auto", "files", "rows")
from megatron_unihetero.data.shards import ShardWriter, _indexed_dataset_module, list_shards, shard_name
from megatron_unihetero.data.tokenizer import build_tokenizer


@dataclass
class PreprocessConfig:
    inputs: List[str]
    output_prefix: str
    tokenizer_model: str
    sample: SampleConfig = field(default_factory=SampleConfig)
    input_format: Optional[str] = None  # None: from each file's extension
    workers: int = 1
    chunk_size: int = 64                # rows per task; part of the output's determinism
    shard_size_mb: float = 1024.0
    max_reject_fraction: float = 0.01
    vision_model: Optional[str] = None  # set: store frozen-encoder features instead of pixels
    progress: bool = True
    task_timeout_s: float = 1800.0      # per chunk; a dead worker fails the run instead of hanging it
    # encoded: image files at the target size (JPEG/PNG/WebP: sample.image_format); pixels: raw
    # RGB; features: frozen-encoder features (needs vision_model).
    image_store: str = "encoded"
    num_shards: int = 1                 # K independent jobs ...
    shard_index: int = 0                # ... of which this is job I (writes part_prefix(PREFIX, I, K))
    split_by: str = "auto"              # files | rows | auto (files when there are >= K files)
    invalid_utf8: str = "reject"        # reject | replace (readers.UTF8_ERRORS)

    def __post_init__(self) -> None:
        if self.vision_model and self.image_store != "features":
            self.image_store = "features"  # --precompute-features
        if self.image_store not in IMAGE_STORES:
            raise ValueError(f"image_store must be one of {IMAGE_STORES}, got {self.image_store!r}")
        if self.image_store == "features" and not self.vision_model:
            raise ValueError("image_store 'features' needs vision_model (a local HF vision model folder)")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={self.num_shards}), got {self.shard_index}")
        if self.invalid_utf8 not in UTF8_ERRORS:
            raise ValueError(f"invalid_utf8 must be one of {UTF8_ERRORS}, got {self.invalid_utf8!r}")
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {self.split_by!r}")

    @property
    def job_prefix(self) -> str:
        """Where this job writes: the output prefix, or its part's when the run is split."""
        if self.num_shards == 1:
            return self.output_prefix
        return part_prefix(self.output_prefix, self.shard_index, self.num_shards)


def part_prefix(prefix: str, index: int, count: int) -> str:
    """The dataset prefix job ``index`` of ``count`` writes: ``PREFIX.part00001-of-00004``."""
    return f"{prefix}.part{index:05d}-of-{count:05d}"


class ShardSink:
    """Writes samples into PREFIX_00000, PREFIX_00001, ... rolling over at ``shard_size_mb``."""

    def __init__(self, cfg: PreprocessConfig, metadata: Dict[str, Any]) -> None:
        self.cfg, self.metadata = cfg, metadata
        self.limit = int(cfg.shard_size_mb * 1024 * 1024)
        self.writer = None
        self.shards: List[str] = []
        self.num_samples = 0
        self.num_images = 0
        self.image_bytes = 0  # stored bytes of the images (for bytes-per-image figures)
        self.feature_shape = None

    def _open(self) -> None:
        prefix = shard_name(self.cfg.job_prefix, len(self.shards))
        if self.cfg.image_store == "features":
            kw = dict(image_store="features", feature_shape=self.feature_shape, image_size=self.cfg.sample.image_size)
        else:
            kw = dict(image_store=self.cfg.image_store, image_size=self.cfg.sample.image_size)
        self.writer = ShardWriter(prefix, with_loss_mask=self.cfg.sample.has_loss_mask, metadata=self.metadata, **kw)

    def add(self, sample) -> None:
        if self.writer is None:
            self._open()
        self.writer.add_sample(sample.tokens, sample.images, sample.loss_mask)
        self.num_samples += 1
        self.num_images += len(sample.images)
        self.image_bytes += sum(len(im) if isinstance(im, bytes) else im.nbytes for im in sample.images)
        if self.writer.bytes_written >= self.limit:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.finalize(shard_index=len(self.shards))
            self.shards.append(self.writer.prefix)
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


Plan = List[Tuple[str, RowRange]]  # (input file, rows of it this job reads; None = all)


def job_plan(cfg: PreprocessConfig) -> Plan:
    """The inputs (and row ranges) of job ``shard_index`` of ``num_shards``: a contiguous block
    of the files, or of the global row order when splitting by rows."""
    k, i = cfg.num_shards, cfg.shard_index
    split = cfg.split_by if cfg.split_by != "auto" else ("files" if len(cfg.inputs) >= k else "rows")
    if k == 1:
        return [(p, None) for p in cfg.inputs]
    if split == "files":
        if len(cfg.inputs) < k:
            raise ValueError(f"--num-shards {k} jobs split by files need at least {k} input files, got "
                             f"{len(cfg.inputs)} (use --split-by rows)")
        n = len(cfg.inputs)
        return [(p, None) for p in cfg.inputs[i * n // k:(i + 1) * n // k]]
    counts = [count_rows(p, cfg.input_format or detect_format(p), exact=True, invalid_utf8=cfg.invalid_utf8)
              for p in cfg.inputs]
    total = sum(counts)
    lo, hi = i * total // k, (i + 1) * total // k
    plan, start = [], 0
    for path, n in zip(cfg.inputs, counts):
        a, b = max(lo, start) - start, min(hi, start + n) - start
        if a < b:
            plan.append((path, (a, b)))
        start += n
    return plan


class DuplicateIds:
    """Counts rows whose ``id`` field (LLaVA records, most jsonl) was seen before in this job.

    Duplicates are kept (the same id may carry different turns; deduplicating is the data
    owner's call) but counted in the summary. 8 bytes per row (a 64-bit hash), so a job of
    10M rows holds 80 MB; a hash collision over 80M ids has probability ~2e-4.
    """

    def __init__(self) -> None:
        self.hashes = array.array("Q")

    def add(self, rec: Any) -> None:
        if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
            digest = hashlib.blake2b(repr(rec["id"]).encode("utf-8", "surrogatepass"), digest_size=8).digest()
            self.hashes.append(int.from_bytes(digest, "little"))

    def count(self) -> int:
        hashes = np.frombuffer(self.hashes, dtype=np.uint64)
        return int(len(hashes) - len(np.unique(hashes)))


def _chunks(cfg: PreprocessConfig, plan: Plan, ids: DuplicateIds) -> Iterator[List[W.Row]]:
    chunk: List[W.Row] = []
    for path, row_range in plan:
        fmt = cfg.input_format or detect_format(path)
        s = cfg.sample
        for row, rec in iter_records(path, fmt, text_column=s.text_column, image_column=s.image_column,
                                     columns=s.columns(), batch_size=cfg.chunk_size, row_range=row_range,
                                     invalid_utf8=cfg.invalid_utf8):
            ids.add(rec)
            chunk.append((path, row, rec))
            if len(chunk) == cfg.chunk_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def ordered_map(fn: Callable, tasks: Iterable, workers: int, init: Callable, initarg: Any, window: int,
                timeout: float = 1800.0) -> Iterator:
    """``map(fn, tasks)`` in order over a spawn pool, at most ``window`` tasks in flight.

    ``timeout`` bounds the wait for one task: a worker killed by the OOM killer makes Pool
    silently drop its task, and waiting for it without a timeout would hang forever.
    """
    if workers <= 1:
        init(initarg)
        for t in tasks:
            yield fn(t)
        return
    # spawn, not fork: forked children inherit torch/gloo state and can deadlock.
    with mp.get_context("spawn").Pool(workers, initializer=init, initargs=(initarg,)) as pool:
        pending: collections.deque = collections.deque()
        done = 0

        def next_result():
            nonlocal done
            try:
                result = pending.popleft().get(timeout=timeout)
            except mp.TimeoutError:
                raise RuntimeError(f"preprocessing chunk {done} (counting from 0) did not finish in "
                                   f"{timeout:.0f}s: a worker was probably killed (out of memory?)") from None
            done += 1
            return result

        for t in tasks:
            pending.append(pool.apply_async(fn, (t,)))
            if len(pending) >= window:
                yield next_result()
        while pending:
            yield next_result()


def _remove_old_shards(prefix: str) -> None:
    """A rerun replaces the dataset: stale shards of a bigger earlier run must not be mixed in."""
    for shard in list_shards(prefix):
        if shard == prefix:
            continue
        os.remove(shard + ".json")  # first: the shard stops looking whole
        for name in os.listdir(os.path.dirname(os.path.abspath(shard))):
            path = os.path.join(os.path.dirname(os.path.abspath(shard)), name)
            if name.startswith(os.path.basename(shard) + "."):
                os.remove(path)


def run_preprocess(cfg: PreprocessConfig) -> Dict[str, Any]:
    """Run preprocessing; returns the summary (also written to ``PREFIX.summary.json``)."""
    for path in cfg.inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(f"input file {path} does not exist")
    tokenizer = build_tokenizer(cfg.tokenizer_model)  # fail fast here, not in every worker
    out = cfg.job_prefix
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # The summary marks a finished run (shards.check_preprocessing_finished): an older one
    # must not vouch for this run's shards until it, too, has finished.
    if os.path.exists(out + ".summary.json"):
        os.remove(out + ".summary.json")
    _remove_old_shards(out)
    plan = job_plan(cfg)
    # The workers return what the shard stores: encoded bytes, or pixels (also for features).
    sample = replace(cfg.sample, images_as="encoded" if cfg.image_store == "encoded" else "pixels")
    metadata = {
        "tokenizer": tokenizer.metadata(),
        "sources": [os.path.abspath(p) for p, _ in plan],
        "sample_config": asdict(sample),
        "dataset_name": os.path.basename(cfg.output_prefix),
    }
    if cfg.image_store == "encoded":
        metadata["image_encoding"] = {"format": sample.image_format, "jpeg_quality": sample.jpeg_quality,
                                      "source_kept_when": "already image_size x image_size in the target format"}
    if cfg.num_shards > 1:
        metadata["job"] = {"index": cfg.shard_index, "count": cfg.num_shards,
                           "inputs": [[os.path.abspath(p), list(r) if r else None] for p, r in plan]}
    wcfg = W.WorkerConfig(cfg.tokenizer_model, sample, cfg.vision_model,
                          torch_threads=max(1, (os.cpu_count() or 1) // max(1, cfg.workers)) if cfg.workers > 1 else 0)
    feature_shape = None
    if cfg.vision_model:
        # Load once here: fails fast on a bad folder, and gives the feature shape even when the
        # first documents are text-only.
        extractor = FeatureExtractor(cfg.vision_model, cfg.sample.image_size)
        metadata.update(extractor.metadata())
        feature_shape = tuple(extractor([np.zeros((cfg.sample.image_size,) * 2 + (3,), np.uint8)]).shape[1:])
        del extractor
    totals = [(r[1] - r[0]) if r else count_rows(p, cfg.input_format or detect_format(p)) for p, r in plan]
    total = sum(totals) if all(t is not None for t in totals) else None
    _indexed_dataset_module()  # megatron.core's slow import is kept out of the measured rate
    sink = ShardSink(cfg, metadata)
    sink.feature_shape = feature_shape
    reasons: collections.Counter = collections.Counter()
    ids = DuplicateIds()
    rows = 0
    t0 = time.time()
    rejects_path = out + ".rejects.jsonl"
    bar = tqdm(total=total, unit="row", disable=not cfg.progress, dynamic_ncols=True)
    try:
        with open(rejects_path, "w") as rejects:
            results = ordered_map(W.process_chunk, _chunks(cfg, plan, ids), cfg.workers, W.init_worker, wcfg,
                                  window=2 * max(1, cfg.workers), timeout=cfg.task_timeout_s)
            for chunk in results:
                for r in chunk:
                    rows += 1
                    if r.samples is None:
                        reasons[r.reason] += 1
                        rejects.write(json.dumps({"file": r.source, "row": r.row, "reason": r.reason, "detail": r.detail}) + "\n")
                        continue
                    for s in r.samples:
                        sink.add(s)
                bar.update(len(chunk))
                bar.set_postfix(samples=sink.num_samples, rejected=sum(reasons.values()),
                                samples_per_s=f"{sink.num_samples / max(time.time() - t0, 1e-9):.0f}")
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()
    seconds = time.time() - t0
    rejected = sum(reasons.values())
    summary = {
        "rows": rows,
        "samples": sink.num_samples,
        "rejected": rejected,
        "reject_fraction": rejected / rows if rows else 0.0,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "duplicate_ids": ids.count(),
        "shards": sink.shards,
        "seconds": round(seconds, 3),
        "samples_per_s": round(sink.num_samples / seconds, 1) if seconds > 0 else None,
        "workers": cfg.workers,
        "rejects_file": rejects_path,
        "image_store": cfg.image_store,
        "image_bytes": sink.image_bytes,
        "images": sink.num_images,
    }
    if cfg.num_shards > 1:
        summary["job"] = metadata["job"]
    summary["ok"] = summary["reject_fraction"] <= cfg.max_reject_fraction
    with open(out + ".summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def format_summary(summary: Dict[str, Any], max_reject_fraction: float) -> str:
    lines = [
        f"rows read: {summary['rows']}  samples written: {summary['samples']}  "
        f"shards: {len(summary['shards'])}  time: {summary['seconds']:.1f}s  ({summary['samples_per_s']} samples/s)",
        f"rejected: {summary['rejected']} ({100 * summary['reject_fraction']:.2f}%, limit {100 * max_reject_fraction:.2f}%)"
        + (f"  -> see {summary['rejects_file']}" if summary["rejected"] else ""),
    ]
    for reason, n in summary["rejects_by_reason"].items():
        lines.append(f"  {reason}: {n}")
    if summary.get("duplicate_ids"):
        lines.append(f"duplicate ids: {summary['duplicate_ids']} rows repeat an earlier row's 'id' (kept)")
    if not summary["ok"]:
        lines.append("FAILED: the rejected fraction exceeds --max-reject-fraction")
    return "\n".join(lines)
