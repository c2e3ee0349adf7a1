"""benchmarks/gpu_session.sh --dry-run: the device session's checks, listed and argument-checked
on a CPU machine (no GPU, no training): the script's listing and each python step's own
--dry-run (imports, configs, the Llava reference on the meta device)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _listing(tmp_path, *checks):
    """The dry run's output, each python step's command recorded by a stand-in interpreter."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {calls}\necho >> {calls}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TRAIN_ARGS", "OUT")}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), "--dry-run", *checks],
                          cwd=REPO, env=dict(env, PYTHON=str(fake)), capture_output=True, text=True,
                          timeout=60)
    recorded = [shlex.split(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return proc, recorded


def test_dry_run_lists_every_check_and_passes_dry_run(tmp_path):
    proc, calls = _listing(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "would run, in order: train throughput" in proc.stdout
    assert "check train (timeout 150 s)" in proc.stdout
    assert "check throughput (timeout 300 s)" in proc.stdout
    assert "gpu_session dry run: OK" in proc.stdout
    assert [c[0] for c in calls] == ["benchmarks/gpu_train_check.py"] * 2
    assert all(c[-1] == "--dry-run" for c in calls)
    train, throughput = calls
    assert train[train.index("--checks") + 1] == "resume,export"
    assert {"--preset", "1p3b", "--compile", "--llava"} <= set(throughput)
    # the device time budget: 8 minutes for the default session
    assert 150 + 300 <= 8 * 60


def test_unknown_check_is_refused(tmp_path):
    proc, _ = _listing(tmp_path, "bogus")
    assert proc.returncode == 2 and "unknown check" in proc.stdout


def test_each_step_dry_run_builds_its_configs(tmp_path, capsys):
    """The python steps' --dry-run in this process (imports already paid): every run's config,
    the FLOPs terms, the export tool, the Llava reference on the meta device."""
    _, calls = _listing(tmp_path)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_train_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for call in calls:
        assert gpu_train_check.main(call[1:]) == 0
    out = capsys.readouterr().out
    assert "would run pretrain resumed" in out and "async save True" in out
    assert "would run pretrain 1p3b_auto_compiled: 24 x 2048 LLM, seq 4096" in out
    assert "would time the transformers Llava + AdamW loop" in out
    assert out.count("gpu_train_check dry run: OK") == 2
