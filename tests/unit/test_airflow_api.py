"""The Airflow REST client: authentication on a freshly booted machine, and task logs.

The HTTP side is Airflow's API as a transport stub (the token endpoint issues numbered
tokens; /api/v2 refuses a request without a current one, as Airflow does with a 401). The
client itself runs unchanged; the real API server is exercised by the browser, CLI and
end-to-end tests.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tuneship.airflow_api import TOKEN_MAX_AGE_S, AirflowAPI, format_log_event


class FakeAirflowAuth:
    """Issues tokens and accepts only the newest (a restarted API server forgets old ones)."""

    def __init__(self) -> None:
        self.issued = 0
        self.valid: str | None = None
        self.api_calls: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            body = json.loads(request.content)
            if body != {"username": "admin", "password": "pw"}:
                return httpx.Response(401, json={"detail": "Invalid credentials"})
            self.issued += 1
            self.valid = f"tok-{self.issued}"
            return httpx.Response(201, json={"access_token": self.valid})
        auth = request.headers.get("Authorization")
        self.api_calls.append(auth)
        if auth != f"Bearer {self.valid}" or self.valid is None:
            return httpx.Response(401, json={"detail": "Not authenticated"})
        return httpx.Response(200, json={"dags": [{"dag_id": "llm_finetune"}]})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("boot_age_s", [0.0, 3.0, 42.0, 599.0])
def test_young_machine_fetches_a_token_before_the_first_call(boot_age_s: float) -> None:
    """time.monotonic() is seconds since boot: on a machine booted minutes ago the client
    used to think its never-fetched token was fresh and sent no Authorization header."""
    server = FakeAirflowAuth()
    api = AirflowAPI("http://airflow.test", "admin", "pw", clock=Clock(boot_age_s),
                     transport=httpx.MockTransport(server))
    assert "llm_finetune" in api.dags()
    assert server.issued == 1
    assert server.api_calls == ["Bearer tok-1"]


def test_token_reused_then_refreshed_after_max_age() -> None:
    server = FakeAirflowAuth()
    clock = Clock(1.0)
    api = AirflowAPI("http://airflow.test", "admin", "pw", clock=clock, transport=httpx.MockTransport(server))
    api.dags()
    clock.now += TOKEN_MAX_AGE_S - 1
    api.dags()
    assert server.issued == 1
    clock.now += 2
    api.dags()
    assert server.issued == 2 and server.api_calls[-1] == "Bearer tok-2"


def test_a_refused_token_is_replaced_once() -> None:
    """The API server restarted (new JWT secret): a 401 gets one fresh token and one retry."""
    server = FakeAirflowAuth()
    api = AirflowAPI("http://airflow.test", "admin", "pw", clock=Clock(5.0), transport=httpx.MockTransport(server))
    api.dags()
    server.valid = "rotated"  # the old token no longer counts
    assert "llm_finetune" in api.dags()
    assert server.issued == 2


def test_wrong_password_names_the_login() -> None:
    server = FakeAirflowAuth()
    api = AirflowAPI("http://airflow.test", "admin", "wrong", clock=Clock(5.0), transport=httpx.MockTransport(server))
    with pytest.raises(httpx.HTTPStatusError, match="auth/token: HTTP 401.*user and password"):
        api.dags()


def test_task_log_asks_for_json_and_renders_lines() -> None:
    """Airflow 3.3 answers `Accept: text/plain` with 406-style refusals; the client asks for
    JSON and turns the structured events (with the exception of an error event) into lines."""
    seen: dict[str, str] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            return httpx.Response(201, json={"access_token": "t"})
        seen["accept"] = request.headers["Accept"]
        seen["full_content"] = request.url.params["full_content"]
        if request.headers["Accept"] not in ("application/json", "application/x-ndjson"):
            return httpx.Response(400, json={"detail": "Only application/json or application/x-ndjson is supported"})
        return httpx.Response(200, json={"content": [
            {"timestamp": "2026-11-30T10:00:00Z", "level": "info", "event": "validating batch-0001"},
            {"timestamp": "2026-11-30T10:00:01Z", "level": "error", "event": "Task failed with exception",
             "error_detail": [{"exc_type": "Refusal", "exc_value": "Dataset rejected: pii_email 40 rows",
                               "frames": []}]},
            "plain line when the log could not be parsed",
        ], "continuation_token": None})

    api = AirflowAPI("http://airflow.test", "admin", "pw", clock=Clock(5.0), transport=httpx.MockTransport(handler))
    text = api.task_log("llm_data_validation", "manual__1", "validate_and_version", 1)
    assert seen == {"accept": "application/json", "full_content": "true"}
    assert text.splitlines() == [
        "2026-11-30T10:00:00Z INFO validating batch-0001",
        "2026-11-30T10:00:01Z ERROR Task failed with exception",
        "Refusal: Dataset rejected: pii_email 40 rows",
        "plain line when the log could not be parsed",
    ]


def test_format_log_event_without_timestamp_or_level() -> None:
    assert format_log_event({"event": "::group::Log message source details"}) == "::group::Log message source details"


def test_a_server_error_is_retried_for_a_patch_but_a_trigger_is_never_sent_twice() -> None:
    """The API server on SQLite answers 500 ("database is locked") while the scheduler writes:
    a PATCH (absolute values) is sent again; a POST that may have started a run is not."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            return httpx.Response(201, json={"access_token": "t"})
        sent.append(request.method)
        if len(sent) == 1 or request.method == "POST":
            return httpx.Response(500, json={"detail": {"reason": "Database error"}})
        return httpx.Response(200, json={"state": "failed"})

    api = AirflowAPI("http://airflow", "admin", "pw", transport=httpx.MockTransport(handler))
    assert api.request("PATCH", "/dags/d/dagRuns/r", json={"state": "failed"}) == {"state": "failed"}
    assert sent == ["PATCH", "PATCH"]
    with pytest.raises(httpx.HTTPStatusError, match="HTTP 500"):
        api.trigger("d")
    assert sent == ["PATCH", "PATCH", "POST"]
