"""Debian's promtool (package `prometheus`, installed by `make promtool`) for the tests that
check PromQL and rules with it: the autoscaling contract, the Prometheus rules and the
Grafana dashboards."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run `make promtool` (installs Debian's `prometheus` package, which ships "
                    "it); the autoscaling contract, the Prometheus rules and the Grafana dashboards are checked with it")
    return path


def run_promtool(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
