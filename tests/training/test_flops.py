"""training/flops.py (the MFU formula) against torch's FlopCounterMode over a training step."""

from megatron_unihetero.testing import run_distributed_test

from tests.training import _flops_jobs as jobs


def test_step_flops_match_flop_counter_mode(tmp_path):
    report = tmp_path / "flops.txt"
    run_distributed_test(jobs.flop_count_job, 1, str(report))
    (measured, formula, measured_copy, formula_copy, measured_llm_frozen, formula_llm_frozen,
     measured_heads_only, formula_heads_only) = map(float, report.read_text().split())
    print(f"one step: FlopCounterMode {measured:.4g}, formula {formula:.4g} "
          f"({formula / measured - 1:+.2%}); last-stage encoder copy: {measured_copy:.4g} vs "
          f"{formula_copy:.4g} ({formula_copy / measured_copy - 1:+.2%})")
    assert abs(formula - measured) <= 0.05 * measured
    assert abs(formula_copy - measured_copy) <= 0.05 * measured_copy
    for name, got, want in (("frozen LLM", formula_llm_frozen, measured_llm_frozen),
                            ("heads only", formula_heads_only, measured_heads_only)):
        print(f"{name}: FlopCounterMode {want:.4g}, formula {got:.4g} ({got / want - 1:+.2%})")
        assert abs(got - want) <= 0.05 * want, name
