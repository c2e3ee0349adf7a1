"""Image generation (generation/sample.py) on a tiny model, in this process (one rank): the KV
cache against full recompute, a batch of prompts of different lengths against each prompt
alone, classifier-free guidance, and condition dropout (models/pixel.py drop_conditions)."""

import pytest
import torch

from tests.objectives._jobs import IMAGE_TOKEN, TOKENS_PER_IMAGE, tiny_config

NULL = 5
CAPTIONS = ([1, 20, 30, 6], [1, 40, 41, 42, 43, 44, 45, 6])  # BOS caption <image_start>(=6)


def _randomise(module, seed):
    """Random values instead of adaLN-Zero's zeros (untrained, the denoiser outputs zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.fixture(scope="module")
def models():
    from megatron_unihetero import parallel

    with parallel.single_process(seed=9):
        built = {}
        for routing in ("hetero", "shared"):
            config = tiny_config(pixel_weight=1.0, routing=routing)
            config.pixel.cond_dropout, config.pixel.null_token_id = 0.1, NULL
            model = parallel.build_model(config)
            _randomise(model.pixel_head, 3)
            built[routing] = model
        yield built


def _close(a, b):
    # A random denoiser's DDIM amplifies float rounding (latents of ~1e4 here): a tolerance
    # relative to the largest latent.
    scale = float(a.latents.abs().max())
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("routing", ["hetero", "shared"])
def test_cache_equals_full_recompute(models, routing, one_thread):
    from megatron_unihetero.generation.sample import ImageSampling, generate_latents

    model = models[routing]
    params = ImageSampling(cfg_scale=2.5, seed=4)  # a padded batch of 2 prompts x 2 streams
    cached = generate_latents(model, CAPTIONS, params)
    full = generate_latents(model, CAPTIONS, params, use_cache=False)
    assert cached.latents.shape == (2, TOKENS_PER_IMAGE, model.pixel_head.token_dim)
    assert cached.embeddings.shape == (2, TOKENS_PER_IMAGE, 32)
    _close(cached, full)


def _row(tokens, i):
    return type(tokens)(latents=tokens.latents[i:i + 1], embeddings=tokens.embeddings[i:i + 1])


def test_batch_equals_each_prompt_alone(models, one_thread):
    from megatron_unihetero.generation.sample import ImageSampling, generate_latents

    model = models["hetero"]
    for scale in (1.0, 3.0):
        batch = generate_latents(model, CAPTIONS, ImageSampling(cfg_scale=scale, seed=7))
        for i, prompt in enumerate(CAPTIONS):  # prompt i of the batch draws from seed + i
            alone = generate_latents(model, [prompt], ImageSampling(cfg_scale=scale, seed=7 + i))
            _close(_row(batch, i), alone)


def test_guidance(models, one_thread):
    from megatron_unihetero.generation.sample import ImageSampling, generate_latents, null_prompt

    model = models["shared"]
    prompt = CAPTIONS[1]
    plain = generate_latents(model, [prompt], ImageSampling(seed=2))
    assert ImageSampling(cfg_scale=1.0).guided is False  # scale 1 is the unguided sampler
    guided = {g: generate_latents(model, [prompt], ImageSampling(cfg_scale=4.0, guide=g, seed=2))
              for g in ("both", "semantic", "pixel")}
    for g, out in guided.items():
        assert (out.latents - plain.latents).abs().max() > 1e-3, g
    # guide=pixel keeps the conditional embeddings: only the pixel head's noise is mixed.
    torch.testing.assert_close(guided["pixel"].embeddings, plain.embeddings, rtol=1e-4, atol=1e-5)
    assert (guided["semantic"].embeddings - plain.embeddings).abs().max() > 1e-3
    # Scale 0 is the unconditional model: the null prompt run alone, unguided; the mixing and
    # the two streams in one batch are exact.
    uncond = generate_latents(model, [prompt], ImageSampling(cfg_scale=0.0, seed=2))
    alone = generate_latents(model, [null_prompt(prompt, NULL, True)], ImageSampling(seed=2))
    _close(uncond, alone)


def test_null_prompt_keeps_bos_only_when_documents_start_with_it():
    from megatron_unihetero.generation.sample import null_prompt

    assert null_prompt(CAPTIONS[0], NULL, True) == [1, NULL, NULL, 6]
    assert null_prompt([20, 30, 6], NULL, False) == [NULL, NULL, 6]  # a tokenizer without BOS


def test_guidance_needs_condition_dropout(models):
    from megatron_unihetero import parallel
    from megatron_unihetero.generation.sample import ImageSampling, check_model

    model = parallel.build_model(tiny_config(pixel_weight=1.0))
    check_model(model, ImageSampling())
    with pytest.raises(ValueError, match="cond_dropout"):
        check_model(model, ImageSampling(cfg_scale=2.0))
    with pytest.raises(ValueError, match="model.pixel.weight"):
        check_model(parallel.build_model(tiny_config()), ImageSampling())
    with pytest.raises(ValueError, match="guide"):
        ImageSampling(guide="text")


def _documents(rows, docs_per_row):
    """Rows of documents ``BOS c c c <start> <image> <end>`` (text before the image) and
    ``BOS <start> <image> <end> c c`` (image first), one token per image."""
    t2i, i2t = [1, 20, 21, 22, 6, IMAGE_TOKEN, 7], [1, 6, IMAGE_TOKEN, 7, 23, 24, 25]
    tokens, segments = [], []
    for _ in range(rows):
        row, seg = [], []
        for d in range(docs_per_row):
            doc = t2i if d % 2 == 0 else i2t
            row += doc
            seg += [d] * len(doc)
        tokens.append(row)
        segments.append(seg)
    return torch.tensor(tokens), torch.tensor(segments, dtype=torch.int32)


def test_condition_dropout_rate_and_determinism():
    from megatron_unihetero.models import interleaver
    from megatron_unihetero.models.config import PixelGenConfig
    from megatron_unihetero.models.pixel import drop_conditions

    tokens, segments = _documents(32, 80)
    layout = interleaver.layout(tokens, image_token_id=IMAGE_TOKEN, tokens_per_image=1,
                                num_images=32 * 80, segment_ids=segments)
    caption = interleaver.condition_positions(layout, starts_with_bos=True)
    # Exactly the three caption tokens of each text-to-image document: not BOS, not the marker.
    assert torch.equal(caption[0, :14], torch.tensor([0, 1, 1, 1, 0, 0, 0] + [0] * 7, dtype=torch.bool))
    # Documents without BOS (Qwen2's tokenizer): the first token is the caption's, so it is
    # nulled too (and the second document reads as a one-token caption before its image).
    no_bos = interleaver.condition_positions(layout, starts_with_bos=False)
    assert torch.equal(no_bos[0, :14], torch.tensor([1, 1, 1, 1, 0, 0, 0] + [1] + [0] * 6, dtype=torch.bool))
    config = PixelGenConfig(weight=1.0, cond_dropout=0.1, null_token_id=NULL)
    torch.manual_seed(11)
    dropped = drop_conditions(tokens, layout, config, starts_with_bos=True)
    torch.manual_seed(11)
    assert torch.equal(dropped, drop_conditions(tokens, layout, config, starts_with_bos=True))  # the seed decides
    changed = dropped != tokens
    assert torch.equal(changed, changed & caption)  # nothing but captions changes
    assert bool((dropped[changed] == NULL).all())
    # Per document: all of its caption or none of it.
    per_doc = changed.view(32, 40, 2, 7)[:, :, 0, 1:4]  # the t2i documents' caption tokens
    assert bool((per_doc.all(-1) | ~per_doc.any(-1)).all())
    rate = per_doc.all(-1).float().mean().item()
    assert abs(rate - 0.1) < 0.025, rate  # 1280 documents: 4 standard deviations
    torch.manual_seed(12)
    assert not torch.equal(dropped, drop_conditions(tokens, layout, config, starts_with_bos=True))


def test_model_feeds_dropped_conditions_in_training_only(models):
    from megatron_unihetero.models import interleaver
    from megatron_unihetero.models.pixel import drop_conditions

    from tests.objectives._jobs import make_batch

    model = models["shared"]
    batch = make_batch(seed=1)
    # Row 1's image follows text (positions 1..10 are its condition); row 0's comes first.
    fed = []
    hook = model.llm.embedding.register_forward_hook(lambda m, args, out: fed.append(args[0].clone()))
    try:
        layout = interleaver.layout(batch["tokens"], image_token_id=IMAGE_TOKEN,
                                    tokens_per_image=TOKENS_PER_IMAGE, num_images=2)
        expected = {}
        for seed in range(40):  # until a draw drops row 1's caption
            torch.manual_seed(seed)
            expected = drop_conditions(batch["tokens"], layout, model.cfg.pixel, starts_with_bos=True)
            if not torch.equal(expected, batch["tokens"]):
                break
        assert not torch.equal(expected, batch["tokens"])
        model.train()
        torch.manual_seed(seed)
        model(**batch)
        model.eval()
        model(**batch)
    finally:
        hook.remove()
        model.eval()
    assert torch.equal(fed[0], expected) and torch.equal(fed[1], batch["tokens"])
