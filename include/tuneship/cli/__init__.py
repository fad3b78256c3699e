"""`tuneship`: the command CI pipelines and people use to drive Tuneship from outside Airflow.

Trigger a DAG and wait for it, show and roll back what the gateway serves, manage client
keys. It talks only HTTP (Airflow's REST API, the gateway's admin API); see docs/CLI.md.
"""

from __future__ import annotations

from tuneship.cli.app import app, main
from tuneship.cli.audit import audit_app

app.add_typer(audit_app, name="audit")  # reads a local file, not a service: tuneship/cli/audit.py

__all__ = ["app", "main"]
