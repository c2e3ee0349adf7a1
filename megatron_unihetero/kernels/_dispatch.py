"""Choosing a kernel implementation: one place for the `impl` switch rules of every op.

Every public op in this package takes ``impl``: a name ("torch", "triton", "flash", ...) or
"auto". "auto" picks the best implementation usable for the given tensors (a GPU kernel when the
tensors live on CUDA and its library imports; the torch reference otherwise). Setting
``MEGATRON_UNIHETERO_KERNELS=torch`` makes "auto" resolve to the torch reference everywhere, which
is the first thing to try when a fused kernel is suspected of a numerical problem.

Inside a region that torch.compile traces (``train.compile``), "auto" takes the torch path:
TorchInductor fuses its ops into kernels of its own, with the neighbouring ops, where a
hand-written kernel would be one more opaque call in the graph.

Optional libraries (triton, flash_attn, transformer_engine, apex) are imported lazily and only
here, so importing megatron_unihetero.kernels never fails on a machine without them.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Iterable, Optional

import torch

ENV_VAR = "MEGATRON_UNIHETERO_KERNELS"


def references_forced() -> bool:
    """True when the environment asks for the torch references (read at call time)."""
    return os.environ.get(ENV_VAR, "").strip().lower() == "torch"


@functools.lru_cache(maxsize=None)
def optional_import(name: str) -> Optional[ModuleType]:
    """Import ``name`` or return None. A broken install (ImportError *or* an OSError from a
    missing shared library, common with TE / flash_attn wheels built for another CUDA) counts
    as absent rather than crashing the caller."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure to import means "not available"
        return None


def triton_interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): slow, for parity tests on small shapes."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    """Triton can run on this device: compiled on CUDA, or interpreted on CPU when asked."""
    if optional_import("triton") is None:
        return False
    return device.type == "cuda" or triton_interpreting()


def resolve_impl(op: str, impl: str, valid: Iterable[str], auto_order: Iterable[str]) -> str:
    """Validate ``impl`` and turn "auto" into the first name of ``auto_order`` (already filtered
    by the caller to the implementations usable for these tensors; it must end with the
    reference). The env override wins over "auto" but never over an explicit request; under
    torch.compile "auto" is "torch" where the op has it (see the module docstring)."""
    valid = tuple(valid)
    if impl != "auto":
        if impl not in valid:
            raise ValueError(f"{op}: unknown impl {impl!r}; expected 'auto' or one of {valid}")
        return impl
    order = list(auto_order)
    if references_forced():
        return order[-1]
    if "torch" in order and torch.compiler.is_compiling():
        return "torch"
    return order[0]


def require(condition: bool, op: str, impl: str, why: str) -> None:
    """Raise a clear error when an explicitly requested implementation cannot run here."""
    if not condition:
        raise RuntimeError(f"{op}: impl={impl!r} is not usable here: {why}")
