"""The site inbox: signals, cancels and terminates for runs homed at another site
(tla/Replication.tla ``SendSignal``, ``ForwardSignal``, ``DeliverSignal``).

A request that reaches a site holding only a replica of its run is stored durably in
the site's inbox (a set keyed by namespace, request id and kind: a retried request
merges into the entry already there) and acknowledged: the client hears that it is
pending delivery. While the link to the run's home is up, the inbox forwards it with
the client's request id; the home applies each request id once (signals by
``signal_request_ids``, a cancel once per run, a terminate once), so a request
forwarded twice, or lost and forwarded again, changes the run once. An entry stays
until this site's replica shows its effect (or shows the run closed, after which
nothing applies); if a handoff made this site the home meanwhile, it applies it here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from tideflow.api.v1 import replication_pb2 as rp
from tideflow.api.v1 import state_pb2
from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus as WS
from tideflow.history import HistoryStore, InboxEntry, RunKey, home_of, now_micros

from ._engine import HistoryEngine
from ._errors import FailedPreconditionError, NotFoundError, NotHomeError, UnavailableError
from ._replication import PeerStats
from ._replication_trace import ReplicationTracer
from ._site_link import LinkDown, SiteLink, message_of

log = logging.getLogger("tideflow.server.inbox")

KIND_SIGNAL = 1
KIND_CANCEL = 2
KIND_TERMINATE = 3
_KINDS = {"signal": KIND_SIGNAL, "cancel": KIND_CANCEL, "terminate": KIND_TERMINATE}
_TRACE_KINDS = {kind: name for name, kind in _KINDS.items()}
# A forwarded entry whose effect the replica does not show yet is sent again after
# this long (the home dedups it): the reply or the replication may have been lost.
_RESEND_AFTER_S = 3.0
# How long a client waits for a forward while the link is up before it is told
# "pending delivery".
_DIRECT_FORWARD_S = 5.0


def _inner(request: rp.ForwardedRequest) -> object:
    which = request.WhichOneof("request")
    assert which is not None
    return getattr(request, which)


def forwarded_run(request: rp.ForwardedRequest) -> RunKey:
    """The run a forwarded request acts on."""
    inner = _inner(request)
    execution = inner.workflow_execution  # type: ignore[attr-defined]
    return RunKey(
        namespace=inner.namespace,  # type: ignore[attr-defined]
        workflow_id=execution.workflow_id,
        run_id=execution.run_id,
    )


async def apply_request(
    engine: HistoryEngine, request: rp.ForwardedRequest
) -> rp.ForwardedResponse:
    """Apply a forwarded request at the run's home (``DeliverSignal`` + the engine's
    ``ApplySignal``): "applied" (now or before), "closed", "not_found" or "not_home"."""
    try:
        key = forwarded_run(request)
        key = await engine.resolve_run_id(key.namespace, key.workflow_id, key.run_id)
        which = request.WhichOneof("request")
        if which == "signal":
            s = request.signal
            await engine.signal(
                key,
                s.signal_name,
                s.input if s.HasField("input") else None,
                s.identity,
                s.request_id,
                s.header if s.HasField("header") else None,
            )
        elif which == "cancel":
            c = request.cancel
            await engine.request_cancel(key, c.identity, c.request_id, c.reason)
        else:
            t = request.terminate
            details = t.details if t.HasField("details") else None
            await engine.terminate(key, t.reason, details, t.identity, t.request_id)
    except NotHomeError as error:
        return rp.ForwardedResponse(outcome="not_home", detail=error.home)
    except FailedPreconditionError as error:
        return rp.ForwardedResponse(outcome="closed", detail=error.message)
    except NotFoundError as error:
        return rp.ForwardedResponse(outcome="not_found", detail=error.message)
    return rp.ForwardedResponse(outcome="applied")


def _shows(kind: int, request_id: str, ms: state_pb2.MutableState) -> bool:
    """Whether the replica shows the request's effect, or that it can have none."""
    if ms.status != WS.WORKFLOW_EXECUTION_STATUS_RUNNING:
        return True
    if kind == KIND_SIGNAL:
        return request_id in ms.signal_request_ids
    if kind == KIND_CANCEL:
        return ms.cancel_requested
    return False


