"""Image decoding, resizing and encoding: PIL decode -> RGB -> resize shorter side -> centre crop.

Two outputs, one per shard image store:
  pixels   uint8 ``[size, size, 3]`` (:func:`decode_image`)
  encoded  the image file at ``size`` x ``size`` (:func:`encode_image`): the source bytes
           themselves when the source already is that size in the target format, else the
           resized pixels re-encoded (JPEG at a quality, or lossless PNG / WebP). Decoding it
           gives exactly the pixels store's array for lossless formats and for kept sources.
"""

from __future__ import annotations

import functools
import io
import os
import stat
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image

from megatron_unihetero.data.image_decode import orientation, to_rgb

# --image-format choices -> the PIL format written when an image must be re-encoded.
# "auto" keeps a lossy source lossy and a lossless one lossless: JPEG sources are written as
# JPEG (at --jpeg-quality), every other source as PNG.
IMAGE_FORMATS = ("auto", "jpeg", "png", "webp")
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ImageError(Exception):
    """A row's image cannot be used; ``reason`` is the reject reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]`` of an RGB image (data/image_decode.to_rgb): the shorter side
    scaled to ``size`` (bicubic), centre cropped.

    Scaling the shorter side keeps the aspect ratio (no distortion) at the cost of cropping the
    long side's margins, the usual choice for CLIP/SigLIP-style encoders.
    """
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)


@dataclass(frozen=True)
class ImageLimits:
    """What a source image must be to be used, checked from its header before it is decoded
    (img2dataset's min_image_size / max_aspect_ratio idea, and a pixel budget of our own).

    ``min_size``: the shorter side, in pixels (1 x 1 trackers, 4 x 4 icons are rejects);
    ``max_aspect_ratio``: longer / shorter side (a 10000 x 10 banner is a reject: the centre crop
    would keep a sliver); ``max_pixels``: width x height, sized so that one preprocessing
    worker's decode stays near 1 GB (a 12000 x 12000 PNG of 136 KB decodes to 1.1 GB; 48 MP phone
    photos pass).
    """

    min_size: int = 10
    max_aspect_ratio: float = 10.0
    max_pixels: int = 64_000_000

    def check(self, width: int, height: int, where: str) -> None:
        if min(width, height) < self.min_size:
            raise ImageError("image_too_small", f"{where}{width} x {height} pixels, a side under "
                             f"--min-image-size={self.min_size}")
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            raise ImageError("bad_aspect_ratio", f"{where}{width} x {height} pixels, aspect ratio "
                             f"{max(width, height) / min(width, height):.1f} over "
                             f"--max-aspect-ratio={self.max_aspect_ratio:g}")
        if width * height > self.max_pixels:
            raise ImageError("image_too_large", f"{where}{width} x {height} = {width * height} pixels, "
                             f"more than --max-image-pixels={self.max_pixels} (not decoded)")


def _decode(data: bytes, size: int, where: str, limits: ImageLimits):
    """(source PIL format, True when the source decodes to itself at ``size`` x ``size``: RGB,
    upright, that size; pixels ``[size, size, 3]``) or raise ImageError. The limits are checked
    from the header, before the decode; the decode is data/image_decode.to_rgb's (EXIF
    orientation, high bit depth, alpha), the loader's too."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # the header's: nothing decoded yet
            limits.check(width, height, where)
            img.load()  # force the full decode now: truncated files fail here, not later
            as_is = img.mode == "RGB" and orientation(img) == 1 and img.size == (size, size)
            return img.format, as_is, resize_center_crop(to_rgb(img), size)
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", f"{where}image too large: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three for corrupt data
        raise ImageError("bad_image", f"{where}cannot decode image ({len(data)} bytes): {e}") from None


def decode_image(data: bytes, size: int, where: str = "",
                 limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode encoded image bytes to a uint8 ``[size, size, 3]`` array or raise ImageError."""
    return _decode(data, size, where, limits)[2]


def encode_image(data: bytes, size: int, image_format: str = "auto", jpeg_quality: int = 90,
                 where: str = "", limits: ImageLimits = ImageLimits()) -> bytes:
    """The image file for the encoded store: ``size`` x ``size``, in the target format.

    The source is always fully decoded (an undecodable file is rejected here, not in the
    training loader). It is kept byte for byte only when it decodes to exactly what would be
    stored: ``size`` x ``size``, RGB, upright (no EXIF rotation), in the target format;
    otherwise its resized, centre-cropped RGB pixels are encoded.
    """
    source_format, as_is, pixels = _decode(data, size, where, limits)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if image_format == "auto":
        target = "JPEG" if source_format == "JPEG" else "PNG"
    else:
        target = _PIL_FORMAT[image_format]
    if source_format == target and as_is:
        return data
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if target == "JPEG":
        # 4:4:4 chroma: 4:2:0 would halve the colour resolution, visible on small images.
        img.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    elif target == "WEBP":
        img.save(buf, format="WEBP", lossless=True)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # far above any real photo; /dev/zero or a 20 GB file is not


