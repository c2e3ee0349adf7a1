"""Losses are normalised by global token counts: splitting a step over DP ranks or micro-batches
changes neither the loss nor the gradients."""

from megatron_unihetero.testing import run_distributed_test

from tests.models import _parity_jobs as jobs


def test_data_parallel_split_matches_one_rank_with_two_micro_batches(reference, tmp_path):
    run_distributed_test(jobs.dp_grads_job, 2, reference, str(tmp_path / "unused"))
