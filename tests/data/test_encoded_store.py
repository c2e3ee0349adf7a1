"""The encoded image store: what preprocessing writes, what the reader decodes, what it rejects."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_unihetero.data.preprocess.fixtures import train_tiny_tokenizer
from megatron_unihetero.data.preprocess.images import decode_image
from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
from megatron_unihetero.data.preprocess.samples import SampleConfig
from megatron_unihetero.data.shards import ShardError, ShardReader, ShardWriter, list_shards
from megatron_unihetero.data.synthetic_shards import TOKENIZER

SIZE = 16
IMG = TOKENIZER["image_token_id"]


def smooth_image(seed, w, h):
    """A photo-like image (smooth gradients): JPEG's error on it is what its quality says."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    channels = [128 + 100 * np.sin(x / rng.uniform(4, 9) + y / rng.uniform(5, 11) + rng.uniform(0, 6))
                for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def encode(pixels, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {"root": root, "tok": train_tiny_tokenizer(str(root))}


def preprocess(env, images, name, size=SIZE, **kw):
    """One caption row per image (bytes); returns (summary, [stored bytes], [decoded pixels])."""
    path = str(env["root"] / f"{name}.parquet")
    pq.write_table(pa.Table.from_pylist([{"image": b, "caption": f"a picture {i}"} for i, b in enumerate(images)]), path)
    sample = SampleConfig(image_size=size, **{k: kw.pop(k) for k in ("image_format", "jpeg_quality") if k in kw})
    cfg = PreprocessConfig(inputs=[path], output_prefix=str(env["root"] / name), tokenizer_model=env["tok"],
                           sample=sample, progress=False, **kw)
    summary = run_preprocess(cfg)
    stored, decoded = [], []
    for shard in list_shards(cfg.output_prefix):
        r = ShardReader(shard)
        for i in range(len(r)):
            if r.metadata["image_store"] == "encoded":
                stored += r.encoded_images(i)
            decoded += list(r.images(i))
    return summary, stored, decoded


def test_lossless_sources_decode_exactly_to_the_pixels_store(env):
    wrong_size = [encode(smooth_image(i, 40, 30), "PNG") for i in range(3)]
    right_size = [encode(smooth_image(9, SIZE, SIZE), "PNG")]
    summary, stored, decoded = preprocess(env, wrong_size + right_size, "png")
    assert summary["image_store"] == "encoded" and summary["rejected"] == 0
    for src, got in zip(wrong_size + right_size, decoded):
        assert got.dtype == np.uint8 and np.array_equal(got, decode_image(src, SIZE))
    assert stored[3] == right_size[0]  # already 16x16 PNG: the source file itself
    assert all(Image.open(io.BytesIO(b)).format == "PNG" for b in stored)  # auto: lossless stays lossless
    meta = ShardReader(list_shards(str(env["root"] / "png"))[0]).metadata
    assert meta["format_version"] == 2 and meta["image_encoding"]["format"] == "auto"
    _, webp, webp_decoded = preprocess(env, wrong_size, "webp", image_format="webp")
    assert all(Image.open(io.BytesIO(b)).format == "WEBP" for b in webp)
    assert all(np.array_equal(a, decode_image(s, SIZE)) for a, s in zip(webp_decoded, wrong_size))


def test_jpeg_reencoded_within_its_quality(env):
    sources = [encode(smooth_image(i, 48, 36), "JPEG", quality=95) for i in range(4)]
    errors = {}
    for q in (95, 40):
        _, stored, decoded = preprocess(env, sources, f"jpeg{q}", jpeg_quality=q)
        assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b in stored)
        diff = np.concatenate([np.abs(d.astype(int) - decode_image(s, SIZE).astype(int)).ravel()
                               for d, s in zip(decoded, sources)])
        errors[q] = diff.mean()
    assert errors[95] < 2.5, errors  # quality 95: about two grey levels on average at 16 px
    assert errors[40] > errors[95]  # the quality option is honoured
    # Already 16x16 JPEG: kept byte for byte (no second lossy pass).
    exact = encode(smooth_image(7, SIZE, SIZE), "JPEG", quality=80)
    _, stored, decoded = preprocess(env, [exact], "jpeg_kept")
    assert stored == [exact] and np.array_equal(decoded[0], decode_image(exact, SIZE))


