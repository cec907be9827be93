"""History in pages that fit the gRPC message limit, however long the run's history is.

A history grows without bound (every event is bounded, their number is not), while one
gRPC message is at most ``grpc_max_message_bytes``. So, as Temporal does:

- ``GetHistory`` returns pages of at most ``history_page_bytes`` (and at most
  ``maximum_page_size`` events), with a ``next_page_token`` while more follow;
- a workflow task (``PollWorkflowTask``, or an eager one returned to an activity
  completion) carries a first page that fits plus a ``next_page_token``; the worker
  fetches the rest with ``GetHistory`` before it runs the task. The engine reads only
  that first page from the store (``first_task_page``), so a task of a long history
  costs one page, not the whole history.

A workflow task's continuation token names the run, the next event id and the last
stored event id of the task, and carries the task's last two events itself
(WorkflowTaskScheduled and WorkflowTaskStarted): for a transient task (a retried
attempt) those two are not in the store. A query task's token names where the run's
buffered events start (they are not in the store either); see ``_continue_query``.

These tokens are sealed like task tokens (server/_task_tokens.py: an HMAC-SHA256 under
the store's keys, with a prefix of their own so that neither kind passes for the
other), and opened before any of their fields is read. Unsealed, a caller allowed to
read a run could forge one: its stored events it may read anyway (GetHistory with a
plain page token), and the events a forged tail carries are only its own echoed back,
but a forged query continuation (``buffered_from`` = the run's next event id) would
hand it the run's buffered events, which are in no history yet (signals and activity
results that arrived while a workflow task runs).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from dataclasses import replace as _replace
from typing import Any

from google.protobuf.message import DecodeError

from tideflow.api.v1 import history_pb2, state_pb2
from tideflow.api.v1.history_pb2 import EventType, HistoryEvent
from tideflow.history import RunKey

from ._errors import FailedPreconditionError, InvalidArgumentError
from ._task_tokens import TaskTokenSigner

# Continuation tokens of workflow and query tasks start with this (then the key id, the
# MAC and the body); GetHistory's own page tokens are the decimal next event id.
_TASK_TOKEN_PREFIX = b"tfh1:"
# Events read per store round trip before the sizes seen so far refine the guess.
# Event ids are int64 in the store.
_MAX_EVENT_ID = 2**63
_FIRST_BATCH = 64
_MAX_BATCH = 1000

ReadEvents = Callable[[RunKey, int, int], Awaitable[list[HistoryEvent]]]
StateOf = Callable[[RunKey], Awaitable[state_pb2.MutableState]]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Continuation:
    run_id: str
    next_event_id: int
    # The last event id to read from the store; later ones come from `tail` or, for a
    # query, from the run's buffered events.
    last_stored_id: int
    tail: tuple[HistoryEvent, ...] = ()
    # Query tasks: the provisional id of the first buffered event (0: not a query).
    buffered_from: int = 0

    def encode(self) -> bytes:
        """The token's body (sealed by ``HistoryPager._seal``)."""
        head = {
            "r": self.run_id,
            "n": self.next_event_id,
            "l": self.last_stored_id,
            "b": self.buffered_from,
        }
        tail = history_pb2.History(events=self.tail).SerializeToString()
        return json.dumps(head).encode() + b"\n" + tail


def _decode(body: bytes) -> _Continuation:
    """The continuation in a token's ``body``: anything but what ``encode`` writes is
    refused as malformed, before any of it reaches the store (an id past int64 was
    answered UNAVAILABLE, Infinity and a deeply nested head INTERNAL). Only a body
    whose seal was checked gets here, so this guards against the server's own
    defects, not against clients."""
    try:
        head, tail = body.split(b"\n", 1)
        fields = json.loads(head)
        events = history_pb2.History.FromString(tail).events
    except (ValueError, RecursionError, DecodeError) as exc:
        # DecodeError is no ValueError in the upb runtime: a corrupt tail was INTERNAL.
        raise InvalidArgumentError("next_page_token is malformed") from exc
    if not isinstance(fields, dict) or not isinstance(fields.get("r"), str):
        raise InvalidArgumentError("next_page_token is malformed")
    ids: list[Any] = [fields.get(name) for name in ("n", "l", "b")]
    # Exact ints (JSON also gives floats, Infinity and booleans) within the store's range.
    if not all(type(value) is int and 0 <= value < _MAX_EVENT_ID for value in ids):
        raise InvalidArgumentError("next_page_token is malformed")
    next_event_id, last_stored_id, buffered_from = ids
    return _Continuation(
        run_id=fields["r"],
        next_event_id=next_event_id,
        last_stored_id=last_stored_id,
        buffered_from=buffered_from,
        tail=tuple(events),
    )


