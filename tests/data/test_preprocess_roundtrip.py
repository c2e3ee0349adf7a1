"""Preprocessing round trips: rows in = samples out, byte-for-byte, for every input kind."""

import filecmp
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_unihetero.data.demo_world import write_demo_data
from megatron_unihetero.data.preprocess.fixtures import (png_bytes, save_tiny_dinov2, train_tiny_tokenizer,
                                                        write_jsonl, write_webdataset)
from megatron_unihetero.data.preprocess.images import decode_image
from megatron_unihetero.data.preprocess.merge import merge_shards
from megatron_unihetero.data.preprocess.pipeline import PreprocessConfig, run_preprocess
from megatron_unihetero.data.preprocess.samples import SampleConfig
from megatron_unihetero.data.shards import ShardReader, list_shards
from megatron_unihetero.data.tokenizer import build_tokenizer

SIZE = 16


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    tok_path = train_tiny_tokenizer(str(root))
    write_demo_data(str(root / "demo"), 60, seed=5, image_size=24, valid_fraction=0.0, row_group_size=16)
    return {"root": root, "tok_path": tok_path, "tok": build_tokenizer(tok_path), "demo": str(root / "demo" / "train.parquet")}


def run(env, inputs, prefix, **kw):
    sample_kw = {k: kw.pop(k) for k in list(kw) if k in SampleConfig.__dataclass_fields__}
    sample_kw.setdefault("image_size", SIZE)
    cfg = PreprocessConfig(inputs=list(inputs), output_prefix=str(env["root"] / prefix), tokenizer_model=env["tok_path"],
                           sample=SampleConfig(**sample_kw), progress=False, chunk_size=kw.pop("chunk_size", 8), **kw)
    return run_preprocess(cfg), cfg.output_prefix


def samples_of(prefix):
    out = []
    for shard in list_shards(prefix):
        r = ShardReader(shard)
        out += [(r.tokens(i), r.images(i), r.loss_mask(i)) for i in range(len(r))]
    return out


def expected_tokens(tok, *texts, images=1):
    return [tok.bos_id] + [tok.image_start_id, tok.image_token_id, tok.image_end_id] * images + \
        [t for text in texts for t in tok.encode(text)] + [tok.eos_id]


def test_parquet_caption_round_trip(env):
    summary, prefix = run(env, [env["demo"]], "cap")
    rows = pq.read_table(env["demo"]).to_pylist()
    got = samples_of(prefix)
    assert summary["rows"] == summary["samples"] == len(rows) == len(got) and summary["rejected"] == 0
    tok = env["tok"]
    for row, (tokens, images, mask) in zip(rows, got):
        assert tokens.tolist() == expected_tokens(tok, row["caption"])
        assert images.shape == (1, SIZE, SIZE, 3) and images.dtype == np.uint8
        assert np.array_equal(images[0], decode_image(row["image"], SIZE))
        assert mask.tolist() == [1, 0, 0, 0] + [1] * (len(tokens) - 4)  # default: all but image tokens
    meta = ShardReader(list_shards(prefix)[0]).metadata
    assert meta["tokenizer"]["image_token_id"] == tok.image_token_id and meta["image_store"] == "encoded"
    assert meta["image_size"] == SIZE and meta["has_loss_mask"] is False


def test_qa_template_masks_all_but_the_answer(env):
    summary, prefix = run(env, [env["demo"]], "both", template="both")
    rows = pq.read_table(env["demo"]).to_pylist()
    got = samples_of(prefix)
    assert summary["samples"] == 2 * len(rows) == len(got)
    tok = env["tok"]
    for row, (tokens, _, mask) in zip(rows, got[1::2]):
        assert tokens.tolist() == expected_tokens(tok, f"Question: {row['question']} Answer:", " " + row["answer"])
        target = tokens[mask.astype(bool)]
        assert target[-1] == tok.eos_id
        assert tok.decode(target[:-1]).strip() == row["answer"]
    for tokens, _, mask in got[0::2]:  # caption samples keep the default mask
        assert mask.tolist() == [1, 0, 0, 0] + [1] * (len(tokens) - 4)


def test_workers_do_not_change_output_and_shards_merge(env):
    s1, p1 = run(env, [env["demo"]], "w1/ds", workers=1, shard_size_mb=0.02, template="both")
    s2, p2 = run(env, [env["demo"]], "w2/ds", workers=2, shard_size_mb=0.02, template="both")
    shards = list_shards(p1)
    assert len(shards) > 2, "shard-size-mb split"
    names = sorted(f for f in os.listdir(os.path.dirname(p1)) if f.startswith("ds_"))
    assert names == sorted(f for f in os.listdir(os.path.dirname(p2)) if f.startswith("ds_"))
    match, mismatch, errors = filecmp.cmpfiles(os.path.dirname(p1), os.path.dirname(p2), names, shallow=False)
    assert not mismatch and not errors
    merged = str(env["root"] / "merged")
    meta = merge_shards([p1], merged)
    assert meta["num_samples"] == s1["samples"] and list_shards(merged) == [merged]
    for a, b in zip(samples_of(merged), samples_of(p1)):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)


