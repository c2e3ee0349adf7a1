"""Pixel generation: a MAR-style diffusion head predicting the next VAE latent token.

The paper's pixel arm: position i, whose next position is visual, predicts the latent token of
position i+1 (the same shift as the semantic head). As in MAR
(Li et al., 2024, "Autoregressive Image Generation without Vector Quantization"), the
prediction is not a regression: a small MLP denoiser, conditioned on a vector from the LLM,
learns p(latent | condition) with a diffusion loss (MSE on the noise), with
``diffusion_batch_mul`` noise draws per token so the small head sees more noise levels per
LLM forward. The noise schedule and the sampler are diffusers' ``DDPMScheduler`` and
``DDIMScheduler``. Two routings decide where the condition comes from:

* ``shared``: the LLM's last hidden state itself, so the pixel gradient reaches the LLM (the
  setting the paper says hurts understanding at scale);
* ``hetero``: a separate "modality decoder" (a few causal transformer layers) fed the hidden
  states DETACHED, so the LLM gets no pixel gradient (the paper's "modality related decoder").

The head is replicated over tensor-parallel ranks like the semantic head; its noise comes from
torch's default generator, which every rank seeds identically (parallel.initialize) and
consumes identically, so TP replicas stay equal. Approximation: data-parallel ranks then draw
the same (t, noise) sequence too; their latents differ, so this only correlates the draws.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from megatron_unihetero.models import interleaver
from megatron_unihetero.models.config import PixelGenConfig
from megatron_unihetero.models.heads import LossAndCount
from megatron_unihetero.models.vae import require_diffusers


def noise_schedule(config: PixelGenConfig):
    """The training noise schedule: diffusers' ``DDPMScheduler`` (betas, alpha-bar, noising).

    ``linear``: DDPM's betas (1e-4 .. 0.02 over 1000 steps), rescaled to other step counts as
    in improved-diffusion / MAR, so the total noise added stays comparable. ``cosine``: Nichol &
    Dhariwal (2021), alpha-bar(t) = cos^2((t/T + s) / (1 + s) * pi / 2) with s = 0.008 and the
    betas capped at 0.999 (diffusers' ``squaredcos_cap_v2``). The tables are float32.
    """
    diffusers = require_diffusers()
    steps = config.num_diffusion_steps
    kwargs = dict(num_train_timesteps=steps, clip_sample=False,
                  prediction_type="epsilon" if config.prediction == "epsilon" else "v_prediction")
    if config.noise_schedule == "linear":
        scale = 1000.0 / steps
        kwargs.update(beta_schedule="linear", beta_start=scale * 1e-4, beta_end=scale * 0.02)
    elif config.noise_schedule == "cosine":
        kwargs.update(beta_schedule="squaredcos_cap_v2")
    else:
        raise ValueError(f"noise schedule must be cosine or linear; got {config.noise_schedule!r}")
    return diffusers.DDPMScheduler(**kwargs)


def sampling_schedule(noise, num_steps: int):
    """Deterministic DDIM (eta = 0) over the alpha-bar of ``noise`` (a :func:`noise_schedule`):
    diffusers' ``DDIMScheduler`` with ``num_steps`` steps.

    Trailing timestep spacing (T-1, T-1-T/n, ...): sampling starts from the noisiest training
    level, and the last step goes to alpha-bar 1 (``set_alpha_to_one``), the clean latent.
    diffusers' DDIM steps from t to t - T // n; when n divides T that is the next timestep.
    """
    diffusers = require_diffusers()
    schedule = diffusers.DDIMScheduler.from_config(noise.config, set_alpha_to_one=True,
                                                   timestep_spacing="trailing", clip_sample=False)
    schedule.set_timesteps(num_steps)
    return schedule


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps [N] -> [N, dim] (DiT/MAR)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class AdaLNBlock(nn.Module):
    """Residual MLP block whose LayerNorm shift/scale and residual gate come from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, cond):
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class Denoiser(nn.Module):
    """MAR's SimpleMLPAdaLN: predicts the noise (or v) of a noisy latent token.

    The timestep embedding plus the projected condition drive every block's AdaLN. The
    modulations and the output layer start at zero (adaLN-Zero), so training starts from the
    identity blocks and a zero prediction.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, token_dim)
        for module in [b.modulation[-1] for b in self.blocks] + [self.final_modulation[-1], self.output]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(timestep_embedding(t, self.width).to(x.dtype)) + self.cond_embed(cond)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_modulation(y).chunk(2, dim=-1)
        return self.output(_modulate(self.final_norm(h), shift, scale))


class ModalityDecoder(nn.Module):
    """The hetero routing's separate decoder: pre-norm causal transformer layers over the
    (detached) LLM hidden states, attending within each packed document only."""

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden_size, num_heads, dim_feedforward=4 * hidden_size,
                                       dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, hidden: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, H], segment_ids [B, S] (-1: padding) -> [B, S, H]."""
        b, s, _ = hidden.shape
        causal = torch.ones(s, s, dtype=torch.bool, device=hidden.device).tril()
        same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
        # Padding rows see only themselves (a fully masked row would give NaN).
        allowed = (causal & same_doc) | torch.eye(s, dtype=torch.bool, device=hidden.device)
        mask = (~allowed).repeat_interleave(self.num_heads, dim=0)  # [B * heads, S, S]
        for layer in self.layers:
            hidden = layer(hidden, src_mask=mask)
        return self.norm(hidden)


