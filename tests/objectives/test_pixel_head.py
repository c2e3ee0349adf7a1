"""The pixel objective's parts on their own: schedule, denoiser loss, DDIM sampler, the latent
token grid, the VAE wrapper, config validation and the token count (no process group)."""

import pytest
import torch

from megatron_unihetero.models.config import ConfigError, PixelGenConfig
from megatron_unihetero.models.pixel import PixelHead, noise_schedule, pixel_loss
from megatron_unihetero.models.vae import patchify, unpatchify


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/objectives/conftest.py


def _head(prediction="epsilon", steps=100, **kw):
    cfg = PixelGenConfig(weight=1.0, routing="shared", denoiser_width=64, denoiser_depth=2,
                         num_diffusion_steps=steps, num_sampling_steps=steps,
                         prediction=prediction, **kw)
    return PixelHead(cfg, hidden_size=16, token_dim=8)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_decreases_from_one_to_near_zero(kind):
    ab = noise_schedule(PixelGenConfig(weight=1.0, noise_schedule=kind,
                                       num_diffusion_steps=1000)).alphas_cumprod
    assert ab.shape == (1000,)
    assert bool((ab[1:] < ab[:-1]).all())
    assert 0.99 < float(ab[0]) < 1.0 and float(ab[-1]) < 0.01


def test_diffusion_loss_starts_at_one_and_falls_on_a_toy_problem():
    torch.manual_seed(0)
    head = _head()
    cond = torch.randn(16, 16)
    latents = torch.randn(16, 8) * 0.5 + cond[:, :8]  # a fixed condition -> latent map

    def held_out_loss():
        gen = torch.Generator().manual_seed(123)  # the same noise draws before and after
        with torch.no_grad():
            return float(head.loss(cond.repeat(8, 1), latents.repeat(8, 1), generator=gen).mean())

    before = held_out_loss()
    assert abs(before - 1.0) < 0.1  # adaLN-Zero: the initial prediction is 0, E[eps^2] = 1
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        loss, count = pixel_loss(head, cond, latents)
        (loss / count).backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.6 * before, (before, after)


def test_diffusion_batch_mul_averages_draws_per_token():
    head = _head(diffusion_batch_mul=3)
    per_token = head.loss(torch.randn(5, 16), torch.randn(5, 8))
    assert per_token.shape == (5,)
    loss, count = pixel_loss(head, torch.randn(0, 16), torch.randn(0, 8))
    assert int(count) == 0 and float(loss) == 0.0 and loss.requires_grad


class _Oracle(torch.nn.Module):
    """Predicts the exact noise (or v) of a point mass at x0: DDIM must then land on x0."""

    def __init__(self, head, x0):
        super().__init__()
        self.head, self.x0 = head, x0
        self.output = torch.nn.Linear(1, 1)  # the sampler reads the dtype from here

    def forward(self, x, t, cond):
        ab = self.head.noise_scheduler.alphas_cumprod.to(x.device)[t][:, None]
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        if self.head.cfg.prediction == "epsilon":
            return eps
        return ab.sqrt() * eps - (1 - ab).sqrt() * self.x0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_sampler_recovers_the_point_mass(prediction):
    head = _head(prediction)
    x0 = torch.randn(4, 8)
    head.denoiser = _Oracle(head, x0)
    for steps in (100, 7):
        sample = head.sample(torch.randn(4, 16), num_steps=steps,
                             generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(sample, x0, rtol=1e-4, atol=1e-4)


def test_patchify_puts_each_latent_patch_on_its_vision_token():
    grid, p, c = 4, 2, 3
    # latent value = index of the vision token (row-major over the grid) that covers it
    rows = torch.arange(grid * p)[:, None] // p
    cols = torch.arange(grid * p)[None, :] // p
    owner = (rows * grid + cols).float()
    latents = owner.expand(2, c, grid * p, grid * p).clone()
    tokens = patchify(latents, grid)
    assert tokens.shape == (2, grid * grid, c * p * p)
    for token in range(grid * grid):
        assert bool((tokens[:, token] == token).all())
    torch.testing.assert_close(unpatchify(tokens, grid, c), latents)
    with pytest.raises(ValueError):
        patchify(torch.zeros(1, c, 6, 6), 4)


def test_vae_encodes_to_the_token_grid_and_decodes_to_pixels():
    pytest.importorskip("diffusers")
    from megatron_unihetero.models.vae import PixelVAE

    torch.manual_seed(0)
    vae = PixelVAE(PixelGenConfig(weight=1.0), grid=4, image_size=32)
    assert (vae.latent_side, vae.patch, vae.channels, vae.token_dim) == (16, 4, 4, 64)
    images = torch.randn(2, 3, 32, 32)
    tokens = vae.encode(images)
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(tokens, vae.encode(images))  # the posterior mean: deterministic
    pixels = vae.decode(tokens)
    assert pixels.shape == (2, 3, 32, 32) and float(pixels.min()) >= 0 and float(pixels.max()) <= 1
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ConfigError, match="vae_image_size"):
        PixelVAE(PixelGenConfig(weight=1.0), grid=3, image_size=32)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="pixel.routing"):
        PixelGenConfig(routing="both")
    with pytest.raises(ConfigError, match="pixel.latent_channels"):
        PixelGenConfig(latent_source="batch")
    assert not PixelGenConfig().enabled and PixelGenConfig(weight=0.5).enabled


def test_pixel_token_count_is_the_semantic_positions():
    from megatron_unihetero.training.losses import OBJECTIVES, count_targets

    assert "pixel" in OBJECTIVES
    tokens = torch.tensor([[5, 3, 3, 3, 3, 6, 3, 3], [3, 3, 7, 8, 9, 9, 9, 9]])
    segment_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0, -1, -1]])
    counts = count_targets({"tokens": tokens, "labels": tokens, "segment_ids": segment_ids}, 3)
    # row 0: positions 0..3 precede an image token; 6 does (7, same doc); 5 -> 6 crosses docs.
    # row 1: position 0 precedes position 1.
    assert counts["pixel"] == counts["semantic"] == 6


def test_bf16_head_keeps_the_schedule_in_fp32():
    head = _head().to(torch.bfloat16)
    assert head.noise_scheduler.alphas_cumprod.dtype == torch.float32
    cond = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    loss, _ = pixel_loss(head, cond, torch.randn(3, 8))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert cond.grad is not None
    sample = head.sample(cond.detach(), num_steps=3)
    assert sample.shape == (3, 8) and sample.dtype == torch.float32
