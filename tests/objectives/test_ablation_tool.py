"""The objective-ablation tool (tools/run_ablation.py, megatron_unihetero/ablation/): the arm
configs, the slope fit, the result collection and the CSV / Markdown / PNG writer. No training."""

import csv
import json
import math
import os

import pytest

from megatron_unihetero.ablation import ARMS, arm_config_path, check_arm_config, fit_log_slope, write_results
from megatron_unihetero.ablation import cli, report, runner
from megatron_unihetero.ablation.arms import CONFIG_DIR, REPO_ROOT
from megatron_unihetero.config_io import load_config
from megatron_unihetero.models.config import ConfigError
from megatron_unihetero.training.config import RunConfig

EXPECTED = {  # arm: (semantic on, pixel routing or None)
    "und_only": (False, None),
    "semantic": (True, None),
    "pixel_shared": (False, "shared"),
    "pixel_hetero": (False, "hetero"),
    "semantic_pixel_hetero": (True, "hetero"),
    "semantic_cosine": (True, None),
    "semantic_ema": (True, None),
    "semantic_encoder": (True, None),
    "semantic_encoder_cosine": (True, None),
}
SEMANTIC_VARIANT = {  # arm: (semantic.loss, semantic.target); the others: mse, input_embedding
    "semantic_cosine": ("cosine", "input_embedding"),
    "semantic_ema": ("mse", "ema_input_embedding"),
    "semantic_encoder": ("mse", "encoder_output"),
    "semantic_encoder_cosine": ("cosine", "encoder_output"),
}


def _fake_shards(tmp_path):
    prefix = tmp_path / "train"
    (tmp_path / "train_00000.json").write_text("{}")
    return str(prefix)


def _load(name, tmp_path):
    return load_config(RunConfig, arm_config_path(name), [f"--data.train=[{_fake_shards(tmp_path)}]"])


