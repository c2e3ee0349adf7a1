"""Helpers for the kernel parity tests (tests/kernels/test_kernel_*.py).

Triton decides between compiling and interpreting when a kernel is *decorated* (import time), from
TRITON_INTERPRET. Setting that variable inside a pytest process would leak into every later
import (and, on a GPU machine, turn the compiled GPU tests into interpreted ones), so interpreted
runs happen in a child process: the test file is executed as a script with TRITON_INTERPRET=1 and
runs its own ``__main__`` block.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (rtol, atol) for comparing an implementation with the fp32 reference on the same inputs.
# bf16 keeps 8 mantissa bits: one rounding of a value of size ~1 is ~4e-3; kernels that round
# intermediates (logits, the logits gradient) accumulate a few of those.
TOLERANCES = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, msg: str = ""):
    """Compare in fp32 with ``dtype``'s tolerance; ``scale`` widens atol for large-magnitude
    quantities (sums over many tokens)."""
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.detach().float().cpu(), expected.detach().float().cpu(),
                               rtol=rtol, atol=atol * scale, msg=lambda m: f"{msg}: {m}")


def run_under_triton_interpreter(script: str, *args: str, timeout_s: int = 240) -> str:
    """Run ``python script *args`` with TRITON_INTERPRET=1 on CPU; raise with its output on failure."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    env.pop("MEGATRON_UNIHETERO_KERNELS", None)
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise AssertionError(f"interpreted Triton run of {script} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
