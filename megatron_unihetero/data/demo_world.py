"""The built-in "shapes world" data set, generated locally (no data is downloaded).

Small RGB images with 1-3 objects, each a (shape, colour, size, 3x3 grid cell), rendered with
PIL; a caption naming every object, one question with its answer and scoring candidates, and
ground-truth attributes for probing. No data can be downloaded on the CPU machines, and this
world exercises what semantic generation should teach (objects, positions, shapes, colours)
while giving an answer-accuracy metric a small CPU run can move.

Determinism: sample i of seed s is drawn from its own generator ``default_rng([s, i])``, so a
sample does not depend on how many were generated before it and the same seed gives the same
bytes (PNG encoding with PIL is deterministic for a given PIL/zlib build).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SIZES = {"small": 0.45, "large": 0.9}  # fraction of a grid cell the object spans
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
NUMBER_WORDS = ("zero", "one", "two", "three")
BACKGROUND = (20, 20, 20)


def position_name(row: int, col: int) -> str:
    """3x3 cell name: "top left", "top", "center", "bottom right", ..."""
    r, c = ROWS[row], COLS[col]
    if r == "middle" and c == "center":
        return "center"
    if r == "middle":
        return c
    if c == "center":
        return r
    return f"{r} {c}"


POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def describe(obj: Dict[str, str]) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']} {_where(obj['position'])}"


def caption_for(objects: List[Dict[str, str]]) -> str:
    parts = [describe(o) for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _draw(draw: ImageDraw.ImageDraw, obj: Dict[str, Any], cell: float) -> None:
    cx, cy = (obj["col"] + 0.5) * cell, (obj["row"] + 0.5) * cell
    h = SIZES[obj["size"]] * cell / 2
    fill = COLOURS[obj["colour"]]
    box = (cx - h, cy - h, cx + h, cy + h)
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    elif shape == "cross":
        t = h / 3
        draw.rectangle((cx - h, cy - t, cx + h, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - h, cx + t, cy + h), fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def render(objects: List[Dict[str, Any]], image_size: int) -> bytes:
    """PNG bytes of the scene."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw(draw, obj, image_size / 3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _question(rng: np.random.Generator, objects: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One question about the scene, its answer and the closed set of candidate answers."""
    obj = objects[int(rng.integers(len(objects)))]
    name = f"{obj['colour']} {obj['shape']}"
    kinds = ["shape", "colour", "position", "size", "count", "exists"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "shape":
        return dict(question_type=kind, question=f"what shape is {_where(obj['position'])}?",
                    answer=obj["shape"], candidates=list(SHAPES))
    if kind == "colour":
        return dict(question_type=kind, question=f"what colour is the {obj['size']} {obj['shape']} {_where(obj['position'])}?",
                    answer=obj["colour"], candidates=list(COLOURS))
    if kind == "position":
        return dict(question_type=kind, question=f"where is the {obj['size']} {name}?",
                    answer=obj["position"], candidates=list(POSITIONS))
    if kind == "size":
        return dict(question_type=kind, question=f"what size is the {name} {_where(obj['position'])}?",
                    answer=obj["size"], candidates=list(SIZES))
    if kind == "count":
        return dict(question_type=kind, question="how many objects are there?",
                    answer=NUMBER_WORDS[len(objects)], candidates=list(NUMBER_WORDS[1:]))
    # "exists": half the time ask about an object that is present, else a random (colour, shape)
    if rng.random() < 0.5:
        colour, shape = obj["colour"], obj["shape"]
    else:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
    present = any(o["colour"] == colour and o["shape"] == shape for o in objects)
    return dict(question_type=kind, question=f"is there a {colour} {shape}?",
                answer="yes" if present else "no", candidates=["yes", "no"])


def make_sample(seed: int, index: int, image_size: int = 64) -> Dict[str, Any]:
    """Sample ``index`` of the world with ``seed`` (independent of every other sample)."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(1, 4))
    cells = rng.choice(9, size=n, replace=False)  # distinct cells: positions name objects uniquely
    objects = []
    for cell in cells:
        row, col = divmod(int(cell), 3)
        objects.append(dict(
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
            size=list(SIZES)[int(rng.integers(len(SIZES)))],
            row=row, col=col, position=position_name(row, col),
        ))
    qa = _question(rng, objects)
    first = objects[0]
    return {
        "id": f"shapes-{seed}-{index}",
        "image": render(objects, image_size),
        "caption": caption_for(objects),
        **qa,
        "objects": json.dumps([{k: o[k] for k in ("shape", "colour", "size", "position")} for o in objects]),
        "num_objects": n,
        "shape": first["shape"], "colour": first["colour"], "size": first["size"], "position": first["position"],
    }


def write_demo_data(output: str, num_samples: int, seed: int, image_size: int = 64,
                    valid_fraction: float = 0.1, row_group_size: int = 256) -> Dict[str, int]:
    """Write ``output/train.parquet`` and ``output/valid.parquet``; returns row counts.

    The last ``round(num_samples * valid_fraction)`` samples form the held-out split. Small row
    groups let the preprocessor's streaming (one row group at a time) be exercised on demo data.
    """
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    os.makedirs(output, exist_ok=True)
    num_valid = int(round(num_samples * valid_fraction))
    splits = {"train": range(0, num_samples - num_valid), "valid": range(num_samples - num_valid, num_samples)}
    counts = {}
    for split, indices in splits.items():
        rows = [make_sample(seed, i, image_size) for i in indices]
        table = pa.Table.from_pylist(rows, schema=_schema()) if rows else _schema().empty_table()
        pq.write_table(table, os.path.join(output, f"{split}.parquet"), row_group_size=row_group_size)
        counts[split] = len(rows)
    return counts


def _schema():
    s = pa.string()
    return pa.schema([
        ("id", s), ("image", pa.binary()), ("caption", s), ("question_type", s), ("question", s),
        ("answer", s), ("candidates", pa.list_(s)), ("objects", s), ("num_objects", pa.int32()),
        ("shape", s), ("colour", s), ("size", s), ("position", s),
    ])
