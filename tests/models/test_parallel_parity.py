"""TP=2, PP=2 and TP=2 x PP=2 give the losses and gradients of TP=1 / PP=1 (gloo, CPU)."""

import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.models import _parity_jobs as jobs


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_parallel_layout_matches_single_rank(reference, tp, pp):
    run_distributed_test(jobs.parallel_job, tp * pp, reference, jobs.tiny_config(), tp, pp)


def test_interleaved_pipeline_matches_single_rank(reference):
    """PP=2 with 2 virtual stages per rank (4 chunks of one layer) through interleaved 1F1B."""
    run_distributed_test(jobs.interleaved_job, 2, reference, jobs.tiny_config(), 2, 2, 2)


def test_decoder_builds_the_attention_layout_once_per_forward():
    run_distributed_test(jobs.decoder_layout_once_job, 1)


def test_recompute_sequence_parallel_and_grad_overlap_match_the_plain_run(reference):
    """TP=2: selective and full recompute and sequence parallelism give the plain run's losses
    and finalised gradients; DP=2: overlap_grad_reduce gives the same gradients (one job)."""
    run_distributed_test(jobs.memory_parity_job, 2, reference, jobs.tiny_config())
