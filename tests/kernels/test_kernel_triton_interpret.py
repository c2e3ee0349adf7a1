"""All Triton kernels under the CPU interpreter (TRITON_INTERPRET=1), in ONE child process.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the variable cannot be set inside
this pytest process without leaking into other tests (see megatron_unihetero.kernels.testing).
The child runs this file as a script; its __main__ executes ``interpreted_cases()`` of every
sibling test_kernel_*.py (small shapes: the interpreter is slow). One child instead of one per
file saves a torch + triton import per op.
"""

import glob
import importlib.util
import os
import runpy

import pytest

from megatron_unihetero.kernels.testing import run_under_triton_interpreter

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_interpreted_match_references():
    out = run_under_triton_interpreter(__file__)
    ran = [line for line in out.splitlines() if line.startswith("interpreted ")]
    assert len(ran) >= 4, out  # cross-entropy, regression, rmsnorm, rope at least


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for path in sorted(glob.glob(os.path.join(HERE, "test_kernel_*.py"))):
        if os.path.abspath(path) == os.path.abspath(__file__):
            continue
        namespace = runpy.run_path(path, run_name="kernel_cases")
        if "interpreted_cases" in namespace:
            namespace["interpreted_cases"]()
            print(f"interpreted {os.path.basename(path)}: ok", flush=True)
