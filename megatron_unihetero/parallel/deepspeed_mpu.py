"""The ``mpu`` object DeepSpeed expects, backed by megatron-core's ``parallel_state``.

DeepSpeed calls ``get_model_parallel_rank/world_size/group`` (which megatron-core's
parallel_state lacks) and ``get_data_parallel_*``. The deepspeed engine
runs at PP=1 only, so DeepSpeed's "model parallel" is megatron's tensor parallel: DeepSpeed uses
that group to sum gradient norms over TP shards and to name its checkpoint files (mp_rank_XX).

Sequence-parallel hooks are deliberately absent: DeepSpeed probes them with ``hasattr`` and
would otherwise switch on its Ulysses sequence-parallel paths.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch.distributed as dist

# What a launcher (torchrun, the deepspeed launcher) sets and DeepSpeed reads.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class MegatronMPU:
    """A stateless view of megatron-core's process groups in DeepSpeed's mpu vocabulary."""

    @staticmethod
    def _ps():
        from megatron.core import parallel_state

        return parallel_state

    # -- model parallel (= tensor parallel at PP=1) -----------------------------------------
    def get_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps().get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps().get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps().get_tensor_model_parallel_src_rank()

    # -- pipeline (always 1 stage for this engine, reported for completeness) ----------------
    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps().get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps().get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps().get_pipeline_model_parallel_group()

    # -- data parallel ----------------------------------------------------------------------
    def get_data_parallel_rank(self) -> int:
        return self._ps().get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps().get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps().get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def megatron_mpu() -> MegatronMPU:
    return MegatronMPU()


@contextlib.contextmanager
def launcher_environment() -> Iterator[None]:
    """RANK / WORLD_SIZE / LOCAL_RANK in ``os.environ`` for the block only (the DeepSpeed
    engine's lifetime, training/engine_deepspeed.py); the environment is restored after it.

    ``deepspeed.initialize`` reads ``LOCAL_RANK`` from the environment even with
    ``dist_init_required=False`` (its engine's argument checks and device choice, ZeRO-3's
    ``zero.Init``). Every launcher sets these variables; a process started without one
    (parallel.init_distributed: a world of one) has none, and they are lent here from the
    running process group. Variables already set (a launcher's) are kept as they are.
    """
    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    lent = {"RANK": str(dist.get_rank()), "WORLD_SIZE": str(dist.get_world_size())}
    if dist.get_world_size() == 1:
        lent["LOCAL_RANK"] = "0"
    for name, value in lent.items():
        os.environ.setdefault(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
