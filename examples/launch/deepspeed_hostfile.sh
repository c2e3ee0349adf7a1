#!/usr/bin/env bash
# Pretrain with the DeepSpeed launcher over the machines of a hostfile (engine=deepspeed,
# ZeRO stage from parallel.zero_stage). Run it once, on the first host; it reaches the others
# over passwordless ssh (pdsh); DeepSpeed checks ssh even for a one-host hostfile, so on a
# single machine use torchrun_single_node.sh with --parallel.engine=deepspeed instead.
#   HOSTFILE=hostfile bash examples/launch/deepspeed_hostfile.sh CONFIG.yaml [--section.key=value ...]
# The hostfile has one line per machine: "node0 slots=8".
# Environment: HOSTFILE (default ./hostfile), NNODES (default: the hostfile's hosts),
# GPUS_PER_NODE (default: the first host's slots=), MASTER_ADDR (default: the first host),
# MASTER_PORT (default 29500), and the common ones in _common.sh: DRY_RUN=1,
# DIST_TIMEOUT_MINUTES, OMP_NUM_THREADS, PYTHON.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

[ $# -ge 1 ] || die 2 "usage: $0 CONFIG.yaml [--section.key=value ...]"
CONFIG=$1; shift
OVERRIDES=("--parallel.engine=deepspeed" "$@")
HOSTFILE=${HOSTFILE:-hostfile}
[ -f "$HOSTFILE" ] || die 2 "hostfile '$HOSTFILE' does not exist (lines like: node0 slots=8)"
HOSTS=$(grep -Ev '^[[:space:]]*(#|$)' "$HOSTFILE" | awk '{print $1}')
[ -n "$HOSTS" ] || die 2 "hostfile '$HOSTFILE' lists no hosts"
NNODES=${NNODES:-$(wc -l <<<"$HOSTS" | tr -d ' ')}
FIRST_SLOTS=$(grep -Ev '^[[:space:]]*(#|$)' "$HOSTFILE" | head -n1 | sed -n 's/.*slots=\([0-9]*\).*/\1/p')
GPUS_PER_NODE=${GPUS_PER_NODE:-${FIRST_SLOTS:-8}}
MASTER_ADDR=${MASTER_ADDR:-$(head -n1 <<<"$HOSTS")}
MASTER_PORT=${MASTER_PORT:-29500}

set_dist_env
check_topology
(( PP == 1 )) || die 2 "engine=deepspeed supports parallel.pipeline_parallel=1 only (got ${PP})"

# pdsh starts the remote ranks with a clean environment except the variables named in the
# DeepSpeed env file: write ours to a private one and point DS_ENV_FILE at it.
if [ "${DRY_RUN:-0}" != "1" ]; then
  DS_ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/unihetero_ds_env.XXXXXX")
  {
    echo "TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING}"
    echo "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS}"
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS}"
    echo "PYTHONPATH=${PYTHONPATH}"
  } >"$DS_ENV_FILE"
  export DS_ENV_FILE
fi

# --no_local_rank: pretrain.py reads LOCAL_RANK from the environment and treats every
# --x=y argument as a config override, so the launcher must not append --local_rank=N.
run_or_print deepspeed \
  --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --no_local_rank --module megatron_unihetero.pretrain \
  --config "$CONFIG" "${OVERRIDES[@]}"