@dataclass(frozen=True)
class PathPolicy:
    """Where an image path written in a data file may be read from (--image-root and its flags).

    ``root``: the folder paths are resolved against, and stay inside (``..``, absolute paths
    and symbolic links that lead out of it are rejects) unless ``allow_outside_root`` (trusted
    data; without a root, paths are then resolved against the working directory). Only regular
    files are read (a device, FIFO, socket or folder is a reject, and never blocks), at most
    ``max_bytes`` of them (inline image bytes too).
    """

    root: Optional[str] = None
    allow_outside_root: bool = False
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    @functools.cached_property
    def real_root(self) -> str:
        """The root with its links resolved, once (every path image is checked against it)."""
        return os.path.realpath(self.root)

    def resolve(self, value: str) -> str:
        if self.root is None:
            if not self.allow_outside_root:
                raise ImageError("path_outside_root", f"{value}: an image path, but no --image-root: "
                                 f"paths from a data file are read only inside a folder you name "
                                 f"(--image-root DIR; --allow-paths-outside-root for trusted data)")
            return value
        path = value if os.path.isabs(value) else os.path.join(self.root, value)
        if not self.allow_outside_root:
            real_root, real = self.real_root, os.path.realpath(path)
            if os.path.commonpath([real_root, real]) != real_root:
                raise ImageError("path_outside_root", f"{path}: resolves to {real}, outside "
                                 f"--image-root {self.root} (a '..', an absolute path or a link "
                                 f"out of it; --allow-paths-outside-root reads it, for trusted data)")
        return path

    def read(self, path: str) -> bytes:
        """The bytes of regular file ``path``, bounded. Opened non-blocking and checked on the
        open descriptor: a FIFO or device put in its place after a check cannot hang or flood
        the read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise ImageError("missing_image_file", f"cannot read image file {path}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ImageError("not_a_regular_file", f"{path} is not a regular file (a device, "
                                 f"FIFO, socket or folder): not read")
            if info.st_size > self.max_bytes:
                raise ImageError("image_too_large", f"{path}: {info.st_size} bytes, more than "
                                 f"--max-image-bytes={self.max_bytes}")
            handle, fd = os.fdopen(fd, "rb"), None
        finally:
            if fd is not None:
                os.close(fd)
        with handle:
            data = handle.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise ImageError("image_too_large", f"{path}: more than --max-image-bytes={self.max_bytes} "
                             f"(it grew while being read)")
        return data


def read_image_value(value: Any, paths: PathPolicy) -> bytes:
    """An image column value -> the encoded file bytes. Accepts bytes, a path (read as
    ``paths`` allows), or a HF datasets Image struct ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise ImageError("bad_image", "empty image bytes")
        if len(value) > paths.max_bytes:
            raise ImageError("image_too_large", f"inline image of {len(value)} bytes, more than "
                             f"--max-image-bytes={paths.max_bytes}")
        return bytes(value)
    if isinstance(value, str):
        if not value:
            raise ImageError("missing_image_file", "empty image path")
        return paths.read(paths.resolve(value))
    raise ImageError("wrong_type", f"image value is {type(value).__name__}, expected bytes or a path")


def _where(value: Any, paths: PathPolicy) -> str:
    """The reject detail's prefix: the path of an image given by path."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        root = paths.root
        return (value if os.path.isabs(value) or root is None else os.path.join(root, value)) + ": "
    return ""


def load_image_value(value: Any, size: int, paths: PathPolicy,
                     limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """An image column value (see :func:`read_image_value`) -> pixels ``[size, size, 3]``."""
    return decode_image(read_image_value(value, paths), size, _where(value, paths), limits)


def prepare_image(value: Any, size: int, paths: PathPolicy, store: str = "pixels",
                  image_format: str = "auto", jpeg_quality: int = 90,
                  limits: ImageLimits = ImageLimits()):
    """An image column value -> what the shard stores: pixels, or encoded bytes (``store``)."""
    if store == "encoded":
        return encode_image(read_image_value(value, paths), size, image_format, jpeg_quality,
                            _where(value, paths), limits)
    return load_image_value(value, size, paths, limits)
