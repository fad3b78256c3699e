"""A small client for Airflow 3's REST API (v2), used by the demo and the end-to-end test.

The demo drives Airflow exactly as a user or CI job would: through the API server, with a
JWT from the simple auth manager. Nothing here imports Airflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

TOKEN_MAX_AGE_S = 600.0  # re-authenticate well before Airflow's JWTs expire


# Requests that do the same thing when sent twice: reads, and our PATCHes, each of which
# sets absolute values (a run's state, a DAG's is_paused). A POST (a trigger) is never resent.
IDEMPOTENT = frozenset({"GET", "PATCH"})


def _transient(exc: BaseException) -> bool:
    """Worth another try: the connection failed, or an idempotent request met a server error
    (the API server on SQLite answers 500 now and then while the scheduler writes)."""
    return isinstance(exc, httpx.TransportError) or (
        isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500
        and exc.request.method in IDEMPOTENT)


class AirflowAPI:
    def __init__(self, base_url: str, username: str, password: str, *,
                 clock: Callable[[], float] = time.monotonic, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"username": username, "password": password}
        self._client = httpx.Client(base_url=self.base_url, timeout=30.0, transport=transport)
        self._clock = clock
        # None until the first token: monotonic time is seconds since boot, so on a machine
        # booted minutes ago any "fetched at 0" sentinel would look fresh.
        self._token_at: float | None = None
        self._static_token = False  # with_token(): no password to log in again with

    def _ensure_token(self, *, force: bool = False) -> None:
        if self._static_token:
            return
        if not force and self._token_at is not None and self._clock() - self._token_at < TOKEN_MAX_AGE_S:
            return
        r = self._client.post("/auth/token", json=self._auth)
        if r.status_code >= 400:
            raise httpx.HTTPStatusError(f"POST /auth/token: HTTP {r.status_code} {r.text[:300]} "
                                        f"(check the Airflow user and password)", request=r.request, response=r)
        self._client.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        self._token_at = self._clock()

    @retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(5),
           wait=wait_exponential(multiplier=0.5, max=5), reraise=True)
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self._ensure_token()
        r = self._client.request(method, f"/api/v2{path}", **kwargs)
        if r.status_code == 401 and not self._static_token:  # expired or revoked (e.g. the API server restarted with a new secret)
            self._ensure_token(force=True)
            r = self._client.request(method, f"/api/v2{path}", **kwargs)
        if r.status_code >= 400:
            raise httpx.HTTPStatusError(f"{method} {path}: HTTP {r.status_code} {r.text[:500]}",
                                        request=r.request, response=r)
        return r.json() if r.content else None

    def dags(self, pattern: str = "llm_") -> dict[str, dict]:
        return {d["dag_id"]: d for d in self.request("GET", "/dags", params={"dag_id_pattern": pattern,
                                                                               "limit": 100})["dags"]}

    def import_errors(self) -> list[dict]:
        return self.request("GET", "/importErrors")["import_errors"]

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        body = {"logical_date": None, "conf": conf or {}}
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after", "limit": 50})["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """A task instance's XCom (`map_index`: which instance of a mapped task); None when absent."""
        try:
            return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                                params={"deserialize": True, "stringify": False, "map_index": map_index})["value"]
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise

    def set_variable(self, key: str, value: str) -> None:
        try:
            self.request("PATCH", f"/variables/{key}", json={"key": key, "value": value})
        except httpx.HTTPStatusError:
            self.request("POST", "/variables", json={"key": key, "value": value})

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
        """The task's log as plain lines. Airflow 3 serves logs as structured JSON (it refuses
        text/plain); each event becomes one line, with the exception type and message of an
        error event, which is usually the reason a person is looking."""
        data = self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                            params={"full_content": True, "map_index": map_index},
                            headers={"Accept": "application/json"})
        return "\n".join(format_log_event(e) for e in (data or {}).get("content", []))

    # -- for the `tuneship` CLI ------------------------------------------------------------
    @classmethod
    def with_token(cls, base_url: str, token: str) -> AirflowAPI:
        """A client that sends a token the caller already holds (a CI secret) instead of
        logging in with a password."""
        api = cls(base_url, "", "")
        api._client.headers["Authorization"] = f"Bearer {token}"
        api._static_token = True
        return api

    def dag(self, dag_id: str) -> dict:
        return self.request("GET", f"/dags/{dag_id}")


def format_log_event(event: dict[str, Any] | str) -> str:
    """One structured log event (Airflow 3's StructuredLogMessage) as a readable line."""
    if isinstance(event, str):  # Airflow returns plain strings when it could not parse the log
        return event
    parts = (event.get("timestamp"), str(event.get("level") or "").upper(), event.get("event"))
    line = " ".join(str(p) for p in parts if p)
    for err in event.get("error_detail") or []:
        if isinstance(err, dict) and err.get("exc_type"):
            line += f"\n{err['exc_type']}: {err.get('exc_value', '')}"
    return line
