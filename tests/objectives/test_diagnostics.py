"""The generation diagnostics (eval/diagnostics.py) on hand-made cases: R² and cosine against
their mean-predictor baselines, exactness under any split of the rows, the pixel baselines, and
the step summary's path through training/losses.py."""

import math

import pytest
import torch

from megatron_unihetero.eval import diagnostics as diag
from megatron_unihetero.models.heads import ModelLosses
from megatron_unihetero.training.losses import assemble_loss, summarize


def _targets(n=64, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * torch.linspace(0.5, 2.0, d) + 3.0


def test_r2_is_zero_for_the_mean_and_one_for_an_exact_predictor():
    t = _targets().double()  # the mean exactly: the baseline's figures hold to rounding
    mean = t.mean(0, keepdim=True).expand_as(t)
    fig = diag.regression_figures(diag.regression_stats(mean, t))
    assert fig["semantic_r2"] == pytest.approx(0.0, abs=1e-12)
    # The mean predictor's MSE is the targets' variance per dimension: the baseline.
    assert fig["semantic_mse"] == pytest.approx(fig["semantic_baseline_mse"], rel=1e-12)
    assert fig["semantic_baseline_mse"] == pytest.approx(float(t.double().var(0, unbiased=False).mean()), rel=1e-9)
    assert fig["semantic_cos"] == pytest.approx(fig["semantic_baseline_cos"], rel=1e-12)
    assert fig["semantic_pred_var"] == pytest.approx(0.0, abs=1e-9)  # a constant prediction
    exact = diag.regression_figures(diag.regression_stats(t, t))
    assert exact["semantic_r2"] == pytest.approx(1.0) and exact["semantic_mse"] == 0.0
    assert exact["semantic_cos"] == pytest.approx(1.0)
    assert exact["semantic_pred_var"] == pytest.approx(exact["semantic_baseline_mse"])
    # A predictor worse than the mean has a negative R²; halfway to the truth gives 0.75.
    assert diag.regression_figures(diag.regression_stats(-t, t))["semantic_r2"] < 0
    half = diag.regression_figures(diag.regression_stats((t + mean) / 2, t))
    assert half["semantic_r2"] == pytest.approx(0.75)


def test_the_figures_match_a_direct_computation():
    t = _targets(seed=1)
    p = t + torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
    fig = diag.regression_figures(diag.regression_stats(p, t))
    t64, p64 = t.double(), p.double()
    sse, sst = (p64 - t64).pow(2).sum(), (t64 - t64.mean(0)).pow(2).sum()
    assert fig["semantic_r2"] == pytest.approx(float(1 - sse / sst), rel=1e-9)
    cos = torch.nn.functional.cosine_similarity(p64, t64, dim=-1).mean()
    assert fig["semantic_cos"] == pytest.approx(float(cos), rel=1e-9)
    base = torch.nn.functional.cosine_similarity(t64.mean(0, keepdim=True), t64, dim=-1).mean()
    assert fig["semantic_baseline_cos"] == pytest.approx(float(base), rel=1e-9)
    assert fig["semantic_target_norm"] == pytest.approx(float(t64.norm(dim=-1).mean()), rel=1e-9)


def test_summed_statistics_are_exact_for_any_split_of_the_rows():
    t = _targets(n=50, seed=3)
    p = 0.5 * t + torch.randn(t.shape, generator=torch.Generator().manual_seed(4))
    whole = diag.regression_figures(diag.regression_stats(p, t))
    total = None
    for chunk in ((0, 7), (7, 7), (7, 31), (31, 50)):  # uneven, one empty
        total = diag.add_stats(total, diag.regression_stats(p[slice(*chunk)], t[slice(*chunk)]))
    split = diag.regression_figures(total)
    assert split == pytest.approx(whole, rel=1e-10)
    # Averaging per-chunk R² instead would be wrong: each chunk's own mean is another baseline.
    per_chunk = [diag.regression_figures(diag.regression_stats(p[a:b], t[a:b]))["semantic_r2"]
                 for a, b in ((0, 7), (7, 31), (31, 50))]
    assert abs(sum(per_chunk) / 3 - whole["semantic_r2"]) > 1e-3
    assert diag.regression_figures(diag.empty_regression_stats(8)) == {}


def test_gaussian_denoiser_baseline_is_the_loss_of_the_best_linear_estimate():
    """Monte Carlo: the optimal linear estimate of eps (and v) from x_t has the stated MSE."""
    gen = torch.Generator().manual_seed(5)
    mu, s = 0.7, 1.6
    x0 = mu + s * torch.randn(200_000, 1, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    for abar in (0.05, 0.5, 0.95):
        a, b = math.sqrt(abar), math.sqrt(1 - abar)
        xt = a * x0 + b * eps
        centred = xt - a * mu
        var_xt = a * a * s * s + b * b
        v = a * eps - b * x0
        for prediction, target, cov in (("epsilon", eps, b), ("v", v, a * b * (1 - s * s))):
            # The best linear estimate: E[target] + cov / var(x_t) * (x_t - E[x_t]); E[v] = -b mu.
            offset = 0.0 if prediction == "epsilon" else -b * mu
            estimate = offset + cov / var_xt * centred
            mc = float((estimate - target).pow(2).mean())
            formula = float(diag.gaussian_denoiser_mse(torch.tensor([abar], dtype=torch.float64),
                                                       torch.tensor([s * s], dtype=torch.float64), prediction))
            assert formula == pytest.approx(mc, rel=0.02), (prediction, abar)


def test_pixel_figures_from_summed_statistics():
    gen = torch.Generator().manual_seed(6)
    latents = 2.0 * torch.randn(40, 4, generator=gen) + 1.0
    abar = torch.linspace(0.999, 0.001, 10)
    loss = torch.tensor(40 * 0.3)  # a per-token loss of 0.3
    whole = diag.pixel_figures(diag.pixel_stats(loss, latents, abar, "epsilon"))
    parts = diag.add_stats(diag.pixel_stats(loss * 0.25, latents[:10], abar, "epsilon"),
                           diag.pixel_stats(loss * 0.75, latents[10:], abar, "epsilon"))
    assert diag.pixel_figures(parts) == pytest.approx(whole, rel=1e-10)
    assert whole["pixel_loss_mean"] == pytest.approx(0.3) and whole["pixel_baseline_zero"] == 1.0
    variance = latents.double().var(0, unbiased=False)
    expected = float(diag.gaussian_denoiser_mse(abar.double(), variance, "epsilon").mean())
    assert whole["pixel_baseline"] == pytest.approx(expected, rel=1e-9)
    assert 0.0 < whole["pixel_baseline"] < 1.0  # knowing the latents' spread beats predicting 0
    assert whole["pixel_r2"] == pytest.approx(1 - 0.3 / whole["pixel_baseline"])
    v = diag.pixel_figures(diag.pixel_stats(loss, latents, abar, "v"))
    second_moment = float(latents.double().pow(2).mean())
    assert v["pixel_baseline_zero"] == pytest.approx(float(abar.double().mean()) +
                                                     (1 - float(abar.double().mean())) * second_moment)
    with pytest.raises(ValueError, match="prediction"):
        diag.pixel_stats(loss, latents, abar, "x0")


def test_statistics_ride_through_the_loss_without_changing_it():
    p = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(6, 3)
    sem_sum = (p - t).pow(2).sum()
    outputs = ModelLosses({"text": (torch.tensor(4.0, requires_grad=True), torch.tensor(2)),
                           "semantic": (sem_sum, torch.tensor(6))},
                          stats={"semantic": diag.regression_stats(p, t)})
    counts = {"text": 4, "semantic": 12, "pixel": 0}
    weights = {"text": 1.0, "semantic": 0.5}
    total, report = assemble_loss(outputs, counts, weights)
    assert float(total) == pytest.approx(4 / 4 + 0.5 * float(sem_sum) / 12)
    assert not report.stats["semantic"].requires_grad
    total.backward()
    torch.testing.assert_close(p.grad, 0.5 * 2 * (p - t).detach() / 12)
    # Two micro-batches: the statistics add up; "loss" is the objectives' total only.
    second = ModelLosses(outputs.objectives, stats={"semantic": diag.regression_stats(p[:2], t[:2])})
    summary = summarize([report, assemble_loss(second, counts, weights)[1]], counts, weights)
    assert summary.losses["loss"] == pytest.approx(2 * float(total))
    torch.testing.assert_close(summary.stats["semantic"],
                               diag.regression_stats(torch.cat([p, p[:2]]), torch.cat([t, t[:2]])))
    done = summary.figures()
    assert "stats/semantic" not in done and -10 < done["semantic_r2"] < 1 and done["loss"] == summary.losses["loss"]
    assert set(diag.figures("embedding", torch.tensor([2.0, 6.0, 20.0, 3.0, 3.0, 3.0]))) == {
        "embed_norm_visual", "embed_norm_text"}
    with pytest.raises(KeyError, match="unknown statistics"):
        diag.figures("nonsense", torch.zeros(3))
