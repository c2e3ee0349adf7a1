"""The ablation on any data and launcher (tools/run_ablation.py): a VLMEvalKit-style TSV as the
held-out set, the first-N subsets of arbitrary shards, the SLURM array it would submit, resume,
and one real tiny sweep (train + evaluate subprocesses) with a pretrained encoder
(tools/pretrain_vision_encoder.py), whose metrics.jsonl must hold the diagnostics."""

import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

from megatron_unihetero.ablation import cli, runner
from megatron_unihetero.eval.data import read_vlmeval_tsv

TSV_COLUMNS = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer"]


def _png_b64(colour, size=40):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(TSV_COLUMNS)
        for row in rows:
            writer.writerow(row)
    return str(path)


def _good_rows():
    red, blue = _png_b64((200, 30, 30)), _png_b64((30, 30, 200))
    return [
        ["10", red, "what colour is the picture?", "", "red", "blue", "green", "yellow", "A"],
        # VLMEvalKit writes a repeated image as the index of the row that holds it.
        ["11", "10", "is it\tdark?", "Look closely.", "yes", "no", "", "", "B"],
        ["12", blue, "what colour is the picture?", "nan", "red", "blue", "green", "", "B"],
    ]


def test_vlmeval_tsv_rows_become_scored_questions(tmp_path):
    rows = read_vlmeval_tsv(write_tsv(tmp_path / "mc.tsv", _good_rows()))
    assert [r["id"] for r in rows] == ["10", "11", "12"]
    assert rows[0]["candidates"] == ["red", "blue", "green", "yellow"] and rows[0]["answer"] == "red"
    assert rows[1]["image"] == rows[0]["image"]  # the reference resolved to row 10's bytes
    assert rows[1]["candidates"] == ["yes", "no"] and rows[1]["answer"] == "no"  # empty C, D: absent
    assert rows[1]["question"] == "Look closely. is it\tdark?"  # the hint first, as VLMEvalKit does
    assert rows[2]["candidates"] == ["red", "blue", "green"] and rows[2]["answer"] == "blue"
    assert len(read_vlmeval_tsv(str(tmp_path / "mc.tsv"), max_samples=2)) == 2
    with Image.open(io.BytesIO(rows[2]["image"])) as img:
        assert img.size == (40, 40)


@pytest.mark.parametrize("change, message", [
    (lambda r: r[0].__setitem__(8, "E"), r"line 2 \(index '10'\): field 'answer' is 'E'"),
    (lambda r: r[1].__setitem__(8, "C"), r"line 3 \(index '11'\): field 'answer' is 'C'"),
    (lambda r: r[2].__setitem__(1, "not base64!"), r"line 4 \(index '12'\): field 'image' is not base64"),
    (lambda r: r[2].__setitem__(1, base64.b64encode(b"\x89PNG\r\n\x1a\n cut").decode()),
     r"line 4 \(index '12'\): field 'image' does not decode"),
    (lambda r: r[0].__setitem__(2, " "), r"line 2 \(index '10'\): field 'question' is empty"),
    (lambda r: r[0].__setitem__(5, "red"), r"line 2 \(index '10'\): two options have the same text"),
    (lambda r: r[1].append("extra"), r"line 3 \(index '11'\): 10 fields for 9 columns"),
])
def test_a_malformed_tsv_row_is_named(tmp_path, change, message):
    rows = _good_rows()
    change(rows)
    path = write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(ValueError, match=message) as info:
        read_vlmeval_tsv(path)
    assert "bad.tsv" in str(info.value)


