"""Background writer for the inference log (layout and reader: `tuneship.inference_log`).

Each record names its `served_model` and goes to that model's partition
(`<root>/served_model=<name>/dt=.../hour=.../<replica>.jsonl`).

Join strategy: each request is logged once when its live answer is done (`kind: request`,
shadow = null | {status: "pending"} | {status: "dropped"}); a mirrored call writes a second
line (`kind: shadow`) with the same request_id and the request's ts when it finishes, so
both lines land in the same partition file. `tuneship.inference_log.read_inference_log`
merges them. This keeps the live path free of any wait on the shadow. Client feedback
(`POST /v1/feedback`) is a third kind of line (`kind: feedback`), submitted here like the
others with its own ts, so it lands in the hour it arrived; the reader joins it too.

Requests only append a (ts, record) pair to a deque: no lock, no wake-up. A daemon thread
wakes every `interval_s` (50 ms), takes what has accumulated, serialises it (msgspec) and
appends the lines, flushing after each batch. Waking the thread per record (a
`queue.Queue`) cost the event loop a futex wake-up per request and the thread the GIL
right when the next request wanted it. An optional `transform` (PII redaction) runs on
each record in that thread before it is serialised; a record it fails on is dropped, not
written raw. A full buffer drops the record and counts it (the disk must never add
latency). `close()` drains and flushes; the app calls it on shutdown.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import msgspec

from tuneship.inference_log import partition_file

log = logging.getLogger("tuneship.gateway.inference_log")

_MAX_OPEN = 32  # (served model, hour) partitions open at once
_BATCH = 4096


class InferenceLogWriter:
    def __init__(self, root: Path, replica: str, maxsize: int = 10_000, metrics: Any = None,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 interval_s: float = 0.05) -> None:
        self.root = Path(root)
        self._transform = transform  # e.g. PII redaction; runs here, before serialisation
        self.replica = replica
        self._maxsize = maxsize
        self._interval = interval_s
        self._pending: collections.deque[tuple[datetime, dict[str, Any]]] = collections.deque()
        self._stop = threading.Event()
        self._metrics = metrics
        self._files: dict[Path, IO[bytes]] = {}
        self._paths: dict[tuple[str, int], Path] = {}  # (served model, hour since the epoch) -> partition file
        self._encode = msgspec.json.Encoder(enc_hook=str).encode
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference-log-writer", daemon=True)
        self._thread.start()

    def submit(self, ts: datetime, record: dict[str, Any]) -> bool:
        """Non-blocking, from the event loop: deque.append is atomic, the size check approximate."""
        if len(self._pending) >= self._maxsize:
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.log_dropped.inc()
            return False
        self._pending.append((ts, record))
        return True

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("inference log writer did not finish in %.0f s; records may be lost", timeout)
        self._thread = None

    # -- writer thread -------------------------------------------------------------------
    def _path(self, ts: datetime, served_model: str) -> Path:
        key = (served_model, int(ts.timestamp() // 3600))
        path = self._paths.get(key)
        if path is None:
            if len(self._paths) > 256:
                self._paths.clear()
            path = self._paths[key] = partition_file(self.root, ts, self.replica, served_model)
        return path

    def _file(self, path: Path) -> IO[bytes]:
        f = self._files.get(path)
        if f is None:
            if len(self._files) >= _MAX_OPEN:  # old partitions: close the oldest handles
                for old in list(self._files)[: _MAX_OPEN // 2]:
                    self._files.pop(old).close()
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._files[path] = open(path, "ab")
        return f

    def _run(self) -> None:
        pending = self._pending
        while True:
            stopping = self._stop.wait(self._interval)
            while pending:
                batch = [pending.popleft() for _ in range(min(len(pending), _BATCH))]
                self._write(batch)
            if stopping:
                break
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()

    def _write(self, batch: list[tuple[datetime, dict[str, Any]]]) -> None:
        touched: set[Path] = set()
        written = 0
        for ts, record in batch:
            try:
                if self._transform is not None:
                    record = self._transform(record)
                path = self._path(ts, record["served_model"])
                self._file(path).write(self._encode(record) + b"\n")
                touched.add(path)
                written += 1
            except Exception as exc:  # keep the writer alive; never log the record itself
                log.error("inference log write failed: %s", type(exc).__name__)
        self.written += written
        if self._metrics is not None and written:
            self._metrics.log_written.inc(written)
        for path in touched:
            f = self._files.get(path)
            if f is not None:
                try:
                    f.flush()
                except OSError as exc:
                    log.error("inference log flush failed: %s", type(exc).__name__)