def _fitting(events: Sequence[HistoryEvent], budget: int) -> int:
    """How many of ``events`` (at least one) fit in ``budget`` bytes."""
    used = 0
    for count, event in enumerate(events):
        # A repeated message field costs its size plus a tag and a length varint.
        used += event.ByteSize() + 6
        if used > budget and count:
            return count
    return len(events)


class HistoryPager:
    def __init__(
        self, read_events: ReadEvents, state_of: StateOf, page_bytes: int, signer: TaskTokenSigner
    ) -> None:
        """``signer`` seals and opens the continuation tokens (the store's keys)."""
        self._read_events = read_events
        self._state_of = state_of
        self._page_bytes = page_bytes
        self._signer = signer

    async def _seal(self, cont: _Continuation) -> bytes:
        return await self._signer.seal(cont.encode(), prefix=_TASK_TOKEN_PREFIX)

    async def _open(self, token: bytes) -> _Continuation:
        body = await self._signer.open(token, prefix=_TASK_TOKEN_PREFIX, what="next_page_token")
        return _decode(body)

    async def run_of(self, token: bytes) -> str:
        """The run a task's continuation token belongs to (its seal checked first)."""
        return (await self._open(token)).run_id

    async def read_page(
        self, key: RunKey, first: int, max_events: int, last: int | None = None
    ) -> tuple[list[HistoryEvent], bool]:
        """Stored events from ``first`` (up to ``last``): at most ``max_events`` of them
        and, past the first, at most ``page_bytes`` in all; and whether they reach the
        end of the history (or ``last``)."""
        events: list[HistoryEvent] = []
        used = 0
        batch = min(_FIRST_BATCH, max_events)
        next_id = first
        while len(events) < max_events:
            if last is not None and next_id > last:
                return events, True
            want = min(batch, max_events - len(events))
            if last is not None:
                want = min(want, last - next_id + 1)
            read = await self._read_events(key, next_id, want)
            for event in read:
                size = event.ByteSize() + 6
                if events and used + size > self._page_bytes:
                    return events, False
                events.append(event)
                used += size
            if len(read) < want:
                return events, True
            next_id = events[-1].event_id + 1
            # Read about as many as the budget left holds at the mean size seen.
            mean = max(1, used // len(events))
            batch = max(1, min(_MAX_BATCH, (self._page_bytes - used) // mean + 1))
        return events, last is not None and next_id > last

    async def first_task_page(
        self,
        key: RunKey,
        stored: tuple[int, int] | Sequence[HistoryEvent],
        unstored: Sequence[HistoryEvent],
        *,
        buffered_from: int = 0,
    ) -> tuple[list[HistoryEvent], bytes]:
        """The first page of a workflow or query task's history that fits, and the
        ``next_page_token`` the worker fetches the rest with (empty if none).

        The history is the stored events ``stored`` (the events themselves when a
        cache holds them, else the (first, last) ids: then no more is read from the
        store than the page needs, so a long history costs one page per task, not a
        full read), then ``unstored``: a transient task's scheduled/started events, or
        a query's buffered events, whose provisional ids start at ``buffered_from``
        (the run's next event id; 0 for a workflow task).
        """
        if isinstance(stored, tuple):
            first, last = stored
            events, complete = await self.read_page(key, first, max(0, last - first + 1), last)
            if not complete:
                # The page is full before the stored events end: the unstored ones
                # travel in the token (a query reads its buffered events again then).
                cont = _Continuation(
                    run_id=key.run_id,
                    next_event_id=events[-1].event_id + 1,
                    last_stored_id=buffered_from - 1 if buffered_from else last,
                    tail=() if buffered_from else tuple(unstored),
                    buffered_from=buffered_from,
                )
                return events, await self._seal(cont)
        else:
            events = list(stored)
        events.extend(unstored)
        keep = _fitting(events, self._page_bytes)
        if keep == len(events):
            return events, b""
        rest = events[keep:]
        if buffered_from:
            cont = _Continuation(
                run_id=key.run_id,
                next_event_id=rest[0].event_id,
                last_stored_id=buffered_from - 1,
                buffered_from=buffered_from,
            )
        else:
            tail = _task_events(events)
            cont = _Continuation(
                run_id=key.run_id,
                next_event_id=rest[0].event_id,
                last_stored_id=tail[0].event_id - 1 if tail else events[-1].event_id,
                tail=tail,
            )
        return events[:keep], await self._seal(cont)

    async def continue_task(
        self, key: RunKey, token: bytes, max_events: int
    ) -> tuple[list[HistoryEvent], bytes]:
        """The next page of a workflow or query task's history, and the token after it."""
        cont = await self._open(token)
        if cont.run_id != key.run_id:
            raise InvalidArgumentError("next_page_token belongs to another run")
        if cont.buffered_from:
            return await self._continue_query(key, cont, max_events)
        first = cont.next_event_id
        if first <= cont.last_stored_id:
            events, _ = await self.read_page(key, first, max_events, cont.last_stored_id)
            if not events:
                raise FailedPreconditionError("the events of next_page_token are gone")
        else:
            rest = [e for e in cont.tail if e.event_id >= first]
            events = rest[: min(max_events, _fitting(rest, self._page_bytes))]
        if not events:
            return [], b""
        following = events[-1].event_id + 1
        if following > cont.last_stored_id and all(e.event_id < following for e in cont.tail):
            return events, b""
        return events, await self._seal(_replace(cont, next_event_id=following))

    async def _continue_query(
        self, key: RunKey, cont: _Continuation, max_events: int
    ) -> tuple[list[HistoryEvent], bytes]:
        """A query sees the run as it is when each page is read: stored events, then the
        buffered ones with provisional ids from the run's next event id. Only once some
        of those were served must the run stay put (a completed task stores them under
        other ids); if it moved on then, the query fails and its caller retries it."""
        first = cont.next_event_id
        ms = await self._state_of(key)
        if first > cont.buffered_from and ms.next_event_id != cont.buffered_from:
            raise FailedPreconditionError(
                "the run moved on while its query task's history was read; retry the query"
            )
        buffered = []
        for offset, event in enumerate(ms.buffered_events):
            copy = HistoryEvent()
            copy.CopyFrom(event)
            copy.event_id = ms.next_event_id + offset
            buffered.append(copy)
        if first < ms.next_event_id:
            events, _ = await self.read_page(key, first, max_events, ms.next_event_id - 1)
        else:
            rest = [e for e in buffered if e.event_id >= first]
            events = rest[: min(max_events, _fitting(rest, self._page_bytes))]
        if not events:
            return [], b""
        following = events[-1].event_id + 1
        if following >= ms.next_event_id + len(buffered):
            return events, b""
        nxt = _replace(cont, next_event_id=following, buffered_from=ms.next_event_id)
        return events, await self._seal(nxt)


def is_task_token(token: bytes) -> bool:
    return token.startswith(_TASK_TOKEN_PREFIX)


def _task_events(events: Sequence[HistoryEvent]) -> tuple[HistoryEvent, ...]:
    """A workflow task's history ends with its WorkflowTaskScheduled and -Started events
    (not stored yet for a transient attempt): they travel in the token."""
    if (
        len(events) >= 2
        and events[-2].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED
        and events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED
    ):
        return (events[-2], events[-1])
    return ()
