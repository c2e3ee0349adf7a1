"""Bad input: every kind is skipped, counted and listed; good rows survive; exit codes; interrupts."""

import importlib.util
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_unihetero.data.preprocess import pipeline
from megatron_unihetero.data.preprocess.fixtures import png_bytes, train_tiny_tokenizer, write_jsonl
from megatron_unihetero.data.preprocess.images import decode_image
from megatron_unihetero.data.shards import ShardReader, ShardWriter, list_shards
from megatron_unihetero.data.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16


def _load_cli():
    spec = importlib.util.spec_from_file_location("preprocess_data_cli", os.path.join(ROOT, "tools", "preprocess_data.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bad_jsonl(tmp_path_factory):
    """Good rows interleaved with one row of every bad kind; returns (path, tokenizer, good rows by row number)."""
    root = tmp_path_factory.mktemp("rejects")
    tok_path = train_tiny_tokenizer(str(root))
    imgs = root / "imgs"
    imgs.mkdir()
    good = png_bytes(1)
    (imgs / "good.png").write_bytes(good)
    (imgs / "truncated.png").write_bytes(good[: len(good) // 2])
    (imgs / "garbage.jpg").write_bytes(b"this is not an image at all")
    rows = [
        {"image": "good.png", "caption": "a red circle"},              # 0 ok
        {"image": "truncated.png", "caption": "a red circle"},         # 1 bad_image (truncated)
        {"image": "good.png", "caption": "a blue square"},             # 2 ok
        {"image": "garbage.jpg", "caption": "a red circle"},           # 3 bad_image (not an image)
        {"image": "missing.png", "caption": "a red circle"},           # 4 missing_image_file
        {"caption": "a red circle"},                                   # 5 missing_column (image)
        {"image": "good.png"},                                         # 6 missing_column (text)
        {"image": "good.png", "caption": "   "},                       # 7 empty_text
        {"image": "good.png", "caption": 123},                         # 8 wrong_type
        {"image": "good.png", "caption": "a red circle " * 50},        # 9 too_long
        None,                                                          # 10 bad_json (raw line below)
        [1, 2],                                                        # 11 wrong_type (not an object)
        {"image": "good.png", "caption": "a green triangle"},          # 12 ok
    ]
    path = write_jsonl(str(root / "mixed.jsonl"), rows, raw_lines={10: '{"image": "good.png", "caption": '})
    expected = {1: "bad_image", 3: "bad_image", 4: "missing_image_file", 5: "missing_column", 6: "missing_column",
                7: "empty_text", 8: "wrong_type", 9: "too_long", 10: "bad_json", 11: "wrong_type"}
    return {"root": root, "path": path, "tok_path": tok_path, "imgs": str(imgs), "rows": rows, "expected": expected}


def _argv(env, prefix, *extra):
    return ["--input", env["path"], "--output-prefix", str(env["root"] / prefix), "--tokenizer-model", env["tok_path"],
            "--image-size", str(SIZE), "--image-path-root", env["imgs"], "--max-text-tokens", "40",
            "--no-progress", *extra]


def test_every_bad_kind_is_counted_listed_and_neighbours_survive(bad_jsonl, capsys):
    env = bad_jsonl
    cli = _load_cli()
    code = cli.main(_argv(env, "strict"))
    out = capsys.readouterr().out
    assert code == 1, "10 of 13 rows rejected is above the default 1% limit"
    assert "FAILED" in out and "bad_image: 2" in out and "too_long: 1" in out
    rejects = [json.loads(line) for line in open(str(env["root"] / "strict.rejects.jsonl"))]
    assert {r["row"]: r["reason"] for r in rejects} == env["expected"]
    assert all(r["file"] == env["path"] and r["detail"] for r in rejects)
    assert "missing.png" in next(r["detail"] for r in rejects if r["reason"] == "missing_image_file")
    assert "'caption'" in next(r["detail"] for r in rejects if r["row"] == 6)  # names the field
    summary = json.load(open(str(env["root"] / "strict.summary.json")))
    assert summary["rows"] == 13 and summary["samples"] == 3 and summary["rejected"] == 10
    # the good rows are all there, intact, in order
    tok = build_tokenizer(env["tok_path"])
    r = ShardReader(list_shards(str(env["root"] / "strict"))[0])
    assert len(r) == 3
    want_img = decode_image(png_bytes(1), SIZE)
    for i, row in enumerate([0, 2, 12]):
        assert tok.decode(r.tokens(i)).endswith(env["rows"][row]["caption"])
        assert np.array_equal(r.images(i)[0], want_img)


def test_exit_code_follows_max_reject_fraction(bad_jsonl):
    cli = _load_cli()
    assert cli.main(_argv(bad_jsonl, "lenient", "--max-reject-fraction", "0.8")) == 0
    assert cli.main(_argv(bad_jsonl, "tight", "--max-reject-fraction", "0.7")) == 1


def test_bad_image_bytes_in_parquet(bad_jsonl):
    env = bad_jsonl
    good = png_bytes(3)
    rows = [{"image": good, "caption": "ok one"}, {"image": good[:40], "caption": "cut"},
            {"image": b"", "caption": "empty"}, {"image": "a string path", "caption": "nope"}, {"image": good, "caption": "ok two"}]
    path = str(env["root"] / "bytes.parquet")
    pq.write_table(pa.Table.from_pylist([{**r, "image": r["image"] if isinstance(r["image"], bytes) else None} for r in rows]
                                        + [{"image": None, "caption": "null image"}]), path)
    cfg = pipeline.PreprocessConfig(inputs=[path], output_prefix=str(env["root"] / "pq"), tokenizer_model=env["tok_path"],
                                    sample=pipeline.SampleConfig(image_size=SIZE), progress=False, max_reject_fraction=1.0)
    summary = pipeline.run_preprocess(cfg)
    assert summary["samples"] == 2  # rows 0 and 4; the string path became a null (a binary column)
    assert summary["rejects_by_reason"] == {"bad_image": 2, "missing_column": 2}


def test_interrupted_writer_leaves_no_final_files(tmp_path):
    prefix = str(tmp_path / "ds_00000")
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(prefix, image_size=4) as w:
            w.add_sample(np.array([1, 2, 3]), [np.zeros((4, 4, 3), np.uint8)])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    assert list_shards(str(tmp_path / "ds")) == []


def test_interrupted_preprocessing_leaves_no_whole_looking_shard(bad_jsonl, monkeypatch):
    env = bad_jsonl
    calls = {"n": 0}
    real_add = ShardWriter.add_sample

    def flaky_add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through a shard
        return real_add(self, *a, **kw)

    monkeypatch.setattr(ShardWriter, "add_sample", flaky_add)
    cfg = pipeline.PreprocessConfig(inputs=[env["path"]], output_prefix=str(env["root"] / "cut" / "ds"), tokenizer_model=env["tok_path"],
                                    sample=pipeline.SampleConfig(image_size=SIZE, image_path_root=env["imgs"]), progress=False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_preprocess(cfg)
    left = os.listdir(str(env["root"] / "cut"))
    assert list_shards(str(env["root"] / "cut" / "ds")) == []
    assert not [f for f in left if f.startswith("ds_")], left


def test_dead_worker_fails_the_run_instead_of_hanging():
    # os._exit kills the worker mid-task; multiprocessing.Pool then drops the task silently.
    results = pipeline.ordered_map(os._exit, [3], workers=2, init=len, initarg=[], window=2, timeout=2)
    with pytest.raises(RuntimeError, match="did not finish"):
        list(results)
