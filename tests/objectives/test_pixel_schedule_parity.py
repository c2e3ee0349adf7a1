"""The pixel head's noise schedule, noising and DDIM sampler, now diffusers' DDPMScheduler and
DDIMScheduler, give the values of the formulas they replaced.

The ``_old_*`` functions below are copies of the head's former schedule maths (kept here as
the reference); a few alpha-bar values computed by it are also hard-coded.
"""

import math

import pytest
import torch

from megatron_unihetero.models.config import PixelGenConfig
from megatron_unihetero.models.pixel import PixelHead


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/objectives/conftest.py


def _old_alphas_cumprod(kind: str, steps: int) -> torch.Tensor:
    if kind == "linear":
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    else:
        s = 0.008
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1.0 - betas, dim=0)


def _old_noisy_and_target(ab_table, x0, noise, t, prediction):
    ab = ab_table[t][:, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = noise if prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    return x_t, target


def _old_ddim(head, ab_table, cond, x, times):
    """The former sampling loop over the timesteps ``times`` (deterministic DDIM, eta = 0)."""
    for i, t in enumerate(times):
        ab = ab_table[t]
        ab_prev = ab_table[times[i + 1]] if i + 1 < len(times) else x.new_tensor(1.0)
        out = head.denoiser(x, torch.full((x.shape[0],), t), cond).float()
        if head.cfg.prediction == "epsilon":
            eps = out
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        else:
            x0 = ab.sqrt() * x - (1 - ab).sqrt() * out
            eps = (1 - ab).sqrt() * x + ab.sqrt() * out
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    return x


def _head(kind="cosine", steps=100, prediction="epsilon", mul=1):
    torch.manual_seed(0)
    cfg = PixelGenConfig(weight=1.0, routing="shared", denoiser_width=32, denoiser_depth=2,
                         num_diffusion_steps=steps, num_sampling_steps=steps, noise_schedule=kind,
                         prediction=prediction, diffusion_batch_mul=mul)
    head = PixelHead(cfg, hidden_size=16, token_dim=8)
    with torch.no_grad():  # adaLN-Zero starts at a zero prediction: make the denoiser nontrivial
        for param in head.denoiser.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return head


@pytest.mark.parametrize("steps", [1000, 100, 7])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_training_schedule_is_the_former_one(kind, steps):
    head = _head(kind, steps)
    ab = head.noise_scheduler.alphas_cumprod
    assert ab.dtype == torch.float32 and ab.shape == (steps,)
    # diffusers takes the cumulative product in float32, the former code in float64.
    torch.testing.assert_close(ab.double(), _old_alphas_cumprod(kind, steps), rtol=2e-5, atol=0)


def test_training_schedule_hard_coded_values():
    expected = {  # alpha-bar at t = 0, 333, 999 of 1000, from the former code
        "cosine": [0.999958715775178, 0.741974753106723, 2.4287669070348567e-09],
        "linear": [0.9999, 0.3186248549664457, 4.0358297653756754e-05],
    }
    for kind, values in expected.items():
        ab = _head(kind, 1000).noise_scheduler.alphas_cumprod[[0, 333, 999]].double()
        torch.testing.assert_close(ab, torch.tensor(values, dtype=torch.float64), rtol=2e-5, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_diffusion_loss_is_the_former_one(kind, prediction):
    """Same (t, noise) draws from the same generator, same noisy input and target."""
    head = _head(kind, 100, prediction, mul=2)
    cond, latents = torch.randn(5, 16), torch.randn(5, 8)
    got = head.loss(cond, latents, generator=torch.Generator().manual_seed(3))

    gen = torch.Generator().manual_seed(3)
    x0, c = latents.repeat(2, 1), cond.repeat(2, 1)
    t = torch.randint(0, 100, (x0.shape[0],), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ab_table = _old_alphas_cumprod(kind, 100).float()
    x_t, target = _old_noisy_and_target(ab_table, x0, noise, t, prediction)
    per_draw = (head.denoiser(x_t, t, c) - target).pow(2).mean(dim=-1)
    torch.testing.assert_close(got, per_draw.view(2, -1).mean(dim=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sampler_is_the_former_one_where_the_timesteps_agree(prediction):
    """As many sampling as training steps (99, 98, ..., 0) and a single step (99): the
    former sampler's timesteps are diffusers' trailing ones, and the samples agree."""
    head = _head("cosine", 100, prediction)
    ab_table = _old_alphas_cumprod("cosine", 100).float()
    cond = torch.randn(3, 16)
    for steps in (100, 1):
        old_times = torch.linspace(99, 0, steps).round().long().tolist()
        start = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
        want = _old_ddim(head, ab_table, cond, start, old_times)
        got = head.sample(cond, num_steps=steps, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sampler_takes_the_former_ddim_steps_on_trailing_timesteps(prediction):
    """Fewer sampling steps than training steps: diffusers' DDIM with trailing spacing runs the
    former update rule from T-1 down in equal strides of T / n, then to alpha-bar 1."""
    head = _head("cosine", 1000, prediction)
    ab_table = _old_alphas_cumprod("cosine", 1000).float()
    cond = torch.randn(3, 16)
    steps = 50
    times = list(range(999, 0, -20))
    assert times[-1] == 19 and len(times) == steps
    start = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    want = _old_ddim(head, ab_table, cond, start, times)
    got = head.sample(cond, num_steps=steps, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
