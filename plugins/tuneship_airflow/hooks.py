"""Hooks for the two serving endpoints Airflow drives: Triton's model control and the gateway.

Connections are optional on the embedded default: without one, the hook falls back to the
loopback addresses in `tuneship.config`. In production, `triton_default` and
`tuneship_gateway_default` point at the cluster services and carry the admin token.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook


def _conn_or_none(conn_id: str):
    try:
        return BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - AirflowNotFoundException; the default is loopback
        return None


class TritonHook(BaseHook):
    """Model control (load / unload / readiness) on Triton in explicit mode."""

    conn_name_attr = "triton_conn_id"
    default_conn_name = "triton_default"
    conn_type = "http"
    hook_name = "Triton Inference Server"

    def __init__(self, triton_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.triton_conn_id = triton_conn_id

    @property
    def url(self) -> str:
        conn = _conn_or_none(self.triton_conn_id)
        if conn and conn.host:
            return f"{conn.host}:{conn.port or 8000}"
        from tuneship import config

        return config.triton_url()

    def get_conn(self):
        from tuneship.triton_control import TritonControl

        return TritonControl(self.url)

    def load(self, model: str, timeout: float = 180.0) -> None:
        self.get_conn().load(model, timeout)

    def unload(self, model: str) -> None:
        self.get_conn().unload(model)

    def is_ready(self, model: str) -> bool:
        return self.get_conn().is_ready(model)

    def index(self) -> list[dict[str, Any]]:
        return self.get_conn().index()

    def warm_up(self, model: str, prompts: list[str], max_tokens: int = 4) -> dict[str, Any]:
        return self.get_conn().warm_up(model, prompts, max_tokens)


class GatewayHook(BaseHook):
    """The gateway's admin API for one served model: routes, switch, rollback, canary.

    The connection gives the URL and admin token; the calls are `tuneship.gateway_admin.
    GatewayAdmin`'s (one client for the CLI and Airflow). `served_model`: the task's served
    model (the OpenAI `model` id); None lets the gateway pick its only one."""

    conn_name_attr = "gateway_conn_id"
    default_conn_name = "tuneship_gateway_default"
    conn_type = "http"
    hook_name = "Tuneship gateway"

    def __init__(self, gateway_conn_id: str = default_conn_name, served_model: str | None = None) -> None:
        super().__init__()
        self.gateway_conn_id = gateway_conn_id
        self.served_model = served_model

    def endpoint(self) -> tuple[str, str]:
        """(base URL, admin token) of the gateway this hook drives."""
        from tuneship import config, gateway_admin

        conn = _conn_or_none(self.gateway_conn_id)
        if conn and conn.host:
            scheme = conn.schema or "http"
            return f"{scheme}://{conn.host}:{conn.port or 8100}", conn.password or ""
        return config.gateway_url(), gateway_admin.admin_token()

    def get_conn(self):
        """A `GatewayAdmin` for this connection and served model (close it, or use `with`)."""
        from tuneship.gateway_admin import GatewayAdmin

        base, token = self.endpoint()
        return GatewayAdmin(base, token, served_model=self.served_model)

    def version(self) -> dict[str, Any]:
        with self.get_conn() as admin:
            return admin.version()

    def routes(self) -> dict[str, Any]:
        with self.get_conn() as admin:
            return admin.routes()

    def put_routes(self, routes: dict[str, Any], force: bool = False) -> dict[str, Any]:
        with self.get_conn() as admin:
            return admin.put_routes(routes, force=force)

    def switch(self, colour: str | None = None, force: bool = False) -> dict[str, Any]:
        with self.get_conn() as admin:
            return admin.switch(colour, force=force)

    def rollback(self, force: bool = False) -> dict[str, Any]:
        with self.get_conn() as admin:
            return admin.rollback(force=force)

    def canary(self, weight: int, force: bool = False) -> dict[str, Any]:
        with self.get_conn() as admin:
            return admin.canary(weight, force=force)