def test_encoded_is_smaller_than_pixels(env):
    # 64 px: at 16 px a JPEG's headers (~600 bytes) outweigh its 768 pixel bytes.
    sources = [encode(smooth_image(i, 80, 64), "JPEG", quality=90) for i in range(6)]
    enc, _, _ = preprocess(env, sources, "size_enc", size=64)
    pix, _, _ = preprocess(env, sources, "size_pix", size=64, image_store="pixels")
    assert pix["image_bytes"] == 6 * 64 * 64 * 3
    assert enc["image_bytes"] < pix["image_bytes"] / 1.5 and enc["images"] == pix["images"] == 6


def _encoded_shard(tmp_path, images):
    prefix = str(tmp_path / "s")
    with ShardWriter(prefix, image_store="encoded", image_size=8, metadata={"tokenizer": TOKENIZER}) as w:
        for b in images:
            w.add_sample(np.asarray([1, 3, IMG, 5, 9, 2], np.int32), [b])
        w.finalize()
    return prefix


def test_writer_refuses_wrong_size_or_format(tmp_path):
    with ShardWriter(str(tmp_path / "w"), image_store="encoded", image_size=8, metadata={"tokenizer": TOKENIZER}) as w:
        with pytest.raises(ValueError, match=r"sample 0: encoded image is PNG \(9, 8\)"):
            w.add_sample(np.asarray([1, 3, IMG, 5, 2], np.int32), [encode(np.zeros((8, 9, 3), np.uint8), "PNG")])
        with pytest.raises(ValueError, match="sample 0: encoded image is not a JPEG/PNG/WEBP image"):
            w.add_sample(np.asarray([1, 3, IMG, 5, 2], np.int32), [encode(np.zeros((8, 8, 3), np.uint8), "BMP")])
        with pytest.raises(ValueError, match="non-empty bytes"):
            w.add_sample(np.asarray([1, 3, IMG, 5, 2], np.int32), [np.zeros((8, 8, 3), np.uint8)])


def test_damaged_encoded_shards_name_the_file(tmp_path):
    good = encode(smooth_image(1, 8, 8), "PNG")
    prefix = _encoded_shard(tmp_path, [good, good])
    assert np.array_equal(ShardReader(prefix).images(1)[0], smooth_image(1, 8, 8))
    bin_path = prefix + ".encoded.bin"
    data = bytearray(open(bin_path, "rb").read())
    # Damage the second image's data (past its header): found when that image is decoded.
    data[len(good) + len(good) // 2:len(good) + len(good) // 2 + 8] = b"\xff" * 8
    open(bin_path, "wb").write(bytes(data))
    reader = ShardReader(prefix)
    reader.images(0)
    with pytest.raises(ShardError, match=rf"{bin_path}: image 1 cannot be decoded"):
        reader.images(1)
    # A wrong image_size in the json: caught when the shard is opened, from the first image.
    import json
    meta = json.load(open(prefix + ".json"))
    json.dump({**meta, "image_size": 16}, open(prefix + ".json", "w"))
    with pytest.raises(ShardError, match=rf"{bin_path}: image 0 is PNG 8x8, expected .* at 16x16"):
        ShardReader(prefix)
    json.dump(meta, open(prefix + ".json", "w"))
    with open(bin_path, "r+b") as f:  # and the usual size checks hold for the new file kind
        f.truncate(os.path.getsize(bin_path) - 3)
    with pytest.raises(ShardError, match=rf"{bin_path}: size .* truncated"):
        ShardReader(prefix)
