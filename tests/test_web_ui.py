"""The web UI in a real browser: Debian's chromium (``make test-deps`` installs it)
driven by Playwright, against a real server, worker and DAG interpreter (one of each,
and one browser, for the module). Clicks through list -> run -> timeline -> events ->
DAG, watches a DAG's task states change live, and uses the actions behind their
confirmation dialog. Screenshots land in build/test-artifacts/ui/ (the README's
docs/ui-*.png are copies of them)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio
from helpers_web import (
    GATES,
    QUEUE,
    Greeter,
    WebEnv,
    dag_definition,
    schedule_body,
    states_definition,
    web_env,
)
from playwright.async_api import Browser, Page, async_playwright, expect

from tideflow.worker_sdk import dag

pytestmark = pytest.mark.asyncio(loop_scope="module")
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts" / "ui"
# Generous: the pages refresh every 1.5 s, and the machine may be loaded.
expect.set_options(timeout=30_000)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WebEnv]:
    async with web_env(tmp_path_factory.mktemp("ui")) as running:
        yield running


@pytest.fixture(scope="module")
def artifacts() -> Path:
    # No skip without a browser: `make test` installs chromium first (make test-deps).
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: run `make test-deps`"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(artifacts: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        await launched.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    opened = await context.new_page()
    yield opened
    await context.close()


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def confirm(page: Page, ok: bool = True) -> None:
    dialog = page.locator("dialog#confirm")
    await expect(dialog).to_be_visible()
    await page.click("#confirm-ok" if ok else "#confirm-cancel")
    await expect(dialog).to_be_hidden()


async def test_list_run_timeline_and_events(env: WebEnv, page: Page) -> None:
    done, waiting = uid("greet"), uid("waiting")
    await env.client.execute_workflow(Greeter.run, "ada", id=done, task_queue=QUEUE)
    await env.client.start_workflow(Greeter.run, args=["bo", True], id=waiting, task_queue=QUEUE)
    await page.goto(f"{env.base}/#/workflows")
    await expect(page.locator("a.wf-link", has_text=done)).to_be_visible()
    await expect(page.locator("a.wf-link", has_text=waiting)).to_be_visible()
    await page.click("button[data-status=Completed]")
    await expect(page.locator("a.wf-link", has_text=waiting)).to_have_count(0)
    await expect(page.locator("a.wf-link", has_text=done)).to_be_visible()
    await page.fill("#query", f'WorkflowId = "{done}"')
    await page.click("#search")
    await expect(page.locator("tr.run-row")).to_have_count(1)
    await expect(page.locator("#count")).to_have_text("1 matching")
    await shot(page, "list")

    # Paging: three runs, two a page, newest first.
    prefix = uid("page")
    for i in range(3):
        await env.client.execute_workflow(Greeter.run, "ed", id=f"{prefix}-{i}", task_queue=QUEUE)
    query = quote(f'WorkflowId STARTS_WITH "{prefix}" ORDER BY WorkflowId DESC')
    await page.goto(f"{env.base}/#/workflows?query={query}&size=2")
    links = page.locator("a.wf-link")
    await expect(links).to_have_text([f"{prefix}-2", f"{prefix}-1"])
    await page.click("#next-page")
    await expect(links).to_have_text([f"{prefix}-0"])
    await expect(page.locator("#next-page")).to_be_disabled()
    await page.click("#prev-page")
    await expect(links).to_have_text([f"{prefix}-2", f"{prefix}-1"])

    only_done = quote(f'WorkflowId = "{done}"')
    await page.goto(f"{env.base}/#/workflows?query={only_done}")
    await page.click(f"a.wf-link:text('{done}')")
    await expect(page.locator("#run-status")).to_have_text("Completed")
    await expect(page.locator("#input")).to_have_text('"ada"')
    await expect(page.locator("#result")).to_have_text('"hello ada"')
    # The activity's bar says it succeeded on its second attempt.
    bar = page.locator("#timeline rect.bar.completed")
    await expect(bar).to_have_count(1)
    await expect(page.locator("#timeline text", has_text="#2")).to_have_count(1)
    await bar.click()
    await expect(page.locator("#timeline-detail")).to_contain_text("attempt 2, completed")
    await shot(page, "timeline")

    await page.click("#tab-events")
    rows = page.locator("#events tr.event-row")
    history = await env.client.get_workflow_handle(done).fetch_history()
    await expect(rows).to_have_count(len(history.events))
    await expect(page.locator("#events")).to_contain_text("ACTIVITY_TASK_STARTED")
    await shot(page, "events")
    await env.client.get_workflow_handle(waiting).terminate("test over")


async def test_dag_graph_with_live_states_pause_and_resume(env: WebEnv, page: Page) -> None:
    dag_id = uid("etl")
    handle = await dag.start_dag(
        env.client, dag_definition(dag_id, gate="enrich"), {}, id=dag_id, task_queue=QUEUE
    )
    await page.goto(f"{env.base}/#/workflows")
    await page.click(f"a.wf-link:text('{dag_id}')")
    await expect(page.locator("#run-status")).to_have_text("Running")
    await expect(page.locator("#timeline")).to_be_visible()
    await page.click("#tab-dag")

    async def node(task: str, status: str) -> None:
        await expect(page.locator(f"#dag g.dag-node[data-task={task}]")).to_have_attribute(
            "data-status", status
        )

    # Live: no reload; the gated task shows RUNNING (its attempt is on a worker).
    await node("extract", "COMPLETED")
    await node("clean", "COMPLETED")
    await node("enrich", "RUNNING")
    await node("load", "PENDING")
    await expect(page.locator("#dag path.edge")).to_have_count(4)
    await shot(page, "dag-running")

    await page.click("#action-pause")
    await confirm(page)
    await expect(page.locator("#dag-status")).to_have_text("PAUSED")
    await node("load", "PAUSED")
    GATES.gate(f"{dag_id}/enrich").set()
    await node("enrich", "COMPLETED")
    await node("load", "PAUSED")  # nothing new is scheduled while paused
    await page.click("#action-resume")
    await confirm(page)
    await node("load", "COMPLETED")
    await expect(page.locator("#run-status")).to_have_text("Completed")
    await page.click("#dag g.dag-node[data-task=load]")
    await expect(page.locator("#task-detail")).to_contain_text("Task load")
    await expect(page.locator("#task-result")).to_contain_text('"done": "load"')
    await shot(page, "dag-completed")
    assert await handle.result() is not None

    await page.click("#tab-timeline")
    for task in ("extract", "clean", "enrich", "load"):
        await expect(page.locator("#timeline g.timeline-row", has_text=task)).to_have_count(1)
    await shot(page, "dag-timeline")


async def test_signal_and_terminate_behind_confirmation(env: WebEnv, page: Page) -> None:
    signalled, terminated, followed = uid("signal"), uid("terminate"), uid("follow")
    for workflow_id in (signalled, terminated, followed):
        await env.client.start_workflow(
            Greeter.run, args=["cy", True], id=workflow_id, task_queue=QUEUE
        )
    await page.goto(f"{env.base}/#/workflows/{terminated}")
    await expect(page.locator("#run-status")).to_have_text("Running")
    await page.click("#action-terminate")
    await confirm(page, ok=False)  # dismissed: nothing happens
    await page.click("#action-terminate")
    await page.fill("dialog input[name=reason]", "from the UI")
    await shot(page, "confirm-terminate")
    await confirm(page)
    await expect(page.locator("#run-status")).to_have_text("Terminated")
    await expect(page.locator("#io")).to_contain_text("from the UI")
    description = await env.client.get_workflow_handle(terminated).describe()
    assert description.status.name == "TERMINATED"

    await page.goto(f"{env.base}/#/workflows/{signalled}")
    await page.click("#action-signal")
    await page.fill("dialog input[name=name]", "approve")
    await confirm(page)
    await expect(page.locator("#run-status")).to_have_text("Completed")
    await expect(page.locator("#result")).to_have_text('"hello cy"')

    # Events that come while the events table is open are appended to it: an event
    # opened for its attributes stays open.
    await page.goto(f"{env.base}/#/workflows/{followed}?tab=events")
    await expect(page.locator("#events")).to_contain_text("WORKFLOW_TASK_COMPLETED")
    first = page.locator("#events tr.event-row details").first
    await first.locator("summary").click()
    await expect(first).to_have_attribute("open", "")
    await env.client.get_workflow_handle(followed).signal("approve")  # not from the page
    await expect(page.locator("#events")).to_contain_text("WORKFLOW_EXECUTION_COMPLETED")
    await expect(page.locator("#run-status")).to_have_text("Completed")
    await expect(first).to_have_attribute("open", "")
    history = await env.client.get_workflow_handle(followed).fetch_history()
    await expect(page.locator("#events tr.event-row")).to_have_count(len(history.events))


async def test_start_from_the_ui_and_child_workflow_links(env: WebEnv, page: Page) -> None:
    parent_id = uid("parent")
    child_id = f"{parent_id}-child"
    await page.goto(f"{env.base}/#/workflows")

    async def fill_start(arguments: str) -> None:
        await page.click("#start-workflow")
        await page.fill("dialog input[name=workflowId]", parent_id)
        await page.fill("dialog input[name=type]", "Parent")
        await page.fill("dialog input[name=taskQueue]", QUEUE)
        await page.fill("dialog textarea[name=input]", arguments)

    await fill_start('["dee"]')
    await confirm(page, ok=False)  # dismissed: nothing starts
    # A mistake in the arguments is one line that stays; nothing starts either.
    await fill_start('["dee"')
    await confirm(page)
    await expect(page.locator("#error")).to_contain_text("Arguments is not valid JSON")
    await expect(page.locator("#count")).to_contain_text("matching")  # a refresh ran
    await expect(page.locator("#error")).to_be_visible()
    assert not await env.client.count_workflows(f'WorkflowId = "{parent_id}"')

    await fill_start('["dee"]')
    await shot(page, "start-workflow")
    await confirm(page)
    # The new run's page, with its child linked both ways.
    await expect(page.locator("#run-title")).to_have_text(parent_id)
    await expect(page.locator("#error")).to_be_hidden()
    await expect(page.locator("#run-status")).to_have_text("Completed")
    await expect(page.locator("#result")).to_have_text('"parent of hello dee"')
    child = page.locator("#child-workflows a.child-link")
    await expect(child).to_have_text(child_id)
    await expect(page.locator("#child-workflows tr.child-row")).to_contain_text("Completed")
    row = page.locator("#timeline g.timeline-row", has_text=f"child {child_id}")
    await expect(row.locator("rect.bar.completed")).to_have_count(1)
    await shot(page, "child-workflows")
    await child.click()
    await expect(page.locator("#run-title")).to_have_text(child_id)
    await expect(page.locator("#result")).to_have_text('"hello dee"')
    await expect(page.locator("#child-workflows")).to_have_count(0)
    await page.click("#parent-link")
    await expect(page.locator("#run-title")).to_have_text(parent_id)
    description = await env.client.get_workflow_handle(parent_id).describe()
    assert description.workflow_type == "Parent" and description.task_queue == QUEUE


async def test_schedules_page(env: WebEnv, page: Page) -> None:
    sid, hourly = uid("nightly"), uid("hourly")
    status, body = await env.call(
        "POST",
        f"/api/v1/namespaces/default/schedules/{hourly}",
        schedule_body(hourly, {"intervals": [{"interval": "3600s"}]}),
    )
    assert status == 200, body
    await page.goto(f"{env.base}/#/schedules")
    await expect(page.locator("tr.schedule-row", has_text=hourly)).to_contain_text("every 3600s")

    async def fill_create(interval: str) -> None:
        await page.click("#create-schedule")
        for name, value in {
            "scheduleId": sid,
            "cron": "0 3 * * *",
            "interval": interval,
            "timeZone": "Europe/Berlin",
            "type": "Greeter",
            "taskQueue": QUEUE,
            "input": '["night"]',
        }.items():
            await page.fill(f"dialog [name={name}]", value)

    await fill_create("an hour")
    await confirm(page)
    await expect(page.locator("#error")).to_contain_text("is not like 90s, 1h30m or 1d")
    await fill_create("1h30m")
    await shot(page, "create-schedule")
    await confirm(page)
    row = page.locator("tr.schedule-row", has_text=sid)
    await expect(row).to_contain_text("Active")
    await expect(row).to_contain_text("0 3 * * *, every 5400s")
    status, described = await env.call("GET", f"/api/v1/namespaces/default/schedules/{sid}")
    assert status == 200, described
    schedule = described["schedule"]
    assert schedule["spec"]["timezoneName"] == "Europe/Berlin"
    started = schedule["action"]["startWorkflow"]
    assert (started["workflowId"], started["workflowType"]["name"]) == (sid, "Greeter")
    assert started["input"]["payloads"] == ["night"]
    await page.click(f"#pause-{sid}")
    await confirm(page)
    await expect(row).to_contain_text("Paused")
    await page.click(f"#trigger-{sid}")
    await confirm(page)
    await expect(row.locator("td").nth(4)).to_have_text("1")
    await shot(page, "schedules")
    await page.click(f"#delete-{sid}")
    await confirm(page)
    await expect(row).to_have_count(0)


async def test_dag_failed_retry_and_scheduled_states(env: WebEnv, page: Page) -> None:
    dag_id = uid("states")
    await dag.start_dag(env.client, states_definition(dag_id), {}, id=dag_id, task_queue=QUEUE)
    await page.goto(f"{env.base}/#/workflows/{dag_id}?tab=dag")
    states = {
        "fine": "COMPLETED",
        "boom": "FAILED",
        "again": "RETRY",
        "queued": "SCHEDULED",
        "after": "PENDING",
    }
    for task, status in states.items():
        locator = page.locator(f"#dag g.dag-node[data-task={task}]")
        await expect(locator).to_have_attribute("data-status", status)
    await page.click("#dag g.dag-node[data-task=again]")
    await expect(page.locator("#task-detail")).to_contain_text("again exploded")
    await expect(page.locator("#task-detail")).to_contain_text("1 of 2")
    await shot(page, "dag-states")
    await env.client.get_workflow_handle(dag_id).terminate("test over")
    await expect(page.locator("#run-status")).to_have_text("Terminated")


async def test_dag_state_from_history_when_no_worker_answers(env: WebEnv, page: Page) -> None:
    dag_id = uid("orphan")
    # No worker polls this queue: the status query cannot be answered, so the page
    # shows the definition (the start's input) with what the history holds.
    await dag.start_dag(
        env.client, dag_definition(dag_id), {}, id=dag_id, task_queue="no-dag-worker"
    )
    await page.goto(f"{env.base}/#/workflows/{dag_id}?tab=dag")
    await expect(page.locator("#tab-content")).to_contain_text("(from the history)")
    await expect(page.locator("#dag g.dag-node[data-status=PENDING]")).to_have_count(4)
    await expect(page.locator("#dag path.edge")).to_have_count(4)
    await env.client.get_workflow_handle(dag_id).terminate("test over")
