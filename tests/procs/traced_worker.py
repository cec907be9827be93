"""A worker with OpenTelemetry tracing in its own process (tests/test_tracing.py).

    python tests/procs/traced_worker.py HOST:PORT TASK_QUEUE SPANS_FILE

Runs test_tracing's ``Shouter`` (two ``shout`` activities around a timer) with
``TracingInterceptor`` on a tracer provider of its own, which appends each finished
span to SPANS_FILE as one JSON line (name, trace id, span id, parent span id, hex).
Prints ``worker ready`` once its pollers run and stops on SIGTERM. Nothing but the
task's headers and gRPC metadata can tell this process which trace a task belongs to.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from tideflow.worker_sdk import Client, Worker
from tideflow.worker_sdk.tracing import TracingInterceptor

# The very workflow and activity of the in-process tracing test (tests/ on the path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_tracing import Shouter, shout


class JsonLinesExporter(SpanExporter):
    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self.path.open("a") as out:
            for span in spans:
                assert span.context is not None
                record = {
                    "name": span.name,
                    "trace_id": f"{span.context.trace_id:032x}",
                    "span_id": f"{span.context.span_id:016x}",
                    "parent": f"{span.parent.span_id:016x}" if span.parent else None,
                }
                out.write(json.dumps(record) + "\n")
        return SpanExportResult.SUCCESS


async def main(address: str, task_queue: str, spans_file: str) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(Path(spans_file))))
    tracing = TracingInterceptor(provider.get_tracer("traced-worker"))
    client = await Client.connect(address)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[Shouter],
        activities=[shout],
        interceptors=[tracing],
    )
    async with worker:
        print("worker ready", flush=True)
        await stop.wait()
    await client.close()
    provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
