"""Schedules: start a workflow on a cron expression or an interval, server-side.

```python
from datetime import timedelta
from tideflow.worker_sdk.schedules import (
    ScheduleActionStartWorkflow, SchedulePolicy, ScheduleOverlapPolicy, ScheduleSpec,
)

handle = await client.create_schedule(
    "nightly-report",
    action=ScheduleActionStartWorkflow(Report.run, "eu", id="report", task_queue="reports"),
    spec=ScheduleSpec(cron="0 2 * * *", time_zone="Europe/Berlin"),  # or interval=...
    policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP,
                          catchup_window=timedelta(hours=1)),
)
await handle.trigger()                  # run now
await handle.pause("maintenance"); await handle.unpause()
print((await handle.describe()).info.recent_actions)
await handle.delete()
```

The server keeps the schedule in its store and fires each slot once, across
restarts: the run of a slot has the workflow id ``<id>-<slot time RFC 3339>`` (e.g.
``report-2024-05-01T02:00:00Z``) and the search attributes ``TemporalScheduledById``
and ``TemporalScheduledStartTime``. Slots missed while the server was down are taken
on restart if at most ``catchup_window`` late, and recorded as skipped otherwise.
Names follow Temporal's Python SDK (``temporalio.client``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from tideflow.api.search_attributes import (
    SearchAttributeValue,
    decode_search_attributes,
    encode_search_attributes,
)
from tideflow.api.v1 import service_pb2

from . import exceptions as exc
from .common import RetryPolicy
from .converter import DataConverter
from .workflow import definition_of

if TYPE_CHECKING:
    from .client import Client

_DEFAULT_CATCHUP_WINDOW = timedelta(days=365)


class ScheduleAlreadyRunningError(exc.RPCError):
    """A schedule with this id already exists."""


class ScheduleOverlapPolicy(IntEnum):
    """What a schedule does when it fires while a workflow it started still runs."""

    SKIP = 1  # do not start this one
    BUFFER_ONE = 2  # start it when the running one closes; buffer at most one
    BUFFER_ALL = 3  # start each, one after the other
    CANCEL_OTHER = 4  # cancel the running one, start this one once it has closed
    TERMINATE_OTHER = 5  # terminate the running one and start this one
    ALLOW_ALL = 6  # start it anyway


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleIntervalSpec:
    """Every ``every`` since the Unix epoch, shifted by ``offset``."""

    every: timedelta
    offset: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSpec:
    """When a schedule fires: ``cron`` (five fields, e.g. ``"*/5 * * * *"``) and/or
    ``interval`` (at least one second; ``offset`` shifts it), plus any further
    ``cron_expressions`` / ``intervals``. Slots fire only within ``start_at`` ..
    ``end_at`` when those are set.

    ``time_zone`` is the IANA zone the cron expressions are read in (e.g.
    ``"Europe/Berlin"``; None is UTC); an unknown zone is refused with
    ``InvalidArgumentError``. Across daylight-saving changes a job at a fixed time
    fires as cron runs it: once, at the first minute after the gap, when its time is
    skipped in spring; once, at the first occurrence, when its time repeats in autumn.
    Intervals count from the Unix epoch whatever the zone."""

    cron: str | None = None
    interval: timedelta | None = None
    offset: timedelta = timedelta(0)
    cron_expressions: Sequence[str] = ()
    intervals: Sequence[ScheduleIntervalSpec] = ()
    start_at: datetime | None = None
    end_at: datetime | None = None
    time_zone: str | None = None

    def to_proto(self) -> service_pb2.ScheduleSpec:
        proto = service_pb2.ScheduleSpec(timezone_name=self.time_zone or "")
        crons = ([self.cron] if self.cron is not None else []) + list(self.cron_expressions)
        proto.cron_expressions.extend(crons)
        intervals = list(self.intervals)
        if self.interval is not None:
            intervals.insert(0, ScheduleIntervalSpec(every=self.interval, offset=self.offset))
        for item in intervals:
            interval = proto.intervals.add()
            interval.interval.FromTimedelta(item.every)
            interval.phase.FromTimedelta(item.offset)
        if self.start_at is not None:
            proto.start_time.CopyFrom(_timestamp(self.start_at))
        if self.end_at is not None:
            proto.end_time.CopyFrom(_timestamp(self.end_at))
        return proto

    @staticmethod
    def from_proto(proto: service_pb2.ScheduleSpec) -> ScheduleSpec:
        crons = list(proto.cron_expressions)
        intervals = [
            ScheduleIntervalSpec(every=i.interval.ToTimedelta(), offset=i.phase.ToTimedelta())
            for i in proto.intervals
        ]
        first_interval = intervals.pop(0) if intervals else None
        return ScheduleSpec(
            cron=crons[0] if crons else None,
            cron_expressions=tuple(crons[1:]),
            interval=first_interval.every if first_interval else None,
            offset=first_interval.offset if first_interval else timedelta(0),
            intervals=tuple(intervals),
            start_at=_datetime(proto.start_time) if proto.HasField("start_time") else None,
            end_at=_datetime(proto.end_time) if proto.HasField("end_time") else None,
            time_zone=proto.timezone_name or None,
        )


class ScheduleActionStartWorkflow:
    """The workflow a schedule starts: like ``client.start_workflow``'s arguments.
    ``id`` is the prefix of each run's workflow id."""

    def __init__(
        self,
        workflow: Any,
        arg: Any = None,
        *,
        args: Sequence[Any] = (),
        id: str,
        task_queue: str,
        execution_timeout: timedelta | None = None,
        run_timeout: timedelta | None = None,
        task_timeout: timedelta | None = None,
        retry_policy: RetryPolicy | None = None,
        memo: Mapping[str, Any] | None = None,
        search_attributes: Mapping[str, SearchAttributeValue] | None = None,
    ) -> None:
        self.workflow: str = workflow if isinstance(workflow, str) else definition_of(workflow).name
        self.args: list[Any] = list(args) if args else ([] if arg is None else [arg])
        self.id = id
        self.task_queue = task_queue
        self.execution_timeout = execution_timeout
        self.run_timeout = run_timeout
        self.task_timeout = task_timeout
        self.retry_policy = retry_policy
        self.memo = dict(memo or {})
        self.search_attributes = dict(search_attributes or {})

    def __repr__(self) -> str:
        return (
            f"ScheduleActionStartWorkflow({self.workflow!r}, args={self.args!r}, id={self.id!r}, "
            f"task_queue={self.task_queue!r})"
        )

    def to_proto(self, converter: DataConverter) -> service_pb2.ScheduleAction:
        proto = service_pb2.ScheduleAction()
        info = proto.start_workflow
        info.workflow_id = self.id
        info.workflow_type.name = self.workflow
        info.task_queue.name = self.task_queue
        info.input.CopyFrom(converter.to_payloads(self.args))
        for name, value in (
            ("workflow_execution_timeout", self.execution_timeout),
            ("workflow_run_timeout", self.run_timeout),
            ("workflow_task_timeout", self.task_timeout),
        ):
            if value is not None:
                getattr(info, name).FromTimedelta(value)
        if self.retry_policy is not None:
            info.retry_policy.CopyFrom(self.retry_policy.to_proto())
        if self.memo:
            for key, value in self.memo.items():
                info.memo.fields[key].CopyFrom(converter.payload_converter.to_payload(value))
        if self.search_attributes:
            info.search_attributes.CopyFrom(encode_search_attributes(self.search_attributes))
        return proto

    @staticmethod
    def from_proto(
        proto: service_pb2.ScheduleAction, converter: DataConverter
    ) -> ScheduleActionStartWorkflow:
        info = proto.start_workflow

        def duration(name: str) -> timedelta | None:
            return getattr(info, name).ToTimedelta() if info.HasField(name) else None

        return ScheduleActionStartWorkflow(
            info.workflow_type.name,
            args=converter.from_payloads(info.input),
            id=info.workflow_id,
            task_queue=info.task_queue.name,
            execution_timeout=duration("workflow_execution_timeout"),
            run_timeout=duration("workflow_run_timeout"),
            task_timeout=duration("workflow_task_timeout"),
            retry_policy=RetryPolicy.from_proto(info.retry_policy)
            if info.HasField("retry_policy")
            else None,
            memo={
                k: converter.payload_converter.from_payload(v) for k, v in info.memo.fields.items()
            },
            search_attributes={
                k: v
                for k, v in decode_search_attributes(info.search_attributes).items()
                if v is not None
            },
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulePolicy:
    """``overlap``: see ScheduleOverlapPolicy. ``catchup_window``: a slot missed while
    the server was down is still taken if at most this late (default one year)."""

    overlap: ScheduleOverlapPolicy = ScheduleOverlapPolicy.SKIP
    catchup_window: timedelta = _DEFAULT_CATCHUP_WINDOW

    def to_proto(self) -> service_pb2.SchedulePolicies:
        proto = service_pb2.SchedulePolicies(overlap_policy=int(self.overlap))  # type: ignore[arg-type]
        proto.catchup_window.FromTimedelta(self.catchup_window)
        return proto

    @staticmethod
    def from_proto(proto: service_pb2.SchedulePolicies) -> SchedulePolicy:
        return SchedulePolicy(
            overlap=ScheduleOverlapPolicy(proto.overlap_policy or ScheduleOverlapPolicy.SKIP),
            catchup_window=proto.catchup_window.ToTimedelta() or _DEFAULT_CATCHUP_WINDOW,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleState:
    note: str = ""
    paused: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Schedule:
    action: ScheduleActionStartWorkflow
    spec: ScheduleSpec
    policy: SchedulePolicy = field(default_factory=SchedulePolicy)
    state: ScheduleState = field(default_factory=ScheduleState)

    def to_proto(self, converter: DataConverter) -> service_pb2.Schedule:
        proto = service_pb2.Schedule()
        proto.spec.CopyFrom(self.spec.to_proto())
        proto.action.CopyFrom(self.action.to_proto(converter))
        proto.policies.CopyFrom(self.policy.to_proto())
        proto.state.notes = self.state.note
        proto.state.paused = self.state.paused
        return proto

    @staticmethod
    def from_proto(proto: service_pb2.Schedule, converter: DataConverter) -> Schedule:
        return Schedule(
            action=ScheduleActionStartWorkflow.from_proto(proto.action, converter),
            spec=ScheduleSpec.from_proto(proto.spec),
            policy=SchedulePolicy.from_proto(proto.policies),
            state=ScheduleState(note=proto.state.notes, paused=proto.state.paused),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleActionExecutionStartWorkflow:
    """A workflow run a schedule started."""

    workflow_id: str
    first_execution_run_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleActionResult:
    scheduled_at: datetime  # the slot (or the time of the trigger)
    started_at: datetime
    action: ScheduleActionExecutionStartWorkflow
    triggered: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleSkippedAction:
    """A slot that did not start a workflow. ``reason``: "catchup_window" (missed by
    more than the catch-up window), "overlap" (the overlap policy) or "failed" (the
    start was refused; ``message`` says why)."""

    scheduled_at: datetime
    reason: str
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleInfo:
    num_actions: int
    num_actions_missed_catchup_window: int
    num_actions_skipped_overlap: int
    num_actions_buffered: int
    num_actions_pending: int  # decided to start, not started yet
    running_actions: list[ScheduleActionExecutionStartWorkflow]
    recent_actions: list[ScheduleActionResult]  # oldest first, at most 10
    recent_skipped: list[ScheduleSkippedAction]  # oldest first, at most 20
    next_action_times: list[datetime]
    created_at: datetime
    last_updated_at: datetime | None

    @staticmethod
    def from_proto(proto: service_pb2.ScheduleInfo) -> ScheduleInfo:
        return ScheduleInfo(
            num_actions=proto.action_count,
            num_actions_missed_catchup_window=proto.missed_catchup_window,
            num_actions_skipped_overlap=proto.overlap_skipped,
            num_actions_buffered=proto.buffered_actions,
            num_actions_pending=proto.pending_actions,
            running_actions=[
                ScheduleActionExecutionStartWorkflow(
                    workflow_id=w.workflow_id, first_execution_run_id=w.run_id
                )
                for w in proto.running_workflows
            ],
            recent_actions=[
                ScheduleActionResult(
                    scheduled_at=_datetime(r.schedule_time),
                    started_at=_datetime(r.actual_time),
                    action=ScheduleActionExecutionStartWorkflow(
                        workflow_id=r.start_workflow_result.workflow_id,
                        first_execution_run_id=r.start_workflow_result.run_id,
                    ),
                    triggered=r.triggered,
                )
                for r in reversed(proto.recent_actions)
            ],
            recent_skipped=[
                ScheduleSkippedAction(
                    scheduled_at=_datetime(s.schedule_time), reason=s.reason, message=s.message
                )
                for s in reversed(proto.recent_skipped)
            ],
            next_action_times=[_datetime(t) for t in proto.future_action_times],
            created_at=_datetime(proto.create_time),
            last_updated_at=_datetime(proto.update_time) if proto.HasField("update_time") else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleDescription:
    """What ``ScheduleHandle.describe`` returns."""

    id: str
    schedule: Schedule
    info: ScheduleInfo
    raw: service_pb2.DescribeScheduleResponse

    @property
    def paused(self) -> bool:
        return self.schedule.state.paused


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleListDescription:
    """One schedule as ``client.list_schedules`` returns it (``info`` without the
    recent and running actions)."""

    id: str
    schedule: Schedule
    info: ScheduleInfo


class ScheduleHandle:
    """A schedule on the server; ``client.create_schedule`` and
    ``client.get_schedule_handle`` return one."""

    def __init__(self, client: Client, id: str) -> None:
        self._client = client
        self.id = id

    async def _patch(self, patch: service_pb2.SchedulePatch, request_id: str | None) -> None:
        client = self._client
        request = service_pb2.PatchScheduleRequest(
            namespace=client.namespace,
            schedule_id=self.id,
            identity=client.identity,
            request_id=request_id or str(uuid.uuid4()),
        )
        request.patch.CopyFrom(patch)
        await client.call(client.service.PatchSchedule, request)

    async def pause(self, note: str | None = None) -> None:
        """Stop firing until ``unpause`` (slots that pass meanwhile are not caught up)."""
        await self._patch(service_pb2.SchedulePatch(pause=True, note=note or "paused"), None)

    async def unpause(self, note: str | None = None) -> None:
        """Fire again, from the next slot after now."""
        await self._patch(service_pb2.SchedulePatch(unpause=True, note=note or ""), None)

    async def trigger(
        self, overlap: ScheduleOverlapPolicy | None = None, *, request_id: str | None = None
    ) -> None:
        """Take the action now (``overlap``: this once, instead of the schedule's
        policy). Retrying with the same ``request_id`` triggers once."""
        patch = service_pb2.SchedulePatch()
        patch.trigger_immediately.overlap_policy = int(overlap or 0)  # type: ignore[assignment]
        await self._patch(patch, request_id)

    async def describe(self) -> ScheduleDescription:
        client = self._client
        response = await client.call(
            client.service.DescribeSchedule,
            service_pb2.DescribeScheduleRequest(namespace=client.namespace, schedule_id=self.id),
        )
        return ScheduleDescription(
            id=self.id,
            schedule=Schedule.from_proto(response.schedule, client.data_converter),
            info=ScheduleInfo.from_proto(response.info),
            raw=response,
        )

    async def delete(self) -> None:
        """Delete the schedule; workflows it started keep running."""
        client = self._client
        await client.call(
            client.service.DeleteSchedule,
            service_pb2.DeleteScheduleRequest(
                namespace=client.namespace, schedule_id=self.id, identity=client.identity
            ),
        )


def _timestamp(moment: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC))
    return ts


def _datetime(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)
