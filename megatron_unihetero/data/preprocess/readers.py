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

import codecs
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
# What invalid UTF-8 in a text input is: a reject naming the line (jsonl), the member
# (webdataset) or an error naming the element (a JSON array cannot be resynced); "replace"
# (--invalid-utf8 replace, an explicit opt-in) puts U+FFFD in place of the bad bytes.
UTF8_ERRORS = ("reject", "replace")


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


def count_rows(path: str, fmt: str, exact: bool = False, invalid_utf8: str = "reject") -> Optional[int]:
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
        return sum(1 for _ in iter_json_array(path, invalid_utf8=invalid_utf8))
    if fmt == "webdataset":
        return sum(1 for _ in _wds_groups(path, read=False))
    raise ValueError(f"unknown input format {fmt!r} ({', '.join(FORMATS)})")


def _open_binary(path: str):
    return (gzip.open if path.lower().endswith(".gz") else open)(path, "rb")


def _decode(data: bytes, invalid_utf8: str, where: str) -> Union[str, RowError]:
    try:
        return data.decode("utf-8", errors="strict" if invalid_utf8 == "reject" else "replace")
    except UnicodeDecodeError as e:
        return RowError("bad_utf8", f"{where}: invalid UTF-8 at byte {e.start} ({e.reason}); "
                                    f"--invalid-utf8 replace would keep it with U+FFFD")


def _count_lines(path: str) -> int:
    """The rows iter_jsonl yields: newline count, plus an unterminated last line."""
    n, last = 0, b"\n"
    with _open_binary(path) as f:
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


def iter_jsonl(path: str, row_range: RowRange = None, invalid_utf8: str = "reject") -> Iterator[Tuple[int, Record]]:
    # Bytes, decoded line by line: a bad byte rejects its line only (a text stream would stop
    # the file there, or replace without a word).
    with _open_binary(path) as f:
        for row, raw in enumerate(f):
            if not _in_range(row, row_range):
                if row_range is not None and row >= row_range[1]:
                    return
                continue
            line = _decode(raw.removeprefix(codecs.BOM_UTF8) if row == 0 else raw, invalid_utf8, f"line {row + 1}")
            if isinstance(line, RowError):
                yield row, line
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


def _wds_record(key: str, files: Dict[str, bytes], text_column: str, image_column: str,
                invalid_utf8: str = "reject") -> Record:
    rec: Dict[str, Any] = {}
    if "json" in files:
        text = _decode(files["json"], invalid_utf8, f"member {key}.json")
        if isinstance(text, RowError):
            return text
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            return RowError("bad_json", f"member {key}.json: {e}")
        if isinstance(meta, dict):
            rec.update(meta)
    for ext in ("txt", "text", "caption"):
        if ext in files and text_column not in rec:
            text = _decode(files[ext], invalid_utf8, f"member {key}.{ext}")
            if isinstance(text, RowError):
                return text
            rec[text_column] = text
    for ext in IMAGE_EXTENSIONS:
        if ext in files and image_column not in rec:
            rec[image_column] = files[ext]
    return rec


def _wds_groups(path: str, read: bool = True) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """The member groups of a tar, one per sample (consecutive members sharing a key), as
    (key, {extension: bytes}).

    ``read=False`` yields the extensions only (empty bytes), for counting.
    """
    key, files = None, {}
    with tarfile.open(path, "r|*") as tar:  # streaming mode: no seeking, no member table in memory
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _wds_key(member.name)
            if key is not None and k != key:
                yield key, files
                files = {}
            key = k
            f = tar.extractfile(member) if read else None
            files[ext] = f.read() if f is not None else b""
    if key is not None:
        yield key, files


def iter_webdataset(path: str, text_column: str, image_column: str, row_range: RowRange = None,
                    invalid_utf8: str = "reject") -> Iterator[Tuple[int, Record]]:
    """Samples are consecutive tar members sharing a key (``000123.jpg`` + ``000123.txt``)."""
    for row, (key, files) in enumerate(_wds_groups(path)):
        if row_range is not None and row >= row_range[1]:
            return
        if _in_range(row, row_range):
            yield row, _wds_record(key, files, text_column, image_column, invalid_utf8)


_NON_SPACE = re.compile(r"\S")


