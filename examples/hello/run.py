"""The main job: an embedded tideflow server on SQLite, a worker, and a workflow.

    make demo        (or: .venv/bin/python examples/hello/run.py [--db FILE])

It starts a server in this process on an ephemeral port with its history in an
SQLite file, runs a worker for the task queue, starts a few order workflows (three
activities, a durable timer, one activity that fails once and is retried by the
server) and prints each run's history as it grows, then the results.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from tideflow.api.v1.history_pb2 import EventType
from tideflow.server import TideflowServer
from tideflow.worker_sdk import Client, RetryPolicy, Worker, activity, workflow


@dataclass
class Order:
    order_id: str
    item: str
    quantity: int


@dataclass
class Receipt:
    order_id: str
    charged_cents: int
    shipment: str


_charge_attempts: dict[str, int] = {}


@activity.defn
async def reserve_stock(order: Order) -> bool:
    return order.quantity <= 10


@activity.defn
async def charge_card(order: Order) -> int:
    # Fails on the first attempt to show server-side retries with backoff.
    _charge_attempts[order.order_id] = _charge_attempts.get(order.order_id, 0) + 1
    if activity.info().attempt == 1:
        raise RuntimeError("payment gateway timed out")
    return 1250 * order.quantity


@activity.defn
def ship(order: Order) -> str:  # a sync activity: runs in the worker's thread pool
    return f"parcel-{order.order_id[:8]}"


@workflow.defn
class OrderWorkflow:
    @workflow.run
    async def run(self, order: Order) -> Receipt:
        options = {
            "start_to_close_timeout": timedelta(seconds=10),
            "retry_policy": RetryPolicy(initial_interval=timedelta(milliseconds=200)),
        }
        if not await workflow.execute_activity(reserve_stock, order, **options):
            raise ValueError("unreachable in this demo")
        charged = await workflow.execute_activity(charge_card, order, **options)
        await workflow.sleep(timedelta(seconds=1))  # a durable timer
        shipment = await workflow.execute_activity(ship, order, **options)
        return Receipt(order_id=order.order_id, charged_cents=charged, shipment=shipment)


async def show_progress(client: Client, workflow_id: str) -> None:
    """Print every history event of the run as it is appended (long poll)."""
    handle = client.get_workflow_handle(workflow_id)
    seen = 0
    while True:
        history = await handle.fetch_history()
        for event in history.events[seen:]:
            name = EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")
            print(f"  {workflow_id[:14]:14} #{event.event_id:<3} {name}", flush=True)
            if name.startswith("WORKFLOW_EXECUTION_") and name != "WORKFLOW_EXECUTION_STARTED":
                return
        seen = len(history.events)
        await asyncio.sleep(0.05)


async def main(db: Path) -> None:
    print(f"tideflow demo: history in {db}")
    async with TideflowServer(f"sqlite:///{db}", port=0) as server:
        print(f"server listening on {server.address}")
        client = await Client.connect(server.address)
        queue = "orders"
        async with Worker(
            client,
            task_queue=queue,
            workflows=[OrderWorkflow],
            activities=[reserve_stock, charge_card, ship],
        ):
            orders = [Order(order_id=str(uuid.uuid4()), item="widget", quantity=q) for q in (1, 3)]
            handles = [
                await client.start_workflow(
                    OrderWorkflow.run, order, id=f"order-{order.order_id}", task_queue=queue
                )
                for order in orders
            ]
            await asyncio.gather(*(show_progress(client, h.id) for h in handles))
            for handle in handles:
                receipt = await handle.result()
                described = await handle.describe()
                print(
                    f"{handle.id}: {described.status.name}, {described.history_length} events, "
                    f"receipt={receipt}"
                )
            print(f"charge_card attempts per order: {sorted(_charge_attempts.values())}")
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="tideflow demo on an embedded SQLite server")
    parser.add_argument("--db", type=Path, default=None, help="SQLite file (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    db_path = args.db or Path(tempfile.mkdtemp(prefix="tideflow-demo-")) / "tideflow.db"
    asyncio.run(main(db_path))
