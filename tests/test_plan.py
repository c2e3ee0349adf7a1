"""The memory planner (megatron_unihetero/plan.py): its activation formula against the tensors
a decoder layer saves, its TP parameter split (tests/models: the memory parity job), its CLI."""

import os

from megatron_unihetero.testing import run_distributed_test

from tests import _plan_jobs as jobs

PAPER_CONFIG = os.path.join(os.path.dirname(__file__), "..", "examples", "configs", "paper_7b.yaml")


def test_planner_layer_activations_and_cli():
    run_distributed_test(jobs.planner_job, 1, PAPER_CONFIG)
