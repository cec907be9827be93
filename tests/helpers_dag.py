"""What the DAG suites (test_dag_runs.py, test_dag_control.py) share: a worker running
the interpreter workflow, a logical clock for executors, and the replay check.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from tideflow.worker_sdk import Client, Worker, dag
from tideflow.worker_sdk.dag import (
    DagWorkflow,
    ExponentialBackoff,
    RetryPolicy,
    Task,
    Workflow,
    WorkflowStatus,
)

FAST = ExponentialBackoff(timedelta(milliseconds=50), timedelta(milliseconds=200))


@asynccontextmanager
async def dag_worker(client: Client, queue: str, activities: list[Any]) -> AsyncIterator[Worker]:
    async with Worker(
        client, task_queue=queue, workflows=[DagWorkflow], activities=activities
    ) as worker:
        yield worker


class Clock:
    """A logical clock: executors take ticks instead of reading time."""

    def __init__(self) -> None:
        self._ticks = itertools.count(1)

    def tick(self) -> int:
        return next(self._ticks)


async def history_types(handle: dag.DagHandle) -> list[int]:
    return [e.event_type for e in (await handle.workflow.fetch_history()).events]


def etl_definition() -> Workflow:
    """The document's ETL example, with its builder calls."""
    wf = dag.new_workflow("data-etl-process", "1.0.0")
    extract = (
        dag.new_task("extract-data")
        .with_executor("data-connector")
        .with_parameter("source", "postgres")
        .with_parameter("query", "SELECT * FROM events")
        .with_timeout(timedelta(minutes=5))
        .with_retry_policy(
            RetryPolicy(
                max_attempts=3,
                backoff=ExponentialBackoff(timedelta(seconds=1), timedelta(seconds=30)),
            )
        )
    )
    transform = (
        dag.new_task("transform-data")
        .with_executor("data-transformer")
        .with_parameter("operations", ["filter.removeNull", "format.timestamp", "enrich.geoip"])
        .with_parameter("rows", "${tasks.extract-data.result.rows}")
        .with_timeout(timedelta(minutes=10))
        .depends_on(extract.id)
    )
    load = (
        dag.new_task("load-data")
        .with_executor("data-writer")
        .with_parameter("destination", "elasticsearch")
        .with_parameter("index", "events-processed")
        .with_timeout(timedelta(minutes=5))
        .depends_on(transform)
    )
    wf.add_task(extract)
    wf.add_task(transform)
    wf.add_task(load)
    return wf


def workflow_of(*tasks: Task, **kwargs: Any) -> Workflow:
    return Workflow("w", "1", tasks=tasks, **kwargs)


async def paused_status(handle: dag.DagHandle, status: WorkflowStatus) -> bool:
    return (await handle.status()).status is status
