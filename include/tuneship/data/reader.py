"""Streaming reader for a dataset directory (train/eval as JSONL or Parquet).

Rows come in chunks (`iter_chunks`, at most `CHUNK_ROWS` rows, JSONL read in blocks of
about `BLOCK_BYTES`) with their 1-based line (JSONL) or row (Parquet) numbers, so memory
stays bounded by the chunk, not the file. A JSONL block is decoded in one msgspec call; a
block that does not decode cleanly is re-read line by line with Python's json for exact
errors. Anything that makes a file
unusable as a whole raises `DatasetError` naming the file, the line and what to do;
row-level problems (wrong field types, empty text, PII...) are left to the checks.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

SPLITS: tuple[str, ...] = ("train", "eval")
FORMATS: tuple[str, ...] = ("jsonl", "parquet")
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
Shape = Literal["prompt_completion", "chat"]


class DatasetError(ValueError):
    """The dataset cannot be read as training data at all (not a data-quality finding)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line

    def __reduce__(self) -> tuple[Any, ...]:  # keep file/line across worker processes
        return (_dataset_error, (str(self), self.file, self.line))


def _dataset_error(message: str, file: str | None, line: int | None) -> DatasetError:
    return DatasetError(message, file=file, line=line)


@dataclass(frozen=True)
class SplitFile:
    """One split's file inside the dataset directory."""

    split: str
    path: str  # path as understood by `fs` (no protocol)
    name: str  # file name, e.g. "train.jsonl"
    format: str  # "jsonl" | "parquet"


@dataclass(frozen=True)
class DatasetSource:
    """A resolved dataset directory: the filesystem and one file per split."""

    uri: str
    fs: Any  # fsspec.AbstractFileSystem
    root: str
    files: dict[str, SplitFile]


def resolve_dataset(dataset_uri: str | Any) -> DatasetSource:
    """Find train/eval files under `dataset_uri` (local path or fsspec URI)."""
    import fsspec

    uri = str(dataset_uri)
    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise DatasetError(
            f"cannot open dataset location {uri!r}: {exc}. Pass a local directory or an "
            "fsspec URI whose filesystem package is installed."
        ) from exc
    root = root.rstrip("/") or "/"
    try:
        is_dir = fs.isdir(root)
        exists = is_dir or fs.exists(root)
    except OSError as exc:
        raise DatasetError(f"cannot access dataset directory {uri}: {exc}") from exc
    if not exists:
        raise DatasetError(
            f"dataset directory {uri} does not exist. Pass the directory that holds "
            "train.jsonl and eval.jsonl (or train.parquet and eval.parquet)."
        )
    if not is_dir:
        raise DatasetError(
            f"{uri} is a file, not a directory. Pass the directory that holds train.jsonl and "
            "eval.jsonl (or .parquet), not one of the files."
        )
    files: dict[str, SplitFile] = {}
    for split in SPLITS:
        found = [
            SplitFile(split, posixpath.join(root, f"{split}.{fmt}"), f"{split}.{fmt}", fmt)
            for fmt in FORMATS
            if fs.exists(posixpath.join(root, f"{split}.{fmt}"))
        ]
        if not found:
            try:
                present = sorted(posixpath.basename(p) for p in fs.ls(root, detail=False))
            except OSError:
                present = []
            raise DatasetError(
                f"{posixpath.join(uri, split + '.jsonl')} is missing: the dataset directory needs "
                f"{split}.jsonl or {split}.parquet (found: {', '.join(present) or 'nothing'}).",
                file=f"{split}.jsonl",
            )
        if len(found) > 1:
            raise DatasetError(
                f"{uri} holds both {found[0].name} and {found[1].name}; keep exactly one file "
                f"per split so it is unambiguous which one is trained on.",
                file=found[0].name,
            )
        files[split] = found[0]
    return DatasetSource(uri=uri, fs=fs, root=root, files=files)


