#!/usr/bin/env bash
# One device session's GPU checks, in order of importance, each bounded (total < 9 minutes):
#   train:   benchmarks/gpu_train_check.py: bf16 + distributed optimizer on CUDA, resume, throughput;
#   kernels: benchmarks/gpu_check.sh: Triton kernel parity and kernel timings.
# Usage: [TRAIN_ARGS=...] bash benchmarks/gpu_session.sh [train] [kernels]   (in that order;
# both when none is named). TRAIN_ARGS go to gpu_train_check.py.
# Logs go to $OUT (or ./gpu_logs). Wheels for packages the machine lacks (megatron-core) are
# taken from .whl/ when present (see /work/.library/device/README.md in this workplace).
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=${OUT:-gpu_logs}
mkdir -p "$LOGS"
# The interpreter that holds CUDA torch (the device image keeps it in a venv).
PY=python3
for candidate in /opt/torch/.venv/bin/python3 "$(command -v python3)"; do
  if [ -x "$candidate" ] && "$candidate" -c "import torch" 2>/dev/null; then PY=$candidate; break; fi
done
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PATH="$(dirname "$PY"):$PATH"  # its `python` too (a symlink elsewhere would leave the venv)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
status=0
for check in ${*:-train kernels}; do
  case $check in
    train) timeout 270 python benchmarks/gpu_train_check.py --workdir /tmp/gpu_train_check ${TRAIN_ARGS:-} \
             2>&1 | tee "$LOGS/train_check.log" || status=1 ;;
    kernels) timeout 250 bash benchmarks/gpu_check.sh 2>&1 | tee "$LOGS/kernel_check.log" || status=1 ;;
    *) echo "unknown check: $check (train | kernels)"; status=2 ;;
  esac
done
exit $status
