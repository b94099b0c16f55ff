"""Prometheus metrics: HTTP latency per route (this process) and queue state (Redis).

Queue figures are read from Redis at scrape time, so every API replica reports the same
deployment-wide numbers; request counts and latencies are per process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.contract import JobStatus
from worker.queue import JobQueue

__all__ = ["QueueCollector", "RequestMetrics", "new_registry"]

_COUNTERS = {
    "cache_hits": "Influence queries answered from the result cache.",
    "cache_misses": "Influence queries not answered from the result cache (a new job, or "
    "one an identical query in flight had started).",
    "dead_lettered": "Jobs moved to the dead-letter list after their last attempt.",
}


class QueueCollector(Collector):
    """Jobs by status, queue depth, live workers and cache counters, read from Redis."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        counts = self.queue.counts()
        jobs = GaugeMetricFamily("influence_jobs", "Jobs queued or running now.", labels=["status"])
        finished = CounterMetricFamily(
            "influence_jobs_finished",
            "Jobs that ended with each status (since Redis's data began; finished job "
            "records expire, these counts do not).",
            labels=["status"],
        )
        for status in JobStatus:
            family = finished if status.terminal else jobs
            family.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        yield finished
        yield GaugeMetricFamily(
            "influence_queue_depth", "Jobs waiting for a worker.", value=counts[JobStatus.QUEUED]
        )
        yield GaugeMetricFamily(
            "influence_workers_alive",
            "Workers seen recently.",
            value=len(self.queue.workers_alive()),
        )
        for name, help_text in _COUNTERS.items():
            yield CounterMetricFamily(f"influence_{name}", help_text, value=counts.get(name, 0))


class RequestMetrics:
    """ASGI middleware: a latency histogram labelled by method, route template and status."""

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry) -> None:
        self.app = app
        self.histogram = Histogram(
            "influence_http_request_seconds",
            "HTTP request latency (until the response headers are sent).",
            ["method", "route", "status"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.histogram.labels(scope["method"], route, str(message["status"])).observe(
                    time.perf_counter() - start
                )
            await send(message)

        await self.app(scope, receive, timed_send)


def new_registry(queue: JobQueue) -> CollectorRegistry:
    """A registry of this app's metrics (one per app, so tests can build many apps)."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(queue))
    return registry
