"""Tuneship's Airflow plugin: a Reports page in the Airflow UI (HTML run reports, loss
curves, eval tables, drift charts) served by a small FastAPI app under the API server."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse

reports_app = FastAPI(title="Tuneship reports")


def _reports_dir():
    from tuneship import config

    return config.home() / "reports"


@reports_app.get("/", response_class=HTMLResponse)
def index() -> str:
    files = sorted(_reports_dir().glob("*.html"), reverse=True) if _reports_dir().exists() else []
    items = "".join(f'<li><a href="{f.name}">{f.name}</a></li>' for f in files) or "<li>no reports yet</li>"
    return f"<html><body><h1>Tuneship reports</h1><ul>{items}</ul></body></html>"


@reports_app.get("/{name}")
def report(name: str):
    path = (_reports_dir() / name).resolve()
    if path.parent != _reports_dir().resolve() or not path.exists():
        return HTMLResponse("not found", status_code=404)
    return FileResponse(path)


class TuneshipPlugin(AirflowPlugin):
    name = "tuneship"
    fastapi_apps = [{"app": reports_app, "url_prefix": "/tuneship/reports", "name": "Tuneship reports"}]
    external_views = [
        {"name": "Tuneship reports", "href": "/tuneship/reports/", "destination": "nav", "category": "browse"}
    ]
