"""Pointer files written by concurrent runs: never a crash, never a torn value."""

from __future__ import annotations

import threading
from pathlib import Path

from tuneship import atomic


def test_concurrent_writers_of_one_pointer(tmp_path: Path):
    """Two validation runs moved `datasets/LATEST` at the same moment; with one fixed temp
    name one of them renamed the other's file away and failed with FileNotFoundError."""
    pointer = tmp_path / "datasets" / "LATEST"
    errors: list[BaseException] = []

    def writer(value: str) -> None:
        try:
            for _ in range(300):
                atomic.write_text(pointer, value)
                assert pointer.read_text() in {"a" * 64, "b" * 64}
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(c * 64,)) for c in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert pointer.read_text() in {"a" * 64, "b" * 64}
    assert [p.name for p in pointer.parent.iterdir()] == ["LATEST"]  # no temp files left
