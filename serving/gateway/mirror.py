"""Mirroring: copy a request to the shadow colour without touching the live response.

`Mirror.offer()` is synchronous, non-blocking and O(1): it puts a job on a bounded
asyncio.Queue or, when full, drops it and counts it (reason `queue_full`). The live
response never waits for a copy. A few worker tasks take jobs, call Triton with the shadow
timeout, count failures, and hand the result to the inference log as a `shadow` line (see
serving.gateway.inference_log for the join). On shutdown the queue gets a short grace
period to drain, then the workers are cancelled.

A job waits in the queue while the routing state may change. When a worker takes it, the
job's route must still be its served model's shadow route (same colour, model, version and metadata);
after a switch, a rollback or a cleared/replaced shadow it is dropped instead (reason
`route_changed`, and a `dropped` shadow line), never sent to a model that is now live or
unloaded. A copy already in flight when the state changes finishes as it started.

A shadow answer is compared with the live answer of the same request (the job carries it)
and counted in `tuneship_gateway_shadow_compared_total` by agreement (`metrics.agreement`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from serving.gateway.metrics import agreement
from serving.gateway.routing import Route
from serving.gateway.triton import TritonClient, UpstreamError
from tuneship.inference_log import format_ts, utcnow

log = logging.getLogger("tuneship.gateway.mirror")


@dataclass(frozen=True, slots=True)
class ShadowJob:
    request_id: str
    served_model: str  # whose routes the copy follows, and whose log partition it lands in
    ts: datetime  # the request's ts: the shadow line goes to the same partition
    route: Route
    prompt: str
    max_tokens: int | None
    live_version: str | None = None  # the version that answered live, and its answer: the
    live_completion: str | None = None  # shadow answer is compared with it (metrics.agreement)


class Mirror:
    """`shadow_route(served_model)` gives that served model's current shadow route (its
    routing state's, re-read when it changed); a queued job whose route is no longer that
    one is dropped."""

    def __init__(self, triton: TritonClient, writer: Any, metrics: Any, replica: str,
                 shadow_route: Callable[[str], Route | None],
                 maxsize: int = 256, workers: int = 2, timeout_s: float = 30.0) -> None:
        self._triton = triton
        self._shadow_route = shadow_route
        self._writer = writer
        self._metrics = metrics
        self._replica = replica
        self._maxsize = maxsize
        self._n = max(1, workers)
        self._timeout = timeout_s
        self._q: asyncio.Queue[ShadowJob] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._q = asyncio.Queue(maxsize=self._maxsize)
        self._tasks = [asyncio.create_task(self._worker(), name=f"shadow-{i}") for i in range(self._n)]

    def offer(self, job: ShadowJob) -> bool:
        assert self._q is not None, "Mirror.start() not called"
        try:
            self._q.put_nowait(job)
        except asyncio.QueueFull:
            m = self._metrics
            m.child(m.shadow_dropped, job.route.colour, job.route.model, "queue_full").inc()
            return False
        self._metrics.shadow_queue_depth.set(self._q.qsize())
        return True

    async def _worker(self) -> None:
        assert self._q is not None
        while True:
            job = await self._q.get()
            try:
                await self._run(job)
            except Exception as exc:  # a worker must survive anything
                log.error("shadow job failed unexpectedly: %s", type(exc).__name__)
            finally:
                self._q.task_done()
                self._metrics.shadow_queue_depth.set(self._q.qsize())

    async def _run(self, job: ShadowJob) -> None:
        route = job.route
        m = self._metrics
        result: dict[str, Any] = {"colour": route.colour, "version": route.version, "model": route.model}
        if self._shadow_route(job.served_model) != route:
            m.child(m.shadow_dropped, route.colour, route.model, "route_changed").inc()
            result.update(completion=None, status="dropped", reason="route_changed")
            self._log(job, result)
            return
        m.child(m.shadow_sent, route.colour, route.model).inc()
        t0 = time.perf_counter()
        try:
            c = await self._triton.complete(route.model, job.prompt, job.max_tokens, timeout_s=self._timeout,
                                            adapter=route.adapter)
            result.update(completion=c.text, status=200, prompt_tokens=c.prompt_tokens,
                          completion_tokens=c.completion_tokens)
            if c.confidence is not None:
                result["confidence"] = c.confidence
            if job.live_completion is not None:
                m.child(m.shadow_compared, job.served_model, job.live_version or "", route.colour, route.model,
                        route.version or "", agreement(job.live_completion, c.text)).inc()
        except UpstreamError as exc:
            m.child(m.shadow_failed, route.colour, route.model).inc()
            result.update(completion=None, status=exc.status, error=exc.code)
        latency = time.perf_counter() - t0
        result["latency_ms"] = round(latency * 1000, 3)
        m.child(m.upstream_latency, "shadow", route.model).observe(latency)
        self._log(job, result)

    def _log(self, job: ShadowJob, result: dict[str, Any]) -> None:
        self._writer.submit(job.ts, {
            "kind": "shadow",
            "ts": format_ts(job.ts),
            "request_id": job.request_id,
            "served_model": job.served_model,
            "replica": self._replica,
            "completed_at": format_ts(utcnow()),
            "shadow": result,
        })

    async def close(self, drain_s: float = 5.0) -> None:
        if self._q is not None and drain_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._q.join(), drain_s)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
