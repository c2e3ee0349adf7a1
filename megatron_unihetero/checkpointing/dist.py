"""Model and optimizer state on disk: megatron-core's ``dist_checkpointing`` (torch_dist).

    ITER_DIR/dist/.metadata         torch.distributed.checkpoint's index of every tensor piece
    ITER_DIR/dist/__R_I.distcp      the pieces global rank R wrote (every rank writes its own)
    ITER_DIR/dist/common.pt         what is not a tensor (rank 0)
    ITER_DIR/dist/metadata.json     megatron's format marker

The state is described by *sharded state dicts*: each tensor is named by its global key with
this rank's slice of the global tensor (megatron's layers give TP-split weights and a layer
axis across pipeline stages; the vision encoder, projector and heads are replicated tensors,
:meth:`UniHeteroModel.sharded_state_dict`). A checkpoint therefore has no TP/PP/DP layout:
any layout loads it, each rank reading only its slices. Replicated tensors are written once,
spread over the data-parallel ranks (megatron's fully parallel save), so nothing is gathered
to one rank.

What goes in: ``model`` (one chunk) or ``model0``, ``model1``, ... (virtual pipeline chunks;
the keys inside are global, so a checkpoint saved with virtual stages loads without them),
and for the megatron engine ``optimizer`` (megatron-core's optimizer sharded state, saved in
its fully reshardable model-space form). Loading is ``torch.load(weights_only=True)`` for the
common part and tensor reads for the rest; the one plain pickle, torch's ``.metadata`` index,
is scanned before torch reads it (checkpointing/pickles.py): nothing in a checkpoint runs code.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.msc_utils import MultiStorageClientFeature
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

from megatron_unihetero import parallel
from megatron_unihetero.checkpointing import pickles
from megatron_unihetero.checkpointing.errors import CheckpointError

DIST_DIR = "dist"
FORMAT = "megatron_unihetero.torch_dist.v1"


def dist_dir(iter_dir: str) -> str:
    return os.path.join(iter_dir, DIST_DIR)


def model_key(index: int, num_chunks: int) -> str:
    """The top-level name of chunk ``index`` (megatron's convention: ``model`` for one)."""
    return "model" if num_chunks == 1 else f"model{index}"


def model_sharded_state_dict(chunks: List) -> Dict[str, dict]:
    """``{model key: the chunk's sharded state dict}`` for this rank's chunks."""
    return {model_key(i, len(chunks)): chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save(sharded_state_dict: dict, folder: str, content: Optional[dict] = None) -> AsyncRequest:
    """Plan the save of ``sharded_state_dict`` into ``folder``; collective (every rank).

    Returns megatron-core's request: its ``async_fn`` writes this rank's pieces (run it in a
    forked process for an asynchronous save, or in place), its finalize functions write the
    global metadata and raise on every rank when any rank's write failed. Tensors on the CPU
    are written as they are when the write runs (a forked writer sees them as they were at the
    fork); GPU tensors are copied to the host when the request is scheduled.
    """
    _posix_files()
    if torch.distributed.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
    torch.distributed.barrier()
    strategy = FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy("torch_dist"),
        parallel_state.get_data_parallel_group(with_context_parallel=True))
    return dist_checkpointing.save(sharded_state_dict, folder, sharded_strategy=strategy,
                                   async_sharded_save=True,
                                   content_metadata=dict(content or {}, format=FORMAT))


def content(folder: str) -> dict:
    """What :func:`save` recorded about the checkpoint (engine, optimizer kind, ...)."""
    _require(folder)
    return dist_checkpointing.load_content_metadata(folder) or {}


def load_common(folder: str) -> dict:
    """The checkpoint's non-sharded state (``common.pt``: param groups, steps, ...), read on
    this rank alone without building a sharded state dict (scanned first, see :func:`_require`)."""
    _require(folder)
    return dist_checkpointing.load_common_state_dict(folder)


def load(sharded_state_dict: dict, folder: str) -> dict:
    """Read this rank's slices of ``sharded_state_dict`` from ``folder`` (any saved layout).

    Keys the checkpoint has and the request lacks are fine (a weights-only load of a checkpoint
    with optimizer state); a requested key the checkpoint lacks is an error naming it.
    """
    _require(folder)
    strategy = FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(folder),
        parallel_state.get_data_parallel_group(with_context_parallel=True))
    try:
        state, missing, unexpected = dist_checkpointing.load(
            sharded_state_dict, folder, sharded_strategy=strategy, strict=StrictHandling.RETURN_ALL)
    except (OSError, RuntimeError, ValueError, KeyError, CheckpointingException) as exc:
        # e.g. a tensor of another shape (a model built with another vocab_size or width)
        raise CheckpointError(f"checkpoint {folder} does not load into this model: "
                              f"{type(exc).__name__}: {exc}") from exc
    except TorchCheckpointException as exc:
        # What torch's loader raises when a rank's read failed (a BaseException, not an
        # Exception); each rank's cause (megatron's "Global shape mismatch ... for key K",
        # naming the key and both shapes) is in its failures, the rest is a traceback dump.
        causes = sorted({f"{type(cause).__name__}: {cause}" for cause, _ in exc.failures.values()})
        raise CheckpointError(f"checkpoint {folder} does not load into this model: "
                              f"{'; '.join(causes)}") from None
    # megatron's words: "unexpected" = requested but not in the checkpoint.
    if unexpected:
        raise CheckpointError(f"checkpoint {folder} lacks {len(unexpected)} tensors this model "
                              f"needs, e.g. {sorted(unexpected)[:5]}: it was saved from another "
                              f"model configuration")
    return state


