"""Decoding an image as the web has it into RGB: the one function preprocessing and the loader share.

Web images come with an EXIF orientation (phone photos are stored sideways and tagged), in 16-bit
and other high bit-depth modes, with alpha, in palette, CMYK or greyscale modes. :func:`to_rgb`
turns each into the 8-bit RGB the model sees:

- the EXIF orientation is applied (``ImageOps.exif_transpose``), so the image stands as shown;
- 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) is scaled to 8 bits (/257: 65535 -> 255),
  float (``F``) from [0, 1] (or clipped to [0, 255] when it is not in [0, 1]); PIL's own
  ``convert`` would clip them, storing a mid-grey 16-bit image white;
- alpha (``RGBA``, ``LA``, ``PA``, a palette with a transparent colour) is composited onto
  :data:`ALPHA_BACKGROUND` (white, what a browser shows on a page), not dropped to the RGB under
  it (often black or noise where alpha is 0);
- everything else goes through PIL's ``convert("RGB")``.

Preprocessing (preprocess/images.py) decodes every source through it before resizing, and the
loader (shards.decode_encoded_image) decodes the stored files through it, so a source file kept
byte for byte in the encoded store decodes in training exactly as preprocessing saw it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

ALPHA_BACKGROUND = (255, 255, 255)
_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


EXIF_ORIENTATION = 0x0112


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1: upright, as stored)."""
    return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (opened, any mode) as an upright 8-bit RGB image (see the module docstring)."""
    if orientation(img) != 1:  # exif_transpose copies the image even when there is nothing to do
        img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_DEPTH:
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if values.size and 0.0 <= values.min() and values.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")
