# Shared by the launch scripts in this folder (sourced, not run). Needs: CONFIG, NNODES,
# GPUS_PER_NODE and the OVERRIDES array set by the caller.
#
# Environment every launcher honours:
#   DRY_RUN=1                 print the launch command instead of running it
#   DIST_TIMEOUT_MINUTES=N    collective (NCCL) timeout -> --parallel.timeout_minutes=N
#                             (unset: the config's parallel.timeout_minutes, default 30)
#   RDZV_TIMEOUT_S=N          how long torchrun waits for all nodes to join (default 900)
#   OMP_NUM_THREADS=N         CPU threads per rank (default: cores / GPUs per node, at least 1)
#   PYTHON=python             the interpreter used for the topology check
# and the torchrun ones:
#   MAX_RESTARTS=N            torchrun --max-restarts (default 3): a rank that dies restarts
#                             the job's ranks, which resume from the newest verified checkpoint
#                             (each restart is logged and recorded in metrics.jsonl)
#   SHUTDOWN_TIMEOUT_S=N      after torchrun forwarded a stop signal (train.exit_signal, SIGTERM)
#                             to its ranks, how long they have to finish the step, save and exit
#                             before it kills them (default 600; torchrun's own default is 30)

UNIHETERO_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="${UNIHETERO_REPO}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON=${PYTHON:-python}

die() {  # die CODE MESSAGE
  echo "error: $2" >&2
  exit "$1"
}

require_int() {  # require_int NAME VALUE
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die 2 "$1 must be a positive integer, got '$2'"
}

