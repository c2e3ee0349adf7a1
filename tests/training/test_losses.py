"""assemble_loss and summarize: the weighted total over global counts, and the step summary."""

import pytest
import torch

from megatron_unihetero.models.heads import ModelLosses
from megatron_unihetero.training.losses import assemble_loss, summarize


def _outputs(**sums):
    return ModelLosses({name: (torch.tensor(value, requires_grad=True), torch.tensor(count))
                        for name, (value, count) in sums.items()}, stats={})


def test_weighted_total_over_the_global_counts():
    outputs = _outputs(text=(6.0, 3), semantic=(2.0, 2), pixel=(9.0, 4))
    counts = {"text": 12, "semantic": 8, "pixel": 8}  # the whole step's, not this micro-batch's
    total, report = assemble_loss(outputs, counts, {"text": 1.0, "semantic": 0.5, "pixel": 2.0})
    assert float(total) == pytest.approx(6 / 12 + 0.5 * 2 / 8 + 2.0 * 9 / 8)
    assert {k: float(v) for k, v in report.shares.items()} == pytest.approx(
        {"text": 6 / 12, "semantic": 2 / 8, "pixel": 9 / 8})
    assert all(not v.requires_grad for v in report.shares.values())
    total.backward()
    assert float(outputs.objectives["pixel"][0].grad) == pytest.approx(2.0 / 8)


def test_text_weight_defaults_to_one_and_others_are_left_out_at_weight_zero():
    outputs = _outputs(text=(4.0, 2), semantic=(3.0, 1), pixel=(5.0, 1))
    counts = {"text": 4, "semantic": 2, "pixel": 2}
    # No weights given: text counts with 1, the others with 0 (left out).
    total, report = assemble_loss(outputs, counts, {})
    assert float(total) == pytest.approx(1.0) and set(report.shares) == {"text"}
    # Explicit zero weights leave semantic / pixel out of the total and the report...
    total, report = assemble_loss(outputs, counts, {"semantic": 0.0, "pixel": 0.0})
    assert float(total) == pytest.approx(1.0) and set(report.shares) == {"text"}
    # ...but text stays reported even at weight 0.
    total, report = assemble_loss(outputs, counts, {"text": 0.0, "semantic": 1.0})
    assert float(total) == pytest.approx(1.5) and set(report.shares) == {"text", "semantic"}


def test_an_objective_without_tokens_in_the_step_contributes_zero():
    outputs = _outputs(text=(4.0, 2), semantic=(0.0, 0))
    total, report = assemble_loss(outputs, {"text": 2, "semantic": 0, "pixel": 0},
                                  {"text": 1.0, "semantic": 1.0})
    assert float(total) == pytest.approx(2.0) and float(report.shares["semantic"]) == 0.0
    assert torch.isfinite(total)


def test_micro_batch_shares_add_up_to_the_step_mean():
    counts = {"text": 10, "semantic": 4, "pixel": 0}
    weights = {"text": 1.0, "semantic": 0.5}
    micro = [_outputs(text=(3.0, 4), semantic=(1.0, 1)), _outputs(text=(7.0, 6), semantic=(5.0, 3))]
    totals, reports = zip(*(assemble_loss(out, counts, weights) for out in micro))
    summary = summarize(list(reports), counts, weights)
    assert summary.losses["text"] == pytest.approx(10 / 10) and summary.losses["semantic"] == pytest.approx(6 / 4)
    assert summary.losses["loss"] == pytest.approx(1.0 + 0.5 * 1.5) == pytest.approx(float(sum(totals)))
    assert summary.counts == {"text": 10, "semantic": 4, "pixel": 0}
