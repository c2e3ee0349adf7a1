#!/usr/bin/env bash
# Pretrain on one machine with torchrun.
#   GPUS_PER_NODE=8 bash examples/launch/torchrun_single_node.sh CONFIG.yaml [--section.key=value ...]
# Environment: GPUS_PER_NODE (default 8; the processes to start), MASTER_PORT (default 29500),
# and the common ones in _common.sh: DRY_RUN=1, DIST_TIMEOUT_MINUTES, RDZV_TIMEOUT_S,
# OMP_NUM_THREADS, PYTHON, MAX_RESTARTS,
# SHUTDOWN_TIMEOUT_S.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

[ $# -ge 1 ] || die 2 "usage: $0 CONFIG.yaml [--section.key=value ...]"
CONFIG=$1; shift
OVERRIDES=("$@")
NNODES=1
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}

set_dist_env
check_topology
set_torchrun_fault_args

run_or_print torchrun \
  --nnodes=1 --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr=127.0.0.1 --master_port="$MASTER_PORT" \
  --rdzv_conf="timeout=${RDZV_TIMEOUT_S}" "${TORCHRUN_FAULT_ARGS[@]}" \
  -m megatron_unihetero.pretrain --config "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
