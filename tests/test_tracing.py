"""OpenTelemetry tracing on the public interceptors (issue 15): a real server, a client
and a worker with ``TracingInterceptor``, spans collected by the OpenTelemetry SDK's
``InMemorySpanExporter``. One trace from the client's start through every workflow
task and the activity; the activity's span is a child of the ``StartActivity`` span of
the task that scheduled it; with the cache off (every task replays the run from its
history) no span is duplicated: one per task handled, one per command sent, one per
activity attempt. The client interceptor chain runs first-outermost and can add gRPC
metadata. With the worker in another process, tracing with a provider of its own, its
spans join the client's trace (the context crosses only in headers and metadata).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import Processes, bounded, new_id, running_server
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tideflow.api.v1.history_pb2 import EventType
from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, Worker, activity, workflow
from tideflow.worker_sdk.interceptor import ClientCallHandler, ClientCallInput, ClientInterceptor
from tideflow.worker_sdk.tracing import TracingInterceptor


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn
class Shouter:
    @workflow.run
    async def run(self, text: str) -> str:
        first = await workflow.execute_activity(
            shout, text, start_to_close_timeout=timedelta(seconds=30)
        )
        await workflow.sleep(0.01)
        second = await workflow.execute_activity(
            shout, first + "!", start_to_close_timeout=timedelta(seconds=30)
        )
        return second


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.shutdown()


def _provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "replaying"])
async def test_one_trace_across_client_workflow_and_activities(
    tmp_path: Path, exporter: InMemorySpanExporter, cached: bool
) -> None:
    provider = _provider(exporter)
    tracing = TracingInterceptor(provider.get_tracer("test"))
    queue = new_id("q")
    url = f"sqlite:///{tmp_path / 'tideflow.db'}"
    async with TideflowServer(url, port=0, tracer_provider=provider) as server:
        client = await Client.connect(server.address, interceptors=[tracing])
        async with (
            client,
            Worker(
                client,
                task_queue=queue,
                workflows=[Shouter],
                activities=[shout],
                interceptors=[tracing],
                max_cached_workflows=100 if cached else 0,
            ),
        ):
            handle = await client.start_workflow(
                Shouter.run, "hi", id=new_id("shout"), task_queue=queue
            )
            assert await bounded(handle.result()) == "HI!"
            history = await handle.fetch_history()
    spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    names = [s.name for s in spans]
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)

    start = by_name["StartWorkflow:Shouter"]
    assert len(start) == 1
    trace_id = start[0].context.trace_id
    # The server's span of the start is the client span's child (context in metadata).
    served = by_name["WorkflowService/StartWorkflow"]
    assert len(served) == 1 and served[0].parent is not None
    assert served[0].parent.span_id == start[0].context.span_id
    assert served[0].context.trace_id == trace_id
    worker_spans = [s for s in spans if not s.name.startswith(("StartWorkflow", "WorkflowService"))]
    assert worker_spans and all(s.context.trace_id == trace_id for s in worker_spans), names

    completed = [
        e for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    ]
    tasks = by_name["RunWorkflowTask:Shouter"]
    # One span per workflow task handled, whether or not the run was replayed for it.
    assert len(tasks) == len(completed), names
    assert all(t.parent is not None and t.parent.span_id == start[0].context.span_id for t in tasks)
    starts, runs = by_name["StartActivity:shout"], by_name["RunActivity:shout"]
    assert len(starts) == 2 and len(runs) == 2, names
    task_ids = {t.context.span_id for t in tasks}
    assert all(s.parent is not None and s.parent.span_id in task_ids for s in starts)
    assert {r.parent.span_id for r in runs if r.parent} == {s.context.span_id for s in starts}


class Tagging(ClientInterceptor):
    """Adds metadata to every call and records the calls it saw, in order."""

    def __init__(self, name: str, seen: list[str]) -> None:
        self.name = name
        self.seen = seen

    def intercept_call(self, next: ClientCallHandler) -> ClientCallHandler:
        async def call(input: ClientCallInput) -> object:
            self.seen.append(f"{self.name}:{input.rpc}")
            input.metadata[f"x-tag-{self.name}"] = "1"
            return await next(input)

        return call


async def test_client_interceptor_chain(tmp_path: Path) -> None:
    seen: list[str] = []
    async with running_server(tmp_path) as server:
        client = await Client.connect(
            server.address, interceptors=[Tagging("outer", seen), Tagging("inner", seen)]
        )
        async with client:
            assert await client.count_workflows("") == 0
    assert seen[:2] == ["outer:GetSystemInfo", "inner:GetSystemInfo"]
    assert seen[-2:] == ["outer:CountWorkflowExecutions", "inner:CountWorkflowExecutions"]


async def test_worker_in_another_process_joins_the_trace(
    tmp_path: Path, exporter: InMemorySpanExporter, procs: Processes
) -> None:
    tracing = TracingInterceptor(_provider(exporter).get_tracer("test"))
    queue, spans_file = new_id("q"), tmp_path / "worker-spans.jsonl"
    script = Path(__file__).parent / "procs" / "traced_worker.py"
    async with running_server(tmp_path) as server:
        worker = procs.spawn(
            "traced-worker", [sys.executable, str(script), server.address, queue, str(spans_file)]
        )
        await procs.wait_for_line(worker, "worker ready")
        async with await Client.connect(server.address, interceptors=[tracing]) as client:
            handle = await client.start_workflow(
                "Shouter", "hi", id=new_id("shout"), task_queue=queue
            )
            assert await bounded(handle.result()) == "HI!"
        worker.popen.send_signal(signal.SIGTERM)  # spans are written as they end
        assert await bounded(asyncio.to_thread(worker.popen.wait)) == 0, worker.tail()
    (start,) = [s for s in exporter.get_finished_spans() if s.name == "StartWorkflow:Shouter"]
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    by_name: dict[str, list[dict[str, str]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    assert {s["trace_id"] for s in spans} == {f"{start.context.trace_id:032x}"}
    tasks = by_name["RunWorkflowTask:Shouter"]
    assert tasks and all(t["parent"] == f"{start.context.span_id:016x}" for t in tasks)
    starts, runs = by_name["StartActivity:shout"], by_name["RunActivity:shout"]
    assert len(starts) == 2 and len(runs) == 2, by_name.keys()
    assert {r["parent"] for r in runs} == {s["span_id"] for s in starts}
