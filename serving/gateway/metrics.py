"""Prometheus metrics, one registry per app (so tests can build several apps in a process).

Hot paths take labelled children through `GatewayMetrics.child`, which keeps them:
prometheus_client's `.labels()` validates, stringifies and locks on every call (about 5 us
each, five times per request), and the label sets here are few and bounded (colours,
models, statuses, key ids). Per-request series carry `served_model` (the client's `model`
once it named a served model; "none" for a request refused before that).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self) -> None:
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

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, kept for the next call (see the module docstring)."""
        key = (metric, values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c
