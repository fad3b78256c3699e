"""The demo tasks' own modules for tests (include/tasks/<task>_task.py, loaded as the
library loads them: by file, beside the task file)."""

from __future__ import annotations

from typing import Any


def task_module(task: str = "triage") -> Any:
    from tuneship.tasks import load_task

    return load_task(task).module(f"{task}_task")


def triage() -> Any:
    return task_module("triage")