def test_jsonl_with_image_paths_and_gzip(env):
    img_dir = env["root"] / "imgs"
    img_dir.mkdir(exist_ok=True)
    rows = []
    for i in range(5):
        (img_dir / f"{i}.jpg").write_bytes(png_bytes(i, fmt="JPEG"))
        rows.append({"url_path": f"{i}.jpg", "text": f"a red circle number {i}"})
    path = write_jsonl(str(env["root"] / "pairs.jsonl.gz"), rows)
    summary, prefix = run(env, [path], "jsonl", text_column="text", image_column="url_path", image_path_root=str(img_dir),
                          image_store="pixels")
    got = samples_of(prefix)
    assert summary["samples"] == 5 and summary["rejected"] == 0
    for i, (tokens, images, _) in enumerate(got):
        assert tokens.tolist() == expected_tokens(env["tok"], rows[i]["text"])
        assert np.array_equal(images[0], decode_image((img_dir / f"{i}.jpg").read_bytes(), SIZE))


def test_webdataset_tar(env):
    samples = [{"png": png_bytes(i), "txt": f"a blue square {i}".encode()} for i in range(4)]
    samples.append({"jpg": png_bytes(9, fmt="JPEG"), "json": b'{"caption": "a green triangle"}'})
    path = write_webdataset(str(env["root"] / "wds.tar"), samples)
    summary, prefix = run(env, [path], "wds", image_store="pixels")
    got = samples_of(prefix)
    assert summary["samples"] == 5 and summary["rejected"] == 0
    texts = [f"a blue square {i}" for i in range(4)] + ["a green triangle"]
    for i, (tokens, images, _) in enumerate(got):
        assert tokens.tolist() == expected_tokens(env["tok"], texts[i])
        data = samples[i].get("png") or samples[i]["jpg"]
        assert np.array_equal(images[0], decode_image(data, SIZE))


def test_interleaved_documents(env):
    a, b = png_bytes(1), png_bytes(2, size=(20, 50))
    docs = [{"segments": [{"text": "first"}, {"image": a}, {"text": "then"}, {"image": b}, {"text": "end"}]},
            {"segments": [{"text": "text only document"}]}]
    path = str(env["root"] / "inter.parquet")
    pq.write_table(pa.Table.from_pylist(docs), path)
    summary, prefix = run(env, [path], "inter", interleaved_column="segments", template="interleaved")
    got = samples_of(prefix)
    assert summary["samples"] == 2 and summary["rejected"] == 0
    tok = env["tok"]
    img = [tok.image_start_id, tok.image_token_id, tok.image_end_id]
    assert got[0][0].tolist() == [tok.bos_id] + tok.encode("first") + img + tok.encode("then") + img + tok.encode("end") + [tok.eos_id]
    assert np.array_equal(got[0][1], np.stack([decode_image(a, SIZE), decode_image(b, SIZE)]))
    assert got[1][1].shape == (0, SIZE, SIZE, 3)
    assert ShardReader(list_shards(prefix)[0]).image_offsets.tolist() == [0, 2, 2]


def test_precomputed_features_match_the_frozen_model(env):
    import torch
    from transformers import Dinov2Model

    model_dir = save_tiny_dinov2(str(env["root"] / "dinov2"))
    summary, prefix = run(env, [env["demo"]], "feat", image_size=32, vision_model=model_dir, chunk_size=32)
    r = ShardReader(list_shards(prefix)[0])
    assert r.metadata["image_store"] == "features" and r.metadata["feature_shape"] == [17, 32]
    feats = r.images(0)
    assert feats.shape == (1, 17, 32) and feats.dtype == np.float16
    pixels = decode_image(pq.read_table(env["demo"]).slice(0, 1).to_pylist()[0]["image"], 32)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = Dinov2Model.from_pretrained(model_dir).eval()(pixel_values=x).last_hidden_state[0].numpy()
    np.testing.assert_allclose(feats[0].astype(np.float32), ref, atol=2e-2, rtol=1e-2)
    assert summary["samples"] == len(r) if len(list_shards(prefix)) == 1 else True


def test_merge_caption_and_qa_shards_fills_default_masks(env):
    _, cap = run(env, [env["demo"]], "mix/cap")
    _, qa = run(env, [env["demo"]], "mix/qa", template="qa")
    merged = str(env["root"] / "mix" / "all")
    meta = merge_shards([cap, qa], merged)
    assert meta["has_loss_mask"] and meta["num_samples"] == 120
    want = samples_of(cap) + samples_of(qa)
    got = samples_of(merged)
    for (t1, i1, m1), (t2, i2, m2) in zip(got, want):
        assert np.array_equal(t1, t2) and np.array_equal(i1, i2) and np.array_equal(m1, m2)
    with pytest.raises(ValueError, match="image_size"):
        _, small = run(env, [env["demo"]], "mix/small", image_size=8)
        merge_shards([cap, small], str(env["root"] / "mix" / "bad"))


def test_text_only_shard_opens_and_reads(tmp_path):
    from megatron_unihetero.data.shards import ShardReader, ShardWriter

    prefix = str(tmp_path / "text_only")
    with ShardWriter(prefix, image_size=8, metadata={"tokenizer": {"image_token_id": 4}}) as writer:
        writer.add_sample(np.array([1, 10, 11, 2], dtype=np.int32), [], None)
        writer.add_sample(np.array([1, 12, 2], dtype=np.int32), [], None)
        writer.finalize()
    reader = ShardReader(prefix)
    assert len(reader) == 2
    assert reader.tokens(1).tolist() == [1, 12, 2]
    assert reader.images(0).shape == (0, 8, 8, 3)