class Inbox:
    def __init__(
        self,
        store: HistoryStore,
        engine: HistoryEngine,
        site: str,
        link_to: Callable[[str], SiteLink | None],
        stats: Callable[[str], PeerStats],
        *,
        tracer: ReplicationTracer | None = None,
    ) -> None:
        self._store = store
        self._engine = engine
        self._site = site
        self._link_to = link_to
        self._stats = stats
        self._tracer = tracer or ReplicationTracer(None, "")
        self.changed = asyncio.Event()
        self._sent: dict[tuple[str, str, int], float] = {}
        # A site of several nodes (server/_site_nodes.py): where a request is applied
        # at its home (the owner of the run's shard), and whether this node holds a
        # run's shard (its engine reads and caches the run; other runs are read from
        # the store).
        self.apply_at_home: Callable[[rp.ForwardedRequest], Awaitable[rp.ForwardedResponse]] = (
            lambda request: apply_request(engine, request)
        )
        self.owns: Callable[[RunKey], bool] = lambda key: True

    def sent_remembered(self) -> int:
        """Entries forwarded and not retired yet (each is forgotten when retired)."""
        return len(self._sent)

    async def accept(self, request: rp.ForwardedRequest, key: RunKey, home: str) -> bool:
        """Store a request for ``key`` (homed at ``home``), then try to hand it over
        at once; True while it is pending delivery (the link is down or slow)."""
        inner = _inner(request)
        if not inner.request_id:  # type: ignore[attr-defined]
            inner.request_id = str(uuid.uuid4())  # type: ignore[attr-defined]
        # Pinned to the run the request reached (a later run of the id is not it).
        inner.workflow_execution.run_id = key.run_id  # type: ignore[attr-defined]
        which = request.WhichOneof("request")
        assert which is not None
        entry = InboxEntry(
            namespace=key.namespace,
            request_id=inner.request_id,  # type: ignore[attr-defined]
            kind=_KINDS[which],
            workflow_id=key.workflow_id,
            run_id=key.run_id,
            request=request.SerializeToString(),
            received_at=now_micros(),
            attempts=0,
        )
        # The home it was addressed to: a child's request may be stored before this
        # site holds its replica (server/_remote_children.py; Replication.tla
        # AddressChild).
        seq = self._trace("InboxStored", entry, home=home)
        await self._store.replication.put_inbox(entry)
        self._tracer.outcome(seq, "ok")
        self.changed.set()
        link = self._link_to(home)
        if link is None:
            return True
        try:
            async with asyncio.timeout(_DIRECT_FORWARD_S):
                outcome = await self._forward(link, entry)
        except (TimeoutError, LinkDown):
            return True
        return outcome != "applied"

    async def forward_loop(self, link: SiteLink) -> None:
        """While the link lasts, hand over (again) what the inbox holds for runs
        homed at ``link.peer``, and retire what the replicas show applied."""
        while not link.closed.is_set():
            self.changed.clear()
            await self.flush(link)
            try:
                async with asyncio.timeout(1.0):
                    await self.changed.wait()
            except TimeoutError:
                pass

    async def flush(self, link: SiteLink | None) -> None:
        loop = asyncio.get_running_loop()
        for entry in await self._store.replication.inbox():
            key = RunKey(
                namespace=entry.namespace, workflow_id=entry.workflow_id, run_id=entry.run_id
            )
            if link is None and not self.owns(key):
                continue  # the node holding the run's shard looks after it
            ms = await self._replica(key)
            if ms is None:
                continue  # no replica yet: kept until there is one
            if _shows(entry.kind, entry.request_id, ms):
                await self._retire(entry)
                self._sent.pop((entry.namespace, entry.request_id, entry.kind), None)
                continue
            home = home_of(ms, self._site)
            if home == self._site:
                # A handoff made this site the home: apply it here.
                request = rp.ForwardedRequest.FromString(entry.request)
                outcome = (await self.apply_at_home(request)).outcome
                if outcome in ("applied", "closed", "not_found"):
                    await self._retire(entry)
                continue
            if link is None or home != link.peer:
                continue
            sent = self._sent.get((entry.namespace, entry.request_id, entry.kind))
            if sent is not None and loop.time() - sent < _RESEND_AFTER_S:
                continue
            await self._forward(link, entry, basis=ms.next_event_id - 1)

    async def _replica(self, key: RunKey) -> state_pb2.MutableState | None:
        """The run's state here: the engine's while this node holds its shard, else
        as stored (another node of this site writes it)."""
        if self.owns(key):
            try:
                return await self._engine.state_of(key)
            except NotFoundError:
                return None
            except UnavailableError:
                pass  # the shard moved meanwhile
        record = await self._store.get_execution(key)
        return None if record is None else state_pb2.MutableState.FromString(record.state)

    async def _forward(self, link: SiteLink, entry: InboxEntry, *, basis: int = 0) -> str:
        """Hand ``entry`` to the home over ``link``; ``basis``: the events of the
        replica that named that home (trace mode; 0 when the caller did not read it)."""
        request = rp.ForwardedRequest.FromString(entry.request)
        self._sent[(entry.namespace, entry.request_id, entry.kind)] = (
            asyncio.get_running_loop().time()
        )
        seq = self._trace("InboxForwarded", entry, to=link.peer, basis=basis)
        response = await link.call("forward", request, rp.ForwardedResponse)
        self._tracer.outcome(seq, "ok")
        self._stats(link.peer).requests_forwarded += 1
        await self._store.replication.note_forwarded(entry, now_micros())
        if response.outcome in ("closed", "not_found"):
            log.info(
                "inbox: %s for %s/%s dropped by %s: %s",
                entry.request_id,
                entry.workflow_id,
                entry.run_id,
                link.peer,
                response.detail,
            )
            await self._retire(entry)
        return response.outcome

    def _trace(self, action: str, entry: InboxEntry, **fields: str | int) -> int:
        """Trace mode: an inbox step (a signal, cancel or terminate), ahead of it."""
        key = RunKey(namespace=entry.namespace, workflow_id=entry.workflow_id, run_id=entry.run_id)
        kind = _TRACE_KINDS[entry.kind]
        return self._tracer.ahead(action, key, sid=entry.request_id, kind=kind, **fields)

    async def _retire(self, entry: InboxEntry) -> None:
        seq = self._trace("InboxRetired", entry)
        await self._store.replication.retire(entry)
        self._tracer.outcome(seq, "ok")

    async def serve_forwarded(self, link: SiteLink, body: bytes) -> rp.ForwardedResponse:
        """A peer forwards a request it holds for a run homed (it thinks) here."""
        return await self.apply_at_home(message_of(body, rp.ForwardedRequest))
