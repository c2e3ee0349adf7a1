"""What a person reads: a tiny pretraining run's console carries no library warning; they are in
LOGGING_DIR/run.log (with the CPU layer's one line), and logging.verbose=true prints them too."""

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.training import _train_jobs as jobs

WARNING_LINE = re.compile(r"\w*Warning: |warnings\.warn\(")
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONWARNINGS")


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return jobs.make_data(str(tmp_path_factory.mktemp("console_data")))


def _pretrain(data_prefix, run_dir, *extra):
    args = jobs.overrides(data_prefix, run_dir, **{"train.steps": 2, "checkpoint.save_interval": 2})
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    proc = subprocess.run([sys.executable, "-m", "megatron_unihetero.pretrain", *args, *extra],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(run_dir, "run.log")) as handle:
        return proc.stdout + proc.stderr, handle.read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer and its warnings: CPU only")
def test_the_console_has_no_library_warnings_and_run_log_has_them(data_prefix, tmp_path):
    console, log = _pretrain(data_prefix, str(tmp_path / "quiet"))
    assert not [line for line in console.splitlines() if WARNING_LINE.search(line)], console
    assert "[megatron_unihetero] step 1/2 | eta " in console
    # Import-time warnings (held until the file was known) and run-time ones, in the file.
    assert "Transformer Engine and Apex are not installed" in log
    assert "runs on the CPU layer" in log and log.count("runs on the CPU layer") == 1

    console, log = _pretrain(data_prefix, str(tmp_path / "verbose"), "--logging.verbose=true")
    assert "UserWarning: Transformer Engine and Apex are not installed" in console
    assert "runs on the CPU layer" in console
