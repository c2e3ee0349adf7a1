#!/usr/bin/env bash
# One device session's GPU checks, in order of importance, each bounded (the default two
# finish in under 8 minutes on one H100):
#   train:      benchmarks/gpu_train_check.py --checks resume,export: the paper's path at reduced
#               depth: bf16, distributed optimizer, asynchronous saves, stop + resume
#               (identical losses), export to transformers;
#   throughput: gpu_train_check.py --preset 1p3b --compile --llava: a ~1.3B LLM (24 x 2048) +
#               a DINOv2-L-shaped frozen encoder at 224 px, rows of 4096 packed tokens:
#               tokens/s, MFU counting the encoder, memory; train.compile off and on; the plain
#               transformers Llava + AdamW loop at the same size;
#   kernels:    benchmarks/gpu_check.sh: Triton kernel parity and kernel timings (not in the
#               default set: ~4 more minutes; name it).
# Usage: [TRAIN_ARGS=...] bash benchmarks/gpu_session.sh [--dry-run] [train] [throughput] [kernels]
#   (in that order; train and throughput when none is named). TRAIN_ARGS go to both
#   gpu_train_check.py steps.
# --dry-run: lists every check with its command and time limit, and runs each python step
#   with --dry-run (parses its arguments, imports, builds the configs; no GPU), bash -n on
#   gpu_check.sh: catches import and argument errors on a CPU machine before a device session.
# Logs go to $OUT (or ./gpu_logs). Wheels for packages the machine lacks (megatron-core) are
# taken from .whl/ when present (see /work/.library/device/README.md in this workplace).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
checks=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    train|throughput|kernels) checks+=("$arg") ;;
    *) echo "unknown check: $arg (--dry-run | train | throughput | kernels)"; exit 2 ;;
  esac
done
[ ${#checks[@]} -eq 0 ] && checks=(train throughput)
LOGS=${OUT:-gpu_logs}
# The interpreter that holds CUDA torch (the device image keeps it in a venv).
# (Or $PYTHON when set.)
PY=${PYTHON:-}
for candidate in /opt/torch/.venv/bin/python3 "$(command -v python3)"; do
  [ -n "$PY" ] && break
  if [ -x "$candidate" ] && "$candidate" -c "import torch" 2>/dev/null; then PY=$candidate; fi
done
PY=${PY:-python3}
if [ $DRY_RUN = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PATH="$(dirname "$PY"):$PATH"  # its `python` too (a symlink elsewhere would leave the venv)
export PYTHONUNBUFFERED=1
TRAIN_CMD=(python benchmarks/gpu_train_check.py --workdir /tmp/gpu_train_check --checks resume,export
           --attention '' ${TRAIN_ARGS:-})
THROUGHPUT_CMD=(python benchmarks/gpu_train_check.py --workdir /tmp/gpu_throughput_check --checks ''
                --preset 1p3b --compile --llava --throughput-steps 8 --llava-steps 8 ${TRAIN_ARGS:-})
if [ $DRY_RUN = 1 ]; then
  echo "gpu_session dry run: would run, in order: ${checks[*]}"
else
  mkdir -p "$LOGS"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
status=0
for check in "${checks[@]}"; do
  case $check in
    train) limit=150; cmd=("${TRAIN_CMD[@]}") ;;
    throughput) limit=300; cmd=("${THROUGHPUT_CMD[@]}") ;;
    kernels) limit=250; cmd=(bash benchmarks/gpu_check.sh) ;;
  esac
  if [ $DRY_RUN = 1 ]; then
    echo "check $check (timeout ${limit} s): ${cmd[*]}"
    if [ "${cmd[0]}" = python ]; then
      "$PY" "${cmd[@]:1}" --dry-run || status=1
    else
      bash -n benchmarks/gpu_check.sh && echo "  bash -n benchmarks/gpu_check.sh: OK" || status=1
      "$PY" benchmarks/kernel_speed.py --help > /dev/null || status=1
    fi
    continue
  fi
  timeout $limit "${cmd[@]}" 2>&1 | tee "$LOGS/${check}_check.log" || status=1
done
[ $DRY_RUN = 1 ] && echo "gpu_session dry run: $([ $status = 0 ] && echo OK || echo FAILED)"
exit $status
