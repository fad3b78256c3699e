"""The Tuneship Grafana dashboards, built with Grafana's Foundation SDK.

    python -m serving.grafana.dashboards           # rewrite serving/grafana/dashboards/*.json
    python -m serving.grafana.dashboards --check   # exit 1 if a committed file is out of date

Grafana (compose) provisions the JSON files this writes (serving/grafana/provisioning/); the
files are committed so the stack needs no Python, and tests/unit/test_grafana_dashboards.py
checks that they are what this module builds, that every query parses (promtool) and reads
only series the gateway exports or the recording rules record.

Panels read the recording rules (serving/prometheus/rules/recording.yml) where one exists, so
a dashboard and an alert never disagree on what "p95" or "cost per 1k tokens" means.
Deployment annotations (switch, canary step, rollback, new candidate or live route) come from
the gateway's `tuneship_gateway_deployment_events_total`, so they work in any deployment that
scrapes the gateway.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DATASOURCE_UID = "tuneship-prometheus"  # serving/grafana/provisioning/datasources/prometheus.yml
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
SERVING_UID = "tuneship-serving"
SEL = 'served_model=~"$served_model"'

DEPLOYMENTS = "Deployments"
# The annotation query: one mark per served model and event while the counter moved.
DEPLOYMENT_EVENTS_EXPR = (
    "sum by (served_model, event) (increase(tuneship_gateway_deployment_events_total"
    '{served_model=~"$served_model"}[2m])) > 0'
)
# Grafana's Prometheus annotation options the SDK's AnnotationQuery schema has no field for.
DEPLOYMENT_EVENTS_OPTIONS = {"step": "60s", "titleFormat": "{{event}}: {{served_model}}",
                             "tagKeys": "served_model,event",
                             "textFormat": "route change through the gateway's admin API"}


def _ds() -> Any:
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    return DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)


def _query(expr: str, legend: str, ref: str = "A") -> Any:
    from grafana_foundation_sdk.builders.prometheus import Dataquery

    return Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(_ds())


def _timeseries(title: str, description: str, unit: str, queries: list[Any], w: int = 12, h: int = 8) -> Any:
    from grafana_foundation_sdk.builders.timeseries import Panel

    panel = Panel().title(title).description(description).unit(unit).datasource(_ds()).span(w).height(h)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def serving_dashboard() -> Any:
    """Traffic, errors, latency, throughput, cost, shadow agreement, drift, per served model."""
    from grafana_foundation_sdk.builders.dashboard import (
        AnnotationQuery,
        Dashboard,
        QueryVariable,
        Row,
    )
    from grafana_foundation_sdk.models.dashboard import VariableRefresh

    served = (
        QueryVariable("served_model").label("Served model").datasource(_ds())
        .query("label_values(tuneship_gateway_requests_total, served_model)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True).all_value(".*")
    )
    deployments = (
        AnnotationQuery().name(DEPLOYMENTS).datasource(_ds()).enable(True).icon_color("orange")
        .expr(DEPLOYMENT_EVENTS_EXPR)
    )
    return (
        Dashboard("Tuneship / Serving").uid(SERVING_UID).tags(["tuneship", "generated"])
        .description("The inference gateway per served model: traffic, errors, p95, tokens/s, cost, "
                     "shadow agreement and drift, with every switch, canary step and rollback marked.")
        .refresh("30s").time("now-6h", "now").timezone("utc").editable()
        .with_variable(served).annotation(deployments)
        .with_row(Row("Traffic"))
        .with_panel(_timeseries(
            "Request rate", "Requests per second by served model and status (admin smoke requests left out).",
            "reqps", [_query(f'sum by (served_model, status) (rate(tuneship_gateway_requests_total{{{SEL}, '
                             'role!="pinned"}[$__rate_interval]))', "{{served_model}} {{status}}")]))
        .with_panel(_timeseries(
            "Error rate (5xx)", "Share of requests that failed server-side; TuneshipGatewayHighErrorRate fires "
            "over 5% for 5 minutes.", "percentunit",
            [_query(f"served_model:tuneship_gateway_error_ratio:rate5m{{{SEL}}}", "{{served_model}}")]))
        .with_panel(_timeseries(
            "p95 latency", "95th percentile of end-to-end latency of answered requests; "
            "TuneshipGatewayHighLatencyP95 fires over 2.5 s for 10 minutes.", "s",
            [_query(f"served_model:tuneship_gateway_request_latency_seconds:p95_5m{{{SEL}}}", "{{served_model}}")]))
        .with_panel(_timeseries(
            "Tokens/s", "Generation speed (completion tokens per second of Triton time, the serving gate's "
            "figure) and throughput (completion tokens per second served), by answering colour.", "short",
            [_query(f"served_model_colour:tuneship_gateway_tokens_per_second:ratio5m{{{SEL}}}",
                    "speed {{served_model}} {{colour}}", "A"),
             _query(f"served_model_colour:tuneship_gateway_completion_tokens:rate5m{{{SEL}}}",
                    "throughput {{served_model}} {{colour}}", "B")]))
        .with_row(Row("Cost"))
        .with_panel(_timeseries(
            "Cost per 1k tokens", "USD per 1k generated tokens at the declared instance price (price / (3600 x "
            "tokens/s) x 1000), against the task's ceiling.", "currencyUSD",
            [_query(f"served_model_colour:tuneship_gateway_cost_per_1k_tokens_usd:ratio5m{{{SEL}}}",
                    "{{served_model}} {{colour}}", "A"),
             _query(f"max by (served_model) (tuneship_gateway_max_cost_per_1k_tokens_usd{{{SEL}}})",
                    "ceiling {{served_model}}", "B")]))
        .with_panel(_timeseries(
            "Cost per request", "USD per answered request at the declared instance price.", "currencyUSD",
            [_query(f"served_model_colour:tuneship_gateway_cost_per_request_usd:ratio5m{{{SEL}}}",
                    "{{served_model}} {{colour}}")]))
        .with_row(Row("Release"))
        .with_panel(_timeseries(
            "Shadow agreement", "Share of the candidate's shadow answers equal or similar to the live answer "
            "(text level; the release's verdict decides on parsed answers).", "percentunit",
            [_query(f"served_model_version:tuneship_gateway_shadow_agreement:ratio30m{{{SEL}}}",
                    "{{served_model}} v{{shadow_version}} vs v{{live_version}}")]))
        .with_panel(_timeseries(
            "Canary weight", "Share of traffic the candidate answers.", "percent",
            [_query(f"max by (served_model) (tuneship_gateway_canary_weight_percent{{{SEL}}})", "{{served_model}}")]))
        .with_row(Row("Drift"))
        .with_panel(_timeseries(
            "Drift score", "The drift monitor's latest score per task against its threshold; TuneshipDriftScoreHigh "
            "fires at or over it for an hour.", "short",
            [_query("max by (task) (tuneship_drift_score)", "{{task}}", "A"),
             _query("max by (task) (tuneship_drift_threshold)", "threshold {{task}}", "B")], w=24))
    )


def build() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON (as Grafana provisions it)."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    encoder = JSONEncoder(sort_keys=True, indent=2)
    serving = json.loads(encoder.encode(serving_dashboard().build()))
    for i, panel in enumerate(serving["panels"], start=1):
        panel["id"] = i  # unique, stable ids (links and alerts refer to panels by id)
    for annotation in serving["annotations"]["list"]:
        if annotation.get("name") == DEPLOYMENTS:
            annotation.update(DEPLOYMENT_EVENTS_OPTIONS)
    return {f"{SERVING_UID}.json": serving}


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.grafana.dashboards")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for name, dashboard in build().items():
        path = OUT_DIR / name
        text = render(dashboard)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python -m serving.grafana.dashboards): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
