"""The gateway's dashboard metrics that need no server: declared prices, shadow agreement,
deployment events, the drift collector and the per-model gauges set on scrape
(`serving.gateway.metrics`). The same metrics over real sockets: tests/integration/test_prometheus_scrape.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from serving.gateway import routing
from serving.gateway.metrics import DriftCollector, GatewayMetrics, Prices, agreement, route_events

BLUE = routing.Route(colour="blue", model="triage_blue", version="3")
GREEN = routing.Route(colour="green", model="triage_green", version="4")


def _value(metrics: GatewayMetrics, name: str, labels: dict[str, str]) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- prices ----------------------------------------------------------------------------------
def test_route_price_wins_over_the_task_file_and_bad_values_fall_back():
    prices = Prices({"triage": (0.09, 0.005)})
    priced = BLUE.model_copy(update={"metadata": {"price_per_hour": 1.5, "max_cost_per_1k_tokens": 0.02}})
    assert prices.of("triage", priced) == 1.5
    assert prices.max_cost("triage", priced) == 0.02
    assert prices.of("triage", BLUE) == 0.09  # no price on the route: the task file's
    assert prices.max_cost("triage", BLUE) == 0.005
    for bad in ("abc", -1, 0, float("nan"), None, True):
        route = BLUE.model_copy(update={"metadata": {"price_per_hour": bad}})
        assert prices.of("triage", route) == 0.09
    assert prices.of("faq", BLUE) is None  # neither: no price, no cost series


def test_prices_from_the_task_files(tmp_path, monkeypatch):
    """The shipped tasks declare prices; a broken task file in TUNESHIP_TASK_PATH is skipped
    (serving must not depend on it), the others are still read."""
    (tmp_path / "broken.yaml").write_text("name: broken\nschema_version: [\n")
    monkeypatch.setenv("TUNESHIP_TASK_PATH", str(tmp_path))
    prices = Prices.from_task_files()
    from tuneship.tasks import load_task_file, task_files

    triage = load_task_file(task_files()["triage"], check_refs=False)
    assert prices.of(triage.served_model, BLUE) == triage.serving.price_per_hour > 0
    assert prices.max_cost(triage.served_model, BLUE) == triage.serving.max_cost_per_1k_tokens


# -- shadow agreement ------------------------------------------------------------------------
@pytest.mark.parametrize(("live", "shadow", "expected"), [
    ("Label: billing", "label:   Billing", "exact"),
    ("label: billing\n", " label: billing", "exact"),
    ("The invoice was charged twice this month", "The invoice was charged twice last month", "similar"),
    ("label: billing", "label: shipping", "different"),
    ("", "anything at all", "different"),
    ("word " * 100 + "A", "word " * 100 + "B", "exact"),  # compared on the first 64 words
    ("a b c d e f g h i j", "a b c d e f g h i k", "similar"),  # 9 of 10 words
    ("a b c d e f g h i j", "a b c d e f g x y z", "different"),  # 7 of 10
])
def test_agreement(live, shadow, expected):
    assert agreement(live, shadow) == expected


# -- deployment events -----------------------------------------------------------------------
def test_route_events():
    empty = routing.RoutingState(served_model="triage")
    live = empty.model_copy(update={"live": BLUE})
    candidate = live.model_copy(update={"shadow": GREEN})
    canary = candidate.model_copy(update={"canary_weight": 10})
    assert route_events(empty, live) == ["live"]
    assert route_events(live, candidate) == ["candidate"]
    assert route_events(candidate, canary) == ["canary"]
    assert route_events(canary, canary) == []
    assert route_events(canary, live) == ["candidate", "canary"]  # candidate cleared, weight back to 0


# -- per-model gauges on scrape --------------------------------------------------------------
def test_observe_routes_follows_switches(tmp_path):
    m = GatewayMetrics(tmp_path)
    prices = Prices({"triage": (0.09, 0.005)})
    state = routing.RoutingState(served_model="triage", generation=4, live=BLUE, shadow=GREEN, canary_weight=25)
    m.observe_routes({"triage": state}, prices)
    assert _value(m, "tuneship_gateway_live_info", {"served_model": "triage", "colour": "blue",
                                                     "model": "triage_blue", "version": "3"}) == 1
    assert _value(m, "tuneship_gateway_canary_weight_percent", {"served_model": "triage"}) == 25
    assert _value(m, "tuneship_gateway_price_per_hour_usd", {"served_model": "triage", "colour": "green",
                                                             "model": "triage_green"}) == 0.09
    assert _value(m, "tuneship_gateway_max_cost_per_1k_tokens_usd", {"served_model": "triage"}) == 0.005
    # Every deployment event is exported at 0 before it happens, so `increase()` sees the first one.
    for event in ("live", "candidate", "canary", "switch", "rollback"):
        assert _value(m, "tuneship_gateway_deployment_events_total", {"served_model": "triage", "event": event}) == 0

    switched = routing.switch(state).model_copy(update={"generation": 5})
    m.observe_routes({"triage": switched}, Prices())
    text = generate_latest(m.registry).decode()
    assert 'tuneship_gateway_live_info{colour="green",model="triage_green",served_model="triage",version="4"} 1.0' \
        in text
    assert 'version="3"' not in text  # the old live route's series is gone
    assert "tuneship_gateway_price_per_hour_usd{" not in text  # no price declared any more
    assert _value(m, "tuneship_gateway_route_generation", {"served_model": "triage"}) == 5
    assert _value(m, "tuneship_gateway_canary_weight_percent", {"served_model": "triage"}) == 0


# -- drift -----------------------------------------------------------------------------------
def _decision(at: float, score: float | None, drifted: bool, status: str = "ok") -> str:
    return json.dumps({"at": at, "run_id": "r", "champion": "3", "status": status, "score": score,
                       "drifted": drifted, "requests": 80, "fire": False, "reason": "debounce"}) + "\n"


def _report(path: Path, score: float, threshold: float, mtime: float) -> None:
    path.write_text(json.dumps({"task": path.parent.name, "status": "ok", "score": score, "threshold": threshold,
                                "drifted": score >= threshold}))
    os.utime(path, (mtime, mtime))


def _drift(m: GatewayMetrics, what: str, task: str) -> float | None:
    return _value(m, f"tuneship_drift_{what}", {"task": task})


def test_drift_collector_exports_the_latest_check(tmp_path):
    triage = tmp_path / "triage"
    triage.mkdir()
    _report(triage / "drift-run1.json", 0.1, 0.2, 1_000)
    _report(triage / "drift-run2.json", 0.31, 0.25, 2_000)  # newest report: its threshold
    (triage / "governor.jsonl").write_text(_decision(1_000, 0.1, False) + _decision(2_000, 0.31, True))
    m = GatewayMetrics(tmp_path)
    assert _drift(m, "score", "triage") == 0.31
    assert _drift(m, "threshold", "triage") == 0.25
    assert _drift(m, "drifted", "triage") == 1
    assert _drift(m, "last_check_timestamp_seconds", "triage") == 2_000

    # A later check with too few requests: no score of its own, so the last scored report's
    # score stays; its time and verdict are the newest; a torn last line is skipped.
    with open(triage / "governor.jsonl", "a") as f:
        f.write(_decision(3_000, None, False, status="insufficient"))
        f.write('{"at": 4000, "sco')
    assert _drift(m, "score", "triage") == 0.31
    assert _drift(m, "drifted", "triage") == 0
    assert _drift(m, "last_check_timestamp_seconds", "triage") == 3_000


def test_drift_collector_skips_what_it_cannot_read(tmp_path, caplog):
    (tmp_path / "faq").mkdir()
    (tmp_path / "faq" / "drift-x.json").write_text("{not json")
    (tmp_path / "triage").mkdir()
    (tmp_path / "triage" / "governor.jsonl").write_text(_decision(10, 0.05, False))
    (tmp_path / "notes.txt").write_text("not a task directory")
    m = GatewayMetrics(tmp_path)
    assert _drift(m, "score", "triage") == 0.05
    assert _drift(m, "threshold", "triage") is None  # no report yet
    assert _drift(m, "score", "faq") is None
    assert "drift figures of" in caplog.text and "faq" in caplog.text
    # No monitor directory at all (a fresh home): no drift series, and the scrape works.
    empty = GatewayMetrics(tmp_path / "absent")
    assert "tuneship_drift_score{" not in generate_latest(empty.registry).decode()


def test_drift_collector_rereads_only_changed_files(tmp_path, monkeypatch):
    from serving.gateway import metrics as gm

    (tmp_path / "triage").mkdir()
    gov = tmp_path / "triage" / "governor.jsonl"
    gov.write_text(_decision(10, 0.05, False))
    reads: list[Path] = []
    real = gm._last_json_line
    monkeypatch.setattr(gm, "_last_json_line", lambda p, tail=65536: reads.append(p) or real(p, tail))
    collector = DriftCollector(tmp_path)
    list(collector.collect())
    list(collector.collect())
    assert reads == [gov]  # the second scrape was served from the cache
    with open(gov, "a") as f:
        f.write(_decision(20, 0.5, True))
    families = {f.name: f for f in collector.collect()}
    assert reads == [gov, gov]
    assert families["tuneship_drift_score"].samples[0].value == 0.5
