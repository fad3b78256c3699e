"""A state file every gateway replica shares: parsed once, re-read only when it changes."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("tuneship.gateway")


class WatchedFile(Generic[T]):
    """`get()` costs one stat while the file is unchanged (inode, mtime, size), so every
    request can call it and a change another replica wrote is seen on the next request.
    Under load, calls within `min_interval_s` (1 ms) of the last stat reuse its answer: at
    hundreds of requests per second that saves most stats (a stat was 10-30 us on the build
    VM), while a change made elsewhere is still seen within a millisecond -- sooner than
    any switch through the admin API can return. This process's own writes call
    `invalidate()` and are seen at once. A missing file gives `empty`; a file that stops
    parsing keeps the last good value (logged), so a bad edit can neither open nor lock up
    the gateway."""

    def __init__(self, path: Path, parse: Callable[[str], T], empty: T, what: str,
                 errors: tuple[type[Exception], ...] = (OSError, ValueError),
                 min_interval_s: float = 0.001) -> None:
        self.path = Path(path)
        self._parse, self._empty, self._what, self._errors = parse, empty, what, errors
        self._value = empty
        self._sig: tuple[int, int, int] | None = None
        self._min_interval = min_interval_s
        self._fresh_until = 0.0  # time.monotonic() before which the last stat still counts
        self._mu = threading.Lock()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def invalidate(self) -> None:
        """Force a fresh read next time (after this process rewrote the file)."""
        self._sig = None
        self._fresh_until = 0.0

    def get(self) -> T:
        now = time.monotonic()
        if now < self._fresh_until:
            return self._value
        self._fresh_until = now + self._min_interval
        sig = self._stat()
        if sig == self._sig:
            return self._value
        with self._mu:
            sig = self._stat()
            if sig == self._sig:
                return self._value
            if sig is None:
                self._value, self._sig = self._empty, None
                return self._value
            try:
                value = self._parse(self.path.read_text())
            except FileNotFoundError:
                return self._value
            except self._errors as exc:
                log.error("%s %s is unreadable (%s); keeping the last good one",
                          self._what, self.path, type(exc).__name__)
                self._sig = sig
                return self._value
            self._value, self._sig = value, sig
            return value
