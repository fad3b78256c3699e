"""Tuneship's Airflow plugin: a Reports page in the Airflow UI (HTML run reports, loss
curves, eval tables, drift charts, model cards) and a Deployments page (per task: what is
live, shadowing and kept for rollback, the canary weight, the window's bounds over time, the
last gates, drift, the audit trail, the model cards: `tuneship.deployments`), served by small
FastAPI apps under the API server.

Airflow mounts plugin apps without its own authentication, and the reports hold sample
prompts and completions, so every route here requires the Airflow login (the UI's `_token`
cookie or an `Authorization: Bearer` JWT from `POST /auth/token`) and read access to DAG
runs. An anonymous browser is sent to Airflow's login page and comes back after it; an
anonymous API client gets 401.
"""

from __future__ import annotations

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

reports_app = FastAPI(
    title="Tuneship reports",
    dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))],
)
deployments_app = FastAPI(
    title="Tuneship deployments",
    dependencies=[Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))],
)


async def _login_first(request: Request, exc: HTTPException) -> Response:
    """A person without a session gets the login page (then comes back here), not a bare 401."""
    wants_html = "text/html" in request.headers.get("accept", "")
    if exc.status_code == status.HTTP_401_UNAUTHORIZED and wants_html:
        back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(get_auth_manager().get_url_login(next_url=back),
                                status_code=status.HTTP_303_SEE_OTHER)
    return await http_exception_handler(request, exc)


for _app in (reports_app, deployments_app):
    _app.add_exception_handler(HTTPException, _login_first)


def _reports_dir():
    from tuneship import config

    return config.home() / "reports"


@reports_app.get("/", response_class=HTMLResponse)
def index() -> str:
    files = sorted(_reports_dir().glob("*.html"), reverse=True) if _reports_dir().exists() else []
    items = "".join(f'<li><a href="{f.name}">{f.name}</a></li>' for f in files) or "<li>no reports yet</li>"
    return (f"<html><body><h1>Tuneship reports</h1><p><a href='/tuneship/deployments/'>Deployments</a></p>"
            f"<ul>{items}</ul></body></html>")


@reports_app.get("/{name}")
def report(name: str):
    path = (_reports_dir() / name).resolve()
    if path.parent != _reports_dir().resolve() or not path.exists():
        return HTMLResponse("not found", status_code=404)
    return FileResponse(path)


@deployments_app.get("/", response_class=HTMLResponse)
def deployments() -> str:
    from tuneship.deployments import page
    from tuneship.tasks import load_tasks

    return page(list(load_tasks().values()))


class TuneshipPlugin(AirflowPlugin):
    name = "tuneship"
    fastapi_apps = [{"app": reports_app, "url_prefix": "/tuneship/reports", "name": "Tuneship reports"},
                    {"app": deployments_app, "url_prefix": "/tuneship/deployments", "name": "Tuneship deployments"}]
    external_views = [
        {"name": "Tuneship reports", "href": "/tuneship/reports/", "destination": "nav", "category": "browse"},
        {"name": "Tuneship deployments", "href": "/tuneship/deployments/", "destination": "nav", "category": "browse"},
    ]
