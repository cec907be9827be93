"""Between the shared metadata document (server/_site_metadata.py) and this site's
store: local writes of schedules and namespaces are recorded in the document; entries a
peer's update changed are applied to the store.

The API the sites' link calls (over the stream the edge dialled, in both directions):

    sv = here.metadata.state_vector()          # on one side
    update = there.metadata.diff(sv)           # on the other
    await here.metadata_sync.merge(update)     # back here: merged, stored, applied

``merge`` is idempotent: any order, any duplication, the same document and store.

What is applied, and how:
- ``namespaces``: created if missing (description, retention). A namespace is never
  deleted by a merge (the store has no namespace deletion).
- ``schedules``: a schedule the document has and the store lacks is created (from the
  definition, its next fire time computed here); one whose definition changed is
  replaced (deleted and created: its action ledger and counters start over); one
  deleted in the document is deleted. Pause state and notes are each site's own.
- ``search_attributes`` and ``sites``: kept in the document only (custom search
  attributes need no registration in the store; site records are read from it).

Merges change the store through the scheduler and the store directly, never through
the RPCs that record local writes, so an applied entry is not written back into the
document as a new local write (which would ping-pong between the sites).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from typing import Any

from tideflow.api.v1 import service_pb2
from tideflow.history import HistoryStore

from ._errors import NotFoundError, ScheduleAlreadyExistsError
from ._schedules import Scheduler
from ._site_metadata import Change, SiteMetadata

log = logging.getLogger("tideflow.server.metadata")


def schedule_key(namespace: str, schedule_id: str) -> str:
    return json.dumps([namespace, schedule_id])


class MetadataSync:
    """Keeps the document and the store in step (see the module docstring)."""

    def __init__(
        self, metadata: SiteMetadata, store: HistoryStore, scheduler: Scheduler | None
    ) -> None:
        self.metadata = metadata
        self._store = store
        self._scheduler = scheduler
        metadata.on_change(self._apply)

    # ------------------------------------------------------------ local writes

    async def namespace_registered(
        self, name: str, description: str, retention_seconds: int
    ) -> None:
        value = {"description": description, "retention_seconds": retention_seconds}
        await self.metadata.put("namespaces", name, value)

    async def schedule_created(
        self, namespace: str, schedule_id: str, schedule: service_pb2.Schedule
    ) -> None:
        definition = service_pb2.Schedule()
        definition.CopyFrom(schedule)
        definition.ClearField("state")  # pause state and notes stay each site's own
        value = {
            "namespace": namespace,
            "schedule_id": schedule_id,
            "definition": base64.b64encode(
                definition.SerializeToString(deterministic=True)
            ).decode(),
        }
        await self.metadata.put("schedules", schedule_key(namespace, schedule_id), value)

    async def schedule_deleted(self, namespace: str, schedule_id: str) -> None:
        await self.metadata.put("schedules", schedule_key(namespace, schedule_id), None)

    async def publish_site(self, **fields: Any) -> None:
        """Update this site's record (``sites[<cluster name>]``: its tier at start; the
        sites work adds link state, placement the capabilities its workers offer);
        written only when a field changed, so restarts do not grow the document."""
        site = self.metadata.site
        current = self.metadata.get("sites", site) or {}
        if any(current.get(name) != value for name, value in fields.items()):
            await self.metadata.put("sites", site, {**current, **fields})

    # ---------------------------------------------------------- remote merges

    async def merge(self, update: bytes) -> list[Change]:
        """Merge a peer's update into the document and apply what changed."""
        return await self.metadata.apply_remote(update)

    async def _apply(self, changes: list[Change]) -> None:
        for change in changes:
            if change.collection == "namespaces" and change.value is not None:
                await self._store.ensure_namespace(
                    change.key,
                    description=str(change.value.get("description", "")),
                    retention_seconds=int(change.value.get("retention_seconds", 0)),
                )
            elif change.collection == "schedules":
                await self._apply_schedule(change)

    async def _apply_schedule(self, change: Change) -> None:
        namespace, schedule_id = json.loads(change.key)
        scheduler = self._scheduler
        if scheduler is None:
            log.warning("schedule %s/%s not applied: no scheduler", namespace, schedule_id)
            return
        existing = await self._store.schedules.get(namespace, schedule_id)
        if change.value is None:
            if existing is not None:
                with contextlib.suppress(NotFoundError):
                    await scheduler.delete(namespace, schedule_id)
            return
        definition = base64.b64decode(change.value["definition"])
        if existing is not None:
            if existing.definition == definition:
                return
            with contextlib.suppress(NotFoundError):
                await scheduler.delete(namespace, schedule_id)
        await self._store.ensure_namespace(namespace)
        schedule = service_pb2.Schedule.FromString(definition)
        # Already there: created meanwhile by a merge racing this one (same definition).
        with contextlib.suppress(ScheduleAlreadyExistsError):
            await scheduler.create(namespace, schedule_id, schedule, request_id="")
