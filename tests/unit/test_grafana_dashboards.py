"""The provisioned Grafana dashboards (serving/grafana/): the committed JSON is what
`serving.grafana.dashboards` builds with Grafana's Foundation SDK, every panel and annotation
query parses (promtool, on the query with Grafana's variables filled in) and reads only series
the gateway exports or the recording rules record, the panels cover what operators watch, the
deployment annotations come from the gateway's event counter, and the provisioning files name
the datasource the dashboards use."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from promtool import promtool

from serving.gateway.metrics import GatewayMetrics
from serving.grafana import dashboards
from tuneship import services

GRAFANA = Path(dashboards.__file__).resolve().parent
COMMITTED = {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}
SERVING = COMMITTED.get(f"{dashboards.SERVING_UID}.json")
RECORDING = yaml.safe_load((services.PROMETHEUS_DIR / "rules" / "recording.yml").read_text())
RECORDED = {r["record"] for g in RECORDING["groups"] for r in g["rules"]}
# What Grafana substitutes before a query reaches Prometheus.
VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$served_model": ".*"}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep theirs inside
    return [p for p in out if p.get("type") != "row"]


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every Prometheus query: panel targets and annotations."""
    found = [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    found += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if a.get("expr")]
    return found


def _filled(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def test_committed_dashboards_are_what_the_generator_builds():
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError:
        pytest.fail("grafana-foundation-sdk is not installed: it builds the dashboards "
                    "(pip install the version pinned in requirements.txt)")
    built = dashboards.build()
    assert set(built) == set(COMMITTED), "run `python -m serving.grafana.dashboards` and commit the result"
    for name, dashboard in built.items():
        assert dashboards.render(dashboard) == (GRAFANA / "dashboards" / name).read_text(), (
            f"{name} is out of date: run `python -m serving.grafana.dashboards`")


def test_every_query_parses(tmp_path):
    """Each query, variables filled in, as a recording rule: `promtool check rules` parses it."""
    exprs = _exprs(SERVING)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": _filled(e)} for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout
    # ... and a broken one would not pass.
    rules["groups"][0]["rules"][0]["expr"] += " by"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


def test_queries_read_only_exported_or_recorded_series(tmp_path):
    exported = GatewayMetrics(tmp_path).series_names()
    for where, expr in _exprs(SERVING):
        bare = re.sub(r'"[^"]*"', '""', expr)
        for name in re.findall(r"(?<![:\w])(tuneship_[a-z0-9_]+)\b", bare):
            assert name in exported, f"{where}: {name} is not a series the gateway exports"
        for name in re.findall(r"\b([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b", bare):
            assert name in RECORDED, f"{where}: {name} is not a recording rule"


def test_panels_cover_what_operators_watch():
    titles = {p["title"] for p in _panels(SERVING)}
    assert {"Request rate", "Error rate (5xx)", "p95 latency", "Tokens/s", "Cost per 1k tokens",
            "Cost per request", "Shadow agreement", "Drift score"} <= titles
    ids = [p["id"] for p in SERVING["panels"]]
    assert len(set(ids)) == len(ids) and all(isinstance(i, int) and i > 0 for i in ids)
    for p in _panels(SERVING):
        assert p["datasource"] == {"type": "prometheus", "uid": dashboards.DATASOURCE_UID}, p["title"]
        assert p.get("description"), f"{p['title']} has no description"
        assert p["targets"], f"{p['title']} has no query"


def test_deployment_annotations_come_from_the_event_counter():
    marks = [a for a in SERVING["annotations"]["list"] if a.get("name") == "Deployments"]
    assert len(marks) == 1
    mark = marks[0]
    assert mark["enable"] is True
    assert mark["datasource"]["uid"] == dashboards.DATASOURCE_UID
    assert "tuneship_gateway_deployment_events_total" in mark["expr"] and "increase(" in mark["expr"]
    assert set(mark["tagKeys"].split(",")) == {"served_model", "event"}
    # The events the gateway counts are the ones the annotation names.
    from serving.gateway.metrics import GatewayMetrics as M

    doc = {f.name: f.documentation for f in M().registry.collect()}["tuneship_gateway_deployment_events"]
    for event in ("switch", "rollback", "canary", "candidate", "live"):
        assert event in doc


def test_provisioning_names_the_dashboards_datasource():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [source] = ds["datasources"]
    assert source["uid"] == dashboards.DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tuneship.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/etc/grafana/dashboards"
    variable = {v["name"]: v for v in SERVING["templating"]["list"]}["served_model"]
    assert variable["datasource"]["uid"] == dashboards.DATASOURCE_UID
