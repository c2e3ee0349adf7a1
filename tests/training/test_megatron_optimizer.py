"""megatron-core's distributed optimizer (ZeRO-1) in the megatron engine, on CPU with gloo."""

import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.training import _optimizer_jobs as jobs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_optimizer_shards_state_and_matches_the_replicated_one(dtype):
    run_distributed_test(jobs.sharded_matches_replicated_job, 2, dtype)
