"""A worker in its own process whose activity completions go in one batch, for
tests/test_batch_responds.py.

    python tests/procs/batch_worker.py HOST:PORT TASK_QUEUE FANOUT MODE

``Fanout`` runs its input's ``fanout`` activities ``step`` at once; each execution appends its key
to its input's ``ledger`` file (the test counts executions). MODE:

- ``hang-after-batch``: the first completion's call waits until the other completions
  queued behind it, so they go in one RespondTasksCompleted; once the server answered
  that batch the process prints ``batch answered N`` and hangs before anything
  dispatches the answers (its eager workflow task included): the test SIGKILLs it.
- ``plain``: an ordinary worker (batching on), the survivor.

Prints ``worker ready`` once it polls.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from tideflow.worker_sdk import Client, Worker, activity, workflow


@activity.defn
def step(job: dict[str, Any]) -> int:
    with Path(job["ledger"]).open("a") as ledger:
        ledger.write(f"{job['key']}\n")
    return int(job["key"])


@workflow.defn
class Fanout:
    @workflow.run
    async def run(self, job: dict[str, Any]) -> int:
        results = await asyncio.gather(
            *(
                workflow.execute_activity(
                    step,
                    {"ledger": job["ledger"], "key": str(i)},
                    # Long: a retry would run a step twice, which the test counts.
                    start_to_close_timeout=timedelta(seconds=60),
                )
                for i in range(job["fanout"])
            )
        )
        return sum(results)


def _hold_first_completion(client: Client, fanout: int) -> None:
    """Instrument the client (test-side): the first completion's call waits until the
    other ``fanout - 1`` activity completions were handed to the batcher; the batch's answer is
    announced, then the process hangs."""
    batcher = client.completions
    sent: list[Any] = []
    all_handed = asyncio.Event()
    send = batcher.send

    async def counting_send(request: Any, run_owner: str = "") -> Any:
        if type(request).__name__ == "RespondActivityTaskCompletedRequest":
            sent.append(request)
        if len(sent) >= fanout:
            all_handed.set()
        return await send(request, run_owner)

    batcher.send = counting_send  # type: ignore[method-assign]
    call = client.call

    async def held_call(method: Any, request: Any, **kwargs: Any) -> Any:
        name = type(request).__name__
        if name == "RespondActivityTaskCompletedRequest" and not all_handed.is_set():
            await all_handed.wait()
            await asyncio.sleep(0)  # the others reach the queue
        response = await call(method, request, **kwargs)
        if name == "RespondTasksCompletedRequest":
            print(f"batch answered {len(response.results)}", flush=True)
            await asyncio.Event().wait()  # the test SIGKILLs us here
        return response

    client.call = held_call  # type: ignore[method-assign]


async def main(address: str, queue: str, fanout: int, mode: str) -> None:
    client = await Client.connect(address)
    if mode == "hang-after-batch":
        _hold_first_completion(client, fanout)
    worker = Worker(
        client,
        task_queue=queue,
        workflows=[Fanout],
        activities=[step],
        max_concurrent_activities=fanout,
        sticky_queue_schedule_to_start_timeout=timedelta(milliseconds=300),
    )
    async with worker:
        print("worker ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
