"""A small self-supervised DINOv2 for CPU-scale ablations (``tools/pretrain_vision_encoder.py``).

The paper's semantic generation regresses the next *DINOv2* patch embedding: semantic and
spatially smooth features, so the next one is predictable from the context. A randomly
initialised frozen encoder gives features that are close to a fixed random function of each
patch's pixels, and the semantic head can then only learn their mean. This module trains a
DINOv2 of the ablation's size on shapes-world images without any label:

- two views of each image with the *same* geometry (so patch t of one view is patch t of the
  other) and independent photometric noise: a brightness gain, a small per-channel gain,
  Gaussian pixel noise, and a random 30 % of patches replaced by DINOv2's mask token;
- an image-level InfoNCE (SimCLR's NT-Xent) on the CLS token, and a patch-level InfoNCE
  where patch t of image b in one view must find patch t of image b in the other among every
  patch of the batch (``patch_negatives="all"``), or among the patches t of every image
  (``"same_position"``: the position alone then identifies nothing). A masked patch can only
  be matched from its context, as in iBOT's masked prediction, which makes the patch features
  contextual and spatially smooth; the negatives keep them from collapsing. Measured (2000
  probe images, docs/ablation/encoder.md): "all" probes better (position above all) at the
  same next-patch R², so it is the default.

Both losses read the features the ablation feeds its projector (the last hidden state, patch
tokens: models/vision.py), through small projection heads that are thrown away. The probes
attributes (shape, colour, position, size) are never used for training; they only score the
frozen features afterwards (:func:`probe_report`), against a random encoder of the same shape.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from megatron_unihetero.data.demo_world import make_sample
from megatron_unihetero.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD, ImageNormalizer
from megatron_unihetero.eval import probes

# The ablation configs' encoder (examples/configs/ablation/*.yaml, model.vision.hf_config).
DEFAULT_ENCODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, image_size=32, patch_size=8)
PROBE_ATTRIBUTES = ("shape", "colour", "position", "size")
REPORT_NAME = "pretrain_report.json"


@dataclass
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 64  # x 16 patches: 1024 candidates in the patch-level InfoNCE
    patch_negatives: str = "all"  # all | same_position (see the module docstring)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    temperature: float = 0.1
    patch_weight: float = 1.0  # patch-level InfoNCE next to the image-level one (weight 1)
    mask_ratio: float = 0.3
    noise_std: float = 0.05  # pixel noise, in [0, 1] units
    num_images: int = 20000  # the training pool (generated, seed `data_seed`)
    data_seed: int = 1000  # != the ablation data's seed (0): no held-out image is trained on
    seed: int = 0
    projection_dim: int = 64
    encoder: Dict[str, int] = field(default_factory=lambda: dict(DEFAULT_ENCODER))


def world_images(num: int, seed: int, image_size: int) -> Tuple[np.ndarray, List[dict]]:
    """``num`` shapes-world images uint8 [num, S, S, 3] and each one's attributes."""
    pixels, attributes = [], []
    for i in range(num):
        sample = make_sample(seed, i, image_size)
        with Image.open(io.BytesIO(sample["image"])) as img:
            pixels.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
        attributes.append({k: sample[k] for k in (*PROBE_ATTRIBUTES, "num_objects")})
    return np.stack(pixels), attributes


def build_encoder(encoder: Dict[str, int], seed: int) -> Dinov2Model:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(Dinov2Config(**encoder))


