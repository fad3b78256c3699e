"""A gate's refusal fails its Airflow task once, without a retry.

`tuneship.stages.Refusal` is a decision (dataset rejected, gates failed, smoke failed, shadow
rollback, post-switch breach): a retry would redo the same work on the same bytes and alert
again. This is the one place that maps it onto Airflow's `AirflowFailException` (fail now,
skip the remaining retries); every other error keeps the task's retries, which stay for
infrastructure faults.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from airflow.sdk.exceptions import AirflowFailException

from tuneship.stages import Refusal

F = TypeVar("F", bound=Callable[..., Any])


def fail_on_refusal(func: F) -> F:
    """Wrap a task callable (put it under `@task`): a Refusal raised inside becomes
    AirflowFailException with the same message. `functools.wraps` keeps the name and the
    signature, so Airflow still derives the task id and the context arguments from `func`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Refusal as exc:  # a decision: fail once, the stage has already alerted
            raise AirflowFailException(str(exc)) from exc

    wrapper.fails_on_refusal = True  # type: ignore[attr-defined]  # read by the DAG integrity test
    return wrapper  # type: ignore[return-value]
