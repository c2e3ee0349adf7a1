"""The CPU layer's global changes (Tensor.cuda, Module.cuda, Tensor.type, the import hook) are
made on a CPU platform only, and said once in the log, not on the console (fresh interpreters:
the layer cannot be taken back once installed)."""

import os
import subprocess
import sys

CHECK = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(name)s: %(message)s")
if sys.argv[1] == "cuda":
    torch.cuda.is_available = lambda: True  # what prepare_megatron sees on a GPU machine
from megatron_unihetero import platform
from megatron_unihetero.platform import megatron_cpu
before = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.Tensor.type, list(sys.meta_path))
platform.prepare_megatron()
platform.prepare_megatron()
after = (torch.Tensor.cuda, torch.nn.Module.cuda, torch.Tensor.type, list(sys.meta_path))
print("patched", [a is not b for a, b in zip(before[:3], after[:3])], after[3] != before[3])
"""


def _check(kind):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-c", CHECK, kind], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_with_cuda_nothing_of_torch_or_megatron_core_is_patched():
    proc = _check("cuda")
    assert "patched [False, False, False] False" in proc.stdout, proc.stdout
    assert "CPU layer" not in proc.stdout + proc.stderr


def test_on_cpu_it_is_installed_once_and_said_once_in_the_log():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("the CPU layer is off with CUDA")
    proc = _check("cpu")
    assert "patched [True, True, True] True" in proc.stdout, proc.stdout
    said = [line for line in proc.stdout.splitlines() if "runs on the CPU layer" in line]
    assert len(said) == 1 and said[0].startswith("LOG INFO megatron_unihetero.platform.megatron_cpu:")
    # No warning about it on the console (stderr: the libraries' own import warnings only).
    assert "CPU layer" not in proc.stderr
