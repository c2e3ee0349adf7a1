"""A model checkpoint saved at one TP x PP layout loads exactly at another."""

import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.models import _parity_jobs as jobs


# TP=2 x PP=2 (2 virtual stages) -> one process, with the optimizer state too, is
# tests/training/test_trainer.py's
# test_megatron_engine_trains_with_model_parallelism.
@pytest.mark.parametrize("saved,loaded", [((2, 1), (1, 2))], ids=["tp2-to-pp2"])
def test_checkpoint_reshards_on_load(reference, tmp_path, saved, loaded):
    model_dir = str(tmp_path / "iter_0000001")
    cfg = jobs.tiny_config()
    run_distributed_test(jobs.save_sharded_job, saved[0] * saved[1], reference, model_dir, cfg, *saved)
    run_distributed_test(jobs.load_resharded_job, loaded[0] * loaded[1], reference, model_dir, cfg, *loaded)
