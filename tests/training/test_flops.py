"""training/flops.py (the MFU formula) against torch's FlopCounterMode over a training step."""

from megatron_unihetero.testing import run_distributed_test

from tests.training import _flops_jobs as jobs


def test_step_flops_match_flop_counter_mode(tmp_path):
    report = tmp_path / "flops.txt"
    run_distributed_test(jobs.flop_count_job, 1, str(report))
    measured, formula, measured_copy, formula_copy = map(float, report.read_text().split())
    print(f"one step: FlopCounterMode {measured:.4g}, formula {formula:.4g} "
          f"({formula / measured - 1:+.2%}); last-stage encoder copy: {measured_copy:.4g} vs "
          f"{formula_copy:.4g} ({formula_copy / measured_copy - 1:+.2%})")
    assert abs(formula - measured) <= 0.05 * measured
    assert abs(formula_copy - measured_copy) <= 0.05 * measured_copy
