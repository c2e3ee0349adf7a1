#!/usr/bin/env bash
# GPU checks for the fused kernels, on one CUDA device (the timeouts below bound each part):
#   1. parity tests of the compiled Triton kernels (and flash_attn / TransformerEngine / apex
#      where installed) against the reference implementations: pytest -m requires_gpu tests/kernels
#   2. timings and peak memory against the references: benchmarks/kernel_speed.py --device cuda
# Most of the time is Triton compiling each kernel specialisation once.
# Exit status: non-zero if a test fails or the fused cross-entropy misses its targets
# (<= 1.1x the reference's time, <= 25% of its peak memory).
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
for name in ("triton", "flash_attn", "transformer_engine", "apex"):
    try:
        module = __import__(name)
        print(f"  {name}: {getattr(module, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001 - report, do not fail: optional backends
        print(f"  {name}: absent ({type(exc).__name__})")
PY

start=$SECONDS
timeout 200 python -m pytest -q -m requires_gpu tests/kernels -p no:cacheprovider
echo "parity tests: $((SECONDS - start)) s"

start=$SECONDS
timeout 120 python benchmarks/kernel_speed.py --device cuda --repeats 5 --check
echo "benchmarks: $((SECONDS - start)) s"
