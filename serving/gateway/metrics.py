"""Prometheus metrics, one registry per app (so tests can build several apps in a process).

Hot paths take labelled children through `GatewayMetrics.child`, which keeps them:
prometheus_client's `.labels()` validates, stringifies and locks on every call (about 5 us
each, five times per request), and the label sets here are few and bounded (colours,
models, statuses, key ids). Per-request series carry `served_model` (the client's `model`
once it named a served model; "none" for a request refused before that).

Besides traffic, the gateway exports what dashboards and alerts (`serving/prometheus/`,
`serving/grafana/`) need and only it sees:

* cost: each answered request costs the served model's declared instance price per hour
  times the seconds Triton spent on it (`Prices`: the route's `metadata.price_per_hour`
  when the release put one there, else the task file's `serving.price_per_hour`). It is the
  serving gate's figure (`tuneship.serving_gate.cost_per_1k_tokens`: an instance serving one
  request at a time, so an upper bound for one that serves several at once), summed per
  request: cost per request and per 1k generated tokens are ratios of these counters (the
  recording rules). A route without a declared price has no cost series.
* tokens/s: completion tokens over `generation_seconds` (Triton's time on answered requests).
* shadow agreement: each shadow answer against the live answer of the same request
  (`agreement`): a text-level measure the gateway can make without the task's parser; the
  shadow verdict's parsed agreement stays the release decision.
* deployment events: route changes received through the admin API (`route_events`), so
  Grafana can draw annotations from Prometheus (`increase()` on the counter) anywhere.
* drift: the drift monitor's latest score per task, read from its files on scrape
  (`DriftCollector`); the drift code is untouched.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger("tuneship.gateway.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# USD per request: 1 s of a $0.09/h instance is 2.5e-5.
COST_BUCKETS = (1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)
DEPLOYMENT_EVENTS = ("live", "candidate", "canary", "switch", "rollback")
SIMILAR_RATIO = 0.8  # difflib ratio of the answers' words at or above which they are "similar"
_COMPARE_WORDS = 64  # answers are compared on their first this many words: bounded CPU in the mirror


class GatewayMetrics:
    def __init__(self, monitor_root: Path | None = None) -> None:
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tuneship_gateway_requests_total",
            "Inference requests answered by the gateway; role: live, canary, pinned (admin smoke) or none.",
            ["served_model", "endpoint", "colour", "model", "status", "role"], registry=r,
        )
        self.latency = Histogram(
            "tuneship_gateway_request_latency_seconds", "End-to-end latency of inference requests.",
            ["served_model", "colour", "model", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.upstream_latency = Histogram(
            "tuneship_gateway_upstream_latency_seconds", "Latency of Triton infer calls.",
            ["role", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.completion_tokens = Counter(
            "tuneship_gateway_completion_tokens_total", "Completion tokens returned, by answering colour.",
            ["served_model", "colour", "model"], registry=r,
        )
        self.prompt_tokens = Counter(
            "tuneship_gateway_prompt_tokens_total", "Prompt tokens sent upstream, by answering colour.",
            ["served_model", "colour", "model"], registry=r,
        )
        self.generation_seconds = Counter(
            "tuneship_gateway_generation_seconds_total",
            "Seconds Triton spent on answered requests, by answering colour (completion tokens over this: "
            "tokens/s).",
            ["served_model", "colour", "model"], registry=r,
        )
        self.request_cost = Histogram(
            "tuneship_gateway_request_cost_usd",
            "Cost of each answered request: the served model's declared USD per instance-hour x the seconds "
            "Triton spent on it (one request at a time, as the serving gate counts). Only routes with a price.",
            ["served_model", "colour", "model"], buckets=COST_BUCKETS, registry=r,
        )
        self.price_per_hour = Gauge(
            "tuneship_gateway_price_per_hour_usd",
            "Declared USD per instance-hour of each routed colour (live and shadow) that has one.",
            ["served_model", "colour", "model"], registry=r,
        )
        self.max_cost_per_1k_tokens = Gauge(
            "tuneship_gateway_max_cost_per_1k_tokens_usd",
            "The task's declared ceiling on USD per 1k generated tokens (serving.max_cost_per_1k_tokens), "
            "for served models that declare one.",
            ["served_model"], registry=r,
        )
        self.rate_limited = Counter(
            "tuneship_gateway_rate_limited_total", "Requests refused with 429, by client key id.",
            ["key"], registry=r,
        )
        self.shadow_sent = Counter(
            "tuneship_gateway_shadow_sent_total", "Requests copied to the shadow colour.",
            ["colour", "model"], registry=r,
        )
        self.shadow_dropped = Counter(
            "tuneship_gateway_shadow_dropped_total",
            "Shadow copies never sent; reason: queue_full (mirror queue full when offered) or route_changed "
            "(the colour stopped being the shadow while the copy waited: switch, rollback, shadow cleared).",
            ["colour", "model", "reason"], registry=r,
        )
        self.shadow_failed = Counter(
            "tuneship_gateway_shadow_failed_total", "Shadow copies whose upstream call failed.",
            ["colour", "model"], registry=r,
        )
        self.shadow_compared = Counter(
            "tuneship_gateway_shadow_compared_total",
            "Shadow answers compared with the live answer of the same request; agreement: exact (equal after "
            f"whitespace and case are ignored), similar (difflib ratio of the words >= {SIMILAR_RATIO}), different.",
            ["served_model", "live_version", "shadow_colour", "shadow_model", "shadow_version", "agreement"],
            registry=r,
        )
        self.shadow_queue_depth = Gauge(
            "tuneship_gateway_shadow_queue_depth", "Shadow copies waiting in the mirror queue.", registry=r,
        )
        self.feedback = Counter(
            "tuneship_gateway_feedback_total", "Client feedback (POST /v1/feedback) accepted into the inference log.",
            ["served_model"], registry=r,
        )
        self.log_dropped = Counter(
            "tuneship_gateway_inference_log_dropped_total", "Inference-log records dropped (writer queue full).",
            registry=r,
        )
        self.log_written = Counter(
            "tuneship_gateway_inference_log_written_total", "Inference-log records written.", registry=r,
        )
        self.route_generation = Gauge(
            "tuneship_gateway_route_generation", "Generation of each served model's routing state this replica serves.",
            ["served_model"], registry=r,
        )
        self.canary_weight = Gauge(
            "tuneship_gateway_canary_weight_percent", "Share of each served model's traffic the candidate answers.",
            ["served_model"], registry=r,
        )
        self.live_info = Gauge(
            "tuneship_gateway_live_info", "1 for the route each served model's live colour points at.",
            ["served_model", "colour", "model", "version"], registry=r,
        )
        self.deployment_events = Counter(
            "tuneship_gateway_deployment_events_total",
            "Route changes received through this replica's admin API; event: switch, rollback, canary (weight "
            "changed), candidate (shadow set, replaced or cleared), live (live set by a PUT).",
            ["served_model", "event"], registry=r,
        )
        if monitor_root is not None:
            r.register(DriftCollector(monitor_root))

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, kept for the next call (see the module docstring)."""
        key = (metric, values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c

    def series_names(self) -> set[str]:
        """Every sample name this registry can expose (counters' `_total`, histograms'
        `_bucket`/`_sum`/`_count`): what rules and dashboards may query."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
        return {fam.name + sfx for fam in self.registry.collect() for sfx in suffixes.get(fam.type, ("",))}

    def observe_routes(self, states: Mapping[str, Any], prices: Prices) -> None:
        """Set the per-model gauges from the routing states (on scrape: a switch made through
        another replica shows here too). Label sets that no longer exist are dropped."""
        self.live_info.clear()
        self.price_per_hour.clear()
        self.max_cost_per_1k_tokens.clear()
        for name, st in states.items():
            self.child(self.route_generation, name).set(st.generation)
            for event in DEPLOYMENT_EVENTS:
                # Exported at 0 before the first event: `increase()` cannot see a series that
                # appears at 1, so a first switch would draw no annotation.
                self.child(self.deployment_events, name, event)
            self.child(self.canary_weight, name).set(st.canary_weight)
            if st.live is not None:
                self.live_info.labels(name, st.live.colour, st.live.model, st.live.version or "").set(1)
            for route in (st.live, st.shadow):
                price = prices.of(name, route) if route is not None else None
                if route is not None and price is not None:
                    self.price_per_hour.labels(name, route.colour, route.model).set(price)
            ceiling = prices.max_cost(name, st.live)
            if ceiling is not None:
                self.max_cost_per_1k_tokens.labels(name).set(ceiling)


# -- cost ------------------------------------------------------------------------------------
def _positive(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


class Prices:
    """The declared USD per instance-hour (and cost ceiling) of each served model.

    A route's `metadata.price_per_hour` / `metadata.max_cost_per_1k_tokens` win: a release
    that puts them on the route carries the price wherever the gateway runs (a container
    without the task files, another cluster). Else the task files' `serving` section, read
    once at start (`from_task_files`), by the task's served model: the embedded default,
    where the gateway and the DAGs share a checkout. Neither: no price, no cost series."""

    def __init__(self, declared: Mapping[str, tuple[float | None, float | None]] | None = None) -> None:
        self._declared = dict(declared or {})  # served model -> (price_per_hour, max_cost_per_1k_tokens)

    @classmethod
    def from_task_files(cls) -> Prices:
        """Every task file's declared price; a file that does not load is logged and skipped
        (it must not take serving down; `tuneship tasks check` names the problem)."""
        from tuneship import tasks

        declared: dict[str, tuple[float | None, float | None]] = {}
        try:
            files = tasks.task_files()
        except tasks.TaskError as exc:
            log.warning("task files not read for prices: %s", exc)
            return cls()
        for path in files.values():
            try:
                task = tasks.load_task_file(path, check_refs=False)
            except tasks.TaskError as exc:
                log.warning("no declared price from %s: %s", path, exc)
                continue
            declared[task.served_model] = (task.serving.price_per_hour, task.serving.max_cost_per_1k_tokens)
        return cls(declared)

    def of(self, served_model: str, route: Any) -> float | None:
        """USD per hour of the instance serving `route` (None: none declared)."""
        price = _positive(route.metadata.get("price_per_hour")) if route is not None and route.metadata else None
        if price is None:
            price = self._declared.get(served_model, (None, None))[0]
        return price

    def max_cost(self, served_model: str, route: Any) -> float | None:
        ceiling = _positive(route.metadata.get("max_cost_per_1k_tokens")) if route is not None and route.metadata \
            else None
        if ceiling is None:
            ceiling = self._declared.get(served_model, (None, None))[1]
        return ceiling


# -- shadow agreement ------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return text.casefold().split(maxsplit=_COMPARE_WORDS)[:_COMPARE_WORDS]


def agreement(live: str, shadow: str) -> str:
    """exact | similar | different: the two answers to the same request, compared word by
    word (case and whitespace ignored) on their first 64 words: exact when equal, similar
    when difflib's ratio of the word sequences is at least 0.8. Runs in the mirror worker, on
    the event loop: a bounded word-level comparison stays well under a millisecond."""
    a, b = _words(live), _words(shadow)
    if a == b:
        return "exact"
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    # quick_ratio() bounds ratio() from above in linear time: most different answers stop there.
    return "similar" if sm.quick_ratio() >= SIMILAR_RATIO and sm.ratio() >= SIMILAR_RATIO else "different"


# -- deployment events -----------------------------------------------------------------------
def route_events(old: Any, new: Any) -> list[str]:
    """What a routes PUT or a canary call changed: live, candidate (the shadow route), canary
    (the weight). Switch and rollback are counted by their own endpoints. Each is one of
    `DEPLOYMENT_EVENTS`."""
    events = []
    if old.live != new.live:
        events.append("live")
    if old.shadow != new.shadow:
        events.append("candidate")
    if old.canary_weight != new.canary_weight:
        events.append("canary")
    return events


# -- drift -----------------------------------------------------------------------------------
def _last_json_line(path: Path, tail: int = 65536) -> dict[str, Any] | None:
    """The last complete JSON line of an append-only file (a torn last line is skipped)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail))
        lines = f.read().splitlines()
    for raw in reversed(lines):
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


