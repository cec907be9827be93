"""Eager workflow start: the client's half.

A client that shares a process with a running worker of the start's task queue may
ask the server to start the new run's first workflow task in the start's own commit
and return it (``request_eager_start=True``; Temporal's ``request_eager_execution``),
saving a poll and a commit. The worker registers its workflow slots with its client
while it runs; a start asks for the task only when that worker runs the workflow type
and a slot is free right now, and takes the slot before sending. The task the server
returns is handed to the worker's workflow role; a start that comes back without one
(the server declined: an existing run, a delayed first task) releases the slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tideflow.api.v1 import service_pb2

if TYPE_CHECKING:  # the poller imports the client, which imports this module
    from ._poller import Slots

_Send = Callable[[service_pb2.StartWorkflowRequest], Awaitable[service_pb2.StartWorkflowResponse]]


async def let_started_task_send() -> None:
    """One turn of the event loop for a task just started, before the caller goes on.

    A started task runs to its first suspension point; for a task the worker holds
    everything for (a workflow task whose code runs without waiting), that is its
    completion's RPC, which is then sent before whatever the caller sends next (a
    poller's next long poll, a client's result wait). The server serves a
    connection's requests in the order they arrive, and handling a long poll or a
    result wait first delayed the completion behind it by 0.2 to 0.5 ms
    (bench/README.md, "The path measured again on both stores")."""
    await asyncio.sleep(0)


@dataclass(frozen=True, slots=True, eq=False)
class EagerStartTarget:
    """A running worker's workflow role: its slots and the workflow types it runs."""

    slots: Slots[service_pb2.PollWorkflowTaskResponse]
    workflow_types: frozenset[str]
    starts: EagerStarts  # the registry of the worker's client


class EagerStarts:
    """The workers of one client that take eagerly started workflow tasks, by task
    queue (the first registered of a queue is used)."""

    def __init__(self) -> None:
        self._targets: dict[str, list[EagerStartTarget]] = {}

    def register(self, task_queue: str, target: EagerStartTarget) -> None:
        self._targets.setdefault(task_queue, []).append(target)

    def unregister(self, task_queue: str, target: EagerStartTarget) -> None:
        targets = self._targets.get(task_queue, [])
        if target in targets:
            targets.remove(target)
        if not targets:
            self._targets.pop(task_queue, None)

    async def _reserve(self, request: service_pb2.StartWorkflowRequest) -> EagerStartTarget | None:
        for target in self._targets.get(request.task_queue.name, ()):
            if request.workflow_type.name in target.workflow_types and (
                await target.slots.try_reserve()
            ):
                return target
        return None

    async def start(
        self,
        request: service_pb2.StartWorkflowRequest,
        send: _Send,
    ) -> service_pb2.StartWorkflowResponse:
        """Send the start (``send``), asking for its first workflow task if a local
        worker can take it now; a returned task goes to that worker."""
        target = None if request.signal_name else await self._reserve(request)
        request.request_eager_execution = target is not None
        try:
            response = await send(request)
        except BaseException:
            if target is not None:
                target.slots.release()
            raise
        if target is not None:
            if response.eager_workflow_task.task_token:
                target.slots.hand_over(response.eager_workflow_task)
                # Its completion goes out before the caller's next call (its result
                # wait, usually): the server then serves the completion first.
                await let_started_task_send()
            else:
                target.slots.release()
        return response
