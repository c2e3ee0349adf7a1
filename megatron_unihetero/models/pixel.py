"""Pixel generation: a MAR-style diffusion head predicting the next VAE latent token.

The paper's pixel arm (DESIGN.md section 2): position i, whose next position is visual,
predicts the latent token of position i+1 (the same shift as the semantic head). As in MAR
(Li et al., 2024, "Autoregressive Image Generation without Vector Quantization"), the
prediction is not a regression: a small MLP denoiser, conditioned on a vector from the LLM,
learns p(latent | condition) with a diffusion loss (MSE on the noise), with
``diffusion_batch_mul`` noise draws per token so the small head sees more noise levels per
LLM forward. Two routings decide where the condition comes from:

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

from megatron_unihetero.models.config import PixelGenConfig
from megatron_unihetero.models.heads import LossAndCount


def alphas_cumprod(kind: str, steps: int) -> torch.Tensor:
    """Cumulative signal fraction alpha-bar_t for t = 0..steps-1 (float64)."""
    if kind == "linear":
        # DDPM's schedule (1e-4 .. 0.02 over 1000 steps), rescaled to other step counts as in
        # improved-diffusion / MAR, so the total noise added stays comparable.
        scale = 1000.0 / steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    elif kind == "cosine":
        # Nichol & Dhariwal (2021): alpha-bar(t) = cos^2((t/T + s) / (1 + s) * pi / 2).
        s = 0.008
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"noise schedule must be cosine or linear; got {kind!r}")
    return torch.cumprod(1.0 - betas, dim=0)


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
        # A plain attribute, not a buffer: derived from the config (no checkpoint entry), and
        # kept in float32 when the model is cast to bf16 (alpha-bar near 1 needs the bits).
        self._alphas_cumprod = alphas_cumprod(config.noise_schedule, config.num_diffusion_steps).float()

    def alpha_bar(self, t, device) -> torch.Tensor:
        if self._alphas_cumprod.device != torch.device(device):
            self._alphas_cumprod = self._alphas_cumprod.to(device)
        return self._alphas_cumprod[t]

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
        ab = self.alpha_bar(t, x0.device)[:, None]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = noise if self.cfg.prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return x_t, target

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
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Latent tokens [N, C] for conditions [N, H] by deterministic DDIM (eta = 0).

        ``temperature`` scales the starting noise (MAR scales each step's noise instead; with
        eta = 0 the start is the only randomness).
        """
        steps = num_steps or self.cfg.num_sampling_steps
        total = self.cfg.num_diffusion_steps
        times = torch.linspace(total - 1, 0, steps).round().long().tolist()
        dtype = self.denoiser.output.weight.dtype
        x = torch.randn(cond.shape[0], self.token_dim, generator=generator,
                        device=cond.device, dtype=torch.float32) * temperature
        for i, t in enumerate(times):
            ab = self.alpha_bar(t, x.device)
            ab_prev = self.alpha_bar(times[i + 1], x.device) if i + 1 < len(times) else x.new_tensor(1.0)
            out = self.denoiser(x.to(dtype), torch.full((x.shape[0],), t, device=x.device),
                                cond.to(dtype)).float()
            if self.cfg.prediction == "epsilon":
                eps = out
                x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            else:  # v = sqrt(ab) * eps - sqrt(1 - ab) * x0
                x0 = ab.sqrt() * x - (1 - ab).sqrt() * out
                eps = (1 - ab).sqrt() * x + ab.sqrt() * out
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        return x


def pixel_loss(head: PixelHead, cond: torch.Tensor, latents: torch.Tensor) -> LossAndCount:
    """Summed diffusion loss over the semantic positions, and their count."""
    count = torch.tensor(cond.shape[0], dtype=torch.long, device=cond.device)
    if cond.shape[0] == 0:
        # Keep the head (and, shared, the condition's graph) in the backward on every rank.
        return sum(p.sum() for p in head.parameters()) * 0.0 + cond.sum() * 0.0, count
    return head.loss(cond, latents).sum(), count
