"""``?max_connections=N`` on a PostgreSQL URL caps one process's connections to the
database (several nodes share its ``max_connections``): the parameter is parsed and
taken off the URL, a bad value is one clear error, and a real server under load never
holds more than N connections while every run completes.
"""

from __future__ import annotations

import asyncio

import asyncpg  # type: ignore[import-untyped]
import pytest
from helpers import bounded, new_id, running_server
from helpers_e2e import HelloWorkflow, compose_greeting
from sqlalchemy.engine import make_url

from tideflow.history._postgres import MAX_CONNECTIONS_ENV, connection_budget, server_target
from tideflow.worker_sdk import Client, Worker

pytestmark = pytest.mark.postgres


def test_the_parameter_is_taken_off_the_url_and_splits_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(MAX_CONNECTIONS_ENV, raising=False)
    target = server_target(make_url("postgresql://u@h/db?max_connections=6&application_name=x"))
    assert target.max_connections == 6
    assert "max_connections" not in target.url.query  # the driver never sees it
    assert target.url.query["application_name"] == "x"
    assert server_target(make_url("postgresql://u@h/db")).max_connections is None
    # A deployment's default for the URLs that do not say.
    monkeypatch.setenv(MAX_CONNECTIONS_ENV, "9")
    assert server_target(make_url("postgresql://u@h/db")).max_connections == 9
    assert server_target(make_url("postgresql://u@h/db?max_connections=5")).max_connections == 5
    # A fixed pool plus the group commit's direct lanes, never above the cap.
    assert connection_budget(6) == (4, 0, 2)
    assert connection_budget(2) == (1, 0, 1)
    assert connection_budget(30) == (26, 0, 4)
    assert connection_budget(None) == (10, 10, 4)


@pytest.mark.parametrize("value", ["1", "0", "-3", "many", "4.5"])
def test_a_bad_value_is_one_clear_error(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=f"max_connections='{value}': expected one whole"):
        server_target(make_url(f"postgresql://u@h/db?max_connections={value}"))
    monkeypatch.setenv(MAX_CONNECTIONS_ENV, value)
    with pytest.raises(ValueError, match=f"{MAX_CONNECTIONS_ENV}='{value}': expected one"):
        server_target(make_url("postgresql://u@h/db"))


async def _connections_to(database: str) -> int:
    admin = await asyncpg.connect(host="127.0.0.1", user="postgres", database="postgres")
    try:
        count: int = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database
        )
        return count
    finally:
        await admin.close()


async def test_a_loaded_server_stays_within_its_cap(pg_url: str) -> None:
    cap = 4
    database = make_url(pg_url).database
    assert database
    most = 0
    queue = new_id("capped")
    async with (
        running_server(f"{pg_url}?max_connections={cap}") as server,
        await Client.connect(server.address) as client,
        Worker(client, task_queue=queue, workflows=[HelloWorkflow], activities=[compose_greeting]),
    ):
        runs = asyncio.gather(
            *(
                client.execute_workflow(
                    HelloWorkflow.run, f"n{n}", id=new_id("capped"), task_queue=queue
                )
                for n in range(60)
            )
        )
        while not runs.done():  # without the cap this reaches 14 here
            most = max(most, await _connections_to(database))
        results = await bounded(runs)
    assert sorted(results) == sorted(f"Hello, n{n} (attempt 1)" for n in range(60))
    assert 1 <= most <= cap, most
