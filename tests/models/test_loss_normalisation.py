"""Losses are normalised by global token counts: splitting a step over DP ranks or micro-batches
changes neither the loss nor the gradients (megatron-core's per-token-loss schedule, DDP summing
over DP)."""

import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.models import _loss_jobs as jobs


@pytest.mark.parametrize("num_micro_per_rank", [1, 2], ids=["one_micro_batch", "rows_as_micro_batches"])
def test_data_parallel_split_matches_one_rank_with_all_micro_batches(reference, tmp_path, num_micro_per_rank):
    run_distributed_test(jobs.dp_split_job, 2, reference, num_micro_per_rank)