class _BadUtf8(ValueError):
    """Invalid UTF-8 inside a JSON array file (the caller names the file and element)."""


class _TextBuffer:
    """A window over a binary file's UTF-8 text for incremental parsing: ``buf[pos:]`` is
    unparsed. The bytes are decoded here (not by a text stream) so that a bad byte is named
    by its offset in the file."""

    def __init__(self, f, read_size: int, invalid_utf8: str = "reject") -> None:
        self.f, self.read_size = f, read_size
        self.buf, self.pos, self.offset, self.eof = "", 0, 0, False
        # utf-8-sig: a byte-order mark (files saved on Windows) is not part of the first value
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")("strict" if invalid_utf8 == "reject" else "replace")
        self.bytes_read = 0

    def fill(self) -> bool:
        """Append the next block (dropping the parsed part); False at the end of the file."""
        raw = self.f.read(self.read_size)
        try:
            chunk = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as e:  # e.start counts from the bytes the decoder held back
            at = self.bytes_read - len(e.object) + len(raw) + e.start
            raise _BadUtf8(f"invalid UTF-8 at byte {at} ({e.reason}); --invalid-utf8 replace would keep it "
                           f"with U+FFFD") from None
        self.bytes_read += len(raw)
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


def iter_json_array(path: str, read_size: int = 1 << 20, max_element_chars: int = 64 << 20,
                    invalid_utf8: str = "reject") -> Iterator[Any]:
    """The elements of a (possibly huge) top-level JSON array, one at a time.

    ``json.JSONDecoder.raw_decode`` parses one element from a buffer that holds at most one
    block beyond the element being parsed, so memory is bounded by the largest element, not
    the file (LLaVA-Instruct's 665K-record json is 1 GB). Invalid JSON cannot be skipped inside
    an array (there is no line to resync on), so it raises ValueError naming the element and
    the character offset.
    """
    try:
        yield from _json_array_elements(path, read_size, max_element_chars, invalid_utf8)
    except _BadUtf8 as e:  # decoded a block ahead of the parser: named by byte, not element
        raise ValueError(f"{path}: {e}") from None


def _json_array_elements(path: str, read_size: int, max_element_chars: int, invalid_utf8: str) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    with _open_binary(path) as f:
        b = _TextBuffer(f, read_size, invalid_utf8)
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
    with _open_binary(path) as f:  # the first non-space byte; UTF-8 is checked when it is read
        return f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"["


def iter_llava(path: str, row_range: RowRange = None, invalid_utf8: str = "reject") -> Iterator[Tuple[int, Record]]:
    """LLaVA conversation records: a JSON array (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json,
    LLaVA-Instruct's llava_v1_5_mix665k.json) or JSON lines, told apart by the first character."""
    if not _is_json_array(path):
        yield from iter_jsonl(path, row_range, invalid_utf8)
        return
    for row, rec in enumerate(iter_json_array(path, invalid_utf8=invalid_utf8)):
        if row_range is not None and row >= row_range[1]:
            return
        if _in_range(row, row_range):
            yield row, rec if isinstance(rec, dict) else RowError("wrong_type", f"element is a JSON {type(rec).__name__}, not an object")


def iter_records(path: str, fmt: str, *, text_column: str = "caption", image_column: str = "image",
                 columns: Optional[Sequence[str]] = None, batch_size: int = 256,
                 row_range: RowRange = None, invalid_utf8: str = "reject") -> Iterator[Tuple[int, Record]]:
    """Rows of one input file. ``columns`` restricts the parquet columns read (None = all);
    ``invalid_utf8``: see UTF8_ERRORS (parquet strings are UTF-8 checked by Arrow)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    if invalid_utf8 not in UTF8_ERRORS:
        raise ValueError(f"invalid_utf8 must be one of {UTF8_ERRORS}, got {invalid_utf8!r}")
    if fmt == "parquet":
        return iter_parquet(path, columns, batch_size, row_range)
    if fmt == "jsonl":
        return iter_jsonl(path, row_range, invalid_utf8)
    if fmt == "webdataset":
        return iter_webdataset(path, text_column, image_column, row_range, invalid_utf8)
    if fmt == "llava":
        return iter_llava(path, row_range, invalid_utf8)
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
