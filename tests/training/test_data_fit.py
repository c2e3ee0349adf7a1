"""What the config asks of the data, checked before step 1: a seq_length no sample fits is a
config error (exit code 2) naming the setting and the shortest sample, not a loader that spins."""

import os

from megatron_unihetero.checkpointing.run_lock import LOCK_NAME
from megatron_unihetero.testing import run_in_fresh_process

from tests.training import _train_jobs as jobs


def test_a_seq_length_no_sample_fits_is_a_config_error_before_step_1(tmp_path):
    """Before, the loader drew windows forever (every sample rejected as too long) at 100% CPU;
    now the run exits with code 2 naming the setting and the shortest sample, and takes no
    checkpoint directory."""
    data = jobs.make_data(str(tmp_path / "data"))
    run_dir = str(tmp_path / "run")
    proc = run_in_fresh_process(jobs.pretrain_job, jobs.overrides(data, run_dir, **{"data.seq_length": 4}),
                                timeout_s=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: data.seq_length=4: no sample of" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(run_dir, "ckpt", LOCK_NAME))