def test_a_tsv_without_the_columns_is_refused(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("index\timage\tquestion\n1\tabc\tq\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['answer'\]"):
        read_vlmeval_tsv(str(path))


def _shards(tmp_path, tokenizer):
    """Two preprocessed shard sets (pixels and encoded stores share nothing with run_ablation's
    demo preparation): 12 caption samples, then 12 more."""
    import pyarrow.parquet as pq

    from megatron_unihetero.data.demo_world import write_demo_data
    from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
    from megatron_unihetero.data.preprocess.samples import SampleConfig

    write_demo_data(str(tmp_path / "raw"), 24, seed=11, image_size=32, valid_fraction=0.0)
    table = pq.read_table(tmp_path / "raw" / "train.parquet")
    prefixes = []
    for part in range(2):
        path = str(tmp_path / f"part{part}.parquet")
        pq.write_table(table.slice(12 * part, 12), path)
        prefix = str(tmp_path / "shards" / f"part{part}")
        run_preprocess(PreprocessConfig(inputs=[path], output_prefix=prefix, tokenizer_model=tokenizer,
                                        sample=SampleConfig(template="caption", image_size=32),
                                        workers=1, progress=False))
        prefixes.append(prefix)
    return prefixes


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer

    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_subsets_are_the_first_n_samples_across_shards(tmp_path, tokenizer):
    from megatron_unihetero.data.shards import ShardReader, list_shards

    prefixes = _shards(tmp_path, tokenizer)
    originals = [ShardReader(s) for p in prefixes for s in list_shards(p)]
    flat = [(r, i) for r in originals for i in range(len(r))]
    assert len(flat) == 24
    source = runner.DataSource(str(tmp_path / "subsets"), prefixes, tokenizer, "held.tsv")
    source.prepare([5, 17], log=lambda m: None)
    for size in (5, 17):  # 17 crosses from the first shard set into the second
        sub = ShardReader(source.subset_prefix(size))
        assert len(sub) == size == source.documents(size)
        for i in range(size):
            reader, j = flat[i]
            assert sub.tokens(i).tolist() == reader.tokens(j).tolist()
            assert (sub.images(i) == reader.images(j)).all()
        assert sub.metadata["tokenizer"] == originals[0].metadata["tokenizer"]
    mtime = os.path.getmtime(source.subset_prefix(5) + ".json")
    source.prepare([5], log=lambda m: None)  # made once
    assert os.path.getmtime(source.subset_prefix(5) + ".json") == mtime
    with pytest.raises(ValueError, match="data size 25 exceeds the 24 samples"):
        runner.write_subset(prefixes, 25, str(tmp_path / "too_many"))
    with pytest.raises(FileNotFoundError, match="no finished shard"):
        runner.write_subset([str(tmp_path / "nothing")], 1, str(tmp_path / "none"))


def _finish(work, spec):
    d = work / spec.name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"arm": spec.arm, "data_size": spec.data_size,
                                               "seed": spec.seed, "steps": spec.steps,
                                               "answer_accuracy": 0.5}))


def test_slurm_dry_run_prints_one_array_task_per_unfinished_run(tmp_path, capsys):
    work = tmp_path / "work"
    specs = runner.plan(["und_only", "semantic_ema"], [100, 200], [0, 1], 0.1, 20)
    _finish(work, specs[1])  # a finished run is not submitted again
    rc = cli.main(["--launcher", "slurm", "--dry-run", "--arms", "und_only,semantic_ema",
                   "--data-sizes", "100,200", "--seeds", "0,1", "--work-dir", str(work),
                   "--data", str(tmp_path / "data"), "--slurm-partition", "gpu", "--slurm-gpus-per-task", "2",
                   "--nproc-per-node", "2", "--slurm-max-parallel", "3", "--slurm-extra=--qos=low",
                   "--override", "train.lr=3e-4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-6%3" in out and "7 of 8 runs" in out
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=2", "#SBATCH --qos=low",
                 "--task-index \"$SLURM_ARRAY_TASK_ID\""):
        assert line in out, line
    tasks = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("# task ")]
    assert tasks == [s.name for s in specs if s is not specs[1]]
    assert not (work / "slurm").exists()  # a dry run writes nothing
    # The plan a task reads: its run's train command (torchrun with 2 ranks, the override).
    opts = runner.RunOptions(str(work), runner.DataSource(str(tmp_path / "data")), launcher="torchrun",
                             nproc_per_node=2, overrides=["--train.lr=3e-4"])
    runner.write_plan(str(tmp_path / "plan.json"), specs, opts)
    back_specs, back = runner.read_plan(str(tmp_path / "plan.json"))
    assert back_specs == specs and back == opts
    cmd = runner.train_command(specs[0], back, str(work / specs[0].name))
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-1] == "--train.lr=3e-4" and f"--train.seed={specs[0].seed}" in cmd
    # A task of a finished run returns without running anything.
    assert cli.main(["--run-task", str(tmp_path / "plan.json"), "--task-index", "1"]) == 0
    assert "already done" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--run-task", str(tmp_path / "plan.json"), "--task-index", "8"])