class PixelHead(nn.Module):
    """Condition routing + denoiser + noise schedule: the whole pixel objective's head."""

    def __init__(self, config: PixelGenConfig, hidden_size: int, token_dim: int):
        super().__init__()
        self.cfg = config
        self.token_dim = token_dim
        if config.routing == "hetero":
            if hidden_size % config.decoder_heads:
                raise ValueError(f"pixel.decoder_heads={config.decoder_heads} must divide the "
                                 f"LLM hidden size {hidden_size}")
            self.decoder = ModalityDecoder(hidden_size, config.decoder_layers, config.decoder_heads)
        self.denoiser = Denoiser(token_dim, hidden_size, config.denoiser_width, config.denoiser_depth)
        # A plain attribute, not a module or buffer: derived from the config (no checkpoint
        # entry), and its float32 tables stay float32 when the model is cast to bf16 (alpha-bar
        # near 1 needs the bits).
        self.noise_scheduler = noise_schedule(config)

    def condition(self, hidden_bsh: torch.Tensor, semantic_mask: torch.Tensor,
                  segment_ids: torch.Tensor) -> torch.Tensor:
        """The denoiser's condition [N_sem, H] at the semantic positions.

        ``shared``: the LLM hidden state (gradient reaches the LLM). ``hetero``: the modality
        decoder's output on detached hidden states (no gradient reaches the LLM).
        """
        if self.cfg.routing == "shared":
            return hidden_bsh[semantic_mask]
        return self.decoder(hidden_bsh.detach(), segment_ids)[semantic_mask]

    def _target_and_noisy(self, x0, noise, t):
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        if self.cfg.prediction == "epsilon":
            return x_t, noise
        return x_t, self.noise_scheduler.get_velocity(x0, noise, t)

    def loss(self, cond: torch.Tensor, latents: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-token diffusion loss [N]: MSE of the predicted noise (or v), averaged over the
        channels and over ``diffusion_batch_mul`` independent (t, noise) draws."""
        mul = self.cfg.diffusion_batch_mul
        x0 = latents.detach().float().repeat(mul, 1)  # [mul * N, C], float32 noising
        c = cond.repeat(mul, 1)
        t = torch.randint(0, self.cfg.num_diffusion_steps, (x0.shape[0],), generator=generator,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t, target = self._target_and_noisy(x0, noise, t)
        dtype = self.denoiser.output.weight.dtype
        prediction = self.denoiser(x_t.to(dtype), t, c.to(dtype)).float()
        per_draw = (prediction - target).pow(2).mean(dim=-1)
        return per_draw.view(mul, -1).mean(dim=0)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, num_steps: Optional[int] = None, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, *, noise: Optional[torch.Tensor] = None,
               uncond: Optional[torch.Tensor] = None, cfg_scale: float = 1.0) -> torch.Tensor:
        """Latent tokens [N, C] for conditions [N, H] by deterministic DDIM (eta = 0) over
        ``num_steps`` trailing timesteps (:func:`sampling_schedule`).

        ``temperature`` scales the starting noise (MAR scales each step's noise instead; with
        eta = 0 the start is the only randomness), drawn from ``generator`` or given as
        ``noise`` [N, C] (standard normal; generation/sample.py draws each prompt's from its
        own generator, so a batch samples what each prompt alone would).
        ``uncond`` [N, H]: classifier-free guidance (MAR): the denoiser runs on the conditions
        and the unconditional ones as one batch, and each step takes
        ``uncond_out + cfg_scale * (cond_out - uncond_out)`` of its prediction (noise or v).
        """
        schedule = sampling_schedule(self.noise_scheduler, num_steps or self.cfg.num_sampling_steps)
        dtype = self.denoiser.output.weight.dtype
        if noise is None:
            noise = torch.randn(cond.shape[0], self.token_dim, generator=generator,
                                device=cond.device, dtype=torch.float32)
        x = noise.float() * temperature
        both = cond if uncond is None else torch.cat([cond, uncond])
        for t in schedule.timesteps.tolist():
            inputs = x if uncond is None else torch.cat([x, x])
            out = self.denoiser(inputs.to(dtype), torch.full((inputs.shape[0],), t, device=x.device),
                                both.to(dtype)).float()
            if uncond is not None:
                out_c, out_u = out.chunk(2)
                out = out_u + cfg_scale * (out_c - out_u)
            x = schedule.step(out, t, x, eta=0.0).prev_sample
        return x


def drop_conditions(tokens: torch.Tensor, layout: interleaver.Layout,
                    config: PixelGenConfig, *, starts_with_bos: bool) -> torch.Tensor:
    """Classifier-free guidance's condition dropout (training, first stage): ``tokens`` [B, S]
    with, in each document dropped (probability ``cond_dropout``), its condition (the caption
    before its first image, BOS excepted when ``starts_with_bos``:
    :func:`interleaver.condition_positions`) replaced by ``null_token_id``.

    The drop is at the input, so everything downstream of the image positions sees the null
    condition: the semantic and the pixel objectives both learn the image unconditionally
    there, which is what guiding either prediction needs (generation/sample.py). The text loss
    at the nulled positions is kept: the step's token counts are fixed from the batch before
    it runs (training/losses.py), and those targets (the caption after null inputs) are only
    an unconditional text prior. Image-first documents (captioning) have no condition and are
    never changed.

    One uniform draw per (row, document index) slot, [B, S], from torch's default CPU
    generator on every call: parallel.initialize seeds it with the run's seed on every rank,
    the TP ranks of the first stage consume it identically (so they agree), the checkpoint
    keeps its state (a resumed run draws what the uninterrupted one would), and only the first
    stage acts on it (the later stages need not know: their objectives are unchanged
    functions of the hidden states). Approximation, as for the pixel head's noise: DP ranks
    draw the same slots (their documents differ).
    """
    draws = torch.rand(tokens.shape, dtype=torch.float32)  # default CPU generator, any device
    dropped = draws.to(tokens.device) < config.cond_dropout
    documents = layout.segment_ids.long().clamp(min=0)
    drop = dropped.gather(1, documents) & interleaver.condition_positions(layout, starts_with_bos)
    return tokens.masked_fill(drop, config.null_token_id)


def pixel_loss(head: PixelHead, cond: torch.Tensor, latents: torch.Tensor) -> LossAndCount:
    """Summed diffusion loss over the semantic positions, and their count."""
    count = torch.tensor(cond.shape[0], dtype=torch.long, device=cond.device)
    if cond.shape[0] == 0:
        # Keep the head (and, shared, the condition's graph) in the backward on every rank.
        return sum(p.sum() for p in head.parameters()) * 0.0 + cond.sum() * 0.0, count
    return head.loss(cond, latents).sum(), count
