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


def compile_variant(text: str) -> Any:
    """A build named on the command line, as a task file's `compile:` section:
    `int4:block_size=16:accuracy_level=1:algorithm=k_quant:int8_layers=last_matmul+mixed_layers`
    (every key optional; `fp32` alone is the plain build). Raises ValueError naming the bad part."""
    from tuneship.tasks import CompileSpec

    precision, *parts = text.split(":")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{text!r}: {part!r} is not key=value")
        options[key] = value.split("+") if key == "int8_layers" else int(value) if value.isdigit() else value
    return CompileSpec(precision=precision, **options)
