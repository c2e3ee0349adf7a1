"""The ``mpu`` object DeepSpeed expects, backed by megatron-core's ``parallel_state``.

DeepSpeed calls ``get_model_parallel_rank/world_size/group`` (which megatron-core's
parallel_state lacks) and ``get_data_parallel_*``. The deepspeed engine
runs at PP=1 only, so DeepSpeed's "model parallel" is megatron's tensor parallel: DeepSpeed uses
that group to sum gradient norms over TP shards and to name its checkpoint files (mp_rank_XX).

Sequence-parallel hooks are deliberately absent: DeepSpeed probes them with ``hasattr`` and
would otherwise switch on its Ulysses sequence-parallel paths.
"""

from __future__ import annotations

import torch.distributed as dist


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
