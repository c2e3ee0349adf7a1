import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.models import _parity_jobs as jobs


@pytest.fixture(scope="package")
def reference(tmp_path_factory):
    """A TP=1 / PP=1 model's weights, losses and gradients on fixed batches."""
    path = str(tmp_path_factory.mktemp("parity") / "reference.pt")
    run_distributed_test(jobs.reference_job, 1, path, jobs.tiny_config())
    return path
