"""Streaming reader for a dataset directory (train/eval as JSONL or Parquet).

Rows are yielded one at a time with their 1-based line (JSONL) or row (Parquet) number so
memory stays bounded by the longest line, not the file. Anything that makes a file
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
PARQUET_BATCH_ROWS = 2048


class DatasetError(ValueError):
    """The dataset cannot be read as training data at all (not a data-quality finding)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line


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


def iter_rows(source: DatasetSource, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_or_row_number, record) for one split, streaming."""
    f = source.files[split]
    if f.format == "jsonl":
        yield from _iter_jsonl(source, f)
    else:
        yield from _iter_parquet(source, f)


def _iter_jsonl(source: DatasetSource, f: SplitFile) -> Iterator[tuple[int, dict[str, Any]]]:
    where = posixpath.join(source.uri, f.name)
    try:
        handle = source.fs.open(f.path, "rb")
    except OSError as exc:
        raise DatasetError(f"cannot read {where}: {exc}. Check permissions.", file=f.name) from exc
    rows = 0
    with handle:
        lineno = 0
        try:
            for raw in handle:
                lineno += 1
                if lineno == 1:
                    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                        raise DatasetError(
                            f"{where} line 1: file is UTF-16 encoded; re-encode it as UTF-8 "
                            "(e.g. `iconv -f UTF-16 -t UTF-8`).",
                            file=f.name,
                            line=1,
                        )
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # tolerate a UTF-8 BOM
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad = raw[exc.start : exc.start + 1].hex()
                    raise DatasetError(
                        f"{where} line {lineno}: not valid UTF-8 (byte 0x{bad} at byte offset "
                        f"{exc.start} of the line). Re-export the file as UTF-8 "
                        "(e.g. `iconv -f LATIN1 -t UTF-8`).",
                        file=f.name,
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
                        file=f.name,
                        line=lineno,
                    ) from exc
                if not isinstance(record, dict):
                    raise DatasetError(
                        f"{where} line {lineno}: expected a JSON object with prompt/completion "
                        f"or messages, got a JSON {type(record).__name__}.",
                        file=f.name,
                        line=lineno,
                    )
                rows += 1
                yield lineno, record
        except OSError as exc:
            raise DatasetError(
                f"cannot read {where} (after line {lineno}): {exc}", file=f.name, line=lineno
            ) from exc
    if rows == 0:
        raise DatasetError(
            f"{where} has zero rows; a split needs at least one JSON object per line.",
            file=f.name,
        )


def _iter_parquet(source: DatasetSource, f: SplitFile) -> Iterator[tuple[int, dict[str, Any]]]:
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
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    rows += 1
                    yield rows, record
    except pa.ArrowException as exc:
        raise DatasetError(
            f"{where} row {rows + 1}: cannot decode Parquet data ({exc}); the file is corrupt "
            "or truncated, re-export it.",
            file=f.name,
            line=rows + 1,
        ) from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {where}: {exc}", file=f.name) from exc
    if rows == 0:
        raise DatasetError(f"{where} has zero rows.", file=f.name)


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
