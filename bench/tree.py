"""Process trees in the benchmarks: a server or a command with every descendant (workers,
Triton's backend stubs), their summed resident memory and CPU seconds."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants now."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of `procs` so far (one that has gone counts nothing)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tree_rss(pid: int) -> int:
    """Summed resident bytes of a process and its descendants (0 once it has gone)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for p in tree(pid):
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
    return total


class PeakRss:
    """Peak of `tree_rss(pid)`, sampled every `interval` seconds in a thread while in use."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(
    args: list[str], *, interval: float = 0.05, env: dict[str, str | None] | None = None
) -> dict[str, Any]:
    """Run `args` (a Python child that prints one JSON line last); add peak tree RSS.
    `env`: variables to set for the child (None removes one), on top of this environment."""
    child_env = None
    if env:
        child_env = {**os.environ, **{k: v for k, v in env.items() if v is not None}}
        for k in (k for k, v in env.items() if v is None):
            child_env.pop(k, None)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=child_env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(interval)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        sys.stderr.write(out)
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    return result
