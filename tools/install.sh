#!/usr/bin/env bash
# Install megatron_unihetero and what it needs, idempotently (fast when already installed).
# torch is pinned first: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
# deepspeed is built against the installed torch, so it comes after it, without isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
# Containers and CI machines install as root: pip's "running pip as root" advice is noise there.
export PIP_ROOT_USER_ACTION=ignore
PIP="python -m pip install -q --disable-pip-version-check"
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
python -c "import torch" 2>/dev/null || $PIP "torch==${TORCH_VERSION}"
$PIP -r requirements.txt "torch==$(python -c 'import torch;print(torch.__version__.split("+")[0])')" \
  --no-build-isolation
$PIP -e . --no-deps --no-build-isolation
if [ "${WITH_DEV:-0}" = "1" ]; then
  $PIP -r requirements-dev.txt
fi