def patch_features(model: Dinov2Model, pixel_values: torch.Tensor,
                   bool_masked_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, 1 + T, D]: the last hidden state, CLS first (what models/vision.py reads)."""
    out = model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=True)
    return out.hidden_states[-1]


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` matches row i of ``b`` among all rows of ``b``.
    Leading dimensions before the last two are independent problems ([..., N, D])."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.transpose(-1, -2) / temperature  # [..., N, N]
    n = logits.shape[-1]
    labels = torch.arange(n, device=a.device).expand(logits.shape[:-1]).reshape(-1)
    flat, flat_t = logits.reshape(-1, n), logits.transpose(-1, -2).reshape(-1, n)
    return 0.5 * (F.cross_entropy(flat, labels) + F.cross_entropy(flat_t, labels))


def _head(dim: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out))


def augment(pixels01: torch.Tensor, gen: torch.Generator, noise_std: float) -> torch.Tensor:
    """Photometric only (the geometry of both views must agree): brightness x U(0.7, 1.3),
    per-channel gain x U(0.9, 1.1) (hues stay apart: colour is not made invariant), noise."""
    n = pixels01.shape[0]
    bright = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=gen)
    gain = torch.empty(n, 3, 1, 1).uniform_(0.9, 1.1, generator=gen)
    noise = torch.randn(pixels01.shape, generator=gen) * noise_std
    return (pixels01 * bright * gain + noise).clamp(0.0, 1.0)


def _normalize(pixels01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels01 - mean) / std


def pretrain(cfg: PretrainConfig, log: Callable[[str], None] = print,
             log_every: int = 100) -> Tuple[Dinov2Model, Dict[str, object]]:
    """Train the encoder; returns it (eval mode) and a record of the run."""
    if cfg.patch_negatives not in ("all", "same_position"):
        raise ValueError(f"patch_negatives must be all or same_position; got {cfg.patch_negatives!r}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    size = cfg.encoder["image_size"]
    t0 = time.perf_counter()
    pool, _ = world_images(cfg.num_images, cfg.data_seed, size)
    pool01 = torch.from_numpy(pool).permute(0, 3, 1, 2).float() / 255.0
    data_s = time.perf_counter() - t0
    model = build_encoder(cfg.encoder, cfg.seed)
    dim = model.config.hidden_size
    image_head, patch_head = _head(dim, cfg.projection_dim), _head(dim, cfg.projection_dim)
    params = [*model.parameters(), *image_head.parameters(), *patch_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    num_patches = (size // cfg.encoder["patch_size"]) ** 2

    def lr_at(step):
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    history = []
    t1 = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, pool01.shape[0], (cfg.batch_size,), generator=gen)
        batch = pool01[idx]
        views = [_normalize(augment(batch, gen, cfg.noise_std)) for _ in range(2)]
        masks = [torch.rand(cfg.batch_size, num_patches, generator=gen) < cfg.mask_ratio for _ in range(2)]
        feats = [patch_features(model, v, m) for v, m in zip(views, masks)]
        image_loss = info_nce(image_head(feats[0][:, 0]), image_head(feats[1][:, 0]), cfg.temperature)
        patches = [patch_head(f[:, 1:]) for f in feats]  # [B, T, d]
        if cfg.patch_negatives == "all":
            patches = [p.reshape(-1, cfg.projection_dim) for p in patches]  # [B * T, d]
        else:
            patches = [p.transpose(0, 1) for p in patches]  # [T, B, d]: one problem per position
        patch_loss = info_nce(patches[0], patches[1], cfg.temperature)
        loss = image_loss + cfg.patch_weight * patch_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            rec = {"step": step + 1, "loss": float(loss.detach()), "image_loss": float(image_loss.detach()),
                   "patch_loss": float(patch_loss.detach()), "lr": lr_at(step)}
            history.append(rec)
            log(f"step {step + 1}/{cfg.steps}: loss {rec['loss']:.4f} (image {rec['image_loss']:.4f}, "
                f"patch {rec['patch_loss']:.4f})")
    model.eval()
    train_s = time.perf_counter() - t1
    return model, {"config": asdict(cfg), "history": history, "data_s": data_s, "train_s": train_s}


@torch.no_grad()
def encode(model: Dinov2Model, pixels: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Frozen patch features [N, T, D] of uint8 images, normalised as in training
    (data/image_transforms.py with DINOv2's ImageNet statistics)."""
    model.eval()
    normalize = ImageNormalizer(IMAGENET_MEAN, IMAGENET_STD, image_size=model.config.image_size)
    out = [patch_features(model, normalize(pixels[i:i + batch_size]))[:, 1:]
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).float()


def next_patch_r2(features: torch.Tensor, test_fraction: float = 0.3, ridge: float = 1e-3,
                  seed: int = 0, per_position: bool = False) -> float:
    """Held-out R² of a ridge regression from patch t to patch t + 1 (raster order, within
    each image): how predictable the next visual embedding is from the current one alone,
    the simplest form of what the semantic head must do. Fit on a split of the images.

    ``per_position``: every feature minus its position's mean over the training images first,
    so what a position always holds (a positional code) is neither predicted nor credited:
    the R² of the image's *content* at the next patch.
    """
    train, test = probes.split_indices(features.shape[0], test_fraction, seed)
    if per_position:
        features = features - features[train].mean(dim=0, keepdim=True)

    def pairs(index):
        f = features[index].double()
        return f[:, :-1].reshape(-1, f.shape[-1]), f[:, 1:].reshape(-1, f.shape[-1])

    x, y = pairs(train)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    scale = xc.pow(2).mean()
    w = torch.linalg.solve(xc.T @ xc + ridge * scale * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype),
                           xc.T @ yc)
    xt, yt = pairs(test)
    pred = (xt - mx) @ w + my
    sse = (pred - yt).pow(2).sum()
    sst = (yt - yt.mean(0)).pow(2).sum()
    return float(1.0 - sse / sst)


def probe_report(model: Dinov2Model, pixels: np.ndarray, attributes: Sequence[dict]) -> Dict[str, object]:
    """Linear-probe test accuracy of the mean patch feature for each attribute of the first
    object (every image, and the single-object images, where "the first object" is the only
    one and the label is fully determined by the image), and the next-patch R²."""
    features = encode(model, pixels)
    pooled = features.mean(dim=1)
    out: Dict[str, object] = {"num_images": len(pixels), "next_patch_r2": next_patch_r2(features),
                              "next_patch_r2_content": next_patch_r2(features, per_position=True)}
    single = [i for i, a in enumerate(attributes) if a["num_objects"] == 1]
    for name, index in (("all", list(range(len(pixels)))), ("single_object", single)):
        figures = {}
        for attr in PROBE_ATTRIBUTES:
            labels = [attributes[i][attr] for i in index]
            result = probes.probe_accuracy(pooled[index], labels)
            figures[attr] = {"test_accuracy": result["test_accuracy"],
                             "majority_baseline": result["majority_baseline"]}
        figures["mean"] = sum(f["test_accuracy"] for f in figures.values()) / len(PROBE_ATTRIBUTES)
        figures["num_images"] = len(index)
        out[name] = figures
    return out


def save_encoder(model: Dinov2Model, folder: str, record: Dict[str, object]) -> None:
    """A folder ``transformers.Dinov2Model.from_pretrained`` loads (config.json + safetensors),
    and the run's record and probe figures next to it."""
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    with open(os.path.join(folder, REPORT_NAME), "w") as handle:
        json.dump(record, handle, indent=1)
