"""The real `prometheus` binary (Debian's package) scraping a real gateway and the real
tritonserver, with the embedded default's configuration (`tuneship.services.prometheus_config`,
scrape intervals shortened) and the repository's rule files, read back through Prometheus'
HTTP API: both targets up, the gateway's cost, agreement, deployment-event and drift series
stored, and the recording rules evaluated on them."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from gateway_helpers import metric, wait_for
from ports import free_port

from tuneship import services

pytestmark = pytest.mark.integration

PROMPT = "Ticket: I was charged twice for my order\nTriage:"
PRICE = 0.36  # USD an hour: 1e-4 USD a second of Triton time


def _route(colour: str, version: str, **metadata: Any) -> dict[str, Any]:
    return {"colour": colour, "model": f"llm_{colour}", "version": version, "registered_model": "triage-llm",
            "metadata": metadata}


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def _complete(gw, n: int) -> None:
    for _ in range(n):
        r = httpx.post(f"{gw.url}/v1/completions", json={"model": "tuneship", "prompt": PROMPT, "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200, r.text


@pytest.fixture
def prometheus(tmp_path: Path):
    """Factory: prometheus(targets) -> base URL of a Prometheus scraping `targets` every second."""
    binary = services.prometheus_binary()
    if binary is None:
        pytest.fail("the prometheus binary is missing: run `make promtool` (Debian's package `prometheus`)")
    procs: list[subprocess.Popen] = []

    def start(targets: dict[str, str]) -> str:
        cfg = services.prometheus_config(targets)
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "ab")
        procs.append(subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        log.close()
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if procs[-1].poll() is not None:
                raise RuntimeError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-3000:]}")
            try:
                return httpx.get(f"{base}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(ready, timeout=60, interval=0.2), (tmp_path / "prometheus.log").read_text()[-3000:]
        return base

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_prometheus_scrapes_gateway_and_triton(triton, start_gateway, prometheus):
    gw = start_gateway()
    # A release's routes: the live colour carries its declared price; a candidate shadows it.
    r = httpx.put(f"{gw.url}/admin/routes", headers=gw.admin, timeout=10,
                  json={"live": _route("blue", "1", price_per_hour=PRICE, max_cost_per_1k_tokens=1.0),
                        "shadow": _route("green", "2")})
    assert r.status_code == 200, r.text
    _complete(gw, 4)
    assert wait_for(lambda: metric(gw, "tuneship_gateway_shadow_compared_total") >= 4, timeout=20)
    # The drift monitor's files under the gateway's home.
    drift = gw.home / "monitor" / "triage"
    drift.mkdir(parents=True)
    (drift / "drift-run1.json").write_text(json.dumps({"task": "triage", "score": 0.3, "threshold": 0.2}))
    (drift / "governor.jsonl").write_text(json.dumps({"at": time.time(), "score": 0.3, "drifted": True}) + "\n")

    base = prometheus({"tuneship-gateway": f"127.0.0.1:{gw.port}", "triton": f"127.0.0.1:{triton.server.metrics_port}"})

    def targets_up() -> dict[str, str] | None:
        active = httpx.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in active}
        return health if health == {"tuneship-gateway": "up", "triton": "up"} else None

    assert wait_for(targets_up, timeout=30, interval=0.5), httpx.get(f"{base}/api/v1/targets").json()

    # Traffic while Prometheus watches, so rates are not zero; then a switch and a rollback.
    _complete(gw, 6)
    for action in ("switch", "rollback"):
        r = httpx.post(f"{gw.url}/admin/{action}", headers=gw.admin, params={"force": "true"}, timeout=10)
        assert r.status_code == 200, r.text
    _complete(gw, 4)

    def cost_per_1k() -> list[dict[str, Any]]:
        return _query(base, 'served_model_colour:tuneship_gateway_cost_per_1k_tokens_usd:ratio5m{colour="blue"}')

    result = wait_for(cost_per_1k, timeout=30, interval=0.5)
    assert result, "the cost-per-1k-tokens recording rule never produced a value"
    assert result[0]["metric"]["served_model"] == "tuneship"
    value = float(result[0]["value"][1])
    assert math.isfinite(value) and value > 0

    count = _query(base, 'tuneship_gateway_request_cost_usd_count{colour="blue"}')
    assert float(count[0]["value"][1]) >= 10
    # The price: cost / Triton seconds is the declared USD per second, whatever the timings.
    ratio = _query(base, 'sum(tuneship_gateway_request_cost_usd_sum{colour="blue"}) / sum(tuneship_gateway_generation_seconds_total{colour="blue"})')
    assert float(ratio[0]["value"][1]) == pytest.approx(PRICE / 3600, rel=1e-6)

    agreement = _query(base, "sum by (agreement, shadow_version) (tuneship_gateway_shadow_compared_total)")
    assert {(s["metric"]["agreement"], s["metric"]["shadow_version"]) for s in agreement} == {("different", "2")}  # "[llm_green] ..." vs "[llm_blue] ...": 2 of 3 words

    def events() -> dict[str, float]:
        rows = _query(base, "sum by (event) (tuneship_gateway_deployment_events_total)")
        return {s["metric"]["event"]: float(s["value"][1]) for s in rows}

    expected = {"live": 1, "candidate": 1, "switch": 1, "rollback": 1, "canary": 0}  # canary: exported at 0
    assert wait_for(lambda: events() == expected, timeout=10), events()
    # What the dashboard's annotations query finds: the switch and the rollback made while
    # Prometheus watched (the routes were PUT before it started).
    from serving.grafana.dashboards import DEPLOYMENT_EVENTS_EXPR

    marks = _query(base, DEPLOYMENT_EVENTS_EXPR.replace("$served_model", ".*"))
    assert {(s["metric"]["served_model"], s["metric"]["event"]) for s in marks} == {
        ("tuneship", "switch"), ("tuneship", "rollback")}

    drift_score = _query(base, 'tuneship_drift_score{task="triage"}')
    assert float(drift_score[0]["value"][1]) == 0.3
    live = _query(base, "tuneship_gateway_live_info")
    assert [(s["metric"]["colour"], s["metric"]["version"]) for s in live] == [("blue", "1")]

    # Triton's own metrics are stored too, and the rule files are loaded with their alerts.
    assert _query(base, 'up{job="triton"}')[0]["value"][1] == "1"
    rules = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
    names = {g["name"] for g in rules}
    assert {"tuneship-gateway.recording", "tuneship-gateway.alerts", "tuneship-drift.alerts"} <= names
    alerts = {r["name"] for g in rules for r in g["rules"] if r["type"] == "alerting"}
    assert {"TuneshipGatewayHighErrorRate", "TuneshipDriftScoreHigh", "TuneshipTargetDown"} <= alerts
