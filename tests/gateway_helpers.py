"""Helpers the gateway integration tests share (tests/ is on sys.path via conftest)."""

from __future__ import annotations

import time

import httpx


def metric(gw, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples on the gateway whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{gw.url}/metrics").text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll until `predicate()` is truthy or the timeout passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
