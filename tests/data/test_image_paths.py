"""Image paths written in a data file are read only inside --image-root, only from regular
files, and only up to --max-image-bytes: each planted path is a named, counted reject, the good
rows are kept, and nothing blocks (a FIFO) or floods (/dev/zero)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
from megatron_unihetero.data.preprocess.images import ImageError, PathPolicy
from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
from megatron_unihetero.data.preprocess.samples import SampleConfig

SIZE = 16


def _png(path, size):
    rng = np.random.default_rng(size)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, format="PNG")
    return os.path.getsize(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("paths")
    root = base / "images"
    root.mkdir()
    small = _png(root / "ok.png", 20)
    big = _png(root / "big.png", 96)
    outside = base / "outside.png"
    _png(outside, 20)
    os.symlink(outside, root / "link.png")
    os.mkfifo(root / "pipe.png")
    (root / "folder.png").mkdir()
    return {"base": base, "root": str(root), "outside": str(outside), "small": small, "big": big,
            "tok": train_tiny_tokenizer(str(base))}


def _run(env, name, images, **sample):
    path = env["base"] / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"image": image, "caption": "a red circle"}) + "\n"
                            for image in images))
    cfg = PreprocessConfig(inputs=[str(path)], output_prefix=str(env["base"] / name),
                           tokenizer_model=env["tok"], input_format="jsonl", progress=False,
                           max_reject_fraction=1.0,
                           sample=SampleConfig(image_size=SIZE, image_path_root=env["root"], **sample))
    summary = run_preprocess(cfg)
    rejects = {r["row"]: r for r in map(json.loads, open(summary["rejects_file"]))}
    return summary, rejects


def test_planted_paths_are_named_rejects_and_good_rows_are_kept(env):
    images = ["ok.png", "../outside.png", env["outside"], "link.png", "/dev/zero", "pipe.png",
              "folder.png", "big.png", "ok.png"]
    summary, rejects = _run(env, "planted", images,
                            max_image_bytes=(env["small"] + env["big"]) // 2)
    assert summary["samples"] == 2 and sorted(rejects) == [1, 2, 3, 4, 5, 6, 7]
    assert summary["rejects_by_reason"] == {"path_outside_root": 4, "not_a_regular_file": 2,
                                            "image_too_large": 1}
    assert "outside --image-root" in rejects[1]["detail"] and env["outside"] in rejects[3]["detail"]
    assert "pipe.png is not a regular file" in rejects[5]["detail"]
    assert "more than --max-image-bytes" in rejects[7]["detail"]


def test_trusted_data_may_leave_the_root_but_never_reads_a_device(env):
    summary, rejects = _run(env, "trusted", ["../outside.png", env["outside"], "/dev/zero"],
                            allow_paths_outside_root=True)
    assert summary["samples"] == 2
    assert rejects[2]["reason"] == "not_a_regular_file" and "/dev/zero" in rejects[2]["detail"]


def test_a_path_without_a_root_is_refused_unless_trusted(env):
    with pytest.raises(ImageError, match="no --image-root") as info:
        PathPolicy().resolve("ok.png")
    assert info.value.reason == "path_outside_root"
    assert PathPolicy(allow_outside_root=True).resolve("ok.png") == "ok.png"
