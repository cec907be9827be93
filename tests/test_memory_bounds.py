"""An idle run costs a node no memory beyond the engine's bounded state cache.

120 runs wait on a signal on a node whose cache holds 8 run states: once their
first workflow tasks are done, every in-memory structure the node reports
(``TideflowServer.memory_held``) is within its bound, none near the number of runs.
Then a long poll waits on every run's result (each pins its run in the cache while it
waits: evicted, its poll would sleep through the signal until the poll's timeout), all
are signalled, every result arrives, and the cache is back within its size.
bench/memory.py measures the resident size of 100,000 such runs.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
from helpers import bounded, eventually, new_id, running_server

from tideflow.api.v1.history_pb2 import EventType
from tideflow.history import shard_of
from tideflow.server import ServerConfig, TideflowServer
from tideflow.server._timers import DEAD_ENTRIES_KEPT
from tideflow.worker_sdk import Client, Worker, WorkflowHandle, workflow

_RUNS = 120
_CACHE = 8
_TIMER_ROWS = 16
# history's runs' shard memo (``SHARD_MEMO_SIZE``).
_SHARD_MEMO = shard_of.cache_info().maxsize or 0


@workflow.defn
class Parked:
    """Waits for a ``note`` signal and returns it."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @workflow.signal
    def note(self, text: str) -> None:
        self.notes.append(text)

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: bool(self.notes))
        return self.notes[0]


def _bounds(busy_runs: int = 0) -> dict[str, int]:
    """Each structure's bound with the runs idle (``busy_runs``: runs a long poll
    watches). Every structure the server reports must be listed here."""
    return {
        "engine_cached_runs": _CACHE + busy_runs,
        # Process-wide: other tests' runs may be remembered too.
        "run_shard_memo": _SHARD_MEMO,
        "matching_queues": 2,  # the task queue and the worker's sticky queue
        "matching_backlog_tasks": 0,
        "matching_queued_keys": 0,
        "matching_queries": 0,
        "matching_pollers": 8,  # the worker's parked polls
        "matching_retired_queues": 0,
        # One node serves every queue: no local partitions (server/_matching.py).
        "matching_local_pollers": 0,
        "matching_local_demand": 0,
        "timer_rows_held": 0,  # the runs' workflow task timeouts left with their tasks
        # Dropped rows' entries until compacted.
        "timer_heap_entries": max(_TIMER_ROWS + DEAD_ENTRIES_KEPT, 2 * _TIMER_ROWS),
        "timer_dead_keys": max(DEAD_ENTRIES_KEPT, _TIMER_ROWS),
        "timer_fired_while_reading": 0,
        "transfer_queued_rows": 0,
        "polls_parked": 8,
        "polls_queries_held": 0,
        "sites_hints_queued": 0,
        "sites_untaken_runs": 0,
        "sites_inbox_sent": 0,
        "sites_hinted_runs": 0,
        "forwarder_rows": 0,
        "sticky_moves_queued": 0,
    }


def _over_bounds(server: TideflowServer, busy_runs: int = 0) -> dict[str, tuple[int, int]]:
    held, bounds = server.memory_held(), _bounds(busy_runs)
    assert held.keys() == bounds.keys(), "a structure the test does not bound"
    return {name: (held[name], bounds[name]) for name in held if held[name] > bounds[name]}


async def _idle(handle: WorkflowHandle[str]) -> bool:
    """The run's first workflow task completed: it waits for its signal."""
    events = (await handle.fetch_history()).events
    return EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in [e.event_type for e in events]


def test_no_per_run_memo_outgrows_the_default_state_cache() -> None:
    """The runs' shard memo (history's ``shard_of``) remembers fewer runs than the
    engine caches by default: at 65,536 it kept growing, about 220 bytes a run, long
    after the state cache was full (bench/memory.py)."""
    assert 0 < _SHARD_MEMO < ServerConfig().state_cache_size


@pytest.mark.timeout(240)
async def test_idle_runs_hold_no_memory_beyond_the_state_cache(store_url: str) -> None:
    tq = new_id("tq")
    config = ServerConfig(state_cache_size=_CACHE, max_timers_in_memory=_TIMER_ROWS)
    async with (
        running_server(store_url, config) as server,
        await Client.connect(server.address) as client,
        Worker(client, task_queue=tq, workflows=[Parked], workflow_pollers=4),
    ):
        handles = await asyncio.gather(
            *(
                client.start_workflow(Parked.run, id=new_id("idle"), task_queue=tq)
                for _ in range(_RUNS)
            )
        )
        for handle in handles:
            await eventually(functools.partial(_idle, handle), f"run {handle.id} idle")
        # The last completions' timer drops and the polls re-parking settle.
        assert await eventually(lambda: not _over_bounds(server), "idle bounds") is True
        held = server.memory_held()
        assert held["engine_cached_runs"] <= _CACHE

        results = [asyncio.create_task(h.result()) for h in handles]
        await eventually(
            lambda: server.memory_held()["engine_cached_runs"] >= _RUNS,
            "every result's long poll watching its run",
        )
        assert not _over_bounds(server, busy_runs=_RUNS)
        await asyncio.gather(*(h.signal(Parked.note, h.id) for h in handles))
        # 120 runs' last tasks through one worker: under the full suite's load (two
        # cores, other servers) this took over 30 s twice, so a wider bound.
        assert await bounded(asyncio.gather(*results), 90) == [h.id for h in handles]
        await eventually(
            lambda: server.memory_held()["engine_cached_runs"] <= _CACHE, "the cache trimmed"
        )
        # The closing commits' timer drops may land after the results they woke.
        assert await eventually(lambda: not _over_bounds(server), "bounds after close") is True
