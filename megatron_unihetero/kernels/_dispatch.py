"""Choosing a kernel implementation: one place for the `impl` switch rules of every op.

Every public op in this package takes ``impl``: a name or "auto", from one vocabulary:
- ``REFERENCE`` ("reference"): the plain torch composition under autograd, the definition the
  other implementations are tested against. Every op has exactly one, under this name.
- ``FUSED`` ("fused"): a torch implementation that does the same work in fewer, larger steps
  (an autograd function with a closed-form backward, a chunked loop); the CPU path of "auto".
- a GPU kernel or library: "triton", "apex", "flash", "te", "flex".
"auto" picks the best implementation usable for the given tensors (a GPU kernel when the
tensors live on CUDA and its library imports; a torch path otherwise). Setting
``MEGATRON_UNIHETERO_KERNELS=reference`` makes "auto" resolve to the reference everywhere (read
at call time), which is the first thing to try when a kernel is suspected of a numerical
problem; an explicit ``impl`` still wins over it.

Inside a region that torch.compile traces (``train.compile``), "auto" takes a torch path:
``FUSED`` where the op has it, else ``REFERENCE``. TorchInductor fuses their ops into kernels of
its own, with the neighbouring ops, where a hand-written kernel would be one more opaque call in
the graph.

Contract for an op module: its ``valid`` names include ``REFERENCE``; each module keeps a
module-level table ``_IMPLS`` from name to implementing function and looks the resolved name up
in it at call time (so a test can swap an entry and see which implementation ran).

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
REFERENCE = "reference"
FUSED = "fused"


def references_forced() -> bool:
    """True when the environment asks for the references (read at call time); an unknown
    value is an error rather than silently ignored (a typo would otherwise test the wrong
    kernels)."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower()
    if not value:
        return False
    if value == REFERENCE:
        return True
    raise ValueError(f"{ENV_VAR}={raw!r} is not understood: the accepted value is {REFERENCE!r} "
                     f"(every op's 'auto' takes its reference implementation); unset it otherwise")


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
    """Validate ``impl`` and turn "auto" into a name of ``valid``.

    ``auto_order``: the implementations usable for these tensors, best first (already filtered
    by the caller). The env override wins over "auto" (-> ``REFERENCE``) but never over an
    explicit request; under torch.compile "auto" is ``FUSED`` where the op has it, else
    ``REFERENCE`` (see the module docstring)."""
    valid = tuple(valid)
    if impl != "auto":
        if impl not in valid:
            raise ValueError(f"{op}: unknown impl {impl!r}; expected 'auto' or one of "
                             f"{', '.join(repr(name) for name in valid)}")
        return impl
    if references_forced():
        return REFERENCE
    if torch.compiler.is_compiling():
        return FUSED if FUSED in valid else REFERENCE
    return next(iter(auto_order))


def require(condition: bool, op: str, impl: str, why: str) -> None:
    """Raise a clear error when an explicitly requested implementation cannot run here."""
    if not condition:
        raise RuntimeError(f"{op}: impl={impl!r} is not usable here: {why}")
