"""Background writer for the inference log (layout and reader: `tuneship.inference_log`).

Join strategy: each request is logged once when its live answer is done (`kind: request`,
shadow = null | {status: "pending"} | {status: "dropped"}); a mirrored call writes a second
line (`kind: shadow`) with the same request_id and the request's ts when it finishes, so
both lines land in the same partition file. `tuneship.inference_log.read_inference_log`
merges them. This keeps the live path free of any wait on the shadow.

Requests only enqueue a dict (non-blocking); a daemon thread serialises and appends lines,
flushing after each batch. An optional `transform` (PII redaction) runs on each record in
that thread before it is serialised; a record it fails on is dropped, not written raw. A full queue drops the record and counts it (the disk must never
add latency). `close()` drains and flushes; the app calls it on shutdown.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from tuneship.inference_log import partition_file

log = logging.getLogger("tuneship.gateway.inference_log")

_STOP = object()
_MAX_OPEN = 8


class InferenceLogWriter:
    def __init__(self, root: Path, replica: str, maxsize: int = 10_000, metrics: Any = None,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.root = Path(root)
        self._transform = transform  # e.g. PII redaction; runs here, before serialisation
        self.replica = replica
        self._q: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
        self._metrics = metrics
        self._files: dict[Path, IO[str]] = {}
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference-log-writer", daemon=True)
        self._thread.start()

    def submit(self, ts: datetime, record: dict[str, Any]) -> bool:
        try:
            self._q.put_nowait((ts, record))
            return True
        except queue.Full:
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.log_dropped.inc()
            return False

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        try:
            self._q.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("inference log queue still full at shutdown; records may be lost")
        self._thread.join(timeout)
        self._thread = None

    # -- writer thread -------------------------------------------------------------------
    def _file(self, path: Path) -> IO[str]:
        f = self._files.get(path)
        if f is None:
            if len(self._files) >= _MAX_OPEN:  # old partitions: close the oldest handles
                for old in list(self._files)[: _MAX_OPEN // 2]:
                    self._files.pop(old).close()
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._files[path] = open(path, "a", encoding="utf-8")
        return f

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._q.get()]
            while len(batch) < 512:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            touched: set[Path] = set()
            for item in batch:
                if item is _STOP:
                    stop = True
                    continue
                ts, record = item
                try:
                    if self._transform is not None:
                        record = self._transform(record)
                    path = partition_file(self.root, ts, self.replica)
                    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
                    self._file(path).write(line + "\n")
                    touched.add(path)
                    self.written += 1
                    if self._metrics is not None:
                        self._metrics.log_written.inc()
                except Exception as exc:  # keep the writer alive; never log the record itself
                    log.error("inference log write failed: %s", type(exc).__name__)
            for path in touched:
                f = self._files.get(path)
                if f is not None:
                    try:
                        f.flush()
                    except OSError as exc:
                        log.error("inference log flush failed: %s", type(exc).__name__)
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()
