"""A task's completion is sent before what the worker or client sends next.

The server serves requests in the order they arrive, so a poller's next long poll or
a client's result wait sent ahead of a workflow task's completion delays that
completion by its handling (bench/README.md, "The path measured again"). Two
places hand a task to a handler task and then go on sending: a poller that got a
task (it polls again) and an eager start (its caller waits for the result next).
Both let the handler run to its first suspension point first: its completion RPC,
for a task whose code runs without waiting. Checked on the SDK's own objects with a
handler and a "send" that record what was sent, in order (asyncio's ready queue is
FIFO, so the order is deterministic).
"""

from __future__ import annotations

import asyncio

from tideflow.api.v1 import service_pb2
from tideflow.worker_sdk._eager_start import EagerStarts, EagerStartTarget
from tideflow.worker_sdk._poller import PollLoop, Slots


async def test_a_poller_polls_again_after_its_task_sent_its_completion() -> None:
    sent: list[str] = []
    polls = 0
    parked = asyncio.Event()

    async def poll(queue: str) -> str | None:
        nonlocal polls
        polls += 1
        sent.append(f"poll {polls}")
        if polls == 1:
            return "task"
        parked.set()
        await asyncio.Event().wait()  # a long poll that gets nothing
        return None

    async def handle(task: str) -> None:
        sent.append(f"completion of {task}")

    loop = PollLoop(
        role="workflow task",
        queues=["q"],
        pollers=1,
        slots=Slots[str](4),
        poll=poll,
        handle=handle,
        describe=str,
    )
    async with loop.running():
        await parked.wait()
    assert sent == ["poll 1", "completion of task", "poll 2"]


async def test_an_eager_start_returns_after_its_task_sent_its_completion() -> None:
    sent: list[str] = []
    slots = Slots[service_pb2.PollWorkflowTaskResponse](1)
    handlers: list[asyncio.Task[None]] = []

    async def complete(task: service_pb2.PollWorkflowTaskResponse) -> None:
        sent.append(f"completion of {task.workflow_execution.workflow_id}")

    slots.receive(lambda task: handlers.append(asyncio.create_task(complete(task))))
    starts = EagerStarts()
    starts.register("q", EagerStartTarget(slots, frozenset({"Wf"}), starts))

    async def send(request: service_pb2.StartWorkflowRequest) -> service_pb2.StartWorkflowResponse:
        sent.append(f"start of {request.workflow_id}")
        assert request.request_eager_execution
        response = service_pb2.StartWorkflowResponse(run_id="r")
        response.eager_workflow_task.task_token = b"token"
        response.eager_workflow_task.workflow_execution.workflow_id = request.workflow_id
        return response

    request = service_pb2.StartWorkflowRequest(workflow_id="wf-1")
    request.task_queue.name = "q"
    request.workflow_type.name = "Wf"
    await starts.start(request, send)
    sent.append("result wait")
    await asyncio.gather(*handlers)
    assert sent == ["start of wf-1", "completion of wf-1", "result wait"]
