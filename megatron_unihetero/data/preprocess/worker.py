"""Worker side of preprocessing: one chunk of rows in, samples and rejects out.

Runs in spawned processes (or in the main process for ``--workers 1``). It imports neither
megatron.core nor the shard writer: workers only tokenize, decode and (optionally) run the
frozen vision encoder; the main process writes, in chunk order, so the output bytes do not
depend on the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from megatron_unihetero.data.preprocess.features import FeatureExtractor
from megatron_unihetero.data.preprocess.readers import RowError
from megatron_unihetero.data.preprocess.samples import RowReject, Sample, SampleConfig, row_to_samples
from megatron_unihetero.data.tokenizer import build_tokenizer

# (source file, row number, record or RowError)
Row = Tuple[str, int, Any]


@dataclass
class WorkerConfig:
    tokenizer_path: str
    sample: SampleConfig
    vision_model: Optional[str] = None
    torch_threads: int = 0  # 0: leave torch's default


@dataclass
class RowResult:
    source: str
    row: int
    samples: Optional[List[Sample]] = None  # None when rejected
    reason: Optional[str] = None
    detail: Optional[str] = None


_STATE: dict = {}


def init_worker(cfg: WorkerConfig) -> None:
    """Build the tokenizer (and vision model) once per process."""
    _STATE["cfg"] = cfg
    _STATE["tokenizer"] = build_tokenizer(cfg.tokenizer_path)
    _STATE["features"] = None
    if cfg.vision_model:
        _STATE["features"] = FeatureExtractor(cfg.vision_model, cfg.sample.image_size, cfg.torch_threads)


def process_chunk(rows: List[Row]) -> List[RowResult]:
    """Every row of the chunk, in order. A bad row never affects its neighbours."""
    cfg: WorkerConfig = _STATE["cfg"]
    tok = _STATE["tokenizer"]
    out: List[RowResult] = []
    for source, row, rec in rows:
        if isinstance(rec, RowError):
            out.append(RowResult(source, row, reason=rec.reason, detail=rec.detail))
            continue
        try:
            out.append(RowResult(source, row, samples=row_to_samples(rec, tok, cfg.sample)))
        except RowReject as e:
            out.append(RowResult(source, row, reason=e.reason, detail=e.detail))
        except Exception as e:  # an unforeseen failure is still one row's problem, not the run's
            out.append(RowResult(source, row, reason="error", detail=f"{type(e).__name__}: {e}"))
    if _STATE["features"] is not None:
        _attach_features(out)
    return out


def _attach_features(results: List[RowResult]) -> None:
    """Replace pixels by encoder features, one batched forward for the whole chunk.

    The chunk boundaries do not depend on the worker count, so neither do the batches (and the
    float results).
    """
    images = [img for r in results if r.samples for s in r.samples for img in s.images]
    if not images:
        return
    feats = _STATE["features"](images)
    k = 0
    for r in results:
        for s in r.samples or ():
            n = len(s.images)
            s.images = [feats[k + j] for j in range(n)]
            k += n
