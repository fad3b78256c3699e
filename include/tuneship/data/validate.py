"""`validate_dataset`: read, inspect, assert with Great Expectations, quarantine, report.

One streaming pass per split computes a small feature row per record (and writes rows
failing an error check straight to the quarantine file), then GE validates the feature
frames against the suite from the YAML config and renders Data Docs. The report says
whether the batch is accepted and, when not, which file/lines and checks to look at.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuneship import config
from tuneship.data.checks import (
    ROW_CHECKS,
    AnswerCheck,
    ChunkInspector,
    RowScreen,
    Screened,
    Tokenizer,
    answer_function,
    load_config,
    unknown_schema,
    with_answer_check,
)
from tuneship.data.reader import (
    SPLITS,
    RawBlock,
    decode_block,
    detect_shape,
    file_sha256,
    iter_raw_blocks,
    resolve_dataset,
    zero_rows,
)
from tuneship.profile import TextProfiler, compare_profiles

SAMPLE_LINES = 10
log = logging.getLogger(__name__)
REPORT_FILE = "report.json"
QUARANTINE_FILE = "quarantine.jsonl"


@dataclass
class CheckResult:
    """One check across both splits: blocking when severity is error and passed is False."""

    name: str
    severity: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    sample_lines: dict[str, list[int]] = field(default_factory=dict)  # file name -> lines


@dataclass
class ValidationReport:
    """Outcome of `validate_dataset`; JSON-round-trippable so tasks pass its path, not it."""

    dataset_uri: str
    accepted: bool
    schema: str
    checks: list[CheckResult]
    rows: dict[str, int]
    accepted_rows: dict[str, int]
    files: dict[str, dict[str, str]]  # split -> {name, format, sha256}
    quarantine_path: str | None
    quarantine_count: int
    quarantined_lines: dict[str, list[int]]
    data_docs_path: str | None
    workdir: str
    config: dict[str, Any]
    created_at: str
    reference: dict[str, Any] | None = None  # profile of accepted train prompts

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed and c.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed and c.severity != "error"]

    def check(self, name: str) -> CheckResult:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path | None = None) -> Path:
        p = Path(path) if path else Path(self.workdir) / REPORT_FILE
        p.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        return p

    @classmethod
    def load(cls, path: str | Path) -> ValidationReport:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        raw["checks"] = [CheckResult(**c) for c in raw["checks"]]
        return cls(**raw)

    def summary(self) -> str:
        """A message a person can act on: verdict, files, failing lines/checks, where to look."""
        names = {s: f["name"] for s, f in self.files.items()}
        head = "ACCEPTED" if self.accepted else "REJECTED"
        sizes = ", ".join(
            f"{names[s]}: {self.rows[s]} rows, {self.accepted_rows[s]} accepted" for s in self.rows
        )
        lines = [f"Dataset {self.dataset_uri} {head} (schema {self.schema}; {sizes})."]

        def describe(c: CheckResult) -> str:
            figs = ", ".join(f"{k}={_fmt(v)}" for k, v in c.figures.items() if k != "by_split")
            where = "; ".join(
                f"{f}:{','.join(map(str, ls))}" for f, ls in c.sample_lines.items() if ls
            )
            return f"  - {c.name} [{c.severity}]: {figs}" + (
                f"; first lines {where}" if where else ""
            )

        if self.failed_checks:
            lines.append("Failing checks (block the batch):")
            lines += [describe(c) for c in self.failed_checks]
        if self.warnings:
            lines.append("Warnings (reported, not blocking):")
            lines += [describe(c) for c in self.warnings]
        quarantined = [
            c
            for c in self.checks
            if c.passed and c.name != "quarantine" and c.figures.get("quarantined_rows")
        ]
        if quarantined:
            lines.append("Rows quarantined by passing checks:")
            lines += [describe(c) for c in quarantined]
        if self.quarantine_count:
            lines.append(
                f"Quarantined {self.quarantine_count} row(s) -> {self.quarantine_path} "
                "(each with its file, line number and reasons)"
                + ("; they are excluded from the version." if self.accepted else ".")
            )
        if self.data_docs_path:
            lines.append(f"Data Docs: {self.data_docs_path}")
        if not self.accepted:
            gate = self.config.get("answer_check")
            if gate and any(c.name == "answer_format" for c in self.failed_checks):
                lines.append(
                    f"The answers do not fit task {gate['task']!r}: at least "
                    f"{_fmt(float(gate['min_share']))} of each split must pass "
                    f"{gate['describe']}. If this batch belongs to another task, land it "
                    "there; the threshold is the task's (its declaration), not the suite's."
                )
            lines.append(
                "Fix the listed lines in the source files (or, if the rule is wrong, change "
                f"its threshold in {self.config.get('path')}) and re-run the validation."
            )
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _default_workdir() -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return config.home() / "data_validation" / f"{stamp}-{uuid.uuid4().hex[:8]}"


def _load_manifest(previous: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(previous, Mapping):
        return previous
    import fsspec

    with fsspec.open(str(previous), "r", encoding="utf-8") as fh:
        return json.load(fh)


PARALLEL_MIN_BYTES = 64 << 20  # below this, worker processes cost more than they save
MAX_WORKERS = 4


def original_row(block: RawBlock, line: int) -> dict[str, Any]:
    """The row at `line` exactly as the source holds it, re-read from its raw block (the
    quarantine keeps the original, whichever process checked it)."""
    i = line - block.before - 1
    if block.format == "parquet":
        return block.data.slice(i, 1).to_pylist()[0]
    raw = block.data[i]
    return json.loads(raw.removeprefix(b"\xef\xbb\xbf") if i == 0 else raw)


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: Any, answer_check: AnswerCheck | None = None) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["answer_check"] = answer_check  # its module is imported by the first RowScreen
    # pyarrow imports pandas on the first pa.array() of Python objects (seconds): pay it
    # while booting, not on the first block
    import pandas  # noqa: F401
    import pyarrow.compute  # noqa: F401


def _screen_block(block: RawBlock, split: str, where: str, shape: str) -> Screened:
    if shape not in _WORKER:
        _WORKER[shape] = RowScreen(
            _WORKER["cfg"], shape, answer_check=_WORKER["answer_check"]  # type: ignore[arg-type]
        )
    chunk = decode_block(block, where)
    return _WORKER[shape].screen(split, chunk.lines, chunk.records, where)


class _Screener:
    """Decodes and screens raw blocks in order: inline, or on a pool of worker processes
    (spawned, so nothing of the caller's state is inherited) when the files are large.
    At most two blocks per worker are in flight, so memory stays bounded."""

    def __init__(
        self,
        source: Any,
        cfg: Any,
        tokenizer: Tokenizer | None,
        workers: int | None,
        answer_check: AnswerCheck | None = None,
    ):
        self.source = source
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.answer_check = answer_check
        self.screen: RowScreen | None = None
        self.pool: Any = None
        self._booting: list[Any] = []
        if workers is None:
            size = sum(source.fs.size(f.path) for f in source.files.values())
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            workers = min(MAX_WORKERS, cpus) if size >= PARALLEL_MIN_BYTES else 0
        # a custom tokenizer may not survive pickling into another process: stay inline
        self.workers = workers if workers > 1 and tokenizer is None else 0
        if self.workers:  # started now: the workers boot while the caller hashes the files
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(cfg, answer_check),
            )
            # spawn them all now; until one is up, the caller screens blocks itself
            self._booting = [self.pool.submit(int) for _ in range(self.workers)]

    def __enter__(self) -> _Screener:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, split: str) -> Iterator[tuple[Screened, RawBlock]]:
        where = posixpath.join(self.source.uri, self.source.files[split].name)
        pending: deque[tuple[Any, RawBlock]] = deque()
        for block in iter_raw_blocks(self.source, split):
            chunk = None
            if self.screen is None:  # the first row decides the dataset's shape
                chunk = decode_block(block, where)
                if not chunk.records:
                    continue
                shape = detect_shape(chunk.records[0])
                if shape is None:
                    raise unknown_schema(where, chunk.lines[0], chunk.records[0])
                self.screen = RowScreen(self.cfg, shape, self.tokenizer, self.answer_check)
            booting = self.pool is not None and not any(f.done() for f in self._booting)
            if (self.pool is None or booting) and not pending:
                chunk = chunk or decode_block(block, where)
                if chunk.records:
                    yield self.screen.screen(split, chunk.lines, chunk.records, where), block
            else:
                pending.append((self._submit(block, split, where), block))
                while pending and (self.pool is None or len(pending) > 2 * self.workers):
                    yield from self._ready(pending.popleft(), split, where)
        while pending:
            yield from self._ready(pending.popleft(), split, where)

    def _submit(self, block: RawBlock, split: str, where: str) -> Any:
        """A future for the block, or None (screened inline) once the pool is gone."""
        from concurrent.futures.process import BrokenProcessPool

        if self.pool is None:
            return None
        assert self.screen is not None
        try:
            return self.pool.submit(_screen_block, block, split, where, self.screen.shape)
        except BrokenProcessPool:
            return None  # _ready notices and continues in this process

    def _ready(
        self, item: tuple[Any, RawBlock], split: str, where: str
    ) -> Iterator[tuple[Screened, RawBlock]]:
        from concurrent.futures.process import BrokenProcessPool

        future, block = item
        try:
            if future is None:
                raise BrokenProcessPool("pool already shut down")
            screened = future.result()
        except BrokenProcessPool as exc:
            # e.g. a caller's unguarded __main__ that spawned workers cannot re-import:
            # finish in this process rather than fail the validation
            if self.pool is not None:
                log.warning("validation workers died (%s); continuing in this process", exc)
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
            assert self.screen is not None
            chunk = decode_block(block, where)
            screened = self.screen.screen(split, chunk.lines, chunk.records, where)
        if screened.lines:
            yield screened, block


def validate_dataset(
    dataset_uri: str | Path,
    *,
    config_path: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
    previous_manifest: str | Path | Mapping[str, Any] | None = None,
    workdir: str | Path | None = None,
    workers: int | None = None,
    answer_check: AnswerCheck | None = None,
) -> ValidationReport:
    """Validate a dataset directory against the check suite; never modifies the source.

    Raises `DatasetError` when a file cannot be read as training data at all (missing,
    undecodable, truncated, empty, unknown row shape). Data-quality findings do not raise:
    they are in the returned report (`accepted`, `checks`, quarantine, Data Docs).
    `tokenizer` maps text to a token list or count (default: whitespace tokens).
    `previous_manifest` (path/URI or dict) enables the drift_vs_previous check.
    `workers`: processes that decode and screen blocks in parallel (default: up to
    `MAX_WORKERS` CPUs when the files hold at least `PARALLEL_MIN_BYTES`; 0 or 1: inline).
    `answer_check`: the task's data gate (`answer_format`): each row's answer (completion,
    or last assistant message) must pass the task's function, in at least
    `answer_check.min_share` of each split's rows (the task's threshold, not the suite's).
    Without it the check is not run nor reported. A module file or function that cannot be
    loaded raises ValueError before any data is read.
    The report is also saved as `<workdir>/report.json`.
    """
    import pandas as pd

    from tuneship.data.gx import run_expectations

    cfg = with_answer_check(load_config(config_path), answer_check)
    if not cfg.enabled("answer_format"):
        answer_check = None  # the suite switched the gate off (or no task check was given)
    if answer_check is not None:
        answer_function(answer_check)  # a broken declaration fails here, not in a worker
    source = resolve_dataset(dataset_uri)
    wd = Path(workdir) if workdir else _default_workdir()
    wd.mkdir(parents=True, exist_ok=True)
    qpath = wd / QUARANTINE_FILE


    frames: dict[str, pd.DataFrame] = {}
    failing: dict[str, dict[str, list[int]]] = {c: {s: [] for s in SPLITS} for c in ROW_CHECKS}
    quarantined_lines: dict[str, list[int]] = {s: [] for s in SPLITS}
    first_reason: dict[str, str] = {}  # check -> "file:line: reason" of its first failing row
    profiler = TextProfiler()
    screener = _Screener(source, cfg, tokenizer, workers, answer_check)
    # Hash before reading: a file changing while we read it would make the report lie.
    fingerprints = {s: file_sha256(source, s) for s in SPLITS}
    inspector: ChunkInspector | None = None
    with screener, qpath.open("w", encoding="utf-8") as qf:
        for split in SPLITS:
            name = source.files[split].name
            parts: list[dict[str, Any]] = []
            for screened, block in screener.run(split):
                if inspector is None:
                    inspector = ChunkInspector(screener.screen, profiler)
                res = inspector.finish(screened)
                parts.append(res.features)
                quarantined = res.features["quarantined"]
                for i, reasons in sorted(res.reasons.items()):
                    line = res.lines[i]
                    for check, reason in reasons.items():
                        failing[check][split].append(line)
                        first_reason.setdefault(check, f"{name}:{line}: {reason}")
                    if quarantined[i]:
                        quarantined_lines[split].append(line)
                        qf.write(
                            json.dumps(
                                {
                                    "split": split,
                                    "file": name,
                                    "line": line,
                                    "reasons": reasons,
                                    "row": original_row(block, line),
                                },
                                sort_keys=True,
                                default=str,
                            )
                            + "\n"
                        )
            if inspector is not None:
                inspector.done(split)
            if not parts:
                raise zero_rows(posixpath.join(source.uri, name), source.files[split])
            frames[split] = pd.DataFrame(
                {k: pd.concat([pd.Series(p[k]) for p in parts], ignore_index=True) for k in parts[0]}
                if len(parts) > 1
                else parts[0]
            )
    assert screener.screen is not None
    shape = screener.screen.shape

    outcomes = run_expectations(frames, cfg, shape, wd / "data_docs")
    reference = profiler.result()

    rows = {s: len(frames[s]) for s in SPLITS}
    accepted_rows = {s: rows[s] - len(quarantined_lines[s]) for s in SPLITS}
    names = {s: source.files[s].name for s in SPLITS}
    checks: list[CheckResult] = []

    def samples(lines_by_split: Mapping[str, list[int]]) -> dict[str, list[int]]:
        return {names[s]: ls[:SAMPLE_LINES] for s, ls in lines_by_split.items() if ls}

    for check in (*ROW_CHECKS, "quarantine", "min_rows"):
        if not cfg.enabled(check):
            continue
        mine = [o for o in outcomes if o.check == check]
        if not mine:
            continue
        figures: dict[str, Any] = {}
        sample: dict[str, list[int]] = {}
        if check == "answer_format" and answer_check is not None:
            figures["task"] = answer_check.task
            figures["declared"] = answer_check.describe
        if check in ROW_CHECKS:
            by = failing[check]
            n_fail = sum(len(v) for v in by.values())
            figures["failing_rows"] = n_fail
            denominators = {s: rows[s] for s in SPLITS if not (check == "leakage" and s == "train")}
            figures["failing_fraction"] = max(
                (len(by[s]) / rows[s] for s in denominators), default=0.0
            )
            figures["max_fraction"] = cfg.checks.get(check).max_fraction
            if check == "answer_format" and answer_check is not None:
                figures["conforming_share"] = 1.0 - figures["failing_fraction"]
                figures["min_share"] = answer_check.min_share
            if cfg.severity(check) == "error":
                figures["quarantined_rows"] = n_fail
            if check in first_reason:
                figures["first_reason"] = first_reason[check]
            sample = samples(by)
        elif check == "quarantine":
            figures["quarantined_rows"] = sum(len(v) for v in quarantined_lines.values())
            figures["quarantined_fraction"] = max(
                len(quarantined_lines[s]) / rows[s] for s in SPLITS
            )
            figures["max_fraction"] = cfg.quarantine.max_fraction
            sample = samples(quarantined_lines)
        elif check == "min_rows":
            figures["accepted_rows"] = dict(accepted_rows)
            figures["min_rows"] = {s: getattr(cfg.checks.min_rows, s) for s in SPLITS}
        figures["by_split"] = {
            o.split: {
                "expectation": o.expectation,
                "column": o.column,
                "success": o.success,
                **o.figures,
            }
            for o in mine
        }
        if check == "length":  # two expectations per split: keep both
            figures["by_split"] = {
                f"{o.split}.{o.column}": {
                    "expectation": o.expectation,
                    "success": o.success,
                    **o.figures,
                }
                for o in mine
            }
        checks.append(
            CheckResult(
                name=check,
                severity=cfg.severity(check),
                passed=all(o.success for o in mine),
                figures=figures,
                sample_lines=sample,
            )
        )

    if previous_manifest is not None and cfg.checks.drift_vs_previous.enabled:
        prev = _load_manifest(previous_manifest)
        d = cfg.checks.drift_vs_previous
        if prev.get("reference"):
            cmp = compare_profiles(prev["reference"], reference)
            figures = {
                "score": cmp["score"],
                "max_score": d.max_score,
                "length_psi": cmp["length_psi"],
                "token_psi": cmp["token_psi"],
                "token_js_divergence": cmp["token_js_divergence"],
                "previous_version": prev.get("version_id"),
            }
            passed = cmp["score"] <= d.max_score
        else:
            figures = {"note": "previous manifest has no reference profile"}
            passed = True
        checks.append(CheckResult("drift_vs_previous", d.severity, passed, figures, {}))

    n_quarantined = sum(len(v) for v in quarantined_lines.values())
    if not n_quarantined:
        qpath.unlink(missing_ok=True)
    docs_index = wd / "data_docs" / "index.html"
    report = ValidationReport(
        dataset_uri=source.uri,
        accepted=all(c.passed for c in checks if c.severity == "error"),
        schema=str(shape),
        checks=checks,
        rows=rows,
        accepted_rows=accepted_rows,
        files={
            s: {"name": names[s], "format": source.files[s].format, "sha256": fingerprints[s]}
            for s in SPLITS
        },
        quarantine_path=str(qpath) if n_quarantined else None,
        quarantine_count=n_quarantined,
        quarantined_lines=quarantined_lines,
        data_docs_path=str(docs_index) if docs_index.exists() else None,
        workdir=str(wd),
        config={
            "name": cfg.name,
            "version": cfg.version,
            "path": cfg.path,
            "sha256": cfg.sha256,
            **({"answer_check": asdict(answer_check)} if answer_check is not None else {}),
        },
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        reference=reference,
    )
    report.save()
    return report
