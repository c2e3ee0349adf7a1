"""The loader end to end on real shards: contract, determinism, exact resume, DP sharding."""

import json
import logging

import numpy as np
import pytest
import torch

from megatron_unihetero.data.dataset import MultimodalDataset
from megatron_unihetero.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD
from megatron_unihetero.data.loader import MultimodalLoader, build_loader
from megatron_unihetero.data.shards import ShardWriter
from megatron_unihetero.data.synthetic_shards import TOKENIZER, image_fill_value, write_synthetic_dataset
from megatron_unihetero.testing.batches import assert_same_batch, take

IMG = TOKENIZER["image_token_id"]
TPI = 5
S = 96


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    overlong = (np.asarray([1] + [20] * 120 + [2], np.int32), [])
    write_synthetic_dataset(str(root / "cap"), num_samples=240, num_shards=3, tag=1, seed=1, text_len=(4, 20),
                            extra_samples=[overlong])
    write_synthetic_dataset(str(root / "qa"), num_samples=90, num_shards=1, tag=2, seed=2, qa=True, text_len=(4, 20))
    return root


def _loader(data, **kw):
    args = dict(seq_length=S, micro_batch_size=2, tokens_per_image=TPI, pack_window=48, seed=7, prefetch=0)
    args.update(kw)
    return build_loader(["0.7", str(data / "cap"), "0.3", str(data / "qa")], **args)


def _unexpand(tokens):
    """Sample tokens from a document's expanded tokens."""
    out, prev_img = [], False
    for t in tokens:
        if t == IMG and prev_img:
            continue
        out.append(t)
        prev_img = t == IMG
    return tuple(out)


def _catalogue(data):
    """tokens -> (tag, global sample index, sample) for every sample of both datasets."""
    cat = {}
    for tag, name in ((1, "cap"), (2, "qa")):
        ds = MultimodalDataset(str(data / name))
        for i in range(ds.num_samples_total):
            s = ds.sample(i)
            cat[tuple(s.tokens.tolist())] = (tag, i, s)
    return cat


def test_batches_match_their_samples(data):
    cat = _catalogue(data)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for batch in take(_loader(data), 12):
        tokens, labels, seg = batch["tokens"], batch["labels"], batch["segment_ids"]
        pixel_values = ((batch["images"] * std + mean) * 255).round()[:, 0, 0, 0].long().tolist()
        expected_pixels, docs = [], 0
        for b in range(tokens.shape[0]):
            for d in range(int(seg[b].max()) + 1):
                where = (seg[b] == d).nonzero().flatten()
                assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1)), "document not contiguous"
                assert batch["position_ids"][b, where].tolist() == list(range(len(where)))
                tag, i, sample = cat[_unexpand(tokens[b, where].tolist())]
                expected_pixels += [image_fill_value(tag, i, k) for k in range(len(sample.images))]
                # labels: next token where it is a target of this document, else -100
                mask = np.repeat(sample.loss_mask != 0, np.where(sample.tokens == IMG, TPI, 1))
                doc_tok = tokens[b, where].tolist()
                want = [doc_tok[j + 1] if mask[j + 1] else -100 for j in range(len(doc_tok) - 1)] + [-100]
                assert labels[b, where].tolist() == want
                docs += 1
            pad = seg[b] == -1
            assert (labels[b, pad] == -100).all() and (batch["position_ids"][b, pad] == 0).all()
            assert (tokens[b, pad] == TOKENIZER["pad_id"]).all()
        assert pixel_values == expected_pixels, "images not in order of appearance"
        assert batch["num_documents"] == docs
        assert int((tokens == IMG).sum()) == TPI * batch["images"].shape[0]


def test_deterministic_for_seed(data):
    a, b = take(_loader(data), 6), take(_loader(data), 6)
    for x, y in zip(a, b):
        assert_same_batch(x, y)
    c = take(_loader(data, seed=8), 6)
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_identical_batches(data, prefetch):
    ref = take(_loader(data), 40)  # crosses several packing windows and epochs of 'qa'
    for k in (0, 3, 17, 29):
        first = _loader(data, prefetch=prefetch)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
        first.close()
        resumed = _loader(data, prefetch=prefetch)
        resumed.load_state_dict(state)
        for x, y in zip(take(resumed, 40 - k), ref[k:]):
            assert_same_batch(x, y)
        assert resumed.stats["rows_consumed"] == 40 * 2
        resumed.close()


def test_dp_ranks_disjoint_and_cover_the_stream(data):
    single = take(_loader(data, micro_batch_size=4), 10)
    ranks = [take(_loader(data, micro_batch_size=2, dp_rank=r, dp_size=2), 10) for r in range(2)]
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(2)]
        for key in ("tokens", "labels", "position_ids", "segment_ids", "images"):
            assert_same_batch({key: torch.cat([p[key] for p in parts])}, {key: whole[key]})
        assert sum(p["num_documents"] for p in parts) == whole["num_documents"]


