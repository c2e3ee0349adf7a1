"""Streaming readers for the raw inputs: parquet, jsonl(.gz) and webdataset tar.

Each reader yields ``(row, record)`` pairs, ``row`` being the 0-based row (or sample) number
in its file and ``record`` a dict of column -> value, or a :class:`RowError` for a row that
cannot even be parsed (bad JSON line): the caller rejects that row and carries on.

Nothing loads a whole file: parquet is read one record batch (at most one row group) at a
time, jsonl line by line, tar member by member, so preprocessing a large input does not run out of memory.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import pyarrow.parquet as pq

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class RowError:
    """A row that could not be read; carries the reject reason and a detail message."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail

    def __repr__(self) -> str:
        return f"RowError({self.reason!r}, {self.detail!r})"


Record = Union[Dict[str, Any], RowError]


def detect_format(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    raise ValueError(f"{path}: cannot tell the input format from the name; pass --input-format parquet|jsonl|webdataset")


def count_rows(path: str, fmt: str) -> Optional[int]:
    """Row count when it is cheap to know (parquet footer), else None (progress without total)."""
    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return None


def iter_parquet(path: str, columns: Optional[Sequence[str]] = None, batch_size: int = 256) -> Iterator[Tuple[int, Record]]:
    pf = pq.ParquetFile(path)
    if columns is not None:
        present = set(pf.schema_arrow.names)
        columns = [c for c in columns if c in present]  # a missing column is a per-row reject later
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        for rec in batch.to_pylist():
            yield row, rec
            row += 1


def iter_jsonl(path: str) -> Iterator[Tuple[int, Record]]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for row, line in enumerate(f):
            line = line.strip()
            if not line:
                yield row, RowError("bad_json", "empty line")
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield row, RowError("bad_json", f"invalid JSON: {e}")
                continue
            yield row, rec if isinstance(rec, dict) else RowError("wrong_type", f"line is a JSON {type(rec).__name__}, not an object")


def _wds_key(name: str) -> Tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest."""
    dirname, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return os.path.join(dirname, key), ext.lower()


def _wds_record(files: Dict[str, bytes], text_column: str, image_column: str) -> Record:
    rec: Dict[str, Any] = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return RowError("bad_json", f".json member: {e}")
        if isinstance(meta, dict):
            rec.update(meta)
    for ext in ("txt", "text", "caption"):
        if ext in files and text_column not in rec:
            rec[text_column] = files[ext].decode("utf-8", errors="replace")
    for ext in IMAGE_EXTENSIONS:
        if ext in files and image_column not in rec:
            rec[image_column] = files[ext]
    return rec


def iter_webdataset(path: str, text_column: str, image_column: str) -> Iterator[Tuple[int, Record]]:
    """Samples are consecutive tar members sharing a key (``000123.jpg`` + ``000123.txt``)."""
    row, key, files = 0, None, {}
    with tarfile.open(path, "r|*") as tar:  # streaming mode: no seeking, no member table in memory
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _wds_key(member.name)
            if key is not None and k != key:
                yield row, _wds_record(files, text_column, image_column)
                row, files = row + 1, {}
            key = k
            f = tar.extractfile(member)
            files[ext] = f.read() if f is not None else b""
    if key is not None:
        yield row, _wds_record(files, text_column, image_column)


def iter_records(path: str, fmt: str, *, text_column: str = "caption", image_column: str = "image",
                 columns: Optional[Sequence[str]] = None, batch_size: int = 256) -> Iterator[Tuple[int, Record]]:
    """Rows of one input file. ``columns`` restricts the parquet columns read (None = all)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    if fmt == "parquet":
        return iter_parquet(path, columns, batch_size)
    if fmt == "jsonl":
        return iter_jsonl(path)
    if fmt == "webdataset":
        return iter_webdataset(path, text_column, image_column)
    raise ValueError(f"unknown input format {fmt!r} (parquet, jsonl, webdataset)")


def iter_texts(paths: Sequence[str], columns: Sequence[str]) -> Iterator[str]:
    """Every non-empty string in ``columns`` of every row (for tokenizer training)."""
    for path in paths:
        fmt = detect_format(path)
        for _, rec in iter_records(path, fmt, text_column=columns[0], columns=list(columns)):
            if isinstance(rec, RowError):
                continue
            for c in columns:
                v = rec.get(c)
                if isinstance(v, str) and v.strip():
                    yield v
