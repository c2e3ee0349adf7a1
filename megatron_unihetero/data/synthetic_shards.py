"""Small synthetic shards in the real format, for the loader's tests and benchmark.

Samples are ``BOS text [<image_start> <image> <image_end> text]* EOS`` (``bos=False``: no BOS,
as from a tokenizer without one, whose metadata says ``bos_id: null``) with random text ids and
random images; every image's pixels are filled with a value derived from (dataset tag, sample,
image) so a test can recognise which image landed where after loading.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import io

import numpy as np

from megatron_unihetero.data.shards import ShardWriter, shard_name

# A tokenizer layout like the real ones (see tokenizer.py): specials first, text above them.
TOKENIZER = {
    "pad_id": 0, "bos_id": 1, "eos_id": 2,
    "image_start_id": 3, "image_token_id": 4, "image_end_id": 5,
    "vocab_size": 1000,
}
FIRST_TEXT_ID = 10


def image_fill_value(tag: int, sample: int, image: int) -> int:
    """The constant pixel value of image ``image`` of sample ``sample`` (mod 256, recognisable)."""
    return (tag * 97 + sample * 7 + image * 31) % 256


def make_sample(rng: np.random.Generator, *, tag: int, sample: int, text_len: Tuple[int, int],
                max_images: int, image_size: int, qa: bool,
                bos: bool = True) -> Tuple[np.ndarray, List[np.ndarray], Optional[np.ndarray]]:
    """(tokens, images, loss_mask) of one synthetic sample."""
    n_images = int(rng.integers(0, max_images + 1))
    parts: List[int] = [TOKENIZER["bos_id"]] if bos else []
    images = []
    for k in range(n_images + 1):
        n = int(rng.integers(text_len[0], text_len[1] + 1))
        parts.extend(rng.integers(FIRST_TEXT_ID, TOKENIZER["vocab_size"], size=n).tolist())
        if k < n_images:
            parts += [TOKENIZER["image_start_id"], TOKENIZER["image_token_id"], TOKENIZER["image_end_id"]]
            images.append(np.full((image_size, image_size, 3), image_fill_value(tag, sample, k), dtype=np.uint8))
    parts.append(TOKENIZER["eos_id"])
    tokens = np.asarray(parts, dtype=np.int32)
    mask = None
    if qa:
        # Prompt = the first half, answer (targets) = the rest, like a QA template.
        mask = np.zeros(len(tokens), dtype=np.int8)
        mask[len(tokens) // 2:] = 1
        mask[np.isin(tokens, [TOKENIZER["image_start_id"], TOKENIZER["image_token_id"], TOKENIZER["image_end_id"]])] = 0
    return tokens, images, mask


def write_synthetic_dataset(
    prefix: str,
    *,
    num_samples: int,
    num_shards: int = 1,
    tag: int = 0,
    seed: int = 0,
    text_len: Tuple[int, int] = (4, 40),
    max_images: int = 2,
    image_size: int = 8,
    qa: bool = False,
    extra_samples: Sequence[Tuple[np.ndarray, List[np.ndarray]]] = (),
    image_store: str = "pixels",
    bos: bool = True,
) -> List[str]:
    """Write ``num_samples`` samples over ``num_shards`` shards ``prefix_0000N``; returns their prefixes.

    ``extra_samples`` (tokens, images) are appended to the last shard (e.g. an over-long one).
    ``image_store="encoded"`` stores each image as a PNG (lossless: it decodes to the same pixels).
    """
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, num_samples, num_shards + 1).astype(int)
    prefixes = []
    for s in range(num_shards):
        path = shard_name(prefix, s)
        with ShardWriter(path, image_store=image_store, image_size=image_size, with_loss_mask=qa,
                         metadata={"tokenizer": {**TOKENIZER, "bos_id": TOKENIZER["bos_id"] if bos else None}}) as w:
            for i in range(bounds[s], bounds[s + 1]):
                tokens, images, mask = make_sample(rng, tag=tag, sample=i, text_len=text_len,
                                                   max_images=max_images, image_size=image_size, qa=qa,
                                                   bos=bos)
                if image_store == "encoded":
                    images = [png_bytes(im) for im in images]
                w.add_sample(tokens, images, mask)
            if s == num_shards - 1:
                for tokens, images in extra_samples:
                    mask = np.ones(len(tokens), dtype=np.int8) if qa else None
                    w.add_sample(tokens, images, mask)
            w.finalize()
        prefixes.append(path)
    return prefixes


def png_bytes(pixels: np.ndarray) -> bytes:
    """The PNG file of uint8 ``[H, W, 3]`` pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