CHUNK_ROWS = 32768  # rows per chunk: bounded memory, and enough to amortise vectorised work
BLOCK_BYTES = 2 << 20  # JSONL is read in blocks of whole lines of about this many bytes


@dataclass
class RowChunk:
    """Consecutive rows of one split: their 1-based line (JSONL) or row (Parquet) numbers."""

    lines: list[int]
    records: list[dict[str, Any]]


def iter_rows(source: DatasetSource, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_or_row_number, record) for one split, streaming."""
    for chunk in iter_chunks(source, split):
        yield from zip(chunk.lines, chunk.records, strict=True)


def iter_chunks(source: DatasetSource, split: str) -> Iterator[RowChunk]:
    """Yield the split's rows chunk by chunk (memory stays bounded)."""
    f = source.files[split]
    where = posixpath.join(source.uri, f.name)
    rows = 0
    for block in iter_raw_blocks(source, split):
        chunk = decode_block(block, where)
        rows += len(chunk.records)
        yield chunk
    if rows == 0:
        raise zero_rows(where, f)


def zero_rows(where: str, f: SplitFile) -> DatasetError:
    what = "a split needs at least one JSON object per line" if f.format == "jsonl" else "no rows"
    return DatasetError(f"{where} has zero rows; {what}.", file=f.name)


@dataclass
class RawBlock:
    """Undecoded rows, as read: whole JSONL lines or one Parquet record batch. Small and
    picklable, so decoding can happen in a worker process."""

    format: str
    before: int  # lines (JSONL) or rows (Parquet) that precede the block
    data: Any  # list[bytes] | pyarrow.RecordBatch


def iter_raw_blocks(source: DatasetSource, split: str) -> Iterator[RawBlock]:
    """Read a split in blocks of about `BLOCK_BYTES` (JSONL) or `CHUNK_ROWS` rows (Parquet).
    File-level problems (unreadable, UTF-16, not Parquet) raise here."""
    f = source.files[split]
    if f.format == "jsonl":
        yield from _jsonl_blocks(source, f)
    else:
        yield from _parquet_blocks(source, f)


def decode_block(block: RawBlock, where: str) -> RowChunk:
    """Rows of a block with their line/row numbers; row-level read errors name the line."""
    name = posixpath.basename(where)
    if block.format == "parquet":
        records = block.data.to_pylist()
        return RowChunk(list(range(block.before + 1, block.before + 1 + len(records))), records)
    records = _decode_block(block.data)
    if records is not None and all(type(r) is dict for r in records):
        return RowChunk(list(range(block.before + 1, block.before + 1 + len(records))), records)
    lines, records = _decode_lines(block.data, block.before, where, name)
    return RowChunk(lines, records)


_DECODER = None


def _decode_block(raw_lines: list[bytes]) -> list[Any] | None:
    """Fast path: decode a block of lines as one JSON array (msgspec); None if any line is
    not plain valid JSON, so the caller re-reads the block line by line for exact errors."""
    global _DECODER
    import msgspec

    if _DECODER is None:
        _DECODER = msgspec.json.Decoder()
    try:
        return _DECODER.decode(b"[" + b",".join(raw_lines) + b"]")
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def _jsonl_blocks(source: DatasetSource, f: SplitFile) -> Iterator[RawBlock]:
    where = posixpath.join(source.uri, f.name)
    try:
        handle = source.fs.open(f.path, "rb")
    except OSError as exc:
        raise DatasetError(f"cannot read {where}: {exc}. Check permissions.", file=f.name) from exc
    with handle:
        lineno = 0  # lines consumed before the current block
        try:
            while block := handle.readlines(BLOCK_BYTES):
                if lineno == 0:
                    block[0] = _check_first_line(block[0], where, f.name)
                yield RawBlock("jsonl", lineno, block)
                lineno += len(block)
        except OSError as exc:
            raise DatasetError(
                f"cannot read {where} (after line {lineno}): {exc}", file=f.name, line=lineno
            ) from exc


