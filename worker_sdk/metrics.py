"""Prometheus metrics of a worker (issue 15), with prometheus-client.

```python
from prometheus_client import CollectorRegistry
from tideflow.worker_sdk.metrics import WorkerMetrics

registry = CollectorRegistry()           # or expose it with your own /metrics
worker = Worker(client, task_queue="q", workflows=[...], metrics=WorkerMetrics(registry))
# or let the worker serve its own: Worker(..., metrics_port=9464)  -> /metrics
```

Labelled by ``task_queue`` and ``kind`` (``workflow``/``activity``), so one
``WorkerMetrics`` may serve several workers:

- ``tideflow_worker_poll_latency_seconds{outcome=task|empty|error}``: one long poll;
- ``tideflow_worker_task_execution_seconds``: handling one task, from the poll's answer
  (or an eager handover) to the response sent;
- ``tideflow_worker_workflow_cache_size``: runs held in the sticky cache;
- ``tideflow_worker_workflow_cache_lookups_total{result=hit|miss}``: a workflow task
  found its run cached (hit) or replayed it from its history (miss); hit rate is
  ``hit / (hit + miss)``.

prometheus-client is imported when a ``WorkerMetrics`` is made, never by a worker
without one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

T = TypeVar("T")
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 75)


class WorkerMetrics:
    """The metrics of one or more workers, in ``registry`` (a new one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._poll = Histogram(
            "tideflow_worker_poll_latency_seconds",
            "one long poll for a task",
            ["task_queue", "kind", "outcome"],
            buckets=_BUCKETS,
            registry=r,
        )
        self._execution = Histogram(
            "tideflow_worker_task_execution_seconds",
            "handling one task, to its response",
            ["task_queue", "kind"],
            buckets=_BUCKETS,
            registry=r,
        )
        self._cache_size = Gauge(
            "tideflow_worker_workflow_cache_size",
            "runs held in the worker's cache",
            ["task_queue"],
            registry=r,
        )
        self._cache_lookups = Counter(
            "tideflow_worker_workflow_cache_lookups",
            "workflow tasks whose run was cached (hit) or replayed (miss)",
            ["task_queue", "result"],
            registry=r,
        )

    def timed_poll(
        self, task_queue: str, kind: str, poll: Callable[[str], Awaitable[T | None]]
    ) -> Callable[[str], Awaitable[T | None]]:
        async def timed(queue: str) -> T | None:
            began = time.perf_counter()
            outcome = "error"
            try:
                result = await poll(queue)
                outcome = "empty" if result is None else "task"
                return result
            finally:
                elapsed = time.perf_counter() - began
                self._poll.labels(task_queue, kind, outcome).observe(elapsed)

        return timed

    def timed_handler(
        self, task_queue: str, kind: str, handle: Callable[[T], Awaitable[None]]
    ) -> Callable[[T], Awaitable[None]]:
        async def timed(task: T) -> None:
            began = time.perf_counter()
            try:
                await handle(task)
            finally:
                self._execution.labels(task_queue, kind).observe(time.perf_counter() - began)

        return timed

    def cache_lookup(self, task_queue: str, *, hit: bool, size: int) -> None:
        self._cache_lookups.labels(task_queue, "hit" if hit else "miss").inc()
        self._cache_size.labels(task_queue).set(size)

    def cache_resized(self, task_queue: str, size: int) -> None:
        self._cache_size.labels(task_queue).set(size)


def serve(metrics: WorkerMetrics, port: int, host: str = "127.0.0.1") -> tuple[Any, int]:
    """Serve ``metrics`` on ``http://host:port/metrics`` (prometheus-client's own
    threaded server); returns (server, bound port). ``server.shutdown()`` stops it."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, int(server.server_address[1])
