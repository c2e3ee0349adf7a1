"""Jobs that need megatron's process groups (module-level so spawned workers can import them)."""

import torch

from megatron_unihetero.models.config import LLMConfig, ModelConfig, PixelGenConfig, SemanticGenConfig

IMAGE_TOKEN = 3
VOCAB = 128
TOKENS_PER_IMAGE = 16  # the default tiny Dinov2: 32px images, 8px patches, CLS dropped


def tiny_config(*, semantic_target="input_embedding", ema_decay=0.9, pixel_weight=0.0,
                routing="hetero", semantic_weight=1.0):
    return ModelConfig(
        llm=LLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                      vocab_size=VOCAB, max_sequence_length=64, attention_impl="torch"),
        semantic=SemanticGenConfig(weight=semantic_weight, target=semantic_target,
                                   ema_decay=ema_decay),
        pixel=PixelGenConfig(weight=pixel_weight, routing=routing, decoder_layers=1,
                             decoder_heads=4, denoiser_width=32, denoiser_depth=2,
                             num_diffusion_steps=100, num_sampling_steps=5),
        image_token_id=IMAGE_TOKEN,
    )


def make_batch(seed=0, batch=2, seq=40):
    """Two rows, one image each (at the start of row 0, in the middle of row 1)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, VOCAB, (batch, seq), generator=gen)
    tokens[0, 1:1 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    tokens[1, 12:12 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    position_ids = torch.arange(seq)[None].expand(batch, seq).contiguous()
    images = torch.randn(2, 3, 32, 32, generator=gen)
    return dict(tokens=tokens, labels=labels, position_ids=position_ids, images=images)


def _llm_grad_norm(model):
    total = 0.0
    for name, param in model.named_parameters():
        if name.startswith(("llm.", "projector.")) and param.grad is not None:
            total += float(param.grad.norm()) ** 2
    return total ** 0.5


def _unzero(module):
    """adaLN-Zero starts the denoiser's output at exactly zero, which blocks every gradient
    upstream of its output layer; one optimizer step would lift that, random values do here."""
    with torch.no_grad():
        for param in module.parameters():
            if not param.abs().sum():
                param.normal_(0.0, 0.1)


def routing_job():
    """hetero: the pixel loss alone sends no gradient to the LLM (nor the projector); shared does."""
    from megatron_unihetero import parallel

    parallel.initialize(1, 1, seed=3)
    for routing in ("hetero", "shared"):
        model = parallel.build_model(tiny_config(pixel_weight=1.0, routing=routing))
        _unzero(model.pixel_head)
        out = model(**make_batch())
        assert set(out) == {"text", "semantic", "pixel"}, out.keys()
        loss_sum, count = out["pixel"]
        assert int(count) == 2 * (TOKENS_PER_IMAGE - 0), count  # every image token has a predecessor
        assert torch.isfinite(loss_sum) and float(loss_sum) > 0
        loss_sum.backward()
        head_grad = sum(float(p.grad.detach().norm()) for p in model.pixel_head.parameters() if p.grad is not None)
        assert head_grad > 0, routing
        llm_grad = _llm_grad_norm(model)
        if routing == "hetero":
            assert llm_grad == 0.0, llm_grad
            assert model.pixel_head.decoder.layers[0].linear1.weight.grad.norm() > 0
        else:
            assert llm_grad > 0.0, llm_grad
    parallel.destroy()


def ema_job():
    """sync_semantic_targets moves the EMA projector: ema = decay * ema + (1 - decay) * projector."""
    from megatron_unihetero import parallel

    parallel.initialize(1, 1, seed=5)
    decay = 0.9
    model = parallel.build_model(tiny_config(semantic_target="ema_input_embedding", ema_decay=decay))
    pairs = list(zip(model.target_projector.parameters(), model.projector.parameters()))
    for target, source in pairs:  # building resets the EMA copy to the projector
        torch.testing.assert_close(target, source, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.target_projector.parameters())
    old = [t.detach().clone() for t, _ in pairs]
    with torch.no_grad():
        for _, source in pairs:
            source.add_(torch.randn_like(source))
    parallel.sync_semantic_targets(model)
    for (target, source), before in zip(pairs, old):
        expected = decay * before + (1 - decay) * source.detach()
        torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(target, source)
    # The loss reads its targets from the EMA copy, not from the projector.
    batch = make_batch()
    features = model.vision(batch["images"])
    torch.testing.assert_close(model.semantic_targets(features, model.projector(features)),
                               model.target_projector(features))
    parallel.destroy()


def sampling_job(output_path):
    """sample_image writes a PNG of the VAE's size from a prompt."""
    from PIL import Image

    from megatron_unihetero import parallel
    from megatron_unihetero.generation.sample import generate_latents, sample_image

    parallel.initialize(1, 1, seed=9)
    model = parallel.build_model(tiny_config(pixel_weight=1.0, routing="hetero"))
    prompt = [1, 20, 30, 4]
    latents, embeddings = generate_latents(model, prompt, seed=1)
    assert latents.shape == (TOKENS_PER_IMAGE, model.pixel_head.token_dim)
    assert embeddings.shape == (TOKENS_PER_IMAGE, 32)
    # Feedback check: the k-th prediction was made with predictions 0..k-1 as inputs, so
    # re-running with the generated embeddings in place reproduces the last prediction.
    again, _ = generate_latents(model, prompt, seed=1)
    torch.testing.assert_close(latents, again)
    sample_image(model, prompt, output_path, seed=2)
    with Image.open(output_path) as image:
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
    parallel.destroy()