def test_resume_on_other_dp_size(data):
    first = _loader(data, micro_batch_size=4)
    take(first, 5)
    state, after = first.state_dict(), take(first, 3)
    for r in range(2):
        resumed = _loader(data, micro_batch_size=2, dp_rank=r, dp_size=2)
        resumed.load_state_dict(state)
        for x, whole in zip(take(resumed, 3), after):
            assert torch.equal(x["tokens"], whole["tokens"][2 * r:2 * r + 2])


def test_state_rejects_other_config(data):
    state = _take_state(_loader(data), 2)
    other = _loader(data, seq_length=S + 8)
    with pytest.raises(ValueError, match="seq_length"):
        other.load_state_dict(state)


def _take_state(loader, n):
    take(loader, n)
    return loader.state_dict()


def test_one_epoch_covers_every_sample_once_and_counts_overlong(data, caplog):
    ds = MultimodalDataset(str(data / "cap"))
    with caplog.at_level(logging.WARNING, logger="megatron_unihetero.data.packing"):
        loader = MultimodalLoader(ds, seq_length=S, micro_batch_size=3, tokens_per_image=TPI, dp_rank=1, dp_size=2,
                                  num_samples=len(ds), pack_window=64, prefetch=2)
        batches = list(loader)
        other = list(MultimodalLoader(ds, seq_length=S, micro_batch_size=3, tokens_per_image=TPI, dp_rank=0,
                                      dp_size=2, num_samples=len(ds), pack_window=64))
    assert len(batches) == len(other) > 0  # every rank yields the same number of batches
    seen = []
    for batch in batches + other:
        for b in range(batch["tokens"].shape[0]):
            for d in range(int(batch["segment_ids"][b].max()) + 1):
                seen.append(_unexpand(batch["tokens"][b][batch["segment_ids"][b] == d].tolist()))
    expected = [tuple(ds.sample(i).tokens.tolist()) for i in range(ds.num_samples_total - 1)]
    assert sorted(seen) == sorted(expected)
    assert loader.stats["rejected_samples"] == 1
    shard, index = ds.describe(ds.num_samples_total - 1)
    assert f"rejected sample {index} of shard {shard}" in caplog.text
    assert loader.stats["efficiency"] > 0.8


def test_split_is_disjoint_and_seed_independent(data):
    train = MultimodalDataset(str(data / "cap"), split="train", valid_fraction=0.1, split_seed=3)
    valid = MultimodalDataset(str(data / "cap"), split="valid", valid_fraction=0.1, split_seed=3)
    assert set(train.indices) & set(valid.indices) == set()
    assert sorted([*train.indices, *valid.indices]) == list(range(train.num_samples_total))
    assert len(valid) == round(0.1 * train.num_samples_total)
    loader = build_loader(str(data / "cap"), split="valid", valid_fraction=0.1, split_seed=3, seq_length=S,
                          micro_batch_size=2, tokens_per_image=TPI)
    assert sum(b["num_documents"] for b in loader) == len(valid)


def test_feature_shards(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path / "f"), image_store="features", feature_shape=(TPI, 6),
                     metadata={"tokenizer": TOKENIZER}) as w:
        for i in range(20):
            n = i % 3
            toks = [1, 11] + [3, IMG, 5] * n + [12, 2]
            w.add_sample(np.asarray(toks), [rng.normal(size=(TPI, 6)) for _ in range(n)])
        w.finalize()
    loader = build_loader(str(tmp_path / "f"), seq_length=48, micro_batch_size=2, tokens_per_image=TPI)
    batch = next(iter(loader))
    assert "images" not in batch
    feats = batch["image_features"]
    assert feats.dtype == torch.float32 and feats.shape[1:] == (TPI, 6)
    assert int((batch["tokens"] == IMG).sum()) == TPI * feats.shape[0]


def test_dataset_from_several_prefixes_and_missing_prefix(data):
    both = MultimodalDataset([str(data / "cap"), str(data / "qa")])
    assert len(both) == 241 + 90 and len(both.readers) == 4
    shard, index = both.describe(241)  # first sample after the 'cap' shards
    assert shard.endswith("qa_00000") and index == 0
    with pytest.raises(FileNotFoundError, match="no shards found"):
        MultimodalDataset(str(data / "nope"))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_corrupt_sample_error_names_shard_sample_and_field(tmp_path, prefetch):
    with ShardWriter(str(tmp_path / "bad"), image_size=4, metadata={"tokenizer": TOKENIZER}) as w:
        # (one real image: ShardReader cannot open a shard whose images file is empty)
        w.add_sample(np.asarray([1, 3, IMG, 5, 2]), [np.zeros((4, 4, 3), np.uint8)])
        w.add_sample(np.asarray([1, 3, IMG, 5, 2]))  # a placeholder without its image
        w.finalize()
    loader = build_loader(str(tmp_path / "bad"), seq_length=64, micro_batch_size=1, tokens_per_image=2,
                          prefetch=prefetch)
    for _ in range(2):  # the error is raised again, never swallowed
        with pytest.raises(ValueError, match=r"bad: sample 1: 1 <image> placeholders .* 'text' but 0 entries in 'images'"):
            for _ in range(3):
                next(loader)