# Read the parallel section (config + overrides) with the project's own loader, print the
# topology, and fail with exit 2 when the world size is not a multiple of TP x PP.
check_topology() {
  require_int NNODES "$NNODES"
  require_int GPUS_PER_NODE "$GPUS_PER_NODE"
  [ -f "$CONFIG" ] || die 2 "config file '$CONFIG' does not exist"
  WORLD_SIZE_TOTAL=$((NNODES * GPUS_PER_NODE))
  local out
  if ! out=$("$PYTHON" -c '
import sys
from megatron_unihetero.config_io import load_config
from megatron_unihetero.training.config import RunConfig
world, path, overrides = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
try:
    cfg = load_config(RunConfig, path, overrides)
except Exception as exc:
    print(f"config error: {exc}", file=sys.stderr)
    sys.exit(3)
from megatron_unihetero.training.config import exit_signal_name
par, tr, data = cfg.parallel, cfg.train, cfg.data
tp, pp = par.tensor_parallel, par.pipeline_parallel
print(tp, pp, par.engine, f"{par.timeout_minutes:g}", data.micro_batch_size, tr.grad_accumulation,
      data.seq_length)
# What the stop signal needs: the signal, whether this torchrun forwards such signals to its
# ranks and waits for them (torch >= 2.8 / 2.9), and the checkpoint folder (requeue.json).
import torch.distributed.run as torchrun
flags = torchrun.get_args_parser()._option_string_actions
print(exit_signal_name(tr.exit_signal), int("--signals-to-handle" in flags),
      int("--shutdown-timeout" in flags))
print(cfg.checkpoint.dir)
' "$WORLD_SIZE_TOTAL" "$CONFIG" "${OVERRIDES[@]+"${OVERRIDES[@]}"}"); then
    die 2 "could not read '$CONFIG' (see the config error above)"
  fi
  {
    read -r TP PP ENGINE TIMEOUT_MIN MBS GA SEQ
    read -r EXIT_SIGNAL HAS_SIGNALS_TO_HANDLE HAS_SHUTDOWN_TIMEOUT
    IFS= read -r CKPT_DIR
  } <<<"$out"
  local mp=$((TP * PP))
  echo "[launch] config:     $CONFIG"
  echo "[launch] topology:   ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s)/node = world size ${WORLD_SIZE_TOTAL}"
  if (( WORLD_SIZE_TOTAL % mp != 0 )); then
    die 2 "world size ${WORLD_SIZE_TOTAL} (${NNODES} nodes x ${GPUS_PER_NODE} GPUs) is not divisible by TP x PP = ${TP} x ${PP} = ${mp}; change GPUS_PER_NODE/NNODES or parallel.tensor_parallel/parallel.pipeline_parallel"
  fi
  DP=$((WORLD_SIZE_TOTAL / mp))
  echo "[launch] parallel:   TP=${TP} x PP=${PP} x DP=${DP} (engine ${ENGINE})"
  echo "[launch] batch:      micro ${MBS} x grad-accum ${GA} x DP ${DP} = $((MBS * GA * DP)) sequences of ${SEQ} tokens per step"
  echo "[launch] timeouts:   NCCL ${TIMEOUT_MIN} min (parallel.timeout_minutes), rendezvous ${RDZV_TIMEOUT_S} s"
}

# Environment for the training processes.
set_dist_env() {
  RDZV_TIMEOUT_S=${RDZV_TIMEOUT_S:-900}
  require_int RDZV_TIMEOUT_S "$RDZV_TIMEOUT_S"
  # A rank that hits an NCCL error or timeout aborts (and torchrun tears the job down)
  # instead of hanging forever.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # megatron-core's TP communication overlap needs kernels queued in issue order.
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    local cores
    cores=$(nproc 2>/dev/null || echo 8)
    OMP_NUM_THREADS=$((cores / GPUS_PER_NODE))
    (( OMP_NUM_THREADS >= 1 )) || OMP_NUM_THREADS=1
  fi
  export OMP_NUM_THREADS
  if [ -n "${DIST_TIMEOUT_MINUTES:-}" ]; then
    require_int DIST_TIMEOUT_MINUTES "$DIST_TIMEOUT_MINUTES"
    # Before the user's overrides, so an explicit --parallel.timeout_minutes still wins.
    OVERRIDES=("--parallel.timeout_minutes=${DIST_TIMEOUT_MINUTES}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
  fi
  echo "[launch] env:        TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING} CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=${OMP_NUM_THREADS}"
}

# TORCHRUN_FAULT_ARGS: torchrun's restart and signal flags (after check_topology).
# torchrun dies on a signal it does not handle (its ranks run in sessions of their own, so they
# would never see it): it is told to handle train.exit_signal (and SIGUSR1, what slurm.sbatch
# asks Slurm for) on top of its defaults, and forwards them to its ranks, which save and exit.
set_torchrun_fault_args() {
  MAX_RESTARTS=${MAX_RESTARTS:-3}
  SHUTDOWN_TIMEOUT_S=${SHUTDOWN_TIMEOUT_S:-600}
  [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die 2 "MAX_RESTARTS must be an integer >= 0, got '$MAX_RESTARTS'"
  require_int SHUTDOWN_TIMEOUT_S "$SHUTDOWN_TIMEOUT_S"
  local signals="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
  if [ "$EXIT_SIGNAL" != NONE ] && [[ ",$signals," != *",$EXIT_SIGNAL,"* ]]; then
    signals="$signals,$EXIT_SIGNAL"
  fi
  TORCHRUN_FAULT_ARGS=("--max-restarts=${MAX_RESTARTS}")
  if [ "$HAS_SIGNALS_TO_HANDLE" = 1 ]; then
    TORCHRUN_FAULT_ARGS+=("--signals-to-handle=${signals}")
  else
    echo "[launch] warning:    this torchrun cannot forward ${EXIT_SIGNAL} to its ranks (torch < 2.8): only SIGTERM stops the run cleanly" >&2
  fi
  if [ "$HAS_SHUTDOWN_TIMEOUT" = 1 ]; then
    TORCHRUN_FAULT_ARGS+=("--shutdown-timeout=${SHUTDOWN_TIMEOUT_S}")
  fi
  echo "[launch] faults:     torchrun --max-restarts=${MAX_RESTARTS}; stop signal ${EXIT_SIGNAL} (train.exit_signal) and SIGTERM: finish the step, save, exit (${SHUTDOWN_TIMEOUT_S} s before torchrun kills the ranks)"
}

# run_or_print CMD...: run it, or with DRY_RUN=1 print it (shell-quoted) and return.
run_or_print() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    echo "[launch] DRY_RUN=1, would run:"
    printf '%q ' "$@"
    echo
    return 0
  fi
  echo "[launch] running:    $*"
  exec "$@"
}
