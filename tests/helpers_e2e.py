"""The hello-world workflow, its activity and the activity timeout, shared by the
end-to-end suites (test_e2e.py, test_activities.py, test_task_races.py)."""

from __future__ import annotations

from datetime import timedelta

from tideflow.worker_sdk import (
    RetryPolicy,
    activity,
    workflow,
)

TIMEOUT = timedelta(seconds=30)


@activity.defn
async def compose_greeting(name: str) -> str:
    return f"Hello, {name} (attempt {activity.info().attempt})"


@workflow.defn
class HelloWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        await workflow.sleep(timedelta(milliseconds=100))
        greeting: str = await workflow.execute_activity(
            compose_greeting,
            name,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=3),
        )
        return greeting
