"""Who serves a task queue: ``DescribeTaskQueue`` (Temporal's name) from a client.

    description = await describe_task_queue(client, "orders")
    if not description.pollers:
        print("no worker polls 'orders'")

The server lists the workers (by identity) that polled the queue in the last five
minutes, most recent first, and the tasks waiting for one on that server node.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tideflow.api.v1 import common_pb2, service_pb2

from .client import Client


@dataclass(frozen=True, slots=True, kw_only=True)
class PollerInfo:
    """One worker that polled the queue; ``polling``: a poll of it waits on the
    queue right now (a running worker keeps one there, except for the moments it
    handles what it got)."""

    identity: str
    last_access_time: datetime
    polling: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskQueueDescription:
    name: str
    activity: bool
    pollers: list[PollerInfo]
    backlog_count_hint: int


async def describe_task_queue(
    client: Client, name: str, *, activity: bool = False
) -> TaskQueueDescription:
    """The pollers of the workflow side of queue ``name`` (``activity=True``: the
    activity side)."""
    request = service_pb2.DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=common_pb2.TaskQueue(name=name),
        task_queue_type=service_pb2.TASK_QUEUE_TYPE_ACTIVITY
        if activity
        else service_pb2.TASK_QUEUE_TYPE_WORKFLOW,
    )
    response = await client.call(client.service.DescribeTaskQueue, request)
    return TaskQueueDescription(
        name=name,
        activity=activity,
        pollers=[
            PollerInfo(
                identity=poller.identity,
                last_access_time=poller.last_access_time.ToDatetime(tzinfo=UTC),
                polling=poller.polling,
            )
            for poller in response.pollers
        ],
        backlog_count_hint=response.backlog_count_hint,
    )
