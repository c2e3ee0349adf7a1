"""One run per checkpoint directory (checkpointing/run_lock.py): a live holder is named and
refused, a dead one is taken over with a warning, and a run refused at the door leaves the
holder's checkpoints as they were."""

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest

from megatron_unihetero.checkpointing.errors import CheckpointError
from megatron_unihetero.checkpointing.run_lock import LOCK_NAME, RunLock
from megatron_unihetero.testing import run_in_fresh_process

from tests.training import _train_jobs as jobs


def _plant(folder, **holder) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    with open(path, "w") as handle:
        json.dump(dict({"started": "2026-12-01T10:00:00", "job": None}, **holder), handle)
    return path


@pytest.fixture
def other_process():
    """A live process of this host that is not this one (the holder of a planted lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_refused_by_name_and_a_dead_one_taken_over(tmp_path, other_process):
    host = socket.gethostname()
    start = psutil.Process(other_process.pid).create_time()
    path = _plant(tmp_path, host=host, pid=other_process.pid, process_start=start)
    with pytest.raises(CheckpointError, match=rf"in use by another run: host {host} pid "
                                              rf"{other_process.pid}, started 2026-12-01T10:00:00"):
        RunLock(str(tmp_path), stale_after_s=3600).acquire()
    assert json.load(open(path))["pid"] == other_process.pid  # untouched
    # the same pid number with another start time is another process: the holder is gone
    _plant(tmp_path, host=host, pid=other_process.pid, process_start=start - 100)
    said = []
    lock = RunLock(str(tmp_path), stale_after_s=3600, log=said.append)
    lock.acquire()
    assert "no longer running" in said[0] and json.load(open(path))["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(path)
    # a holder that ended
    _plant(tmp_path, host=host, pid=other_process.pid, process_start=start)
    other_process.kill()
    other_process.wait()
    said.clear()
    RunLock(str(tmp_path), stale_after_s=3600, log=said.append).acquire()
    assert said and "taking over" in said[0] and json.load(open(path))["pid"] == os.getpid()


def test_another_host_holds_until_its_lock_goes_stale_or_its_own_job_restarts(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    path = _plant(tmp_path, host="node-0007", pid=4242, process_start=1.0, job="SLURM_JOB_ID=77")
    with pytest.raises(CheckpointError, match="host node-0007 pid 4242 .SLURM_JOB_ID=77."):
        RunLock(str(tmp_path), stale_after_s=600).acquire()
    # a requeue of the same job (another node, the old one preempted) takes it over
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    said = []
    RunLock(str(tmp_path), stale_after_s=600, log=said.append).acquire()
    assert "the same job (SLURM_JOB_ID=77) restarted" in said[0]
    # a lock its node stopped refreshing long ago
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    _plant(tmp_path, host="node-0007", pid=4242, process_start=1.0, job="SLURM_JOB_ID=77")
    old = time.time() - 3600
    os.utime(path, (old, old))
    said.clear()
    RunLock(str(tmp_path), stale_after_s=600, log=said.append).acquire()
    assert "not refreshed for" in said[0]


def test_a_second_run_on_a_held_directory_exits_naming_the_holder(tmp_path, other_process):
    """The failure the lock exists for: before it, both runs exited 0 and one run's
    checkpoints were lost. Now the second exits with code 4 and writes nothing."""
    data = jobs.make_data(str(tmp_path / "data"))
    run_dir = str(tmp_path / "run")
    ckpt_dir = os.path.join(run_dir, "ckpt")
    _plant(ckpt_dir, host=socket.gethostname(), pid=other_process.pid,
           process_start=psutil.Process(other_process.pid).create_time())
    before = sorted(os.listdir(ckpt_dir))
    proc = run_in_fresh_process(jobs.pretrain_job, jobs.overrides(data, run_dir), timeout_s=300)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert f"in use by another run: host {socket.gethostname()} pid {other_process.pid}" in proc.stderr
    assert sorted(os.listdir(ckpt_dir)) == before



def test_a_checkpoint_dir_that_cannot_be_written_is_named_at_the_start(tmp_path):
    """A checkpoint.dir under a file, or a lock path that is a folder: a CheckpointError naming
    it when the run starts, not an OSError traceback (nor a failure at the first save)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot take .*a_file/ckpt/run.lock .*NotADirectoryError"):
        RunLock(str(blocker / "ckpt"), stale_after_s=60).acquire()
    (tmp_path / "ckpt" / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(CheckpointError, match="cannot take .*IsADirectoryError"):
        RunLock(str(tmp_path / "ckpt"), stale_after_s=60, log=lambda message: None).acquire()
