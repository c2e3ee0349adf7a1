"""The pixel-side VAE: diffusers ``AutoencoderKL`` latents laid out on the image's token grid.

The paper encodes pixels with MAR's KL-16 VAE; any diffusers ``AutoencoderKL`` works here,
loaded from a LOCAL folder (``from_pretrained`` with a path, never a hub id) or built from a
config dict for tests and tiny runs. diffusers is optional: importing this module does not need
it; building a :class:`PixelVAE` without it raises a clear error.

Token-grid mapping (so latent tokens line up with the LLM's visual positions): the vision
encoder turns an image into a g x g grid of patch tokens in row-major order (g = image_size /
patch_size; the CLS token is dropped). The VAE turns the same image, resized to
``vae_image_size``, into latents [C, L, L] (L = vae_image_size / 2^(levels-1)). With
p = L / g, the latent patch (r*p:(r+1)*p, c*p:(c+1)*p) covers the same image region as vision
token (r, c), so it becomes latent token r*g + c, flattened channel-major: C * p * p values.
:func:`patchify` / :func:`unpatchify` do exactly this; L must be a multiple of g.

Precomputed latents may instead come in the batch as ``image_latents`` [n_img, T, C*p*p] in
this same layout (``pixel.latent_source: batch``), e.g. written by the preprocessing pipeline
with :meth:`PixelVAE.encode`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
from torch import nn

# The vision side feeds images normalised with these (data/image_transforms.py); the VAE
# expects pixels in [-1, 1], so they are un-normalised on the way in.
from megatron_unihetero.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD
from megatron_unihetero.models.config import ConfigError, PixelGenConfig


def require_diffusers():
    """Import diffusers or fail with the fix in the message."""
    try:
        import diffusers  # noqa: F401  (optional: only the pixel objective's VAE needs it)
    except ImportError as exc:  # pragma: no cover - exercised only without diffusers
        raise ImportError(
            "the pixel-generation objective (model.pixel.weight > 0 with latent_source=vae, or "
            "image sampling) needs diffusers: `pip install diffusers`, or precompute latents "
            "and set model.pixel.latent_source=batch") from exc
    return diffusers


def patchify(latents: torch.Tensor, grid: int) -> torch.Tensor:
    """[n, C, L, L] -> [n, grid*grid, C*p*p] with p = L // grid (row-major tokens)."""
    n, c, h, w = latents.shape
    if h != w or h % grid:
        raise ValueError(f"latents of side {h}x{w} cannot be split into a {grid}x{grid} token grid")
    p = h // grid
    x = latents.reshape(n, c, grid, p, grid, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # n, row, col, C, p, p
    return x.reshape(n, grid * grid, c * p * p)


def unpatchify(tokens: torch.Tensor, grid: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [n, grid*grid, C*p*p] -> [n, C, L, L]."""
    n, t, d = tokens.shape
    p = int(round((d // channels) ** 0.5))
    if t != grid * grid or channels * p * p != d:
        raise ValueError(f"tokens {list(tokens.shape)} do not fit a {grid}x{grid} grid of "
                         f"{channels}-channel latent patches")
    x = tokens.reshape(n, grid, grid, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, grid * p, grid * p)


class PixelVAE(nn.Module):
    """Frozen AutoencoderKL: normalised images -> latent tokens, and latent tokens -> images."""

    def __init__(self, config: PixelGenConfig, grid: int, image_size: int,
                 image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD):
        """``image_mean`` / ``image_std``: how the incoming images were normalised (the vision
        encoder's normalisation); they are undone before the VAE's [-1, 1] input."""
        super().__init__()
        diffusers = require_diffusers()
        if config.vae_path is not None:
            if not os.path.isdir(config.vae_path):
                raise ConfigError(f"pixel.vae_path {config.vae_path!r} is not a local folder")
            self.vae = diffusers.AutoencoderKL.from_pretrained(config.vae_path)
        else:
            self.vae = diffusers.AutoencoderKL(**_vae_kwargs(config.vae_config))
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.grid = grid
        self.image_size = config.vae_image_size or image_size
        levels = len(self.vae.config.block_out_channels)
        self.downsample = 2 ** (levels - 1)
        self.latent_side = self.image_size // self.downsample
        if self.image_size % self.downsample or self.latent_side % grid:
            raise ConfigError(
                f"pixel: the VAE maps {self.image_size}px images to {self.latent_side}x"
                f"{self.latent_side} latents, which do not split into the vision encoder's "
                f"{grid}x{grid} token grid; set pixel.vae_image_size to a multiple of "
                f"{grid * self.downsample}")
        self.channels = self.vae.config.latent_channels
        self.patch = self.latent_side // grid
        # Latents are scaled to about unit variance for the diffusion loss (SD/MAR convention).
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("_mean", mean, persistent=False)
        self.register_buffer("_std", std, persistent=False)

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch * self.patch

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: no dropout, fixed statistics
        return self

    def to_vae_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> [-1, 1] pixels at the VAE's resolution."""
        x = images * self._std.to(images.dtype) + self._mean.to(images.dtype)
        if x.shape[-1] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size),
                                          mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Normalised images [n, 3, H, W] -> latent tokens [n, grid*grid, token_dim].

        The posterior mean by default (deterministic targets; MAR samples the posterior,
        ``sample=True``).
        """
        dist = self.vae.encode(self.to_vae_pixels(images).to(self.vae.dtype)).latent_dist
        latents = dist.sample() if sample else dist.mean
        return patchify(latents * self.scaling_factor, self.grid).float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latent tokens [n, grid*grid, token_dim] -> images in [0, 1], [n, 3, S, S]."""
        latents = unpatchify(tokens, self.grid, self.channels) / self.scaling_factor
        pixels = self.vae.decode(latents.to(self.vae.dtype)).sample
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def _vae_kwargs(config: Dict[str, Any]) -> Dict[str, Any]:
    """YAML gives lists; diffusers wants tuples for the block fields."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def vision_grid(tokens_per_image: int) -> int:
    """The side g of the vision token grid; the pixel objective needs a square grid, no CLS."""
    grid = int(round(tokens_per_image ** 0.5))
    if grid * grid != tokens_per_image:
        raise ConfigError(
            f"the pixel objective needs a square grid of visual tokens per image, got "
            f"{tokens_per_image} (keep vision.drop_cls_token: true)")
    return grid


def latent_token_dim(config: PixelGenConfig, vae: Optional[PixelVAE]) -> int:
    if config.latent_channels is not None:
        if vae is not None and vae.token_dim != config.latent_channels:
            raise ConfigError(f"pixel.latent_channels={config.latent_channels} but the VAE "
                              f"gives {vae.token_dim} values per latent token")
        return config.latent_channels
    if vae is None:
        raise ConfigError("pixel.latent_channels must be set when no VAE is built")
    return vae.token_dim
