"""Damaged shards fail when they are opened (before the first batch), naming the file."""

import json
import os
import re

import numpy as np
import pytest

from megatron_unihetero.data.dataset import MultimodalDataset
from megatron_unihetero.data.loader import build_loader
from megatron_unihetero.data.shards import ShardError, ShardReader, ShardWriter
from megatron_unihetero.data.synthetic_shards import TOKENIZER, write_synthetic_dataset

IMG = TOKENIZER["image_token_id"]
LOADER = dict(seq_length=64, micro_batch_size=1, tokens_per_image=2, prefetch=0)


@pytest.fixture
def shard(tmp_path):
    # max_images=2 over 12 samples: the shard has images (the seed gives some), a loss mask (qa).
    (prefix,) = write_synthetic_dataset(str(tmp_path / "ds"), num_samples=12, seed=3, qa=True, image_size=8)
    assert ShardReader(prefix).image_offsets[-1] > 0
    return prefix


def _raises(path, *parts):
    """pytest.raises for a ShardError whose message names ``path`` and then each of ``parts``."""
    return pytest.raises(ShardError, match=re.escape(path) + ".*" + ".*".join(re.escape(p) for p in parts))


def _edit_json(prefix, **changes):
    with open(prefix + ".json") as f:
        meta = json.load(f)
    meta.update(changes)
    with open(prefix + ".json", "w") as f:
        json.dump(meta, f)


def _truncate(path, by):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - by)
    return size


def test_whole_shards_open(shard, tmp_path):
    r = ShardReader(shard)
    assert len(r) == 12 and r.images(int(np.argmax(np.diff(r.image_offsets)))).shape[1:] == (8, 8, 3)
    assert issubclass(ShardError, ValueError)  # callers catching ValueError keep working


def test_truncated_images_bin(shard):
    path = shard + ".images.bin"
    size = _truncate(path, 5)
    with _raises(path, f"size {size - 5} bytes, expected {size}", "truncated"):
        ShardReader(shard)


def test_padded_text_bin(shard):
    path = shard + ".text.bin"
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    with _raises(path, f"size {size + 8} bytes, expected {size}", "padded"):
        ShardReader(shard)


@pytest.mark.parametrize("by, what", [(4, "expected"), (10_000, "header")])
def test_truncated_idx(shard, by, what):
    path = shard + ".text.idx"
    by = min(by, os.path.getsize(path) - 10)  # 10 bytes left: shorter than the header
    _truncate(path, by)
    with _raises(path, what):
        ShardReader(shard)


def test_idx_with_wrong_magic_or_dtype(shard):
    path = shard + ".lossmask.idx"
    with open(path, "r+b") as f:
        f.seek(17)  # the dtype code, after the 9-byte magic and the 8-byte version
        f.write(bytes([4]))  # int32 instead of int8
    with _raises(path, "dtype code 4 (int32), expected 2 (int8)"):
        ShardReader(shard)
    with open(path, "r+b") as f:
        f.write(b"NOTANIDX\0")
    with _raises(path, "not an IndexedDataset index"):
        ShardReader(shard)


def test_missing_image_offsets(shard):
    path = shard + ".image_offsets.npy"
    os.remove(path)
    with _raises(path, "missing"):
        ShardReader(shard)


def _jump_then_drop(off):
    off = off.copy()
    off[1] = off[-1] + 1  # above every later entry
    return off


@pytest.mark.parametrize("edit, message", [
    (lambda off: off[:-1], "length 12, expected num_samples + 1 = 13"),
    (lambda off: np.concatenate([off[:-1], [off[-1] + 1]]), "last entry"),
    (_jump_then_drop, "decreases at sample 1"),
    (lambda off: off.astype(np.float64), "must be a 1-D integer array"),
])
def test_inconsistent_image_offsets(shard, edit, message):
    path = shard + ".image_offsets.npy"
    np.save(path, edit(np.load(path)))
    with _raises(path, message):
        ShardReader(shard)
    with open(path, "wb") as f:
        f.write(b"garbage")
    with _raises(path, "unreadable"):
        ShardReader(shard)


def test_wrong_num_samples_in_json(shard):
    _edit_json(shard, num_samples=11)
    with _raises(shard + ".json", "num_samples is 11", shard + ".text.idx holds 12 samples"):
        ShardReader(shard)
    _edit_json(shard, num_samples="12")
    with _raises(shard + ".json", "num_samples must be a non-negative integer"):
        ShardReader(shard)


@pytest.mark.parametrize("changes, message", [
    ({"image_store": "jpeg"}, "image_store must be one of ['encoded', 'features', 'pixels'], got 'jpeg'"),
    ({"image_size": None}, "needs a positive integer image_size"),
    ({"num_images": 999}, "num_images is 999"),
    ({"format_version": 99}, "format_version 99"),
])
def test_bad_json_fields(shard, changes, message):
    _edit_json(shard, **changes)
    with _raises(shard + ".json", message):
        ShardReader(shard)


