"""Image decoding and resizing: PIL decode -> RGB -> resize shorter side -> centre crop."""

from __future__ import annotations

import io
import os
from typing import Any, Optional

import numpy as np
from PIL import Image


class ImageError(Exception):
    """A row's image cannot be used; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the shorter side scaled to ``size`` (bicubic), centre cropped.

    Scaling the shorter side keeps the aspect ratio (no distortion) at the cost of cropping the
    long side's margins, the usual choice for CLIP/SigLIP-style encoders.
    """
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Decode encoded image bytes to a uint8 ``[size, size, 3]`` array or raise ImageError."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # force the full decode now: truncated files fail here, not later
            return resize_center_crop(img, size)
    except Image.DecompressionBombError as e:
        raise ImageError("bad_image", f"image too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for corrupt data
        raise ImageError("bad_image", f"cannot decode image ({len(data)} bytes): {e}") from None


def load_image_value(value: Any, size: int, root: Optional[str]) -> np.ndarray:
    """An image column value -> pixels. Accepts bytes, a path (relative to ``root``), or a HF
    datasets Image struct ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ImageError("bad_image", "empty image bytes")
        return decode_image(bytes(value), size)
    if isinstance(value, str):
        if not value:
            raise ImageError("missing_image_file", "empty image path")
        path = value if os.path.isabs(value) or root is None else os.path.join(root, value)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError("missing_image_file", f"cannot read image file {path}: {e.strerror}") from None
        return decode_image(data, size)
    raise ImageError("wrong_type", f"image value is {type(value).__name__}, expected bytes or a path")
