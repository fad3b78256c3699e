"""Run a command and sample the summed RSS of its whole process tree (workers included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import psutil


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
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(interval)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        sys.stderr.write(out)
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak / 2**20, 1)
    return result
