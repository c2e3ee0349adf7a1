"""The vision-token interleaver: placement, masks, semantic targets, truncation and errors."""

import pytest
import torch

from megatron_unihetero.models import interleaver
from megatron_unihetero.models.interleaver import InterleaveError

IMG = 3  # image placeholder id
T = 2  # tokens per image
H = 4  # embedding width


def _embed(tokens):
    """Text 'embeddings' that encode the token id, so placement is easy to read."""
    return tokens[..., None].float().expand(*tokens.shape, H).clone()


def _visual(n_images):
    """Image i, token t has embedding value 100 * (i + 1) + t."""
    values = torch.tensor([[100.0 * (i + 1) + t for t in range(T)] for i in range(n_images)])
    return values[..., None].expand(n_images, T, H).clone()


def _layout(tokens, n_images, **kwargs):
    return interleaver.layout(tokens, image_token_id=IMG, tokens_per_image=T,
                              num_images=n_images, **kwargs)


def test_one_image_is_placed_and_masked():
    tokens = torch.tensor([[10, IMG, IMG, 11, 12]])
    lay = _layout(tokens, 1)
    out = interleaver.scatter_visual(_embed(tokens), _visual(1), lay)
    assert out[0, :, 0].tolist() == [10, 100, 101, 11, 12]
    assert lay.visual_mask[0].tolist() == [False, True, True, False, False]
    assert lay.text_mask[0].tolist() == [True, False, False, True, True]
    # position i predicts the visual embedding at i+1: positions 0 and 1
    assert lay.semantic_mask[0].tolist() == [True, True, False, False, False]
    targets = interleaver.semantic_targets(_visual(1), lay)
    assert targets[:, 0].tolist() == [100, 101]


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_image_at_start_middle_and_end(where):
    text = [20, 21, 22]
    image = [IMG] * T
    seq = {"start": image + text, "middle": text[:1] + image + text[1:], "end": text + image}[where]
    tokens = torch.tensor([seq])
    lay = _layout(tokens, 1)
    out = interleaver.scatter_visual(_embed(tokens), _visual(1), lay)
    placed = out[0, lay.visual_mask[0], 0].tolist()
    assert placed == [100, 101]
    first = seq.index(IMG)
    expected_sem = [first - 1, first] if first > 0 else [first]  # no position before the start
    assert torch.nonzero(lay.semantic_mask[0]).flatten().tolist() == expected_sem
    targets = interleaver.semantic_targets(_visual(1), lay)
    assert targets[:, 0].tolist() == ([100, 101] if first > 0 else [101])


def test_several_images_over_several_rows_keep_their_order():
    tokens = torch.tensor([
        [IMG, IMG, 10, IMG, IMG, 11],  # row 0: images 0 and 1
        [12, 13, IMG, IMG, IMG, IMG],  # row 1: images 2 and 3, back to back
    ])
    lay = _layout(tokens, 4, images_per_sample=torch.tensor([2, 2]))
    out = interleaver.scatter_visual(_embed(tokens), _visual(4), lay)
    assert out[0, :, 0].tolist() == [100, 101, 10, 200, 201, 11]
    assert out[1, :, 0].tolist() == [12, 13, 300, 301, 400, 401]
    assert lay.images_per_sample.tolist() == [2, 2]
    targets = interleaver.semantic_targets(_visual(4), lay)
    # row 0: positions 0 (->101), 2 (->200), 3 (->201); row 1: 1..4 (->300, 301, 400, 401)
    assert targets[:, 0].tolist() == [101, 200, 201, 300, 301, 400, 401]


def test_semantic_positions_do_not_cross_documents_or_padding():
    tokens = torch.tensor([[10, 11, IMG, IMG, 0, 0]])
    segment_ids = torch.tensor([[0, 1, 1, 1, -1, -1]], dtype=torch.int32)
    lay = _layout(tokens, 1, segment_ids=segment_ids)
    assert lay.semantic_mask[0].tolist() == [False, True, True, False, False, False]
    segment_ids = torch.tensor([[0, 0, 1, 1, -1, -1]], dtype=torch.int32)  # image opens doc 1
    lay = _layout(tokens, 1, segment_ids=segment_ids)
    assert lay.semantic_mask[0].tolist() == [False, False, True, False, False, False]
    assert not lay.text_mask[0, 4:].any()


def test_truncation_keeps_the_first_embeddings_of_a_cut_image():
    tokens = torch.tensor([[10, IMG, IMG, 11, IMG, IMG]])
    lay = _layout(tokens, 2, max_length=5)
    assert lay.tokens.shape == (1, 5)
    assert lay.num_truncated_tokens == 1
    out = interleaver.scatter_visual(_embed(lay.tokens), _visual(2), lay)
    assert out[0, :, 0].tolist() == [10, 100, 101, 11, 200]
    # a row whose later image is cut entirely: images of the next row still line up
    tokens = torch.tensor([[IMG, IMG, 10, IMG, IMG], [IMG, IMG, 11, 12, 13]])
    lay = _layout(tokens, 3, max_length=3)
    out = interleaver.scatter_visual(_embed(lay.tokens), _visual(3), lay)
    assert out[1, :2, 0].tolist() == [300, 301]
    assert lay.num_truncated_tokens == 4


def test_partial_image_block_is_an_error_naming_the_sample():
    tokens = torch.tensor([[10, 11, 12], [10, IMG, 12]])
    with pytest.raises(InterleaveError, match=r"sample 1: a run of 1 image placeholder tokens starts at position 1"):
        _layout(tokens, 0)


def test_image_count_mismatch_is_an_error():
    tokens = torch.tensor([[10, IMG, IMG, 12]])
    with pytest.raises(InterleaveError, match=r"make 1 image\(s\).*but 2 image\(s\) were given"):
        _layout(tokens, 2)
    with pytest.raises(InterleaveError, match=r"sample 0: 2 image placeholder tokens .* but 0 image\(s\)"):
        _layout(tokens, 1, images_per_sample=torch.tensor([0]))


def test_tokens_must_be_two_dimensional():
    with pytest.raises(InterleaveError, match=r"tokens must be \[batch, seq\]"):
        _layout(torch.tensor([10, IMG, IMG]), 1)


def test_images_of_the_wrong_shape_are_refused_by_the_encoder():
    from megatron_unihetero.models.config import VisionConfig
    from megatron_unihetero.models.vision import VisionEncoder

    encoder = VisionEncoder(VisionConfig())
    with pytest.raises(ValueError, match=r"images must have shape \[n, 3, 32, 32\].*got \[2, 3, 16, 16\]"):
        encoder(torch.randn(2, 3, 16, 16))


def test_model_refuses_rows_longer_than_its_maximum():
    from megatron_unihetero.testing import run_distributed_test

    from tests.models import _parity_jobs as jobs

    run_distributed_test(jobs.too_long_job, 1)


def test_each_encoder_family_has_its_own_normalisation():
    from megatron_unihetero.models.config import VisionConfig
    from megatron_unihetero.models.vision import image_normalization

    assert image_normalization(VisionConfig(model_type="dinov2"))[0] == (0.485, 0.456, 0.406)
    assert image_normalization(VisionConfig(model_type="siglip")) == ((0.5,) * 3, (0.5,) * 3)
    custom = VisionConfig(model_type="clip", image_mean=[0.1, 0.2, 0.3], image_std=[1.0, 1.0, 1.0])
    assert image_normalization(custom) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
