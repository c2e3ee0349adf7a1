"""megatron_unihetero.testing.run_distributed_test: workers from the preloaded forkserver run
gloo collectives, see the caller's environment and working directory as they are at the call
(not as they were when the forkserver started), and a failing rank is reported with its
traceback."""

import pytest

from megatron_unihetero.testing import run_distributed_test

from tests.platform import _helper_jobs as jobs


def test_workers_all_reduce_with_the_callers_environment(monkeypatch, tmp_path):
    for value in ("first", "second"):  # the second call reuses the running forkserver
        monkeypatch.setenv("UNIHETERO_HELPER_CHECK", value)
        monkeypatch.setenv("UNIHETERO_HELPER_CWD", str(tmp_path))
        monkeypatch.chdir(tmp_path)
        run_distributed_test(jobs.all_reduce_job, 2, value)


def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(RuntimeError) as info:
        run_distributed_test(jobs.failing_job, 2, timeout_s=60)
    report = str(info.value)
    assert "--- rank1.txt ---" in report
    assert "Traceback" in report and "ValueError: rank one fails on purpose" in report
    assert "failing_job" in report


def test_workers_print_to_the_callers_output(capfd):
    """Under pytest that is the calling test's capture (shown when it fails), not the capture
    of the test that happened to start the forkserver."""
    run_distributed_test(jobs.printing_job, 2, "helper-output-check")
    out, _ = capfd.readouterr()
    assert "helper-output-check from rank 0" in out and "helper-output-check from rank 1" in out
