"""Small files that readers must see whole (pointers, state): written beside the target
under a name unique to this writer, then renamed over it. A fixed temp name (`x.tmp`) is
not enough: two runs writing the same pointer at once rename each other's file away.
And the one cross-process lock for read-modify-write sections and one-time builds."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(lock_path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An fcntl lock on `lock_path`, exclusive across processes (and machines sharing the
    filesystem). The kernel drops it when the holder dies, so a killed holder never blocks
    the next one. `on_wait` is called once if another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def replace_dir(stage: Path, final: Path) -> None:
    """Swap a fully written directory `stage` (a sibling of `final`) into place: `final` is
    either the old directory or the new one, never half of each. The old one is moved aside
    under a name unique to this process, then removed."""
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, final)


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (a name unique to this writer) for the block to write;
    renamed over `path` when the block ends, removed if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
