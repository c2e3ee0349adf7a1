#!/usr/bin/env bash
# Pretrain on several machines with torchrun (static rendezvous): run the same command on every
# node, each with its own NODE_RANK.
#   NNODES=8 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     bash examples/launch/torchrun_multi_node.sh CONFIG.yaml [--section.key=value ...]
# Environment: NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's address, reachable from
# all nodes) are required; MASTER_PORT (default 29500), GPUS_PER_NODE (default 8), and the
# common ones in _common.sh: DRY_RUN=1, DIST_TIMEOUT_MINUTES, RDZV_TIMEOUT_S (how long node 0
# waits for the others), OMP_NUM_THREADS, PYTHON, MAX_RESTARTS,
# SHUTDOWN_TIMEOUT_S.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

[ $# -ge 1 ] || die 2 "usage: $0 CONFIG.yaml [--section.key=value ...]"
CONFIG=$1; shift
OVERRIDES=("$@")
: "${NNODES:?set NNODES (number of machines)}"
: "${NODE_RANK:?set NODE_RANK (index of this machine, 0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (node 0 address)}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
require_int NNODES "$NNODES"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) \
  || die 2 "NODE_RANK must be in 0..$((NNODES - 1)), got '$NODE_RANK'"

set_dist_env
check_topology
set_torchrun_fault_args
echo "[launch] this node:  NODE_RANK=${NODE_RANK}, rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

run_or_print torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  --rdzv_conf="timeout=${RDZV_TIMEOUT_S}" "${TORCHRUN_FAULT_ARGS[@]}" \
  -m megatron_unihetero.pretrain --config "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"
