"""Workflow tasks driven over raw gRPC, without the SDK's workflow runtime: the test
chooses every command and the moment it is sent, which is how races between a workflow
task and events arriving meanwhile are made deterministic.

Not a test module (no ``test_`` prefix): test modules import it by name, since pytest
puts ``tests/`` on ``sys.path`` for them.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from tideflow.api.v1 import command_pb2, common_pb2, service_pb2
from tideflow.server import ServerConfig
from tideflow.worker_sdk import Client

CommandType = command_pb2.CommandType

#: The timer of ``cancel_timer_that_fired_during_the_task``: on a server whose clock
#: only the test moves (helpers.SteppedClock) it fires when the test advances the clock
#: by this much, never before.
RACED_TIMER = timedelta(hours=1)
#: The server that race runs on: workflow tasks time out only long after the clock is
#: advanced (the test's order never depends on the task timeout), and the timer queue
#: re-reads the store every half second (when it sees the advanced clock).
TIMER_RACE_CONFIG = ServerConfig(
    timer_window_s=1.0,
    default_workflow_task_timeout_s=(4 * RACED_TIMER).total_seconds(),
    max_workflow_task_timeout_s=(4 * RACED_TIMER).total_seconds(),
)


def start_timer(timer_id: str, *, after: timedelta) -> command_pb2.Command:
    timeout = Duration()
    timeout.FromTimedelta(after)
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_START_TIMER,
        start_timer_command_attributes=command_pb2.StartTimerCommandAttributes(
            timer_id=timer_id, start_to_fire_timeout=timeout
        ),
    )


def cancel_timer(timer_id: str) -> command_pb2.Command:
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_CANCEL_TIMER,
        cancel_timer_command_attributes=command_pb2.CancelTimerCommandAttributes(timer_id=timer_id),
    )


def complete_workflow() -> command_pb2.Command:
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_COMPLETE_WORKFLOW_EXECUTION,
        complete_workflow_execution_command_attributes=(
            command_pb2.CompleteWorkflowExecutionCommandAttributes()
        ),
    )


def continue_as_new(workflow_type: str, task_queue: str) -> command_pb2.Command:
    return command_pb2.Command(
        command_type=CommandType.COMMAND_TYPE_CONTINUE_AS_NEW_WORKFLOW_EXECUTION,
        continue_as_new_workflow_execution_command_attributes=(
            command_pb2.ContinueAsNewWorkflowExecutionCommandAttributes(
                workflow_type=common_pb2.WorkflowType(name=workflow_type),
                task_queue=common_pb2.TaskQueue(name=task_queue),
            )
        ),
    )


def start_request(
    workflow_type: str = "Wf", task_queue: str = "q"
) -> service_pb2.StartWorkflowRequest:
    """A start of a new workflow id in the default namespace, for tests that drive the
    engine directly."""
    return service_pb2.StartWorkflowRequest(
        namespace="default",
        workflow_id=f"w-{uuid.uuid4()}",
        workflow_type=common_pb2.WorkflowType(name=workflow_type),
        task_queue=common_pb2.TaskQueue(name=task_queue),
        request_id=str(uuid.uuid4()),
    )


@dataclass
class RawWorkflows:
    """Start runs of a workflow type nobody implements and answer their tasks by hand."""

    client: Client
    task_queue: str
    workflow_type: str = "Raw"

    @property
    def _queue(self) -> common_pb2.TaskQueue:
        return common_pb2.TaskQueue(name=self.task_queue)

    async def start(self, workflow_id: str, *args: object) -> str:
        """Start a run with ``args`` as its input; its run id."""
        request = service_pb2.StartWorkflowRequest(
            namespace=self.client.namespace,
            workflow_id=workflow_id,
            workflow_type=common_pb2.WorkflowType(name=self.workflow_type),
            task_queue=self._queue,
            request_id=str(uuid.uuid4()),
        )
        if args:
            request.input.CopyFrom(self.client.data_converter.to_payloads(args))
        response: service_pb2.StartWorkflowResponse = await self.client.call(
            self.client.service.StartWorkflow, request
        )
        return response.run_id

    async def poll(self) -> service_pb2.PollWorkflowTaskResponse:
        """The next workflow task of the queue (long polls until there is one)."""
        request = service_pb2.PollWorkflowTaskRequest(
            namespace=self.client.namespace, task_queue=self._queue, identity="raw"
        )
        while True:
            task: service_pb2.PollWorkflowTaskResponse = await self.client.call(
                self.client.service.PollWorkflowTask, request
            )
            if task.task_token:
                return task

    async def complete(
        self, token: bytes, *commands: command_pb2.Command, sticky_queue: str = ""
    ) -> None:
        """Complete a workflow task; with ``sticky_queue``, ask for the run's next
        tasks there (as a caching worker does; a long sticky timeout)."""
        request = service_pb2.RespondWorkflowTaskCompletedRequest(
            task_token=token, commands=commands, identity="raw"
        )
        if sticky_queue:
            sticky = request.sticky_attributes
            sticky.worker_task_queue.name = sticky_queue
            sticky.worker_task_queue.kind = common_pb2.TASK_QUEUE_KIND_STICKY
            sticky.worker_task_queue.normal_name = self.task_queue
            sticky.schedule_to_start_timeout.FromSeconds(600)
        await self.client.call(self.client.service.RespondWorkflowTaskCompleted, request)

    async def give_back(self, sticky_queue: str) -> None:
        """What a worker shutting down sends: its sticky queue's tasks move on."""
        await self.client.call(
            self.client.service.ShutdownWorker,
            service_pb2.ShutdownWorkerRequest(
                namespace=self.client.namespace, sticky_task_queue=sticky_queue, identity="raw"
            ),
        )

    async def signal(self, workflow_id: str, run_id: str, name: str) -> None:
        await self.client.call(
            self.client.service.SignalWorkflow,
            service_pb2.SignalWorkflowRequest(
                namespace=self.client.namespace,
                workflow_execution=common_pb2.WorkflowExecution(
                    workflow_id=workflow_id, run_id=run_id
                ),
                signal_name=name,
                request_id=str(uuid.uuid4()),
            ),
        )

    async def cancel_timer_that_fired_during_the_task(
        self, workflow_id: str, fire: Callable[[str], Awaitable[object]]
    ) -> str:
        """The race a workflow cancelling a timer can lose, made on purpose: the first
        task starts timer ``t1`` (``RACED_TIMER``, which the server's clock reaches only
        when the test advances it); a signal brings a second task; once it is started,
        ``fire(run_id)`` advances the clock past ``t1`` and waits until the engine has
        buffered the fire; then that task cancels ``t1`` and completes the run. Returns
        the run id."""
        run_id = await self.start(workflow_id)
        await self.complete((await self.poll()).task_token, start_timer("t1", after=RACED_TIMER))
        await self.signal(workflow_id, run_id, "go")
        second = await self.poll()
        await fire(run_id)
        await self.complete(second.task_token, cancel_timer("t1"), complete_workflow())
        return run_id