def test_local_dry_run_marks_finished_runs(tmp_path, capsys):
    work = tmp_path / "work"
    specs = runner.plan(["semantic"], [100], [0, 1], 0.1, 20)
    _finish(work, specs[0])
    assert cli.main(["--dry-run", "--arms", "semantic", "--data-sizes", "100", "--seeds", "0,1",
                     "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"{specs[0].name}  (finished)" in out and "2 runs, 1 to run" in out
    with pytest.raises(SystemExit):  # shards without a held-out set
        cli.main(["--dry-run", "--train-shards", "x", "--tokenizer", "t"])


def test_tiny_sweep_on_shards_and_a_tsv_with_a_pretrained_encoder(tmp_path, tokenizer, capsys):
    """The whole path, one real run: a tiny self-supervised encoder saved for transformers,
    loaded frozen by the semantic arm, trained on a non-demo shard subset, evaluated on a
    VLMEvalKit TSV; the diagnostics in metrics.jsonl and eval.json; a rerun reuses it."""
    import torch
    from transformers import Dinov2Model

    from megatron_unihetero.ablation import vision_pretrain as vp

    cfg = vp.PretrainConfig(steps=2, batch_size=8, num_images=16, warmup_steps=1)
    model, record = vp.pretrain(cfg, log=lambda m: None)
    encoder = str(tmp_path / "encoder")
    vp.save_encoder(model, encoder, record)
    loaded = Dinov2Model.from_pretrained(encoder)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vp.patch_features(loaded.eval(), pixels), vp.patch_features(model, pixels))

    prefixes = _shards(tmp_path, tokenizer)
    held_out = write_tsv(tmp_path / "mc.tsv", _good_rows())
    argv = ["--arms", "semantic", "--data-sizes", "20", "--seeds", "0", "--min-steps", "3",
            "--steps-per-sample", "0.01", "--eval-samples", "3", "--train-shards", *prefixes,
            "--tokenizer", tokenizer, "--held-out", held_out, "--vision-encoder", encoder,
            "--work-dir", str(tmp_path / "work"), "--data", str(tmp_path / "subsets"),
            "--output", str(tmp_path / "report"), "--override", "data.micro_batch_size=2",
            "--override", "data.num_workers=0"]
    assert cli.main(argv) == 0
    spec = runner.plan(["semantic"], [20], [0], 0.01, 3)[0]
    run_dir = tmp_path / "work" / spec.name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3
    for key in ("semantic_r2", "semantic_cos", "semantic_baseline_cos", "semantic_mse",
                "semantic_baseline_mse", "semantic_pred_var", "semantic_target_norm",
                "embed_norm_visual", "embed_norm_text"):
        assert all(isinstance(r.get(key), float) for r in train), key
    assert not any(k.startswith("stats/") for r in train for k in r)
    assert all(r["semantic_r2"] <= 1.0 and r["embed_norm_visual"] > 0 for r in train)
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["num_samples"] == 3 and 0.0 <= ev["answer_accuracy"] <= 1.0
    assert ev["chance_accuracy"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 3) / 3)
    assert "caption_perplexity" not in ev and "probes" not in ev  # a TSV has neither
    retrieval = ev["semantic_retrieval"]
    assert retrieval["num_predictions"] == 3 * 16 and retrieval["top1"] <= retrieval["top5"]
    for key in ("r2", "cos", "baseline_cos", "mse", "baseline_mse"):
        assert isinstance(retrieval[key], float), key
    assert not (run_dir / "checkpoints").exists()  # removed once evaluated (no --keep-checkpoints)
    train_log = (run_dir / "train.log").read_text()
    assert f"--model.vision.path={os.path.abspath(encoder)}" in train_log
    result = json.loads((run_dir / "result.json").read_text())
    assert isinstance(result["final_semantic_r2"], float) and result["retrieval_top5"] == retrieval["top5"]
    assert "semantic R²" in (tmp_path / "report" / "results.md").read_text()
    capsys.readouterr()
    assert cli.main(argv) == 0  # resume: the finished run is reused, not retrained
    assert "already done" in capsys.readouterr().out
    assert (run_dir / "train.log").read_text() == train_log