def test_wrong_image_length_names_first_bad_image(tmp_path, monkeypatch):
    prefix = str(tmp_path / "odd")
    # Bypass the writer's own shape check to store one 7x7 image among 8x8 ones.
    monkeypatch.setattr(ShardWriter, "_check_image", lambda self, img: np.asarray(img))
    with ShardWriter(prefix, image_size=8, metadata={"tokenizer": TOKENIZER}) as w:
        tokens = np.asarray([1, 3, IMG, 5, 2], np.int32)
        w.add_sample(tokens, [np.zeros((8, 8, 3), np.uint8)])
        w.add_sample(tokens, [np.zeros((8, 8, 3), np.uint8)])
        w.add_sample(tokens, [np.zeros((7, 7, 3), np.uint8)])
        w.finalize()
    with _raises(prefix + ".images.idx", "image 2 has 147 values, expected 192", "image_size 8"):
        ShardReader(prefix)


def test_wrong_feature_shape(tmp_path):
    prefix = str(tmp_path / "feat")
    with ShardWriter(prefix, image_store="features", feature_shape=(5, 6), metadata={"tokenizer": TOKENIZER}) as w:
        w.add_sample(np.asarray([1, 3, IMG, 5, 2]), [np.zeros((5, 6))])
        w.finalize()
    assert ShardReader(prefix).images(0).shape == (1, 5, 6)
    _edit_json(prefix, feature_shape=[5, 7])
    with _raises(prefix + ".features.idx", "image 0 has 30 values, expected 35", "feature_shape [5, 7]"):
        ShardReader(prefix)


def test_images_need_the_tokenizer_image_ids(shard, tmp_path):
    _edit_json(shard, tokenizer={k: v for k, v in TOKENIZER.items() if k != "image_end_id"})
    with _raises(shard + ".json", "images but its 'tokenizer' section lacks ['image_end_id']"):
        ShardReader(shard)
    # A text-only shard needs no image ids.
    prefix = str(tmp_path / "text_only")
    with ShardWriter(prefix, image_size=8, metadata={"tokenizer": {"pad_id": 0}}) as w:
        w.add_sample(np.asarray([1, 10, 2]))
        w.finalize()
    assert len(ShardReader(prefix)) == 1


@pytest.mark.parametrize("split", ["train", "valid"])
def test_build_loader_fails_before_any_batch(tmp_path, split):
    prefixes = write_synthetic_dataset(str(tmp_path / "ds"), num_samples=30, num_shards=3, seed=1)
    _truncate(prefixes[2] + ".images.bin", 1)
    # The error comes from build_loader itself: no iterator was created, no batch was made.
    with _raises(prefixes[2] + ".images.bin", "truncated"):
        build_loader(str(tmp_path / "ds"), split=split, valid_fraction=0.2, **LOADER)


def test_all_damaged_shards_reported_at_once(tmp_path):
    prefixes = write_synthetic_dataset(str(tmp_path / "ds"), num_samples=30, num_shards=3, seed=1)
    _truncate(prefixes[0] + ".images.bin", 1)
    os.remove(prefixes[2] + ".image_offsets.npy")
    with pytest.raises(ShardError, match="2 damaged shards") as err:
        MultimodalDataset(str(tmp_path / "ds"))
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 2
    assert lines[0].startswith(prefixes[0] + ".images.bin") and lines[1].startswith(prefixes[2] + ".image_offsets.npy")


def test_a_shard_changed_under_a_running_job_is_named_before_it_is_read(shard, tmp_path):
    """A .bin truncated under a memory map would kill the reader with SIGBUS at the first read
    past its end; a rewritten or replaced one would give other samples than the run planned."""
    reader = ShardReader(shard)
    first = reader.tokens(0)
    size = _truncate(shard + ".text.bin", 4)
    with _raises(shard + ".text.bin", f"rewritten ({size} -> {size - 4} bytes)", "must not change under a run"):
        reader.tokens(0)
    (fresh,) = write_synthetic_dataset(str(tmp_path / "other"), num_samples=12, seed=3, qa=True, image_size=8)
    reader = ShardReader(fresh)
    assert np.array_equal(reader.tokens(0), first)
    os.replace(fresh + ".lossmask.bin", tmp_path / "moved")
    with pytest.raises(ShardError, match="was removed under the running job"):
        reader.loss_mask(0)
    busy = next(i for i in range(len(reader)) if reader.num_images(i))
    data = open(fresh + ".images.bin", "rb").read()
    os.remove(fresh + ".images.bin")
    with open(fresh + ".images.bin", "wb") as f:  # the same bytes, another file
        f.write(data)
    with _raises(fresh + ".images.bin", "was replaced by another file"):
        reader.images(busy)


def test_a_loader_worker_killed_by_sigbus_names_the_data(tmp_path):
    """What torch raises when a loader worker dies of SIGBUS while the main process waits for
    its batch (its SIGCHLD handler's error, wrapped by the DataLoader's wait) becomes a
    ShardError naming the run's data. The worker is not really killed here: torch's SIGCHLD
    handler raises wherever the main thread happens to be, which made a real kill racy."""
    write_synthetic_dataset(str(tmp_path / "ds"), num_samples=30, seed=1)
    loader = build_loader(str(tmp_path / "ds"), num_workers=1, **dict(LOADER, prefetch=1))

    def dead_worker():
        try:
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Bus error. It is possible "
                               "that dataloader's workers are out of shared memory.")
        except RuntimeError as bus:
            raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly") from bus
        yield

    loader._workers_iter = dead_worker()
    with pytest.raises(ShardError, match=r"killed by SIGBUS: a memory-mapped shard file probably shrank.*ds_00000"):
        next(loader)
    loader._workers_iter = iter([])  # any other error is torch's own
    with pytest.raises(StopIteration):
        next(loader)
