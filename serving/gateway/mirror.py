"""Mirroring: copy a request to the shadow colour without touching the live response.

`Mirror.offer()` is synchronous and non-blocking: it puts a job on a bounded asyncio.Queue
or, when full, drops it and counts it. A few worker tasks take jobs, call Triton with the
shadow timeout, count failures, and hand the result to the inference log as a `shadow` line
(see serving.gateway.inference_log for the join). On shutdown the queue gets a short grace
period to drain, then the workers are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from serving.gateway.routing import Route
from serving.gateway.triton import TritonClient, UpstreamError
from tuneship.inference_log import format_ts, utcnow

log = logging.getLogger("tuneship.gateway.mirror")


@dataclass(frozen=True)
class ShadowJob:
    request_id: str
    ts: datetime  # the request's ts: the shadow line goes to the same partition
    route: Route
    prompt: str
    max_tokens: int | None


class Mirror:
    def __init__(self, triton: TritonClient, writer: Any, metrics: Any, replica: str,
                 maxsize: int = 256, workers: int = 2, timeout_s: float = 30.0) -> None:
        self._triton = triton
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
        labels = (job.route.colour, job.route.model)
        assert self._q is not None, "Mirror.start() not called"
        try:
            self._q.put_nowait(job)
        except asyncio.QueueFull:
            self._metrics.shadow_dropped.labels(*labels).inc()
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
        labels = (route.colour, route.model)
        self._metrics.shadow_sent.labels(*labels).inc()
        t0 = time.perf_counter()
        result: dict[str, Any] = {"colour": route.colour, "version": route.version, "model": route.model}
        try:
            c = await self._triton.complete(route.model, job.prompt, job.max_tokens, timeout_s=self._timeout)
            result.update(completion=c.text, status=200, prompt_tokens=c.prompt_tokens,
                          completion_tokens=c.completion_tokens)
        except UpstreamError as exc:
            self._metrics.shadow_failed.labels(*labels).inc()
            result.update(completion=None, status=exc.status, error=exc.code)
        latency = time.perf_counter() - t0
        result["latency_ms"] = round(latency * 1000, 3)
        self._metrics.upstream_latency.labels("shadow", route.model).observe(latency)
        self._writer.submit(job.ts, {
            "kind": "shadow",
            "ts": format_ts(job.ts),
            "request_id": job.request_id,
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
