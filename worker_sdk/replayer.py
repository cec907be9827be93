"""Replaying a recorded history against workflow code, outside any server.

Users run this in their own CI with histories fetched from production
(``handle.fetch_history()`` / ``WorkflowHistory.to_json()``) to prove that a code change
is still deterministic.

Histories must hold decoded payloads: ``fetch_history`` decodes with the client's payload
codec; a history exported without it (encrypted payloads) is decoded first with
``await codec.decode_history(history, converter)``.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from tideflow.api.v1.history_pb2 import EventType

from . import exceptions as exc
from ._workflow_instance import WorkflowInstanceImpl
from .client import WorkflowHistory
from .converter import DataConverter, default_converter
from .workflow import WorkflowDefinition, definition_of


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """Outcome of a replay that found no non-determinism. Awaitable (to itself), so
    ``replayer.replay(h)`` and ``await replayer.replay(h)`` both work."""

    workflow_id: str
    events_replayed: int

    def __await__(self) -> Generator[Any, None, ReplayResult]:
        return self
        yield  # pragma: no cover - makes this a generator


class Replayer:
    def __init__(
        self, *, workflows: Sequence[type], data_converter: DataConverter = default_converter
    ) -> None:
        self._workflows: dict[str, WorkflowDefinition] = {}
        for wf in workflows:
            d = definition_of(wf)
            self._workflows[d.name] = d
        self._converter = data_converter

    def replay(self, history: WorkflowHistory | str) -> ReplayResult:
        """Replay ``history`` (or its JSON); raises ``NonDeterminismError`` on a mismatch."""
        if isinstance(history, str):
            history = WorkflowHistory.from_json(history)
        events = history.events
        if not events or events[0].event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            raise ValueError("a history must start with WorkflowExecutionStarted")
        started = events[0].workflow_execution_started_event_attributes
        definition = self._workflows.get(started.workflow_type.name)
        if definition is None:
            raise ValueError(
                f"workflow type {started.workflow_type.name!r} is not among "
                "the replayer's workflows"
            )
        instance = WorkflowInstanceImpl(  # type: ignore[abstract]
            definition,
            namespace="default",
            workflow_id=history.workflow_id,
            run_id=started.original_execution_run_id,
            task_queue=started.task_queue.name,
            converter=self._converter,
        )
        try:
            instance.process(events, replay_only=True)
        except exc.NonDeterminismError:
            raise
        except Exception as error:
            raise exc.NonDeterminismError(f"replay failed: {error!r}") from error
        finally:
            instance.dispose()
        return ReplayResult(history.workflow_id, len(events))
