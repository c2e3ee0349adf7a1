"""Pickles that a library reads for us, checked before it does: nothing in a checkpoint runs code.

Two files of a checkpoint are unpickled by code that takes no unpickler from us:
``dist/.metadata`` (torch.distributed.checkpoint's ``FileSystemReader.read_metadata`` is a plain
``pickle.load``; megatron-core creates the readers itself) and DeepSpeed's ``engine/*.pt``
(torch's full unpickler, weights_only off, in its checkpoint engine and its universal-checkpoint
converter). A planted ``__reduce__`` in either would run when a run resumes, or when a tool
exports or evaluates the checkpoint.

So each such file is scanned first, statically (``pickletools.genops``: the opcodes are read,
nothing is executed, no module the file names is imported): every global it references must be
on the allowlist of its kind, and the opcodes that reach code by other routes (the copyreg
extension registry) are refused. A file that fails is a :class:`CheckpointError` naming it and
the global. Writing our own unpickler instead would mean replacing the readers of torch and
DeepSpeed (monkeypatching both); scanning keeps their code as it is. Files are read whole, with
a size bound.

The globals are ``(module, name)`` pairs. STACK_GLOBAL takes both from the stack: the scan
simulates the stack (strings and the memo) from each opcode's declared effect, and a
STACK_GLOBAL whose operands are not plain strings is refused (conservative, never guessed).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import pickletools
import sys
import zipfile
from typing import Callable, Iterator, Tuple

import torch

from megatron_unihetero.checkpointing.errors import CheckpointError

# A checkpoint's metadata is small (the index of tensor pieces): 1 GiB is far above a 70B model's.
MAX_PICKLE_BYTES = 1 << 30

Global = Tuple[str, str]
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
               "SHORT_BINUNICODE", "BINUNICODE8"}
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4"}  # the copyreg extension registry: code by number


def _is_torch_dtype_or_size(module: str, name: str) -> bool:
    """``torch.float32`` and the other dtypes, ``torch.Size``, the typed storages
    (``torch.FloatStorage``): attributes of torch itself, looked up, never called."""
    if module != "torch":
        return False
    value = getattr(torch, name, None)
    return isinstance(value, torch.dtype) or value is torch.Size or (
        name.endswith("Storage") and isinstance(value, type))


def _in_modules(*modules: str) -> Callable[[str, str], bool]:
    """Any class defined in one of ``modules`` (all torch's: their classes are dataclasses and
    enums of checkpoint metadata). Only these modules are looked into."""
    def allowed(module: str, name: str) -> bool:
        if module not in modules:
            return False
        value = getattr(__import__(module, fromlist=[name]), name, None)
        return isinstance(value, type) and value.__module__ == module
    return allowed


# torch.distributed.checkpoint's Metadata and what it holds.
DCP_METADATA: Tuple[Callable[[str, str], bool], ...] = (
    _is_torch_dtype_or_size,
    _in_modules("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"),
    lambda module, name: (module, name) in {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("builtins", "set"), ("builtins", "frozenset"),
    },
)

def _deepspeed_data_class(module: str, name: str) -> bool:
    """A plain data class of DeepSpeed's (a dataclass without ``__post_init__``, an Enum, a
    NamedTuple: building one only assigns fields), from a module the running DeepSpeed already
    imported (none is imported for the file's sake)."""
    if not module.startswith("deepspeed.") or module not in sys.modules:
        return False
    value = getattr(sys.modules[module], name, None)
    if not isinstance(value, type) or value.__module__ != module:
        return False
    if dataclasses.is_dataclass(value):
        return getattr(value, "__post_init__", None) is None
    return issubclass(value, enum.Enum) or (issubclass(value, tuple) and "_fields" in vars(value))


# torch.save'd tensors in containers, as DeepSpeed writes its model and optimizer states (its
# loss scalers are plain classes, restored from their __dict__; its fragment addresses and
# ZeRO-stage enum are data classes).
TORCH_STATE: Tuple[Callable[[str, str], bool], ...] = (
    _is_torch_dtype_or_size,
    _deepspeed_data_class,
    lambda module, name: (module, name) in {
        ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"), ("torch", "device"),
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    },
)


_MARK = object()  # a MARK on the simulated stack


def pickle_globals(data: bytes) -> Iterator[Global]:
    """Every global a pickle references, without unpickling it; raises ValueError for what
    cannot be told statically (an extension-registry opcode, a STACK_GLOBAL whose operands are
    not plain strings).

    The stack is simulated from each opcode's declared effect (pickletools' ``stack_before`` /
    ``stack_after``), holding the string values pushed (and got back from the memo) and None
    for everything else, so STACK_GLOBAL's two operands are known exactly, pops included.
    """
    stack: list = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _REFUSED_OPS:
            raise ValueError(f"opcode {name} (the copyreg extension registry)")
        if name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            yield module, attr
        elif name == "STACK_GLOBAL":
            if len(stack) < 2 or not all(isinstance(v, str) for v in stack[-2:]):
                raise ValueError("a STACK_GLOBAL whose module and name are not plain strings")
            yield stack[-2], stack[-1]
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # the stack stays as it is
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else None
            continue
        before = op.stack_before
        if pickletools.stackslice in before:
            # pop down to the MARK, then what the opcode takes from below it
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if not stack:
                raise ValueError(f"opcode {name} without a MARK")
            stack.pop()
            below = before[:before.index(pickletools.markobject)]
        else:
            below = before
        if len(below) > len(stack):
            raise ValueError(f"opcode {name} on a stack of {len(stack)} items")
        del stack[len(stack) - len(below):]
        for kind in op.stack_after:
            if kind is pickletools.markobject:
                stack.append(_MARK)
            elif name in _STRING_OPS:
                stack.append(arg)
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            else:
                stack.append(None)


def check_pickle_bytes(data: bytes, allowed, what: str) -> None:
    """Raise :class:`CheckpointError` naming ``what`` when ``data`` references a global that
    no rule of ``allowed`` admits, or cannot be scanned."""
    try:
        for module, name in pickle_globals(data):
            if not any(rule(module, name) for rule in allowed):
                raise CheckpointError(
                    f"{what} refers to {module}.{name}, which a checkpoint file of this kind never "
                    f"holds: refusing to unpickle it (it could run code). Was it written by "
                    f"someone else? Use a checkpoint from a source you trust")
    except (ValueError, EOFError, IndexError, KeyError) as exc:  # pickletools on a bad stream
        raise CheckpointError(f"{what} is not a readable pickle ({type(exc).__name__}: {exc})") from None


def _read_bounded(path: str) -> bytes:
    if not os.path.isfile(path):  # a regular file (os.path.isfile follows links: the target)
        raise CheckpointError(f"{path} is missing or not a regular file")
    size = os.path.getsize(path)
    if size > MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path} is {size} bytes, more than a checkpoint's metadata can be "
                              f"({MAX_PICKLE_BYTES})")
    with open(path, "rb") as handle:
        return handle.read(MAX_PICKLE_BYTES + 1)


def check_pickle_file(path: str, allowed=DCP_METADATA) -> None:
    """A plain pickle file (DCP's ``.metadata``)."""
    check_pickle_bytes(_read_bounded(path), allowed, path)


def check_torch_file(path: str, allowed=TORCH_STATE) -> None:
    """A ``torch.save`` file: the pickle inside its zip archive (``*/data.pkl``), or the file
    itself in torch's legacy format."""
    if not zipfile.is_zipfile(path):
        check_pickle_file(path, allowed)
        return
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.filename.endswith(".pkl"):
                if member.file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(f"{path}:{member.filename} is {member.file_size} bytes")
                check_pickle_bytes(archive.read(member), allowed, f"{path} ({member.filename})")


def check_torch_files(folder: str, suffix: str = ".pt") -> None:
    """Every ``suffix`` file under ``folder`` (DeepSpeed's checkpoint folder)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(suffix):
                check_torch_file(os.path.join(root, name))
