"""The shapes-world demo data: determinism, content, splits, speed."""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from megatron_unihetero.data import demo_world as dw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    dw.write_demo_data(str(a), 50, seed=7)
    dw.write_demo_data(str(b), 50, seed=7)
    dw.write_demo_data(str(c), 50, seed=8)
    for split in ("train", "valid"):
        assert (a / f"{split}.parquet").read_bytes() == (b / f"{split}.parquet").read_bytes()
    assert (a / "train.parquet").read_bytes() != (c / "train.parquet").read_bytes()
    # a sample does not depend on how many were generated before it
    assert dw.make_sample(7, 3) == dw.make_sample(7, 3)


def test_rows_are_consistent(tmp_path):
    counts = dw.write_demo_data(str(tmp_path), 200, seed=0, image_size=48, valid_fraction=0.25)
    assert counts == {"train": 150, "valid": 50}
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert len(rows) == 150
    for r in rows:
        objects = json.loads(r["objects"])
        assert 1 <= len(objects) == r["num_objects"] <= 3
        assert r["answer"] in r["candidates"]
        assert r["question"].endswith("?")
        for o in objects:
            assert dw.describe(o) in r["caption"]
        first = objects[0]
        assert (r["shape"], r["colour"], r["size"], r["position"]) == (first["shape"], first["colour"], first["size"], first["position"])
        assert len({o["position"] for o in objects}) == len(objects)  # distinct cells
        img = Image.open(io.BytesIO(r["image"]))
        assert img.size == (48, 48) and img.mode == "RGB"
    assert len({r["question_type"] for r in rows}) >= 5  # every question kind shows up
    valid_ids = {r["id"] for r in pq.read_table(tmp_path / "valid.parquet").to_pylist()}
    assert not valid_ids & {r["id"] for r in rows}


def test_objects_are_drawn_where_and_how_the_caption_says():
    s = dw.make_sample(seed=3, index=11, image_size=96)
    img = np.asarray(Image.open(io.BytesIO(s["image"])))
    for o in json.loads(s["objects"]):
        row = next(i for i in range(3) for j in range(3) if dw.position_name(i, j) == o["position"])
        col = next(j for j in range(3) if dw.position_name(row, j) == o["position"])
        cy, cx = int((row + 0.5) * 32), int((col + 0.5) * 32)
        assert tuple(img[cy, cx]) == dw.COLOURS[o["colour"]], o  # every shape covers its centre


def test_cli_makes_2000_samples_in_seconds(tmp_path):
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), "--output", str(tmp_path),
                          "--num-samples", "2000", "--seed", "1"], capture_output=True, text=True, check=True)
    assert time.time() - t0 < 20, "demo data generation became slow"
    assert "1800 train + 200 valid" in out.stdout
    assert pq.ParquetFile(tmp_path / "train.parquet").num_row_groups > 1  # streaming gets exercised
