"""Streaming readers for the raw inputs: parquet, jsonl(.gz), webdataset tar and LLaVA json.

Each reader yields ``(row, record)`` pairs, ``row`` being the 0-based row (or sample) number
in its file and ``record`` a dict of column -> value, or a :class:`RowError` for a row that
cannot even be parsed (bad JSON line): the caller rejects that row and carries on.

Nothing loads a whole file: parquet is read one record batch (at most one row group) at a
time, jsonl line by line, tar member by member, a JSON array element by element
(:func:`iter_json_array`), so preprocessing a large input does not run out of memory.

``row_range=(start, stop)`` restricts a reader to those rows (``--num-shards`` jobs split by
rows): parquet skips whole row groups outside it, jsonl skips the parsing of other lines.
"""

from __future__ import annotations

import gzip
import json
import os
import re
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
RowRange = Optional[Tuple[int, int]]
FORMATS = ("parquet", "jsonl", "webdataset", "llava")


def detect_format(path: str) -> str:
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "webdataset"
    if name.endswith(".json"):
        return "llava"  # a .json input is a conversation array (LLaVA's own files)
    raise ValueError(f"{path}: cannot tell the input format from the name; pass --input-format "
                     f"{'|'.join(FORMATS)}")


def count_rows(path: str, fmt: str, exact: bool = False) -> Optional[int]:
    """Row count when it is cheap to know (parquet footer), else None (progress without total).

    ``exact=True`` counts every format (one streaming pass; what ``--num-shards`` splitting by
    rows needs): jsonl lines, webdataset samples, JSON array elements.
    """
    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    if not exact:
        return None
    if fmt == "jsonl" or (fmt == "llava" and not _is_json_array(path)):
        return _count_lines(path)
    if fmt == "llava":
        return sum(1 for _ in iter_json_array(path))
    if fmt == "webdataset":
        return sum(1 for _ in _wds_groups(path, read=False))
    raise ValueError(f"unknown input format {fmt!r} ({', '.join(FORMATS)})")


