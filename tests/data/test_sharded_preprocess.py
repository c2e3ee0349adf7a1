"""K independent preprocessing jobs (--num-shards K --shard-index I) + merge == one job."""

import importlib.util
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_unihetero.data.preprocess.fixtures import png_bytes, train_tiny_tokenizer, write_jsonl
from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, job_plan, part_prefix, run_preprocess
from megatron_unihetero.data.preprocess.samples import SampleConfig
from megatron_unihetero.data.shards import ShardReader, list_shards

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _merge_tool():
    spec = importlib.util.spec_from_file_location("merge_shards_tool", os.path.join(ROOT, "tools", "merge_shards.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    tok = train_tiny_tokenizer(str(root))
    files = []
    for f in range(2):  # parquet files with several row groups (rows mode skips whole groups)
        rows = [{"image": png_bytes(f * 100 + i), "caption": f"file {f} row {i} a red circle"} for i in range(11)]
        rows[3]["image"] = b"not an image"  # a reject in every file
        path = str(root / f"p{f}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
        files.append(path)
    (root / "img").mkdir()
    for i in range(7):
        (root / "img" / f"{i}.png").write_bytes(png_bytes(500 + i))
    files.append(write_jsonl(str(root / "j.jsonl"), [{"image": f"{i}.png", "caption": f"jsonl {i}"} for i in range(7)],
                             raw_lines={5: "{broken json"}))
    return {"root": root, "tok": tok, "files": files}


def _cfg(env, inputs, prefix, **kw):
    return PreprocessConfig(inputs=inputs, output_prefix=str(env["root"] / prefix), tokenizer_model=env["tok"],
                            sample=SampleConfig(image_size=16, image_path_root=str(env["root"] / "img")),
                            progress=False, chunk_size=3, shard_size_mb=0.004, max_reject_fraction=1.0, **kw)


def _samples(prefix):
    out = []
    for shard in list_shards(prefix):
        r = ShardReader(shard)
        out += [(r.tokens(i).tolist(), r.encoded_images(i), r.loss_mask(i).tolist()) for i in range(len(r))]
    return out


@pytest.mark.parametrize("split_by, inputs", [("rows", slice(0, 3)), ("files", slice(0, 3))])
def test_k_jobs_merged_equal_one_job(env, split_by, inputs):
    files = env["files"][inputs]
    k = 4 if split_by == "rows" else 3
    single = run_preprocess(_cfg(env, files, f"{split_by}/one"))
    assert len(single["shards"]) > 1 and single["rejected"] == 3
    parts = []
    for i in range(k):
        s = run_preprocess(_cfg(env, files, f"{split_by}/ds", num_shards=k, shard_index=i, split_by=split_by))
        parts.append(s)
        assert all(os.path.basename(p).startswith(f"ds.part{i:05d}-of-{k:05d}_") for p in s["shards"])
    assert sum(p["rows"] for p in parts) == single["rows"] == 29
    if split_by == "rows":
        assert [p["rows"] for p in parts] == [7, 7, 7, 8]  # rows split evenly across file boundaries
    merged = str(env["root"] / split_by / "merged")
    assert _merge_tool()(["--input", str(env["root"] / split_by / "ds"), "--num-parts", str(k),
                          "--output-prefix", merged]) == 0
    one, joined = _samples(str(env["root"] / split_by / "one")), _samples(merged)
    assert len(joined) == len(one) == single["samples"] == 26
    assert joined == one  # token ids, encoded image bytes and masks, in the single job's order
    summary = json.load(open(merged + ".summary.json"))
    assert summary["rows"] == 29 and summary["rejects_by_reason"] == single["rejects_by_reason"]
    rejects = [json.loads(line) for line in open(merged + ".rejects.jsonl")]
    single_rejects = [json.loads(line) for line in open(single["rejects_file"])]
    assert [(r["file"], r["row"], r["reason"]) for r in rejects] == \
        [(r["file"], r["row"], r["reason"]) for r in single_rejects]


def test_job_plans_and_errors(env):
    files = env["files"]
    plans = [job_plan(_cfg(env, files, "x", num_shards=2, shard_index=i, split_by="rows")) for i in range(2)]
    assert plans[0] == [(files[0], (0, 11)), (files[1], (0, 3))]
    assert plans[1] == [(files[1], (3, 11)), (files[2], (0, 7))]
    assert job_plan(_cfg(env, files, "x", num_shards=3, shard_index=2)) == [(files[2], None)]  # auto: files
    with pytest.raises(ValueError, match="need at least 4 input files"):
        job_plan(_cfg(env, files, "x", num_shards=4, shard_index=0, split_by="files"))
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, num_shards=2\)"):
        _cfg(env, files, "x", num_shards=2, shard_index=2)
    assert part_prefix("/d/train", 1, 4) == "/d/train.part00001-of-00004"
    with pytest.raises(FileNotFoundError, match="2 of 2 parts of .* have not finished"):
        _merge_tool()(["--input", str(env["root"] / "nothing"), "--num-parts", "2", "--output-prefix",
                       str(env["root"] / "m")])
