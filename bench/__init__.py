"""Benchmarks behind `make bench`: each compares Tuneship with a baseline in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], out: str | None) -> None:
    """A benchmark's result: written to `out` (when given) and printed as JSON."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
