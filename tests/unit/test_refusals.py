"""A gate's refusal fails its Airflow task once; every other error keeps the task's retries.

The mapping itself (`tuneship_airflow.refusals.fail_on_refusal`), that Airflow's `@task`
still sees the wrapped callable's name and context arguments, and that each stage that
decides raises a Refusal while a fault stays an ordinary StageFailed. That the scheduler
then fails the run with try_number 1 and one Slack message runs in tests/e2e/test_loop.py.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from tuneship import audit
from tuneship.notify import read_sink
from tuneship.stages import Refusal, StageFailed, finish_release, smoke_candidate
from tuneship.tasks import load_task
from tuneship_airflow.refusals import fail_on_refusal


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNESHIP_HOME", str(tmp_path))
    return tmp_path


def test_a_refusal_inside_a_task_callable_becomes_airflow_fail_exception():
    @fail_on_refusal
    def evaluate(candidate: dict, p: dict) -> dict:
        raise Refusal("gates failed against base model:\ncategory_accuracy 0.000 < 0.70")

    with pytest.raises(AirflowFailException, match="category_accuracy 0.000 < 0.70") as info:
        evaluate({"version": "3"}, {})
    assert isinstance(info.value.__cause__, Refusal)


@pytest.mark.parametrize("error", [StageFailed("training output is incomplete"), RuntimeError("HTTP 503"),
                                   ConnectionError("refused")])
def test_an_ordinary_error_is_left_for_the_retries(error: Exception):
    @fail_on_refusal
    def task_body() -> None:
        raise error

    with pytest.raises(type(error)) as info:
        task_body()
    assert info.value is error and not isinstance(info.value, AirflowFailException)


def test_the_wrapper_keeps_what_airflow_reads_from_the_callable():
    def decide(p: dict, slot: str, outlet_events=None, ti=None) -> dict:
        """Doc."""
        return {"p": p, "slot": slot, "ti": ti}

    wrapped = fail_on_refusal(decide)
    assert wrapped.__name__ == "decide" and wrapped.__doc__ == "Doc."
    assert inspect.signature(wrapped) == inspect.signature(decide)  # context args (ti, params...) still passed
    assert wrapped({"version": "1"}, "shadow", ti="TI") == {"p": {"version": "1"}, "slot": "shadow", "ti": "TI"}

    from airflow.sdk import dag, task

    @dag(schedule=None)
    def probe():
        task(wrapped)({"version": "1"}, "shadow")

    op = probe().get_task("decide")
    assert op.python_callable is wrapped and op.python_callable.fails_on_refusal


class _Gateway:
    def __init__(self, routes: dict[str, Any] | None = None) -> None:
        self.state = routes or {}

    def endpoint(self) -> tuple[str, str]:
        return "http://127.0.0.1:9", "token"  # nothing listens on port 9 (discard)

    def routes(self) -> dict[str, Any]:
        return dict(self.state)

    def put_routes(self, routes: dict[str, Any]) -> dict[str, Any]:
        self.state = routes
        return routes


class _Triton:
    def __init__(self, *ready: str) -> None:
        self.ready = set(ready)

    def is_ready(self, model: str) -> bool:
        return model in self.ready

    def unload(self, model: str) -> None:
        self.ready.discard(model)


def test_a_shadow_rollback_is_a_refusal_with_one_alert():
    plan = {"task": "llm", "registered_model": "tuneship-test", "model": "llm_green", "version": "5",
            "colour": "green", "previous_version": "4", "previous_colour": "blue"}
    live = {"colour": "blue", "model": "llm_blue", "version": "4"}
    gateway = _Gateway({"live": live, "shadow": {"colour": "green", "model": "llm_green", "version": "5"}})
    verdict = {"verdict": "rollback", "reasons": ["p95 40 ms > 0.001 ms"], "requests": 30}

    with pytest.raises(Refusal, match="rolled back: p95 40 ms"):
        finish_release(plan, "shadow", verdict, gateway=gateway, triton=_Triton("llm_blue", "llm_green"))

    assert gateway.state["live"] == live and gateway.state["shadow"] is None
    (msg,) = read_sink()
    assert msg["level"] == "error" and "rolled back after the shadow window" in msg["text"]
    # the decision is in the audit trail, chained, with why and the window's figures
    (rec,) = audit.read(task="llm")
    assert (rec["action"], rec["version"]) == ("rollback", "5")
    assert rec["reason"] == "after the shadow window: p95 40 ms > 0.001 ms"
    assert rec["figures"]["requests"] == 30 and rec["figures"]["previous"] == "v4"
    assert audit.verify().ok


def test_smoke_the_gateway_cannot_answer_is_a_fault_not_a_refusal():
    """No gateway listening: infrastructure, retried; no alert, the candidate stays loaded for the retry."""
    triton = _Triton("llm_green")
    with pytest.raises(Exception) as info:
        smoke_candidate(load_task("triage").model_copy(update={"name": "llm"}), "llm_green", "5",
                        gateway=_Gateway(), triton=triton)
    assert not isinstance(info.value, Refusal)
    assert triton.ready == {"llm_green"} and read_sink() == []
