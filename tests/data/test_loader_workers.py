"""The loader's worker processes on encoded shards: same batches as in-process, exact resume."""

import json

import numpy as np
import pytest
import torch

from megatron_unihetero.data.dataset import MultimodalDataset
from megatron_unihetero.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD
from megatron_unihetero.data.loader import auto_num_workers, build_loader
from megatron_unihetero.data.synthetic_shards import image_fill_value, write_synthetic_dataset
from megatron_unihetero.testing.batches import assert_same_batch, take

TPI = 3
S = 80


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    write_synthetic_dataset(str(root / "cap"), num_samples=120, num_shards=2, tag=1, seed=1, text_len=(4, 16),
                            image_store="encoded")
    write_synthetic_dataset(str(root / "qa"), num_samples=40, tag=2, seed=2, qa=True, text_len=(4, 16),
                            image_store="encoded")
    return root


def _loader(data, **kw):
    args = dict(seq_length=S, micro_batch_size=2, tokens_per_image=TPI, pack_window=32, seed=3, prefetch=2)
    args.update(kw)
    return build_loader(["0.6", str(data / "cap"), "0.4", str(data / "qa")], **args)


def test_encoded_shards_decode_to_the_written_pixels(data):
    ds = MultimodalDataset(str(data / "cap"))
    assert ds.image_store == "encoded"
    for i in range(ds.num_samples_total):
        images = ds.sample(i).images
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 3)
        for k, im in enumerate(images):
            assert (im == image_fill_value(1, i, k)).all()
    # The batch's images are those pixels, normalised.
    batch = take(_loader(data, num_workers=0), 1)[0]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw = (batch["images"] * std + mean) * 255
    assert batch["images"].shape[1:] == (3, 8, 8) and (raw - raw.round()).abs().max() < 1e-3


def test_workers_give_the_in_process_batches(data):
    ref = take(_loader(data, num_workers=0), 24)  # several packing windows
    with _loader(data, num_workers=2) as loader:
        got = take(loader, 24)
        state = loader.state_dict()
    assert len(got) == 24
    for x, y in zip(got, ref):
        assert_same_batch(x, y)
    # The position is that of the last batch handed out, not of the batches the workers made ahead.
    inproc = _loader(data, num_workers=0)
    take(inproc, 24)
    assert state == inproc.state_dict()


def test_resume_with_workers_is_exact_also_on_another_dp_size(data):
    ref = take(_loader(data, micro_batch_size=4, num_workers=0), 14)
    first = _loader(data, micro_batch_size=4, num_workers=2)
    take(first, 6)
    state = json.loads(json.dumps(first.state_dict()))  # through a checkpoint
    # close() drops the batches made ahead and continues where the caller stopped.
    first.close()
    for x, y in zip(take(first, 2), ref[6:8]):
        assert_same_batch(x, y)
    first.close()
    for r in range(2):
        resumed = _loader(data, micro_batch_size=2, dp_rank=r, dp_size=2, num_workers=2)
        resumed.load_state_dict(state)
        for x, whole in zip(take(resumed, 8), ref[6:14]):
            assert torch.equal(x["tokens"], whole["tokens"][2 * r:2 * r + 2])
            assert torch.equal(x["labels"], whole["labels"][2 * r:2 * r + 2])
        resumed.close()


def test_finite_stream_ends_the_same_with_workers(data):
    def epoch(workers):
        return list(build_loader(str(data / "qa"), split="valid", valid_fraction=0.5, seq_length=S,
                                 micro_batch_size=3, tokens_per_image=TPI, num_workers=workers))
    a, b = epoch(0), epoch(2)
    assert len(a) == len(b) > 0 and sum(x["num_documents"] for x in a) == 20
    for x, y in zip(a, b):
        assert_same_batch(x, y)


def test_worker_errors_reach_the_caller(data, tmp_path):
    (prefix,) = write_synthetic_dataset(str(tmp_path / "bad"), num_samples=10, seed=4, image_store="encoded")
    path = prefix + ".encoded.bin"
    raw = bytearray(open(path, "rb").read())
    raw[-30:] = b"\x00" * 30  # damages the last image's data, not the first one's header
    open(path, "wb").write(bytes(raw))
    loader = build_loader(str(tmp_path / "bad"), seq_length=S, micro_batch_size=10, tokens_per_image=TPI,
                          num_samples=10, num_workers=1)
    with pytest.raises(Exception, match=r"bad_00000\.encoded\.bin: image \d+ cannot be decoded"):
        list(loader)


def test_auto_num_workers():
    assert auto_num_workers(3) == 3 and auto_num_workers(0) == 0
    assert 0 <= auto_num_workers(-1, ranks_per_node=1) <= 8
    assert auto_num_workers(-1, ranks_per_node=10_000) == 0  # no cores to spare
