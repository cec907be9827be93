"""The replica side of replication in the store (history/_replication_store.py,
tla/Replication.tla ``DeliverEvents``): a batch is applied only where it continues
the replica, a mismatch is an alarm that writes nothing else, stale and duplicate
batches change nothing, a replica's writes are fenced like a transition; the inbox is
a set keyed by request id. And the site flags of ``tideflow server``."""

from __future__ import annotations

import pytest
from helpers_store import make_events, run_key
from sqlalchemy import Connection, text

from tideflow.api.v1.common_pb2 import WorkflowExecutionStatus
from tideflow.api.v1.state_pb2 import MutableState
from tideflow.cli._main import build_parser
from tideflow.history import (
    HistoryStore,
    InboxEntry,
    ReplicaVerdict,
    ShardOwnershipLostError,
)
from tideflow.server import _cli as server_cli

HOME = "edge1"


def _state(next_event_id: int) -> bytes:
    ms = MutableState(
        namespace="default",
        workflow_id="wf",
        run_id="run-1",
        next_event_id=next_event_id,
        home_cluster=HOME,
        version=1,
        status=WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING,
    )
    ms.workflow_type.name = "W"
    ms.task_queue.name = "q"
    return ms.SerializeToString()


async def _apply(store: HistoryStore, first: int, count: int, state: bool = True) -> ReplicaVerdict:
    events = make_events(first, count)
    verdict, _ = await store.replication.append_replicated(
        run_key(),
        events,
        _state(first + count) if state else None,
        local="cloud",
        peer=HOME,
        home_last_event_id=first + count - 1,
        now=1,
    )
    return verdict


async def test_a_batch_applies_only_where_it_continues_the_replica(store: HistoryStore) -> None:
    key = run_key()
    assert await _apply(store, 1, 3, state=False) is ReplicaVerdict.APPLIED
    # Events without the state: not listed yet, but the next pull continues from 3.
    assert await store.get_execution(key) is None
    assert (await store.replication.last_event_ids([key]))[key] == 3
    assert await _apply(store, 6, 2) is ReplicaVerdict.GAP  # would leave a hole
    assert await _apply(store, 2, 4) is ReplicaVerdict.APPLIED  # overlap 2..3 equal
    assert [e.event_id for e in await store.read_events(key)] == [1, 2, 3, 4, 5]
    record = await store.get_execution(key)
    assert record is not None and record.summary.history_length == 5
    assert await _apply(store, 1, 5) is ReplicaVerdict.STALE  # a duplicate batch
    current = await store.get_current("default", "wf")
    assert current is not None and current.run_id == key.run_id
    info = await store.replication.replica_info(key)
    assert info is not None and (info.peer, info.home_last_event_id) == (HOME, 5)


async def test_a_mismatch_is_an_alarm_and_writes_nothing(store: HistoryStore) -> None:
    key = run_key()
    assert await _apply(store, 1, 3) is ReplicaVerdict.APPLIED
    forked = make_events(3, 2)
    forked[0].event_time.FromMicroseconds(42)  # another event 3 than the one stored
    verdict, detail = await store.replication.append_replicated(
        key, forked, _state(5), local="cloud", peer=HOME, home_last_event_id=4, now=7
    )
    assert verdict is ReplicaVerdict.MISMATCH and "event 3" in detail
    assert [e.event_id for e in await store.read_events(key)] == [1, 2, 3]
    count, lines = await store.replication.alarms()
    assert count == 1 and "event 3" in lines[0]


async def test_a_site_takes_no_events_beyond_its_own_for_a_run_homed_there(
    store: HistoryStore,
) -> None:
    key = run_key()
    await store.replication.append_replicated(
        key, make_events(1, 2), _state(3), local=HOME, peer="cloud", home_last_event_id=2, now=1
    )
    verdict, _ = await store.replication.append_replicated(
        key, make_events(3, 1), _state(4), local=HOME, peer="cloud", home_last_event_id=3, now=2
    )
    assert verdict is ReplicaVerdict.MISMATCH
    assert len(await store.read_events(key)) == 2


async def test_replica_writes_are_fenced(store: HistoryStore) -> None:
    store.enable_fencing()  # this node holds no shard: the write is refused
    try:
        await _apply(store, 1, 2)
    except ShardOwnershipLostError:
        pass
    else:
        raise AssertionError("a replica write of an unheld shard committed")
    assert await store.read_events(run_key()) == []


async def test_the_inbox_is_a_set_keyed_by_request_id(store: HistoryStore) -> None:
    entry = InboxEntry(
        namespace="default",
        request_id="r-1",
        kind=1,
        workflow_id="wf",
        run_id="run-1",
        request=b"x",
        received_at=1,
        attempts=0,
    )
    assert await store.replication.put_inbox(entry) is True
    assert await store.replication.put_inbox(entry) is False  # a retry merges
    assert await store.replication.inbox_depth() == 1
    await store.replication.note_forwarded(entry, 2)
    (stored,) = await store.replication.inbox()
    assert stored.attempts == 1
    await store.replication.retire(entry)
    assert await store.replication.inbox_depth() == 0


def test_site_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """``--upstream`` needs the edge's own ``--cluster-name``; both are checked before
    anything starts (one line, exit code 2)."""
    for argv, message in (
        (["--upstream", "127.0.0.1:7233"], "--upstream needs --cluster-name"),
        (["--upstream", "nowhere", "--cluster-name", "e1"], "expected HOST:PORT"),
        (["--cluster-name", "a b"], "letters, digits"),
    ):
        args = build_parser().parse_args(["server", "start-dev", "--port", "0", *argv])
        assert server_cli.main(args) == server_cli.EXIT_USAGE
        assert message in capsys.readouterr().err


async def test_a_database_from_before_sites_gains_their_tables(store_url: str) -> None:
    old = await HistoryStore.open(store_url)

    def drop(conn: Connection) -> None:
        for table in ("site_inbox", "replica_runs", "replication_alarms"):
            conn.execute(text(f"DROP TABLE {table}"))

    await old.dialect.write(drop)
    await old.close()
    upgraded = await HistoryStore.open(store_url)
    try:
        assert await upgraded.replication.inbox_depth() == 0
        assert await upgraded.replication.alarms() == (0, [])
        assert await upgraded.replication.lag_by_peer() == {}
    finally:
        await upgraded.close()
