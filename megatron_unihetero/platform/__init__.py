"""Where we run: CUDA or CPU, which backend, which optional accelerators are importable."""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Optional

import torch

from megatron_unihetero.platform import megatron_cpu


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on (its local GPU, or the CPU)."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cpp_compiler() -> Optional[str]:
    """The C++ compiler TorchInductor would build CPU kernels with ($CXX, else g++ / clang++),
    if there is one on PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return next((path for path in map(shutil.which, candidates) if path), None)


def can_compile() -> bool:
    """Whether torch.compile can generate kernels here (Triton on CUDA, C++ on CPU)."""
    return has_cuda() or cpp_compiler() is not None


def has_transformer_engine() -> bool:
    return has_cuda() and has_module("transformer_engine")


def prepare_megatron() -> None:
    """Call before building megatron-core objects. Without CUDA: the CPU layer, and with it
    the fast paths for megatron-core's local fallbacks. With CUDA nothing of megatron-core is
    patched."""
    if megatron_cpu.install():
        # Lazy: megatron_fastpaths imports this package (a cycle) and megatron.core, which
        # only runs that build megatron-core objects need (and then after the CPU layer).
        from megatron_unihetero.platform import megatron_fastpaths

        megatron_fastpaths.install()
