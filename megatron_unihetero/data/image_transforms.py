"""Image tensors for the model: uint8 HWC from shards -> normalised float32 NCHW.

Shards already hold decoded, resized RGB pixels (decoding and resizing belong to
preprocessing: ``preprocess/images.py``), so the training-time work is a layout change and a
normalisation, plus a resize only when blended datasets were preprocessed at a different size
than the model's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNormalizer:
    """``(uint8 [n, H, W, 3]) -> float32 [n, 3, S, S]``: ``(x / 255 - mean) / std``.

    Args:
        mean, std: per-channel, in [0, 1] units.
        image_size: output side; images of another size are resized (bilinear, antialiased).
            None: keep the stored size.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 image_size: Optional[int] = None) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 channels, got {mean} and {std}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.image_size = image_size
        # Folded into one multiply-add: x * scale + shift with scale = 1/(255 std), shift = -mean/std.
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t
        self._scale_np, self._shift_np = self._scale.numpy(), self._shift.numpy()

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 [n, H, W, 3] images, got {images.dtype} {images.shape}")
        n, h, w, _ = images.shape
        size = self.image_size
        if size is not None and (h, w) != (size, size):
            if n == 0:
                return torch.zeros((0, 3, size, size), dtype=torch.float32)
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            return x.mul_(self._scale).add_(self._shift)
        # numpy, not torch: torch's intra-op threads fight the trainer's for these small arrays
        # when called from the training thread; copying the transposed uint8 view into a
        # float32 NCHW buffer then normalising in place is fastest.
        out = np.empty((n, 3, h, w), dtype=np.float32)
        np.copyto(out, images.transpose(0, 3, 1, 2))
        out *= self._scale_np
        out += self._shift_np
        return torch.from_numpy(out)