def _check_first_line(raw: bytes, where: str, name: str) -> bytes:
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DatasetError(
            f"{where} line 1: file is UTF-16 encoded; re-encode it as UTF-8 "
            "(e.g. `iconv -f UTF-16 -t UTF-8`).",
            file=name,
            line=1,
        )
    return raw.removeprefix(b"\xef\xbb\xbf")  # tolerate a UTF-8 BOM


def _decode_lines(
    block: list[bytes], before: int, where: str, name: str
) -> tuple[list[int], list[dict[str, Any]]]:
    """Slow path, one line at a time with Python's json: exact line numbers and reasons,
    blank lines skipped, and what msgspec refuses but json accepts (NaN, lone surrogate
    escapes) still read, so the checks, not the reader, judge such rows."""
    lines: list[int] = []
    records: list[dict[str, Any]] = []
    for offset, raw in enumerate(block):
        lineno = before + offset + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start : exc.start + 1].hex()
            raise DatasetError(
                f"{where} line {lineno}: not valid UTF-8 (byte 0x{bad} at byte offset "
                f"{exc.start} of the line). Re-export the file as UTF-8 "
                "(e.g. `iconv -f LATIN1 -t UTF-8`).",
                file=name,
                line=lineno,
            ) from exc
        if not text.strip():
            continue  # blank separator lines carry no row
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            truncated = not raw.endswith(b"\n")
            hint = (
                "the file ends in the middle of a record (truncated upload or copy?); "
                "re-export or re-copy the file"
                if truncated
                else "each line must be one complete JSON object; fix or remove this line"
            )
            raise DatasetError(
                f"{where} line {lineno}: not valid JSON ({exc.msg} at column "
                f"{exc.colno}): {hint}.",
                file=name,
                line=lineno,
            ) from exc
        if not isinstance(record, dict):
            raise DatasetError(
                f"{where} line {lineno}: expected a JSON object with prompt/completion "
                f"or messages, got a JSON {type(record).__name__}.",
                file=name,
                line=lineno,
            )
        lines.append(lineno)
        records.append(record)
    return lines, records


def _parquet_blocks(source: DatasetSource, f: SplitFile) -> Iterator[RawBlock]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = posixpath.join(source.uri, f.name)
    rows = 0
    try:
        with source.fs.open(f.path, "rb") as handle:
            try:
                pf = pq.ParquetFile(handle)
            except (pa.ArrowException, OSError) as exc:
                raise DatasetError(
                    f"{where}: not a readable Parquet file ({exc}); re-export it or use JSONL.",
                    file=f.name,
                ) from exc
            for batch in pf.iter_batches(batch_size=CHUNK_ROWS):
                yield RawBlock("parquet", rows, batch)
                rows += batch.num_rows
    except pa.ArrowException as exc:
        raise DatasetError(
            f"{where} row {rows + 1}: cannot decode Parquet data ({exc}); the file is corrupt "
            "or truncated, re-export it.",
            file=f.name,
            line=rows + 1,
        ) from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {where}: {exc}", file=f.name) from exc


def detect_shape(record: dict[str, Any]) -> Shape | None:
    """Which of the two supported row shapes a record claims to be, by its keys."""
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    return None


def file_sha256(source: DatasetSource, split: str, chunk: int = 1 << 20) -> str:
    """sha256 of a split's raw bytes, read in chunks, to notice a file changing under us."""
    h = hashlib.sha256()
    path = source.files[split].path
    try:
        with source.fs.open(path, "rb") as handle:
            while block := handle.read(chunk):
                h.update(block)
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read ({exc.strerror or exc}); check that it is a "
                           "readable regular file.", file=source.files[split].name) from exc
    return h.hexdigest()


def canonical_json(record: dict[str, Any]) -> str:
    """One stable serialisation per row (sorted keys, no spaces, UTF-8 text kept as is)."""
    # default=str only matters for Parquet extras (timestamps, decimals); JSONL never needs it.
    return json.dumps(
        record, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    )
