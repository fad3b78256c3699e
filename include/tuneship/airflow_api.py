"""A small client for Airflow 3's REST API (v2), used by the demo and the end-to-end test.

The demo drives Airflow exactly as a user or CI job would: through the API server, with a
JWT from the simple auth manager. Nothing here imports Airflow.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential


class AirflowAPI:
    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"username": username, "password": password}
        self._client = httpx.Client(base_url=self.base_url, timeout=30.0)
        self._token_at: float | None = None  # monotonic time of the last token (None: none yet)

    def _ensure_token(self) -> None:
        if self._token_at is not None and time.monotonic() - self._token_at < 600:
            return
        r = self._client.post("/auth/token", json=self._auth)
        r.raise_for_status()
        self._client.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        self._token_at = time.monotonic()

    @retry(retry=retry_if_exception_type(httpx.TransportError), stop=stop_after_attempt(5),
           wait=wait_exponential(multiplier=0.5, max=5), reraise=True)
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self._ensure_token()
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

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        try:
            return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
                                params={"deserialize": True, "stringify": False})["value"]
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise

    def set_variable(self, key: str, value: str) -> None:
        try:
            self.request("PATCH", f"/variables/{key}", json={"key": key, "value": value})
        except httpx.HTTPStatusError:
            self.request("POST", "/variables", json={"key": key, "value": value})

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        self._ensure_token()
        r = self._client.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                             headers={"Accept": "text/plain"})
        return r.text
