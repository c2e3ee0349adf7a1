"""Packing and collation: the batch contract, checked against a slow per-token reference."""

import logging

import numpy as np
import pytest
import torch

from megatron_unihetero.data.collate import IGNORE_INDEX, Collator, expand_sample
from megatron_unihetero.data.dataset import Sample
from megatron_unihetero.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD, ImageNormalizer
from megatron_unihetero.data.packing import SampleRef, WindowPacker, best_fit_decreasing

IMG, PAD = 4, 0
TPI = 3


def _sample(tokens, images=(), mask=None, index=0):
    imgs = np.stack(images) if len(images) else np.zeros((0, 2, 2, 3), np.uint8)
    return Sample(tokens=np.asarray(tokens, np.int32), images=imgs,
                  loss_mask=None if mask is None else np.asarray(mask, np.int8), shard="mem", index=index)


def _img(v):
    return np.full((2, 2, 3), v, np.uint8)


def _collator(S=16):
    return Collator(seq_length=S, tokens_per_image=TPI, image_token_id=IMG, pad_id=PAD, image_store="pixels",
                    image_shape=(3, 2, 2), normalizer=ImageNormalizer(image_size=None))


def _reference(rows, S):
    """Per-token reference of the contract (deliberately naive)."""
    tokens, targets, pos, seg = [], [], [], []
    for row in rows:
        t, g, p, s = [], [], [], []
        for d, sample in enumerate(row):
            mask = sample.loss_mask if sample.loss_mask is not None else [1] * len(sample.tokens)
            for tok, m in zip(sample.tokens.tolist(), list(mask)):
                for _ in range(TPI if tok == IMG else 1):
                    t.append(tok); g.append(m); p.append(len([x for x in s if x == d])); s.append(d)
        pad = S - len(t)
        tokens.append(t + [PAD] * pad); targets.append(g + [0] * pad); pos.append(p + [0] * pad); seg.append(s + [-1] * pad)
    labels = []
    for t, g, s in zip(tokens, targets, seg):
        labels.append([t[i + 1] if s[i] >= 0 and s[i + 1] == s[i] and g[i + 1] else IGNORE_INDEX for i in range(S - 1)]
                      + [IGNORE_INDEX])
    return tokens, labels, pos, seg


def test_collate_matches_reference_masks_and_image_order():
    rows = [
        [_sample([1, 11, 3, IMG, 5, 12, 2], [_img(10)], index=0),
         _sample([1, 3, IMG, 5, 13, 3, IMG, 5, 2], [_img(20), _img(30)], mask=[0, 0, 0, 0, 1, 0, 0, 0, 1], index=1)],
        [],  # an all-padding row (DP tail)
        [_sample([1, 14, 15, 2], index=2), _sample([1, 3, IMG, 5, 2], [_img(40)], index=3)],
    ]
    S = 24
    batch = _collator(S)(rows)
    tokens, labels, pos, seg = _reference(rows, S)
    assert batch["tokens"].dtype == torch.int64 and batch["labels"].dtype == torch.int64
    assert batch["position_ids"].dtype == torch.int64 and batch["segment_ids"].dtype == torch.int32
    assert batch["tokens"].tolist() == tokens
    assert batch["labels"].tolist() == labels
    assert batch["position_ids"].tolist() == pos
    assert batch["segment_ids"].tolist() == seg
    assert batch["num_documents"] == 4
    assert batch["num_padding_tokens"] == sum(x == -1 for r in seg for x in r)
    # Document 1 of row 0 starts at 9 (document 0 expands to 7 + 2 tokens); only its two target
    # tokens (13 at local 6, EOS at local 12) are labels; document 0's last token is a boundary.
    row0 = batch["labels"][0].tolist()
    assert row0[8] == IGNORE_INDEX
    assert {i - 9: v for i, v in enumerate(row0) if 9 <= i < 22 and v != IGNORE_INDEX} == {5: 13, 11: 2}
    assert row0[22:] == [IGNORE_INDEX] * 2
    # images: row 0's in order of appearance, then row 2's; normalised with ImageNet stats
    imgs = batch["images"]
    assert imgs.shape == (4, 3, 2, 2) and imgs.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = (imgs * std + mean) * 255
    assert [round(v) for v in raw[:, 0, 0, 0].tolist()] == [10, 20, 30, 40]
    # placeholders expand to exactly tokens_per_image image tokens per image
    assert int((batch["tokens"] == IMG).sum()) == TPI * imgs.shape[0]


def test_empty_image_batch_has_empty_tensor():
    batch = _collator(8)([[_sample([1, 11, 2])]])
    assert batch["images"].shape == (0, 3, 2, 2)


def test_placeholder_image_count_mismatch_names_shard_and_sample():
    bad = _sample([1, 3, IMG, 5, 2], [], index=7)
    with pytest.raises(ValueError, match=r"shard mem: sample 7: 1 <image> placeholders .* 0 entries"):
        expand_sample(bad, IMG, TPI)
    with pytest.raises(ValueError, match=r"shard mem: sample 7: 1 <image> placeholders .* 0 entries"):
        _collator(16)([[_sample([1, 11, 2]), bad]])


def test_expand_sample_repeats_mask_of_placeholder():
    s = _sample([1, IMG, 2], [_img(1)], mask=[0, 1, 1])
    tok, mask = expand_sample(s, IMG, 4)
    assert tok.tolist() == [1, IMG, IMG, IMG, IMG, 2]
    assert mask.tolist() == [False, True, True, True, True, True]


def test_best_fit_decreasing_places_everything_without_overflow():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=3000).tolist()
    bins = best_fit_decreasing(lengths, 256)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    assert all(b == sorted(b) for b in bins)
    eff = sum(lengths) / (256 * len(bins))
    assert eff > 0.97, eff
    assert bins == best_fit_decreasing(lengths, 256)  # deterministic


def test_window_packer_rejects_and_logs_overlong(caplog):
    names = {5: ("shardX", 42)}
    packer = WindowPacker(100, seed=0, describe=lambda r: names.get(r.index, ("shardY", r.index)))
    refs = [SampleRef(0, i, 30) for i in range(5)] + [SampleRef(0, 5, 101)]
    with caplog.at_level(logging.WARNING, logger="megatron_unihetero.data.packing"):
        rows = packer.pack(refs, window_index=0)
    assert sorted(r.index for row in rows for r in row) == [0, 1, 2, 3, 4]
    assert packer.stats.rejected_samples == 1 and packer.stats.rejected_tokens == 101
    assert "sample 42 of shard shardX" in caplog.text and "101 > seq_length 100" in caplog.text
    # re-packing for a resume does not count again
    packer.pack(refs, window_index=0, count=False)
    assert packer.stats.rejected_samples == 1
    # row order is shuffled by (seed, window) but reproducible
    assert packer.pack(refs, 3, count=False) == WindowPacker(100, seed=0).pack(refs, 3, count=False)


def test_normalizer_resizes_when_asked():
    x = np.full((2, 4, 4, 3), 255, np.uint8)
    out = ImageNormalizer(mean=(0, 0, 0), std=(1, 1, 1), image_size=2)(x)
    assert out.shape == (2, 3, 2, 2)
    assert torch.allclose(out, torch.ones_like(out))
