"""`version_dataset`: an immutable, content-addressed snapshot of the accepted rows.

The version id is a short sha256 over the canonical JSON of every accepted row (quarantined
rows excluded), split by split, so the same content always gets the same id no matter the
source format, key order or whitespace of the source. The snapshot is written into a
temporary sibling directory and renamed into place, so `artifacts/datasets/<id>/` is either
absent or complete; versioning the same content twice is a no-op (`created=False`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneship import config
from tuneship.data.reader import (
    SPLITS,
    DatasetError,
    canonical_json,
    file_sha256,
    iter_rows,
    resolve_dataset,
)
from tuneship.data.validate import ValidationReport

VERSION_ID_CHARS = 12
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class DatasetVersion:
    """Where a dataset version lives; `created` is False when it already existed."""

    version_id: str
    manifest_uri: str
    path: str
    created: bool


def version_dataset(
    dataset_uri: str | Path,
    report: ValidationReport | str | Path,
    *,
    artifacts_root: str | Path | None = None,
) -> DatasetVersion:
    """Snapshot the accepted rows of a validated dataset under `<artifacts>/datasets/<id>/`.

    `report` is the `ValidationReport` (or the path of its report.json) for this same
    dataset; it must be accepted and the source files must be unchanged since it was made.
    `artifacts_root` defaults to `tuneship.config.artifacts()` (read at call time).
    """
    if not isinstance(report, ValidationReport):
        report = ValidationReport.load(report)
    if not report.accepted:
        raise ValueError(
            f"refusing to version {dataset_uri}: its validation was rejected.\n{report.summary()}"
        )
    source = resolve_dataset(dataset_uri)
    if source.uri.rstrip("/") != report.dataset_uri.rstrip("/"):
        raise ValueError(
            f"the report is for {report.dataset_uri}, not {source.uri}; validate this dataset first"
        )
    for split in SPLITS:
        f = source.files[split]
        expected = report.files[split]
        if f.name != expected["name"] or file_sha256(source, split) != expected["sha256"]:
            raise DatasetError(
                f"{source.uri}/{f.name} changed since it was validated; re-run validation "
                "before versioning so the version matches what was checked.",
                file=f.name,
            )

    root = Path(artifacts_root) if artifacts_root is not None else config.artifacts()
    datasets = root / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    tmp = datasets / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        content = hashlib.sha256()
        file_hashes: dict[str, str] = {}
        rows: dict[str, int] = {}
        for split in SPLITS:
            skip = set(report.quarantined_lines.get(split, []))
            fh = hashlib.sha256()
            n = 0
            content.update(f"#split={split}\n".encode())
            with (tmp / f"{split}.jsonl").open("wb") as out:
                for line, record in iter_rows(source, split):
                    if line in skip:
                        continue
                    try:
                        data = (canonical_json(record) + "\n").encode("utf-8")
                    except UnicodeEncodeError as exc:
                        raise DatasetError(
                            f"{source.uri}/{source.files[split].name} line {line}: text cannot "
                            "be written as UTF-8 (lone surrogate); keep text_encoding at "
                            "severity error so such rows are quarantined.",
                            file=source.files[split].name,
                            line=line,
                        ) from exc
                    out.write(data)
                    fh.update(data)
                    content.update(data)
                    n += 1
                out.flush()
                os.fsync(out.fileno())
            file_hashes[f"{split}.jsonl"] = fh.hexdigest()
            rows[split] = n
        digest = content.hexdigest()
        version_id = digest[:VERSION_ID_CHARS]
        final = datasets / version_id

        if (final / MANIFEST).exists():
            return _existing(final, version_id)

        quarantine = {
            "count": report.quarantine_count,
            "by_split": {s: len(v) for s, v in report.quarantined_lines.items()},
            "path": report.quarantine_path,
        }
        manifest: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "version_id": version_id,
            "rows": rows,
            "sha256": {"content": digest, **file_hashes},
            "schema": report.schema,
            "source_uri": source.uri,
            "source_files": report.files,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "checks": [
                {
                    "name": c.name,
                    "severity": c.severity,
                    "passed": c.passed,
                    "figures": {k: v for k, v in c.figures.items() if k != "by_split"},
                }
                for c in report.checks
            ],
            "quarantine": quarantine,
            "validation": {
                "config": report.config,
                "report": str(Path(report.workdir) / "report.json"),
                "data_docs": report.data_docs_path,
            },
            # the validation profiled exactly these rows: train, quarantine excluded
            "reference": report.reference,
        }
        with (tmp / MANIFEST).open("w", encoding="utf-8") as mf:
            json.dump(manifest, mf, indent=2, sort_keys=True)
            mf.flush()
            os.fsync(mf.fileno())
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else finished the same version first (rename onto a non-empty dir fails).
            if (final / MANIFEST).exists():
                return _existing(final, version_id)
            raise
        _fsync_dir(datasets)
        return DatasetVersion(version_id, str(final / MANIFEST), str(final), created=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _existing(final: Path, version_id: str) -> DatasetVersion:
    return DatasetVersion(version_id, str(final / MANIFEST), str(final), created=False)


def _fsync_dir(path: Path) -> None:
    """Persist the rename itself (POSIX); best effort elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_manifest(version_path_or_manifest: str | Path) -> dict[str, Any]:
    """Read a version's manifest given its directory or manifest path."""
    p = Path(version_path_or_manifest)
    if p.is_dir():
        p = p / MANIFEST
    return json.loads(p.read_text(encoding="utf-8"))
