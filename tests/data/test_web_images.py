"""Images as the web has them (data/image_decode.py, preprocess/images.py): EXIF orientation is
applied, 16-bit is scaled not clipped, alpha is composited onto white, degenerate and oversized
sources are named rejects read from the header, and a source is kept byte for byte only when it
decodes to what would be stored; the loader decodes stored files through the same function."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from megatron_unihetero.data.image_decode import ALPHA_BACKGROUND, to_rgb
from megatron_unihetero.data.preprocess.images import (
    ImageError,
    ImageLimits,
    decode_image,
    encode_image,
)
from megatron_unihetero.data.shards import decode_encoded_image

SIZE = 16


def _save(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied_before_resizing():
    # stored sideways: left half red, right half blue, tagged "rotate 90 degrees clockwise"
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, SIZE)
    assert out[2, 8, 0] > 200 and out[2, 8, 2] < 60  # top: red (the left edge, turned up)
    assert out[13, 8, 2] > 200 and out[13, 8, 0] < 60  # bottom: blue
    # the rotated source is never kept as it is, even at the stored size
    square = _save(Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)), "JPEG", exif=exif.tobytes())
    assert encode_image(square, SIZE, "jpeg") != square


def test_sixteen_bit_grey_is_scaled_and_alpha_composited_onto_white():
    grey16 = Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16))  # 128 * 257
    assert grey16.mode.startswith("I")
    assert np.all(decode_image(_save(grey16), SIZE) == 128)  # was stored white (255), clipped
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)  # black under alpha 0 ...
    rgba[:10, :, 0], rgba[:10, :, 3] = 255, 128  # ... and half-transparent red on top
    out = decode_image(_save(Image.fromarray(rgba, "RGBA")), SIZE)
    assert tuple(out[-1, -1]) == ALPHA_BACKGROUND
    assert abs(int(out[0, 0, 0]) - 255) <= 1 and abs(int(out[0, 0, 1]) - 127) <= 1
    assert to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0)) == ALPHA_BACKGROUND


def _png_header_only(width, height):
    """A PNG whose header says ``width`` x ``height`` and that has no pixel data at all: decoding
    it would fail as a bad image, so a reject for its size shows the header was read alone."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size,reason", [((1, 1), "image_too_small"), ((10000, 10), "bad_aspect_ratio"),
                                         ((12000, 12000), "image_too_large")])
def test_degenerate_and_oversized_sources_are_rejected_from_the_header(size, reason):
    with pytest.raises(ImageError) as info:
        decode_image(_png_header_only(*size), SIZE, where="x.png: ")
    assert info.value.reason == reason and str(info.value).startswith(f"x.png: {size[0]} x {size[1]}")
    # the limits are the user's to set
    decode_image(_save(Image.new("RGB", (4, 40))), SIZE, limits=ImageLimits(min_size=1, max_aspect_ratio=20))


def test_a_source_is_kept_only_when_it_decodes_to_what_is_stored_and_the_loader_agrees():
    rng = np.random.default_rng(0)
    plain = _save(Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)))
    assert encode_image(plain, SIZE, "png") == plain  # RGB, upright, the size: kept
    rgba = rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
    source = _save(Image.fromarray(rgba, "RGBA"))
    stored = encode_image(source, SIZE, "png")
    assert stored != source  # alpha: re-encoded as the composited RGB
    np.testing.assert_array_equal(decode_encoded_image(stored), decode_image(source, SIZE))
    # a kept source with alpha would decode the same in the loader too: one decode function
    np.testing.assert_array_equal(decode_encoded_image(source), decode_image(source, SIZE))
