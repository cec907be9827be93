"""Prometheus metrics of one server node (issue 15).

Each ``TideflowServer`` owns a ``ServerMetrics`` with its own ``CollectorRegistry``
(tests run several servers in one process; a process-wide default registry would mix
them up and refuse the second registration). The components that observe something
get this one object through their constructor; on the hot path they only bump a
counter or observe a histogram. What is a state rather than an event (backlog per
task queue, open runs, transitions committed) is read when Prometheus scrapes:
backlogs from matching's memory, transitions from the store's counters, open runs
with one count query at most every ``OPEN_RUNS_EVERY_S``.

Names (all prefixed ``tideflow_``): see the README's metrics list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tideflow.api.v1 import state_pb2
from tideflow.history import HistoryStore, TaskKind

from ._unary_interceptor import Behavior, UnaryServerInterceptor

# Latency buckets in seconds: from a sub-millisecond RPC to a minute-long poll.
_LATENCY_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
_LATENCY_BUCKETS += (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Group commits batch up to 64 transitions (history/_store.py).
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
OPEN_RUNS_EVERY_S = 10.0
# (namespace, task queue, kind) -> tasks waiting (Matching.backlog_sizes).
Backlogs = dict[tuple[str, str, str], int]
_KIND_NAMES = {TaskKind.WORKFLOW: "workflow", TaskKind.ACTIVITY: "activity"}


class ServerMetrics:
    """The metrics of one node; ``registry`` is what its ``/metrics`` serves."""

    def __init__(self, now_micros: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._now_micros = now_micros
        r = self.registry
        self.rpc_requests = Counter(
            "tideflow_rpc_requests", "RPCs served", ["service", "method", "code"], registry=r
        )
        self.rpc_latency = Histogram(
            "tideflow_rpc_latency_seconds",
            "time to answer an RPC (long polls included)",
            ["service", "method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.schedule_to_start = Histogram(
            "tideflow_task_schedule_to_start_seconds",
            "from a task scheduled to a worker's poll receiving it",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "tideflow_task_end_to_end_seconds",
            "from a task (attempt) scheduled to its worker's answer",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dispatched = Counter(
            "tideflow_task_dispatch",
            "tasks handed to matching: straight to a waiting poller (sync), backlogged, "
            "or to a poll parked on the committing node for another node's queue (local)",
            ["kind", "match"],
            registry=r,
        )
        # Polls parked in this node's local partitions of queues other nodes serve
        # (server/_matching.py ``poll_local``): what local dispatch can reach now.
        self.local_polls = Gauge(
            "tideflow_local_polls_parked",
            "polls parked on this node for queues another node serves",
            registry=r,
        )
        self.timer_lateness = Histogram(
            "tideflow_timer_lateness_seconds",
            "how long after its due time a timer fired",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_latency = Histogram(
            "tideflow_store_commit_seconds",
            "one store transaction (a group commit), retries included",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_batch = Histogram(
            "tideflow_store_commit_batch_size",
            "transitions committed together in one transaction",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self._state: _StateCollector | None = None

    # --------------------------------------------------------------- hooks

    def task_dispatched(self, kind: TaskKind, *, sync: bool) -> None:
        name = _KIND_NAMES.get(kind)
        if name is not None:
            self.dispatched.labels(name, "sync" if sync else "backlog").inc()

    def task_dispatched_local(self, kind: TaskKind) -> None:
        """A task this node committed went to a poll parked here for a queue another
        node serves (no AddTasks, no RecordTaskStarted)."""
        name = _KIND_NAMES.get(kind)
        if name is not None:
            self.dispatched.labels(name, "local").inc()

    def task_started(self, kind: TaskKind, response: Any) -> None:
        """A poll got a started task: its schedule-to-start latency (the response's
        own times, so the engine's clock and the metric agree)."""
        scheduled = (
            response.current_attempt_scheduled_time
            if kind == TaskKind.ACTIVITY
            else response.scheduled_time
        ).ToMicroseconds()
        started = response.started_time.ToMicroseconds()
        if scheduled and started >= scheduled:
            self.schedule_to_start.labels(_KIND_NAMES[kind]).observe((started - scheduled) / 1e6)

    def task_answered(self, token: state_pb2.TaskToken) -> None:
        """A worker answered a task (completed, failed, cancelled): end to end."""
        if token.scheduled_time_us:
            kind = "activity" if token.is_activity else "workflow"
            elapsed = max(0, self._now_micros() - token.scheduled_time_us)
            self.end_to_end.labels(kind).observe(elapsed / 1e6)

    def timer_fired(self, fire_at_us: int) -> None:
        self.timer_lateness.observe(max(0, self._now_micros() - fire_at_us) / 1e6)

    def store_committed(self, transitions: int, seconds: float) -> None:
        self.commit_batch.observe(transitions)
        self.commit_latency.observe(seconds)

    def watch(self, store: HistoryStore, backlogs: Callable[[], Backlogs]) -> None:
        """Read the node's states on each scrape (see the module docstring)."""
        self._state = _StateCollector(store, backlogs)
        self.registry.register(self._state)

    async def refresh(self) -> None:
        """Before a scrape: the open-run count, if the last one is old."""
        if self._state is not None:
            await self._state.refresh()


class _StateCollector(Collector):
    def __init__(self, store: HistoryStore, backlogs: Callable[[], Backlogs]) -> None:
        self._store = store
        self._backlogs = backlogs
        self._open_runs: dict[str, int] = {}
        self._open_runs_at = 0.0

    async def refresh(self) -> None:
        if time.monotonic() - self._open_runs_at < OPEN_RUNS_EVERY_S and self._open_runs_at:
            return
        self._open_runs = await self._store.open_runs_by_namespace()
        self._open_runs_at = time.monotonic()

    def collect(self) -> Iterator[Any]:
        stats = self._store.stats
        yield CounterMetricFamily(
            "tideflow_transitions", "run state transitions committed", value=stats["transitions"]
        )
        yield CounterMetricFamily(
            "tideflow_store_commits", "store transactions committed", value=stats["transactions"]
        )
        backlog = GaugeMetricFamily(
            "tideflow_task_queue_backlog",
            "tasks waiting in a task queue of this node for a poller",
            labels=["namespace", "task_queue", "kind"],
        )
        for (namespace, queue, kind), size in sorted(self._backlogs().items()):
            backlog.add_metric([namespace, queue, kind], size)
        yield backlog
        runs = GaugeMetricFamily(
            "tideflow_open_runs",
            "runs not closed yet (refreshed at most every 10 s)",
            labels=["namespace"],
        )
        for namespace, count in sorted(self._open_runs.items()):
            runs.add_metric([namespace], count)
        yield runs


class RpcMetricsInterceptor(UnaryServerInterceptor):
    """Counts and times every unary RPC by service, method and status code."""

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def wrap(self, service: str, method: str, behavior: Behavior) -> Behavior:
        metrics = self._metrics
        # The labelled children by status name: ``labels()`` looks them up under a lock
        # on every call, and a method meets only a few codes.
        children: dict[str, tuple[Any, Any]] = {}

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                code = _code_of(context) or grpc.StatusCode.OK
                return response
            except BaseException:
                code = _code_of(context) or code
                raise
            finally:
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                pair = children.get(name)
                if pair is None:
                    pair = children[name] = (
                        metrics.rpc_requests.labels(service, method, name),
                        metrics.rpc_latency.labels(service, method, name),
                    )
                pair[0].inc()
                pair[1].observe(time.perf_counter() - started)

        return observed


def _code_of(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """The status the handler set (abort, set_code), if any."""
    try:
        return context.code()
    except Exception:  # older grpcio without ServicerContext.code()
        return None
