"""What the config asks of the data, checked before step 1: a seq_length no sample fits is a
config error (exit code 2) naming the setting and the shortest sample, not a loader that spins."""

import os

import pytest

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


def test_an_unfinished_preprocessing_output_is_refused_naming_the_prefix(tmp_path):
    """An interrupted preprocessing run (its rejects file, no summary; or a shard's temporary
    file left) is refused with exit code 2 and what to do, where before the run trained on the
    finished part and exited 0."""
    data = jobs.make_data(str(tmp_path / "data"))
    open(data + ".rejects.jsonl", "w").close()  # what the pipeline writes first
    run_dir = str(tmp_path / "run")
    proc = run_in_fresh_process(jobs.pretrain_job, jobs.overrides(data, run_dir), timeout_s=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"data error: {data}: its preprocessing did not finish" in proc.stderr
    assert "Run the same tools/preprocess_data.py command again" in proc.stderr
    with open(data + ".summary.json", "w") as handle:
        handle.write("{}")  # finished...
    open(data + "_00000.tmp.text.bin", "w").close()  # ...but a shard was cut short
    from megatron_unihetero.data.dataset import MultimodalDataset
    from megatron_unihetero.data.shards import ShardError

    with pytest.raises(ShardError, match=r"temporary file .*_00000\.tmp\.text\.bin"):
        MultimodalDataset(data)