def test_there_is_one_config_per_arm_and_nothing_else():
    assert set(ARMS) == set(EXPECTED)
    files = {f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_arm_config_loads_validates_and_has_the_named_objectives(name, tmp_path):
    cfg = _load(name, tmp_path)
    cfg.validate(1)
    check_arm_config(ARMS[name], cfg)
    semantic, routing = EXPECTED[name]
    assert cfg.model.semantic.enabled is semantic
    assert cfg.model.pixel.enabled is (routing is not None)
    if semantic:
        loss, target = SEMANTIC_VARIANT.get(name, ("mse", "input_embedding"))
        assert (cfg.model.semantic.loss, cfg.model.semantic.target) == (loss, target)
    assert cfg.model.vision.path is None  # tools/run_ablation.py --vision-encoder sets it
    if routing is not None:
        assert cfg.model.pixel.routing == routing
        assert cfg.model.pixel.latent_source == "vae" and cfg.model.pixel.vae_path is None  # tiny VAE
    assert cfg.logging.dir.endswith(name) and name in cfg.checkpoint.dir


def test_arms_differ_from_tiny_cpu_only_in_the_objectives(tmp_path):
    from megatron_unihetero.config_io import to_dict

    base = to_dict(load_config(RunConfig, os.path.join(REPO_ROOT, "examples", "configs", "tiny_cpu.yaml"),
                               [f"--data.train=[{_fake_shards(tmp_path)}]"]))
    for name in EXPECTED:
        cfg = to_dict(_load(name, tmp_path))
        for section in ("llm", "vision", "projector", "image_token_id", "freeze_llm"):
            assert cfg["model"][section] == base["model"][section], (name, section)
        if name not in SEMANTIC_VARIANT:
            assert cfg["model"]["semantic"]["loss"] == base["model"]["semantic"]["loss"]
            assert cfg["model"]["semantic"]["target"] == base["model"]["semantic"]["target"]
        for key in ("seq_length", "micro_batch_size", "tokenizer"):
            assert cfg["data"][key] == base["data"][key], (name, key)
        for key in ("lr", "min_lr", "weight_decay", "clip_grad", "grad_accumulation"):
            assert cfg["train"][key] == base["train"][key], (name, key)
        assert cfg["parallel"] == base["parallel"]


def test_check_arm_config_names_a_wrong_switch(tmp_path):
    cfg = _load("pixel_shared", tmp_path)
    with pytest.raises(ConfigError, match="routing"):
        check_arm_config(ARMS["pixel_hetero"], cfg)
    with pytest.raises(ConfigError, match="semantic.weight"):
        check_arm_config(ARMS["semantic"], _load("und_only", tmp_path))
    with pytest.raises(ConfigError, match="pixel.weight"):
        check_arm_config(ARMS["und_only"], cfg)
    with pytest.raises(ConfigError, match="semantic.target"):
        check_arm_config(ARMS["semantic_ema"], _load("semantic", tmp_path))
    with pytest.raises(ConfigError, match="semantic.loss"):
        check_arm_config(ARMS["semantic_cosine"], _load("semantic", tmp_path))


def test_fit_log_slope_on_hand_made_points():
    xs = [100, 1000, 10000]
    slope, intercept = fit_log_slope(xs, [0.3 + 0.1 * math.log10(x) for x in xs])
    assert slope == pytest.approx(0.1) and intercept == pytest.approx(0.3)
    # two seeds, +-0.02 around the line: the fit goes through the seed means
    xs2 = [100, 100, 1000, 1000, 10000, 10000]
    ys2 = [0.5 + 0.02, 0.5 - 0.02, 0.45 + 0.02, 0.45 - 0.02, 0.4 + 0.02, 0.4 - 0.02]
    assert fit_log_slope(xs2, ys2)[0] == pytest.approx(-0.05)
    # uneven spacing in log space: slope = cov / var of log10 x
    xs3, ys3 = [10, 100, 10000], [1.0, 2.0, 3.0]
    lx = [1.0, 2.0, 4.0]
    mx, my = sum(lx) / 3, 2.0
    expected = sum((a - mx) * (b - my) for a, b in zip(lx, ys3)) / sum((a - mx) ** 2 for a in lx)
    assert fit_log_slope(xs3, ys3)[0] == pytest.approx(expected)
    with pytest.raises(ValueError):
        fit_log_slope([500, 500], [0.1, 0.2])


def _hand_made_results():
    out = []
    for arm, gain in (("und_only", 0.05), ("semantic", 0.12), ("pixel_shared", -0.02)):
        for n in (500, 1000, 2000):
            for seed in (0, 1):
                acc = 0.3 + gain * math.log10(n / 500) + (0.01 if seed else -0.01)
                out.append(dict(arm=arm, data_size=n, seed=seed, steps=n // 10, docs_seen=n * 2, epochs=1.0,
                                answer_accuracy=acc, caption_perplexity=10.0 - n / 1000,
                                probe_shape=0.5, probe_colour=0.4, probe_position=0.3, probe_size=0.6,
                                probe_mean=0.45, retrieval_top1=0.2 if "semantic" in arm else None,
                                final_loss=2.0, final_text=1.5, final_semantic=0.01 if arm == "semantic" else None,
                                final_pixel=0.4 if "pixel" in arm else None,
                                train_wall_s=10.0, eval_wall_s=5.0, wall_s=15.0))
    return out


def test_writer_produces_csv_markdown_and_png(tmp_path):
    results = _hand_made_results()
    labels = {a: ARMS[a].label for a in ARMS}
    paths = write_results(results, str(tmp_path), labels=labels, arm_order=list(ARMS),
                          header="HEADER LINE", notes="NOTES LINE", chance=0.29)
    for key in ("csv", "md", "png"):
        assert os.path.getsize(paths[key]) > 0
    with open(paths["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(results) and list(rows[0]) == report.COLUMNS
    assert [r["arm"] for r in rows[:6]] == ["und_only"] * 6  # arm order, then size, then seed
    assert rows[0]["retrieval_top1"] == ""  # no semantic head: empty, not 0
    back = report.read_csv(paths["csv"])
    assert back[0]["data_size"] == 500 and back[0]["answer_accuracy"] == pytest.approx(0.29)
    md = open(paths["md"]).read()
    assert "HEADER LINE" in md and "NOTES LINE" in md and "understanding.png" in md
    assert "| +semantic | 0.300 ± 0.014 |" in md  # mean +- std over the two seeds
    assert "+0.120" in md and "-0.020" in md  # slopes per 10x
    assert "minus und-only, same seed" in md
    with open(paths["paired_png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "understanding_vs_und_only.png" in md and "steeper" in md
    diffs = report.paired_differences(results)
    assert diffs["semantic"][2000][0] == pytest.approx(0.07 * math.log10(4)) and diffs["semantic"][2000][1] == 0
    assert diffs["pixel_shared"][500][0] == pytest.approx(0.0)
    slopes = report.slopes(results, "answer_accuracy")
    assert slopes["semantic"] == pytest.approx(0.12) and slopes["pixel_shared"] == pytest.approx(-0.02)


def test_paired_slopes_fit_each_seeds_difference_and_the_verdict_needs_the_seeds_to_agree():
    results = _hand_made_results()  # semantic gains 0.07 / 10x on und-only, pixel_shared loses 0.07
    per_seed = report.paired_slopes(results)
    assert per_seed["semantic"] == pytest.approx([0.07, 0.07]) and "und_only" not in per_seed
    assert per_seed["pixel_shared"] == pytest.approx([-0.07, -0.07])
    assert report.slope_verdict(per_seed["semantic"])[3] == "steeper"
    assert report.slope_verdict(per_seed["pixel_shared"])[3] == "flatter"
    # Restricted to the upper sizes, the slope of a log-linear difference is the same.
    assert report.paired_slopes(results, sizes=[1000, 2000])["semantic"] == pytest.approx([0.07, 0.07])
    # Three seeds that disagree in sign: the mean is positive, the t test does not resolve it.
    mean, std, t, verdict = report.slope_verdict([0.10, -0.05, 0.04])
    assert mean == pytest.approx(0.03) and verdict == "not resolved" and abs(t) < 4.303
    # Three seeds that agree: t = mean / (std / sqrt(3)) beyond t(2) = 4.303.
    assert report.slope_verdict([0.10, 0.11, 0.12])[3] == "steeper"
    assert report.slope_verdict([0.05])[3] == "one seed: not tested"
    table = report.slope_table(results, labels={a: ARMS[a].label for a in ARMS}, arm_order=list(ARMS))
    assert "| und-only | +0.050 | (baseline) | (baseline) |" in table
    assert "| +semantic | +0.120 | +0.070 ± 0.000 (steeper) | +0.070 ± 0.000 (steeper) |" in table
    assert "N=500-2000" in table and "N=1000-2000" in table


def test_plan_steps_and_collect_from_a_run_folder(tmp_path):
    specs = runner.plan(["und_only", "semantic"], [500, 2000], [0, 1], steps_per_sample=0.1, min_steps=20)
    assert len(specs) == 8 and specs[0].seed == 0 and specs[-1].seed == 1
    assert runner.steps_for(500, 0.1, 20) == 50 and runner.steps_for(100, 0.1, 20) == 20
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train_n500.summary.json").write_text(json.dumps({"rows": 500, "samples": 1000}))
    spec = runner.RunSpec("semantic", 500, 0, 3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step, loss in enumerate([3.0, 2.0, 1.0], 1):
            handle.write(json.dumps({"step": step, "kind": "train", "loss": loss + 0.1, "text": loss,
                                     "semantic": 0.1, "semantic_r2": 0.1 * step, "samples_per_s": 100.0,
                                     "step_time_s": 2.0}) + "\n")
        handle.write(json.dumps({"step": 3, "kind": "eval", "valid_loss": 9.0}) + "\n")
    (run_dir / "eval.json").write_text(json.dumps({
        "answer_accuracy": 0.5, "caption_perplexity": 7.0,
        "probes": {a: {"test_accuracy": v} for a, v in
                   (("shape", 0.2), ("colour", 0.4), ("position", 0.6), ("size", 0.8))},
        "semantic_retrieval": {"top1": 0.3, "top5": 0.7, "r2": 0.05}}))
    row = runner.collect(spec, str(run_dir), runner.num_documents(str(data_dir), 500))
    assert row["docs_seen"] == 600 and row["epochs"] == pytest.approx(0.6)
    assert row["final_text"] == pytest.approx(2.0) and row["final_loss"] == pytest.approx(2.1)
    assert row["final_pixel"] is None and row["retrieval_top1"] == 0.3
    assert row["probe_mean"] == pytest.approx(0.5)
    assert row["final_semantic_r2"] == pytest.approx(0.2) and row["final_pixel_r2"] is None
    assert (row["retrieval_top5"], row["retrieval_r2"]) == (0.7, 0.05)


def test_cli_report_only_from_finished_runs(tmp_path, capsys):
    work = tmp_path / "work"
    for r in _hand_made_results():
        spec = runner.RunSpec(r["arm"], r["data_size"], r["seed"], runner.steps_for(r["data_size"], 0.1, 20))
        d = work / spec.name
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(dict(r, steps=spec.steps)))
    out = tmp_path / "out"
    rc = cli.main(["--arms", "und_only,semantic,pixel_shared", "--data-sizes", "500,1000,2000", "--seeds", "0,1",
                   "--work-dir", str(work), "--data", str(tmp_path / "nodata"), "--output", str(out),
                   "--report-only"])
    assert rc == 0
    assert {"results.csv", "results.md", "understanding.png"} <= set(os.listdir(out))
    assert "18 of 18 planned" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        cli.main(["--arms", "nonsense", "--dry-run"])