def load_model(chunks: List, folder: str) -> None:
    """Load the model weights of checkpoint ``folder`` into this rank's chunks (strict)."""
    state = load(model_sharded_state_dict(chunks), folder)
    for i, chunk in enumerate(chunks):
        load_model_state(chunk, state[model_key(i, len(chunks))], folder)


def load_model_state(chunk, state: dict, folder: str) -> None:
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


def load_full_model_state(iter_dir: str, model_config) -> Dict[str, torch.Tensor]:
    """The model of checkpoint ``iter_dir`` as one TP=1 / PP=1 state dict (the names of
    ``UniHeteroModel.state_dict()``), on this single CPU process, whatever layout saved it.

    The model is built from ``model_config`` and loaded through its own sharded state dict,
    so the tensors are read by the same mapping training uses (layer axis, TP splits, SwiGLU
    halves). Starts and ends a one-process world when none is running (export, tests).
    """
    with parallel.single_process():
        model = parallel.build_model(model_config)
        load_model([model], dist_dir(iter_dir))
        return {k: v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def read_all_tensors(folder: str) -> Dict[str, torch.Tensor]:
    """Every tensor of torch_dist checkpoint ``folder`` by its global key (model and optimizer
    state alike), whole, on this one process: for inspection and tests."""
    _require(folder)
    with parallel.single_process():
        return dict(_flatten(dist_checkpointing.load_plain_tensors(folder)))


def _flatten(tree, prefix: str = ""):
    """(dotted key, tensor) of a nested state dict (megatron nests keys at their dots)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        elif torch.is_tensor(value):
            yield name, value


def save_weights(chunks: List, iter_dir: str) -> None:
    """Write this rank's model chunks, weights only, into ``iter_dir/dist``, in place;
    collective (the HF importer, tools, tests: the trainer saves through its engine)."""
    save(model_sharded_state_dict(chunks), dist_dir(iter_dir), content={"engine": None}).execute_sync()


def _posix_files() -> None:
    """megatron-core reads and writes checkpoint files through multistorageclient whenever that
    package is importable (megatron-energon installs it): object-store paths, and files written
    as hidden ``.NAME.tmp`` until closed. A checkpoint here is a POSIX folder that the manager
    lists, hashes and verifies with plain file calls, so megatron-core's plain ``open`` is used
    whatever is installed (Megatron-LM's ``--disable-msc``)."""
    MultiStorageClientFeature.disable()


def _require(folder: str) -> None:
    """``folder`` is a torch_dist checkpoint whose pickles torch may load: ``.metadata`` is
    present and holds nothing but DCP's metadata classes (checkpointing/pickles.py), checked
    before megatron-core's reader runs ``pickle.load`` on it; ``common.pt`` (megatron-core's
    non-sharded state, which it reads with torch's default load: weights-only since torch 2.6,
    raising a bare UnpicklingError on anything else) holds only what a torch.save of tensors and
    containers holds."""
    _posix_files()
    metadata = os.path.join(folder, ".metadata")
    if not os.path.isfile(metadata):
        raise CheckpointError(f"{metadata} is missing: {folder} is not a torch_dist checkpoint (a "
                              f"save that did not finish, or another format)")
    pickles.check_pickle_file(metadata, pickles.DCP_METADATA)
    common = os.path.join(folder, "common.pt")
    if os.path.lexists(common):
        pickles.check_torch_file(common)
