"""Polling until a service shows a state: a deadline, not a timed assertion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait(check: Callable[[], Any], what: str, timeout: float) -> Any:
    """Poll `check` every second until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
