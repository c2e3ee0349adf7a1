"""The training loader: blended samples -> packed rows -> per-rank micro-batches, resumable.

The pipeline, identical on every data-parallel rank (so all ranks agree on the order without
talking to each other):

1. :class:`BlendedSampleStream` yields sample references (dataset, index, expanded length).
2. The stream is cut into windows of ``pack_window`` samples; :class:`WindowPacker` turns each
   window into rows (best-fit-decreasing, then a seeded shuffle of the rows).
3. The rows of all windows, in order, form the *global row stream*. It is consumed in groups
   of ``micro_batch_size * dp_size`` rows; rank r takes rows ``[r*B, (r+1)*B)`` of each group.
   Only then does a rank read token and image data, and only for its own rows.

Position and resume: the state is ``(window index, stream state at the window's start, rows of
the window already consumed)``. Resuming re-draws that one window from the stream, re-packs it
(deterministic) and skips the consumed rows, so a resumed loader yields exactly the batches
the uninterrupted one would have. The global row stream does not depend on ``dp_size`` or
``micro_batch_size``, so a checkpoint can resume on a different data-parallel size.

All ranks hold the same state; saving rank 0's is enough.

Workers (``num_workers > 0``): the row plan above stays in the main process (it is index
arithmetic only, and it is what the position counts); each batch's reading, image decoding
(encoded shards), resizing, normalisation and collation runs in a torch DataLoader worker
process. The plan is the DataLoader's sampler: each item is (this rank's rows of one batch,
the position after it), a worker returns (batch, position), and DataLoader hands batches back
in plan order, so batches do not depend on ``num_workers`` and the position stays exact.

In a trainer::

    from megatron.core import parallel_state as ps
    train = build_loader(["0.7", "data/caps", "0.3", "data/qa"], split="train", valid_fraction=0.01,
                         seq_length=2048, micro_batch_size=4, tokens_per_image=cfg.tokens_per_image,
                         dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                         seed=args.seed)
    if resuming:
        train.load_state_dict(checkpoint["data_loader"])   # before the first next()
    batch = next(train)                                    # one micro-batch per call
    checkpoint["data_loader"] = train.state_dict()         # plain ints/lists/dicts: JSON-safe
    valid = build_loader(..., split="valid", ...)          # same prefixes and valid_fraction; one pass

Tensor- and pipeline-parallel ranks of one data-parallel rank build the same loader and get
identical batches, so nothing needs to be broadcast.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch.utils.data

from megatron_unihetero.data.blending import BlendedSampleStream, parse_data_path
from megatron_unihetero.data.collate import Collator
from megatron_unihetero.data.dataset import MultimodalDataset
from megatron_unihetero.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD, ImageNormalizer
from megatron_unihetero.data.packing import SampleRef, WindowPacker
from megatron_unihetero.data.shards import ShardError
from megatron_unihetero.models.config import ConfigError

STATE_VERSION = 1
_END = object()
# Image stores whose samples are uint8 pixels once read (encoded shards decode in sample()).
PIXEL_STORES = ("pixels", "encoded")


def auto_num_workers(num_workers: int, ranks_per_node: Optional[int] = None) -> int:
    """``num_workers``, or for -1 (auto) the workers this rank's share of the CPU affords.

    A rank keeps 2 cores (its training thread and torch's intra-op threads); the rest of its
    share of the node go to workers, at most 8. On a 2-core machine this is 0: a worker
    would only compete with the trainer for the cores.
    """
    if num_workers >= 0:
        return num_workers
    ranks = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, ranks) - 2))


class MultimodalLoader:
    """Iterator of micro-batches (see :mod:`megatron_unihetero.data.collate` for the contract).

    Args:
        datasets: one dataset or several to blend.
        weights: blending weights (default equal).
        seq_length: tokens per row.
        micro_batch_size: rows per batch on this rank.
        tokens_per_image: the model's visual tokens per image (placeholder expansion).
        dp_rank, dp_size: this rank's data-parallel coordinates.
        seed: shuffling and row order.
        num_samples: samples to draw in total (None: endless, epochs repeat). The last group
            of rows is completed with all-padding rows so that every rank yields the same
            number of batches.
        pack_window: samples per packing window (larger: better packing, more memory per window).
        image_mean, image_std: normalisation, [0, 1] units.
        image_size: output image side; None keeps the stored size (must then be one size).
        prefetch: batches prepared ahead in a background thread (0: build in ``__next__``);
            with workers, batches prepared ahead per worker (at least 1).
        num_workers: worker processes that read, decode and collate batches (0: none, see the
            module docstring; -1: :func:`auto_num_workers`). Batches are identical for any value.
        pin_memory: workers' batches are copied to pinned memory (faster host-to-GPU copies).
        multiprocessing_context: for the workers (None: torch's default, fork on Linux).
    """

    def __init__(
        self,
        datasets: Union[MultimodalDataset, Sequence[MultimodalDataset]],
        *,
        seq_length: int,
        micro_batch_size: int,
        tokens_per_image: int,
        weights: Optional[Sequence[float]] = None,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        num_samples: Optional[int] = None,
        pack_window: int = 2048,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        image_size: Optional[int] = None,
        prefetch: int = 2,
        num_workers: int = 0,
        pin_memory: bool = False,
        multiprocessing_context: Optional[str] = None,
    ) -> None:
        if isinstance(datasets, MultimodalDataset):
            datasets = [datasets]
        self.datasets = list(datasets)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size={dp_size})")
        if micro_batch_size <= 0 or tokens_per_image <= 0 or pack_window <= 0:
            raise ValueError("micro_batch_size, tokens_per_image and pack_window must be positive")
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.tokens_per_image, self.seed, self.pack_window = tokens_per_image, seed, pack_window
        self.dp_rank, self.dp_size, self.prefetch = dp_rank, dp_size, prefetch
        self.num_workers = auto_num_workers(num_workers)
        self.pin_memory, self.multiprocessing_context = pin_memory, multiprocessing_context

        self.stream = BlendedSampleStream(self.datasets, weights, seed=seed, tokens_per_image=tokens_per_image,
                                          num_samples=num_samples)
        self._check_samples_fit()
        self.packer = WindowPacker(seq_length, seed, describe=lambda r: self.datasets[r.dataset].describe(r.index))
        self.collator = self._make_collator(image_mean, image_std, image_size)
        self._fingerprint = {
            "seq_length": seq_length, "tokens_per_image": tokens_per_image, "seed": seed,
            "pack_window": pack_window, "num_samples": num_samples,
            "weights": [float(w) for w in self.stream.weights],
            # Base names only: moving the data to another folder must not block a resume.
            "datasets": [[os.path.basename(d.name), d.split, len(d)] for d in self.datasets],
        }
        # Position in the global row stream (the producer's; see _consumed for the caller's).
        self._window = -1  # no window drawn yet
        self._window_start: Dict[str, Any] = self.stream.state_dict()
        self._rows: List[List[SampleRef]] = []
        self._row_in_window = 0
        self._rows_consumed = 0
        self._ended = False
        self._consumed = self._snapshot()  # the state after the last batch handed to the caller
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._workers_iter: Optional[Iterator] = None  # the DataLoader's iterator (num_workers > 0)

    def _make_collator(self, mean, std, image_size) -> Collator:
        first = self.datasets[0]
        for d in self.datasets[1:]:
            # bos_id too: documents with BOS and documents without (None, a tokenizer without
            # one) come from different tokenizers even when the image and pad ids agree.
            for key in ("image_token_id", "pad_id", "bos_id"):
                if d.tokenizer_ids.get(key) != first.tokenizer_ids.get(key):
                    raise ValueError(f"datasets {first.name} and {d.name} disagree on {key} "
                                     f"({first.tokenizer_ids.get(key)} vs {d.tokenizer_ids.get(key)}): "
                                     f"preprocess with one tokenizer")
            if (d.image_store in PIXEL_STORES) != (first.image_store in PIXEL_STORES):
                raise ValueError(f"datasets {first.name} ({first.image_store}) and {d.name} ({d.image_store}) "
                                 "store images differently: cannot blend pixels with features")
        if first.image_store in PIXEL_STORES:
            side = image_size or first.metadata["image_size"]
            shape = (3, side, side)
        else:
            shape = tuple(first.metadata["feature_shape"])
        return Collator(seq_length=self.seq_length, tokens_per_image=self.tokens_per_image,
                        image_token_id=first.tokenizer_ids["image_token_id"], pad_id=first.tokenizer_ids["pad_id"],
                        image_store="pixels" if first.image_store in PIXEL_STORES else first.image_store,
                        image_shape=shape,
                        normalizer=ImageNormalizer(mean, std, image_size))

    def _check_samples_fit(self) -> None:
        """Every dataset the stream draws from has samples that fit a row. Over-long samples
        are rejected one by one (and counted); a dataset with none that fits would contribute
        nothing, and a stream of only such samples would draw windows forever: said now,
        before step 1, naming the setting."""
        for dataset, weight in zip(self.datasets, self.stream.weights):
            if weight == 0 or len(dataset) == 0:
                continue
            shortest = int(dataset.expanded_lengths(self.tokens_per_image).min())
            if shortest > self.seq_length:
                raise ConfigError(
                    f"data.seq_length={self.seq_length}: no sample of {dataset.name} ({dataset.split}, "
                    f"{len(dataset)} samples) fits a row; the shortest is {shortest} tokens once its "
                    f"images are expanded ({self.tokens_per_image} tokens per image). Raise "
                    f"data.seq_length (and model.llm.max_sequence_length) or use smaller images")

    # --- the global row stream -------------------------------------------------------------

    def _draw_window(self, count: bool) -> None:
        """Draw and pack the next window; skips windows whose samples were all rejected."""
        while True:
            self._window += 1
            self._window_start = self.stream.state_dict()
            self._row_in_window = 0
            refs = self.stream.take(self.pack_window)
            if not refs:
                self._rows, self._ended = [], True
                return
            self._rows = self.packer.pack(refs, self._window, count=count)
            if self._rows:
                return

    def _next_row(self) -> Optional[List[SampleRef]]:
        if self._row_in_window >= len(self._rows) and not self._ended:
            self._draw_window(count=True)
        if self._ended:
            return None
        row = self._rows[self._row_in_window]
        self._row_in_window += 1
        self._rows_consumed += 1
        self.packer.count_emitted(row)
        return row

    def _plan(self) -> Optional[List[Optional[List[SampleRef]]]]:
        """This rank's rows of the next batch (None rows: padding), or None at the end."""
        group = [self._next_row() for _ in range(self.micro_batch_size * self.dp_size)]
        if group[0] is None:
            return None
        return group[self.dp_rank * self.micro_batch_size:(self.dp_rank + 1) * self.micro_batch_size]

    def _produce(self) -> Optional[dict]:
        """The next batch of this rank, or None at the end of a finite stream."""
        plan = self._plan()
        return None if plan is None else build_batch(self.datasets, self.collator, plan)

    # --- iteration: in __next__, a prefetch thread, or worker processes --------------------

    def __iter__(self) -> "MultimodalLoader":
        return self

    def __next__(self) -> dict:
        if self.num_workers > 0:
            if self._workers_iter is None:
                self._workers_iter = iter(torch.utils.data.DataLoader(
                    _BatchBuilder(self.datasets, self.collator), sampler=_Plans(self), batch_size=None,
                    collate_fn=_identity, num_workers=self.num_workers, prefetch_factor=max(1, self.prefetch),
                    pin_memory=self.pin_memory, multiprocessing_context=self.multiprocessing_context))
            try:
                batch, self._consumed = next(self._workers_iter)  # StopIteration at the end
            except RuntimeError as exc:
                # torch: "DataLoader worker (pid(s) N) exited unexpectedly", caused by "... is
                # killed by signal: Bus error" (and torch blames shared memory, which it
                # rarely is here: the worker reads memory-mapped shards)
                cause = exc.__cause__
                if not (isinstance(cause, RuntimeError) and "Bus error" in str(cause)):
                    raise
                raise ShardError(f"a data loader worker was killed by SIGBUS: a memory-mapped shard file "
                                 f"probably shrank under it; this run reads {[d.name for d in self.datasets]} "
                                 f"(a shard must not change under a run). If no file changed, raise the "
                                 f"shared-memory limit (/dev/shm), as torch suggests") from exc
            return batch
        if self.prefetch <= 0:
            batch = self._produce()
            if batch is None:
                raise StopIteration
            self._consumed = self._snapshot()
            return batch
        if self._thread is None:
            self._start_thread()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stay exhausted on further calls
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)  # the producer has stopped: fail again on further calls
            raise item
        batch, self._consumed = item
        return batch

    def _start_thread(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._worker, name="MultimodalLoader-prefetch", daemon=True)
        self._thread.start()

    def _worker(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._produce()
                self._put(_END if batch is None else (batch, self._snapshot()))
                if batch is None:
                    return
        except BaseException as e:  # surfaced to the caller by __next__
            self._put(e)

    def _put(self, item: Any) -> None:
        # Bounded wait so that close() can always stop a producer blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __enter__(self) -> "MultimodalLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the prefetch thread or the workers. The position stays that of the last batch
        returned, and iterating again continues from there (batches made ahead are dropped)."""
        if self._stop_background():
            self._restore(self._consumed)

    def _stop_background(self) -> bool:
        """Stop the thread / workers; True if one ran (the producer may then be ahead)."""
        ran = self._thread is not None or self._workers_iter is not None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
        if self._workers_iter is not None:
            self._workers_iter._shutdown_workers()  # now, not whenever the iterator is collected
            self._workers_iter = None
        return ran

    # --- state -----------------------------------------------------------------------------

    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": self._fingerprint,
            "window": self._window,
            "window_start": dict(self._window_start),
            "row_in_window": self._row_in_window,
            "rows_consumed": self._rows_consumed,
            "ended": self._ended,
            "packing": {k: v for k, v in self.packer.stats.as_dict().items() if k != "efficiency"},
        }

    def state_dict(self) -> dict:
        """The position after the last batch returned by ``__next__`` (small, picklable)."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._consumed.items()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batch at which ``state`` was taken (any dp_size / batch size)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        diff = {k: (state["config"].get(k), v) for k, v in self._fingerprint.items() if state["config"].get(k) != v}
        if diff:
            raise ValueError(f"loader state was saved with a different data configuration (saved, now): {diff}")
        self._stop_background()
        self._restore(state)

    def _restore(self, state: dict) -> None:
        """Put the producer at ``state`` (checked by load_state_dict, or our own snapshot)."""
        self._window = state["window"]
        self._rows_consumed = state["rows_consumed"]
        self._ended = state["ended"]
        for k, v in state["packing"].items():
            setattr(self.packer.stats, k, v)
        if self._window >= 0 and not self._ended:
            # Re-draw the current window from its start; rejections were already counted.
            self.stream.load_state_dict(state["window_start"])
            self._window -= 1
            self._draw_window(count=False)
            if self._window != state["window"]:
                raise RuntimeError(f"resume drew window {self._window}, expected {state['window']}: data changed?")
            self._row_in_window = state["row_in_window"]
        else:
            self.stream.load_state_dict(state["window_start"])
            self._window_start, self._rows, self._row_in_window = dict(state["window_start"]), [], state["row_in_window"]
        self._consumed = self._snapshot()

    @property
    def stats(self) -> dict:
        """Packing efficiency and rejection counts up to the last batch returned."""
        p = self._consumed["packing"]
        eff = p["tokens"] / (p["rows"] * self.seq_length) if p["rows"] else 0.0
        return {**p, "efficiency": eff, "rows_consumed": self._consumed["rows_consumed"]}


def build_batch(datasets: Sequence[MultimodalDataset], collator: Collator,
                plan: Sequence[Optional[Sequence[SampleRef]]]) -> dict:
    """Read the samples of a batch's rows (decoding encoded images) and collate them."""
    rows = [[datasets[r.dataset].sample(r.index) for r in row] if row is not None else [] for row in plan]
    return collator(rows)


class _BatchBuilder(torch.utils.data.Dataset):
    """What a DataLoader worker runs: (rows, position) -> (batch, position)."""

    def __init__(self, datasets: Sequence[MultimodalDataset], collator: Collator) -> None:
        self.datasets, self.collator = list(datasets), collator

    def __getitem__(self, item: Tuple[Any, dict]) -> Tuple[dict, dict]:
        plan, position = item
        return build_batch(self.datasets, self.collator, plan), position


class _Plans:
    """The DataLoader's sampler: the loader's plan, batch by batch, with the position after each
    (runs in the main process, ahead of the batches handed out by up to prefetch x workers)."""

    def __init__(self, loader: MultimodalLoader) -> None:
        self.loader = loader

    def __iter__(self):
        while True:
            plan = self.loader._plan()
            if plan is None:
                return
            yield plan, self.loader._snapshot()


def _identity(x: Any) -> Any:
    return x


def build_loader(
    data_path: Union[str, Sequence[str]],
    *,
    split: str = "train",
    valid_fraction: float = 0.0,
    split_seed: int = 0,
    weights: Optional[Sequence[float]] = None,
    num_samples: Optional[int] = None,
    **loader_kwargs: Any,
) -> MultimodalLoader:
    """A loader from dataset prefixes: ``"prefix"``, ``[p1, p2]`` or Megatron-style ``[w1, p1, w2, p2]``.

    For ``split="valid"`` without ``num_samples``, the loader makes one pass over the
    validation samples (each dataset's share by its weight) and stops.
    """
    spec = [data_path] if isinstance(data_path, str) else list(data_path)
    if weights is None and len(spec) > 1 and len(spec) % 2 == 0 and _is_number(spec[0]):
        prefixes, weights = parse_data_path(spec)
    else:
        prefixes = spec
    datasets = [MultimodalDataset(p, split=split, valid_fraction=valid_fraction, split_seed=split_seed) for p in prefixes]
    if split == "valid" and num_samples is None:
        num_samples = sum(len(d) for d in datasets)
    return MultimodalLoader(datasets, weights=weights, num_samples=num_samples, **loader_kwargs)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