def _open_text(path: str):
    opener = gzip.open if path.lower().endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _count_lines(path: str) -> int:
    """The rows iter_jsonl yields: newline count, plus an unterminated last line."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    n, last = 0, b"\n"
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _in_range(row: int, row_range: RowRange) -> bool:
    return row_range is None or row_range[0] <= row < row_range[1]


def iter_parquet(path: str, columns: Optional[Sequence[str]] = None, batch_size: int = 256,
                 row_range: RowRange = None) -> Iterator[Tuple[int, Record]]:
    pf = pq.ParquetFile(path)
    if columns is not None:
        present = set(pf.schema_arrow.names)
        columns = [c for c in columns if c in present]  # a missing column is a per-row reject later
    groups, starts, row = [], [], 0
    for g in range(pf.metadata.num_row_groups):  # only the row groups that overlap row_range
        n = pf.metadata.row_group(g).num_rows
        if row_range is None or (row < row_range[1] and row + n > row_range[0]):
            groups.append(g)
            starts.append(row)
        row += n
    for g, start in zip(groups, starts):
        row = start
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=[g]):
            for rec in batch.to_pylist():
                if _in_range(row, row_range):
                    yield row, rec
                row += 1


def iter_jsonl(path: str, row_range: RowRange = None) -> Iterator[Tuple[int, Record]]:
    with _open_text(path) as f:
        for row, line in enumerate(f):
            if not _in_range(row, row_range):
                if row_range is not None and row >= row_range[1]:
                    return
                continue
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


def _wds_groups(path: str, read: bool = True) -> Iterator[Dict[str, bytes]]:
    """The member groups of a tar, one per sample (consecutive members sharing a key).

    ``read=False`` yields the extensions only (empty bytes), for counting.
    """
    key, files = None, {}
    with tarfile.open(path, "r|*") as tar:  # streaming mode: no seeking, no member table in memory
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _wds_key(member.name)
            if key is not None and k != key:
                yield files
                files = {}
            key = k
            f = tar.extractfile(member) if read else None
            files[ext] = f.read() if f is not None else b""
    if key is not None:
        yield files


def iter_webdataset(path: str, text_column: str, image_column: str, row_range: RowRange = None) -> Iterator[Tuple[int, Record]]:
    """Samples are consecutive tar members sharing a key (``000123.jpg`` + ``000123.txt``)."""
    for row, files in enumerate(_wds_groups(path)):
        if row_range is not None and row >= row_range[1]:
            return
        if _in_range(row, row_range):
            yield row, _wds_record(files, text_column, image_column)


_NON_SPACE = re.compile(r"\S")


class _TextBuffer:
    """A window over a text file for incremental parsing: ``buf[pos:]`` is unparsed."""

    def __init__(self, f, read_size: int) -> None:
        self.f, self.read_size = f, read_size
        self.buf, self.pos, self.offset, self.eof = "", 0, 0, False

    def fill(self) -> bool:
        """Append the next block (dropping the parsed part); False at the end of the file."""
        chunk = self.f.read(self.read_size)
        if not chunk:
            self.eof = True
            return False
        self.offset += self.pos
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        return True

    def peek(self) -> str:
        """The next non-whitespace character (not consumed), "" at the end of the file."""
        while True:
            m = _NON_SPACE.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.fill():
                return ""


def iter_json_array(path: str, read_size: int = 1 << 20, max_element_chars: int = 64 << 20) -> Iterator[Any]:
    """The elements of a (possibly huge) top-level JSON array, one at a time.

    ``json.JSONDecoder.raw_decode`` parses one element from a buffer that holds at most one
    block beyond the element being parsed, so memory is bounded by the largest element, not
    the file (LLaVA-Instruct's 665K-record json is 1 GB). Invalid JSON cannot be skipped inside
    an array (there is no line to resync on), so it raises ValueError naming the element and
    the character offset.
    """
    decoder = json.JSONDecoder()
    with _open_text(path) as f:
        b = _TextBuffer(f, read_size)
        if b.peek() != "[":
            raise ValueError(f"{path}: expected a JSON array ('[' first), got {b.buf[b.pos:b.pos + 20]!r}")
        b.pos += 1
        index = 0
        if b.peek() == "]":
            return
        while True:
            if b.peek() == "":
                raise ValueError(f"{path}: element {index}: the file ends inside the array (truncated?)")
            while True:
                try:
                    value, end = decoder.raw_decode(b.buf, b.pos)
                except json.JSONDecodeError as e:
                    if b.eof or not b.fill():
                        raise ValueError(f"{path}: element {index}: invalid JSON at character {b.offset + e.pos}: "
                                         f"{e.msg}") from None
                    if len(b.buf) - b.pos > max_element_chars:
                        raise ValueError(f"{path}: element {index} (from character {b.offset + b.pos}) is invalid "
                                         f"or larger than {max_element_chars} characters") from None
                    continue
                # A number at the buffer's end may go on in the next block ("12" | "34").
                if end == len(b.buf) and not b.eof and b.fill():
                    continue
                break
            b.pos = end
            yield value
            index += 1
            sep = b.peek()
            if sep == "]":
                return
            if sep != ",":
                raise ValueError(f"{path}: after element {index - 1}: expected ',' or ']' at character "
                                 f"{b.offset + b.pos}, got {sep!r}")
            b.pos += 1


def _is_json_array(path: str) -> bool:
    with _open_text(path) as f:
        return _TextBuffer(f, 4096).peek() == "["


def iter_llava(path: str, row_range: RowRange = None) -> Iterator[Tuple[int, Record]]:
    """LLaVA conversation records: a JSON array (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json,
    LLaVA-Instruct's llava_v1_5_mix665k.json) or JSON lines, told apart by the first character."""
    if not _is_json_array(path):
        yield from iter_jsonl(path, row_range)
        return
    for row, rec in enumerate(iter_json_array(path)):
        if row_range is not None and row >= row_range[1]:
            return
        if _in_range(row, row_range):
            yield row, rec if isinstance(rec, dict) else RowError("wrong_type", f"element is a JSON {type(rec).__name__}, not an object")


def iter_records(path: str, fmt: str, *, text_column: str = "caption", image_column: str = "image",
                 columns: Optional[Sequence[str]] = None, batch_size: int = 256,
                 row_range: RowRange = None) -> Iterator[Tuple[int, Record]]:
    """Rows of one input file. ``columns`` restricts the parquet columns read (None = all)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    if fmt == "parquet":
        return iter_parquet(path, columns, batch_size, row_range)
    if fmt == "jsonl":
        return iter_jsonl(path, row_range)
    if fmt == "webdataset":
        return iter_webdataset(path, text_column, image_column, row_range)
    if fmt == "llava":
        return iter_llava(path, row_range)
    raise ValueError(f"unknown input format {fmt!r} ({', '.join(FORMATS)})")


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
