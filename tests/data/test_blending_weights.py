"""Blending follows its weights, is deterministic, and walks each dataset's epochs."""

import numpy as np
import pytest

from megatron_unihetero.data.blending import BlendedSampleStream, normalize_weights, parse_data_path
from megatron_unihetero.data.dataset import MultimodalDataset
from megatron_unihetero.data.synthetic_shards import write_synthetic_dataset


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    sizes = (37, 101, 64)
    out = []
    for tag, n in enumerate(sizes):
        write_synthetic_dataset(str(root / f"d{tag}"), num_samples=n, num_shards=2, tag=tag, seed=tag)
        out.append(MultimodalDataset(str(root / f"d{tag}")))
    return out


def test_counts_follow_weights_at_every_step(datasets):
    weights = [0.2, 0.5, 0.3]
    stream = BlendedSampleStream(datasets, weights, seed=3, tokens_per_image=4)
    refs = stream.take(5000)
    choice = np.asarray([r.dataset for r in refs])
    for d, w in enumerate(weights):
        realised = np.cumsum(choice == d)
        expected = w * np.arange(1, len(refs) + 1)
        assert np.abs(realised - expected).max() <= 1.0 + 1e-9, d


def test_each_dataset_walks_full_epochs(datasets):
    stream = BlendedSampleStream(datasets, [1, 1, 1], seed=0, tokens_per_image=4)
    refs = stream.take(3 * 101 * 2)
    for d, ds in enumerate(datasets):
        seq = [r.index for r in refs if r.dataset == d]
        n = len(ds)
        for e in range(len(seq) // n):
            assert sorted(seq[e * n:(e + 1) * n]) == sorted(ds.indices.tolist())
        if len(seq) >= 2 * n:
            assert seq[:n] != seq[n:2 * n], "epochs should be reshuffled"


def test_deterministic_and_resumable(datasets):
    a = BlendedSampleStream(datasets, [0.6, 0.3, 0.1], seed=5, tokens_per_image=4)
    b = BlendedSampleStream(datasets, [0.6, 0.3, 0.1], seed=5, tokens_per_image=4)
    first = a.take(300)
    assert first == b.take(300)
    state = a.state_dict()
    rest = a.take(200)
    c = BlendedSampleStream(datasets, [0.6, 0.3, 0.1], seed=5, tokens_per_image=4)
    c.load_state_dict(state)
    assert c.take(200) == rest
    other = BlendedSampleStream(datasets, [0.6, 0.3, 0.1], seed=6, tokens_per_image=4)
    assert other.take(300) != first


def test_expanded_lengths_and_limit(datasets):
    stream = BlendedSampleStream(datasets[:1], None, seed=0, tokens_per_image=7, num_samples=10)
    refs = stream.take(25)
    assert len(refs) == 10 and stream.exhausted and stream.take(5) == []
    ds = datasets[0]
    for r in refs:
        s = ds.sample(r.index)
        assert r.length == len(s.tokens) + 6 * len(s.images)


def test_weight_validation_and_data_path():
    assert np.allclose(normalize_weights([2, 6], 2), [0.25, 0.75])
    with pytest.raises(ValueError):
        normalize_weights([1, -1], 2)
    with pytest.raises(ValueError):
        normalize_weights([1], 2)
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_data_path(["a"]) == (["a"], [1.0])
    with pytest.raises(ValueError, match="weight prefix"):
        parse_data_path(["a", "b"])


def test_documents_without_bos_blend_only_with_their_kind(datasets, tmp_path):
    """Shards of a tokenizer without BOS (metadata bos_id null) read back None, blend with each
    other and batch with no BOS anywhere; beside shards with BOS they are refused by name, in
    one dataset and across the loader's datasets."""
    from megatron_unihetero.data.loader import MultimodalLoader
    from megatron_unihetero.data.synthetic_shards import TOKENIZER

    plain = [MultimodalDataset(write_synthetic_dataset(str(tmp_path / f"n{tag}"), num_samples=12, tag=tag,
                                                       seed=tag, bos=False)) for tag in range(2)]
    assert plain[0].tokenizer_ids["bos_id"] is None
    batch = next(iter(MultimodalLoader(plain, seq_length=64, micro_batch_size=2, tokens_per_image=4,
                                       num_samples=8, pack_window=64)))
    assert not (batch["tokens"] == TOKENIZER["bos_id"]).any()
    with pytest.raises(ValueError, match="tokenizer differs.*bos_id"):
        MultimodalDataset(plain[0].readers + datasets[0].readers)
    with pytest.raises(ValueError, match="disagree on bos_id"):
        MultimodalLoader([datasets[0], plain[0]], seq_length=64, micro_batch_size=2, tokens_per_image=4,
                         num_samples=8, pack_window=64)