class DriftCollector:
    """The drift monitor's latest figures per task, read on scrape from what it writes under
    `<monitor_root>/<task>/`: the last decision of `governor.jsonl` (check time, score,
    drifted) and the newest `drift-*.json` (its threshold). Files are re-read only when they
    changed; one that cannot be read is logged and left out, never fails the scrape."""

    NAMES = {
        "score": ("tuneship_drift_score", "The drift monitor's latest profile drift score per task (its last check "
                  "that had enough requests)."),
        "threshold": ("tuneship_drift_threshold", "The drift score at or above which a check counts as drifted "
                      "(from the latest drift report)."),
        "drifted": ("tuneship_drift_drifted", "1 when the latest drift check found drift (score or tests), else 0."),
        "checked": ("tuneship_drift_last_check_timestamp_seconds", "When the latest drift check ran (epoch s)."),
    }

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, tuple[tuple[Any, ...], dict[str, float]]] = {}

    def describe(self) -> Iterator[Metric]:
        for name, doc in self.NAMES.values():
            yield GaugeMetricFamily(name, doc, labels=["task"])

    def _read(self, task_dir: Path) -> dict[str, float]:
        gov = task_dir / "governor.jsonl"
        reports = sorted(task_dir.glob("drift-*.json"), key=lambda p: p.stat().st_mtime_ns)
        key = (gov.stat().st_mtime_ns if gov.exists() else None, gov.stat().st_size if gov.exists() else None,
               str(reports[-1]) if reports else None, reports[-1].stat().st_mtime_ns if reports else None)
        cached = self._cache.get(task_dir.name)
        if cached and cached[0] == key:
            return cached[1]
        out: dict[str, float] = {}
        report = json.loads(reports[-1].read_text()) if reports else {}
        last = _last_json_line(gov) if gov.exists() else None
        if last is not None:
            if _number(last.get("at")) is not None:
                out["checked"] = float(last["at"])
            out["drifted"] = 1.0 if last.get("drifted") else 0.0
        score = _number(last.get("score")) if last is not None else None
        if score is None:  # the last check had too few requests: the latest scored report's
            score = _number(report.get("score"))
        if score is not None:
            out["score"] = score
        if _number(report.get("threshold")) is not None:
            out["threshold"] = float(report["threshold"])
        self._cache[task_dir.name] = (key, out)
        return out

    def collect(self) -> Iterator[Metric]:
        families = {k: GaugeMetricFamily(name, doc, labels=["task"]) for k, (name, doc) in self.NAMES.items()}
        tasks = sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        for task_dir in tasks:
            try:
                figures = self._read(task_dir)
            except (OSError, ValueError) as exc:
                log.warning("drift figures of %s not exported: %s", task_dir, exc)
                continue
            for k, v in figures.items():
                families[k].add_metric([task_dir.name], v)
        yield from families.values()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
