// tideflow web UI: a hand-written script over the HTTP API (/api/v1), no build step.
// Views are chosen by the part of the URL after '#': #/workflows, #/workflows/<id>,
// #/schedules. A view that shows a running run refreshes itself every REFRESH_MS, and
// a run's page at once when its history grows (a long poll of GetHistory).
"use strict";

const REFRESH_MS = 1500;
const PAGE_SIZE = 20;
const DAG_TYPE = "tideflow.dag";
const STATUSES = ["Running", "Completed", "Failed", "Canceled", "Terminated", "TimedOut",
  "ContinuedAsNew"];

const settings = {
  get ns() { return localStorage.getItem("tideflow.ns") || "default"; },
  set ns(v) { localStorage.setItem("tideflow.ns", v || "default"); },
  get key() { return localStorage.getItem("tideflow.key") || ""; },
  set key(v) { localStorage.setItem("tideflow.key", v); },
};
let refreshTimer = null;
let viewToken = 0;  // bumped on navigation: stale refreshes of an old view stop
let follower = null;  // the AbortController of the run page's long poll

// ------------------------------------------------------------------ helpers

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? `${body.status}: ${body.message}` : `HTTP ${status}`);
    this.httpStatus = status;
    this.body = body;
  }
}

async function api(method, path, body, timeoutS, signal) {
  const headers = { "Content-Type": "application/json" };
  if (settings.key) headers["Authorization"] = `Bearer ${settings.key}`;
  if (timeoutS) headers["X-Tideflow-Timeout"] = String(timeoutS);
  const response = await fetch(`/api/v1${path}`, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal,
  });
  const text = await response.text();
  let data = {};
  try {
    data = text ? JSON.parse(text) : {};
  } catch (error) {  // not the API's JSON (a proxy's error page, say)
    data = { status: `HTTP ${response.status}`, message: text.slice(0, 200) };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

const ns = () => `/namespaces/${encodeURIComponent(settings.ns)}`;
const wfPath = (id) => `${ns()}/workflows/${encodeURIComponent(id)}`;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) el.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function statusName(s) {
  // WORKFLOW_EXECUTION_STATUS_TIMED_OUT -> TimedOut
  if (!s) return "Unknown";
  return s.replace("WORKFLOW_EXECUTION_STATUS_", "").toLowerCase()
    .replace(/(^|_)(\w)/g, (_, __, c) => c.toUpperCase()).replace("Cancelled", "Canceled");
}
const badge = (text, cls) => h("span", { class: `badge s-${cls || text}` }, text);
const fmtTime = (t) => (t ? new Date(t).toLocaleString() : "");
// Events a few milliseconds apart: UTC with milliseconds.
const fmtPrecise = (t) => (t ? `${new Date(t).toISOString().replace("T", " ").slice(0, 23)} UTC` : "");
const ms = (t) => (t ? new Date(t).getTime() : null);
const json = (v) => JSON.stringify(v, null, 2);
const eventName = (t) => (t || "").replace("EVENT_TYPE_", "");

// A failed action's error stays until the next navigation (a refresh that succeeds
// clears only its own errors, else the message would vanish 1.5 s later, unread).
function showError(error, sticky) {
  const box = document.getElementById("error");
  if (!error) {
    if (box.dataset.sticky && !sticky) return;
    box.hidden = true; box.textContent = ""; delete box.dataset.sticky;
    return;
  }
  box.hidden = false;
  box.textContent = error.message || String(error);
  if (sticky) box.dataset.sticky = "1";
}

function attributesOf(event) {
  const key = Object.keys(event).find((k) => k.endsWith("EventAttributes"));
  return key ? event[key] : {};
}

// A confirmation dialog; resolves to the fields' values, or null when cancelled.
function confirmAction(title, text, fields, okLabel) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = okLabel || "Confirm";
  ok.className = okLabel ? "primary" : "danger";  // a named action (Start) is not a risky one
  showError(null, true);  // a new attempt: the last one's error is no longer news
  document.getElementById("confirm-text").textContent = text;
  const box = document.getElementById("confirm-fields");
  box.replaceChildren(...(fields || []).map((f) => h("label", {}, f.label,
    f.multiline
      ? h("textarea", { name: f.name, rows: 3, placeholder: f.placeholder || "" }, f.value || "")
      : h("input", { type: "text", name: f.name, value: f.value || "",
        placeholder: f.placeholder || "", required: f.required }))));
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") return resolve(null);
      const values = {};
      for (const el of box.querySelectorAll("input, textarea")) values[el.name] = el.value;
      resolve(values);
    }, { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

// Ask, then perform; ``perform`` may answer a location (#/...) to go to.
async function act(title, text, fields, perform, okLabel) {
  const values = await confirmAction(title, text, fields, okLabel);
  if (values === null) return;
  let next = null;
  try {
    next = await perform(values);
    showError(null, true);
  } catch (error) {
    showError(error, true);
    return;
  }
  if (typeof next === "string" && next !== location.hash) location.hash = next;
  else route();
}

// A JSON field of a dialog, or a one-line error naming it.
function parseField(label, text, fallback) {
  if (!text.trim()) return fallback;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${label} is not valid JSON: ${error.message}`);
  }
}

// Run ``fn`` now and every REFRESH_MS while it answers true; ``hooks.wake()`` runs it
// at once (after the one in progress, never two at a time).
function every(fn, hooks) {
  const token = viewToken;
  let busy = false;
  let again = false;
  const tick = async () => {
    if (token !== viewToken) return;
    if (busy) { again = true; return; }
    busy = true;
    clearTimeout(refreshTimer);
    const more = await fn().catch((e) => { showError(e); return true; });
    busy = false;
    if (!more || token !== viewToken) return;
    if (again) { again = false; tick(); return; }
    refreshTimer = setTimeout(tick, REFRESH_MS);
  };
  if (hooks) hooks.wake = tick;
  return tick();
}

// ------------------------------------------------------------------ workflow list

function combinedQuery(text, status) {
  let filter = text.trim();
  let order = "";
  const m = filter.match(/^(.*?)\s*(\bORDER\s+BY\b.*)$/is);
  if (m) { filter = m[1].trim(); order = m[2]; }
  if (status) filter = filter ? `(${filter}) AND ExecutionStatus = "${status}"`
    : `ExecutionStatus = "${status}"`;
  return { list: [filter, order].filter(Boolean).join(" "), count: filter };
}

function listView(params) {
  const text = params.get("query") || "";
  const status = params.get("status") || "";
  const tokens = (params.get("pages") || "").split(",").filter(Boolean);
  const size = Number(params.get("size")) || PAGE_SIZE;
  const go = (q, s, pages) => {
    const p = new URLSearchParams();
    if (q) p.set("query", q);
    if (s) p.set("status", s);
    if (size !== PAGE_SIZE) p.set("size", size);
    if (pages && pages.length) p.set("pages", pages.join(","));
    location.hash = `#/workflows?${p}`;
  };
  const input = h("input", { id: "query", type: "text", value: text,
    placeholder: 'WorkflowType = "Billing" AND StartTime > "2026-01-01T00:00:00Z"' });
  const form = h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); go(input.value, status); } },
    input, h("button", { class: "primary", id: "search" }, "Search"));
  const filters = h("div", { class: "row", id: "status-filters" },
    ["", ...STATUSES].map((s) => h("button", {
      class: s === status ? "on" : "", "data-status": s || "All",
      onclick: () => go(text, s),
    }, s || "All")));
  const count = h("span", { id: "count", class: "muted" });
  const body = h("tbody", { id: "runs" });
  const pager = h("div", { class: "row" });
  const table = h("table", {}, h("thead", {}, h("tr", {},
    ["Status", "Workflow ID", "Run ID", "Type", "Task queue", "Start", "Close"].map((c) => h("th", {}, c)))), body);
  const starter = h("button", { id: "start-workflow", class: "primary", onclick: startWorkflow }, "Start workflow");
  view(h("div", { class: "row" }, h("h2", {}, "Workflows ", count), h("span", { style: "flex:1" }), starter),
    h("div", { class: "panel" }, form, h("div", { style: "height:8px" }), filters),
    table, pager);
  const q = combinedQuery(text, status);
  return every(async () => {
    const page = tokens[tokens.length - 1] || "";
    const args = new URLSearchParams({ query: q.list, pageSize: size });
    if (page) args.set("nextPageToken", page);
    const [list, counted] = await Promise.all([
      api("GET", `${ns()}/workflows?${args}`),
      api("GET", `${ns()}/workflow-count?${new URLSearchParams({ query: q.count })}`),
    ]);
    showError(null);
    count.textContent = `${counted.count || 0} matching`;
    const runs = list.executions || [];
    body.replaceChildren(...runs.map((r) => {
      const id = r.execution.workflowId;
      const st = statusName(r.status);
      return h("tr", { class: "run-row" },
        h("td", {}, badge(st)),
        h("td", { class: "mono" }, h("a", {
          class: "wf-link", href: `#/workflows/${encodeURIComponent(id)}?run=${r.execution.runId}`,
        }, id)),
        h("td", { class: "mono muted" }, r.execution.runId),
        h("td", {}, r.type ? r.type.name : ""),
        h("td", {}, r.taskQueue || ""),
        h("td", {}, fmtTime(r.startTime)),
        h("td", {}, fmtTime(r.closeTime)));
    }));
    if (!runs.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No runs match.")));
    pager.replaceChildren(
      h("button", { id: "prev-page", disabled: !tokens.length,
        onclick: () => go(text, status, tokens.slice(0, -1)) }, "← Newer"),
      h("span", { class: "muted" }, `page ${tokens.length + 1}`),
      h("button", { id: "next-page", disabled: !list.nextPageToken,
        onclick: () => go(text, status, [...tokens, list.nextPageToken]) }, "Older →"));
    return true;
  });
}

// Start a run (StartWorkflow), behind the dialog; then show the new run's page.
function startWorkflow() {
  return act("Start workflow", "Start a new run; a worker polling the task queue runs it.", [
    { name: "workflowId", label: "Workflow ID (empty: a new UUID)" },
    { name: "type", label: "Workflow type", required: true },
    { name: "taskQueue", label: "Task queue", required: true },
    { name: "input", label: "Arguments (a JSON array, optional)", multiline: true, placeholder: '["ada", 2]' },
  ], async (v) => {
    const args = parseField("Arguments", v.input, []);
    if (!Array.isArray(args)) throw new Error('Arguments must be a JSON array, e.g. ["ada", 2]');
    const id = v.workflowId.trim() || newId();
    const started = await api("POST", wfPath(id), { workflowType: { name: v.type.trim() },
      taskQueue: { name: v.taskQueue.trim() }, input: { payloads: args }, requestId: newId() });
    return `#/workflows/${encodeURIComponent(id)}?${new URLSearchParams({ run: started.runId })}`;
  }, "Start");
}

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return "xxxxxxxx-xxxx-4xxx-8xxx-xxxxxxxxxxxx".replace(/x/g, () => Math.floor(Math.random() * 16).toString(16));
}

// ------------------------------------------------------------------ one run

// A run's history as far as read: its events (ids 1..n, gap-free) and the token of
// the next page. A refresh reads only the events added since the last one.
function historyCache(runId) {
  return { runId, events: [], token: "", done: false };
}

// Add a page of GetHistory (asked with waitNewEvent, so a running run's last page
// has a token too); true when it held new events. Pages read concurrently (the long
// poll and a refresh) may overlap: events already held are skipped, and the token is
// taken only from a page that reaches the newest event held.
function addPage(cache, page) {
  const events = (page.history && page.history.events) || [];
  let added = 0;
  for (const e of events) {
    if (Number(e.eventId) !== cache.events.length + 1) continue;
    cache.events.push(e);
    added += 1;
  }
  const last = events.length ? Number(events[events.length - 1].eventId) : null;
  if (last === null ? !page.nextPageToken : last === cache.events.length) {
    cache.token = page.nextPageToken || "";
    cache.done = !cache.token;
  }
  return added > 0;
}

async function readHistory(id, cache, length) {
  while (!cache.done && cache.events.length < Math.max(length, 1)) {
    const args = new URLSearchParams({ runId: cache.runId, waitNewEvent: "true" });
    if (cache.token) args.set("nextPageToken", cache.token);
    // Not a wait: the run has events past the token (its history length says so).
    const page = await api("GET", `${wfPath(id)}/history?${args}`);
    if (!addPage(cache, page)) break;
  }
  return cache.events;
}

// While the run is open, wait on the server for its next events and wake the page
// when they come (the refresh every REFRESH_MS still shows what changes without an
// event: an activity a worker has started, a DAG's state).
function followHistory(id, cache, wake) {
  if (follower) follower.abort();
  const controller = new AbortController();
  controller.cache = cache;
  follower = controller;
  (async () => {
    while (!controller.signal.aborted && !cache.done && cache.token) {
      const args = new URLSearchParams({ runId: cache.runId, waitNewEvent: "true", nextPageToken: cache.token });
      try {
        const page = await api("GET", `${wfPath(id)}/history?${args}`, undefined, 65, controller.signal);
        if (addPage(cache, page) && !controller.signal.aborted) wake();
      } catch (error) {
        if (controller.signal.aborted) return;
        await new Promise((resolve) => setTimeout(resolve, REFRESH_MS));  // the refresh shows the error
      }
    }
  })();
}

function runView(id, params) {
  const tab = params.get("tab") || "timeline";
  let runId = params.get("run") || "";
  const setTab = (t) => {
    const p = new URLSearchParams(params);
    p.set("tab", t);
    if (runId) p.set("run", runId);
    location.hash = `#/workflows/${encodeURIComponent(id)}?${p}`;
  };
  const header = h("div", { class: "row" });
  const summary = h("div", { class: "panel grid", id: "summary" });
  const io = h("div", { class: "cols", id: "io" });
  const pending = h("div", { id: "pending" });
  const children = h("div", { id: "children" });
  const tabs = h("div", { class: "tabs" }, [["timeline", "Timeline"], ["events", "Events"],
    ["dag", "DAG"]].map(([t, label]) => h("button", {
    id: `tab-${t}`, class: t === tab ? "on" : "", onclick: () => setTab(t),
  }, label)));
  const content = h("div", { id: "tab-content" });
  view(header, summary, io, pending, children, tabs, content);
  let selected = params.get("task") || null;
  let cache = historyCache(runId);
  const hooks = {};
  const timelineState = { detail: null };
  return every(async () => {
    const described = await api("GET", `${wfPath(id)}?${new URLSearchParams({ runId })}`);
    const info = described.workflowExecutionInfo;
    runId = info.execution.runId;
    const status = statusName(info.status);
    const running = status === "Running";
    if (cache.runId !== runId) cache = historyCache(runId);
    const events = await readHistory(id, cache, Number(info.historyLength) || 0);
    if (running && (follower === null || follower.cache !== cache)) followHistory(id, cache, () => hooks.wake());
    const isDag = info.type && info.type.name === DAG_TYPE;
    let dag = null;
    if (isDag) dag = await dagState(id, runId, events, described, running);
    showError(null);
    renderHeader(header, id, runId, status, running, dag);
    renderSummary(summary, info, described, events);
    renderIO(io, events);
    renderPending(pending, described, events);
    renderChildren(children, events);
    tabs.querySelector("#tab-dag").hidden = !isDag;
    if (tab === "events") renderEvents(content, events, runId);
    else if (tab === "dag" && dag) {
      const select = (task) => { selected = task; renderDag(content, dag, selected, select); };
      select(selected);
    } else renderTimeline(content, events, info, timelineState);
    return running;
  }, hooks);
}

function renderHeader(header, id, runId, status, running, dag) {
  const path = `${wfPath(id)}`;
  const runQ = `?${new URLSearchParams({ runId })}`;
  const buttons = [];
  if (running) {
    buttons.push(h("button", { id: "action-signal", onclick: () => act("Signal workflow",
      `Send a signal to ${id}.`, [
        { name: "name", label: "Signal name", required: true },
        { name: "input", label: "Input (JSON, optional)", multiline: true, placeholder: '{"key": "value"}' },
      ], (v) => api("POST", `${path}/signal/${encodeURIComponent(v.name)}${runQ}`,
        v.input.trim() ? { input: { payloads: [parseField("Input", v.input)] } } : {})) }, "Signal"));
    if (dag) {
      const paused = dag.status === "PAUSED";
      buttons.push(h("button", { id: paused ? "action-resume" : "action-pause",
        onclick: () => act(paused ? "Resume DAG run" : "Pause DAG run",
          paused ? "Continue scheduling tasks." : "Stop scheduling new tasks and attempts; running ones finish.",
          [], () => api("POST", `${path}/signal/${paused ? "resume" : "pause"}${runQ}`, {})) },
      paused ? "Resume" : "Pause"));
    }
    buttons.push(h("button", { id: "action-cancel", onclick: () => act("Cancel workflow",
      `Request cancellation of ${id}; the workflow decides how to stop.`,
      [{ name: "reason", label: "Reason" }],
      (v) => api("POST", `${path}/cancel${runQ}`, { reason: v.reason })) }, "Cancel"));
    buttons.push(h("button", { id: "action-terminate", class: "danger", onclick: () => act(
      "Terminate workflow", `End ${id} at once; no workflow code runs.`,
      [{ name: "reason", label: "Reason" }],
      (v) => api("POST", `${path}/terminate${runQ}`, { reason: v.reason })) }, "Terminate"));
  }
  header.replaceChildren(...[
    h("h2", { style: "margin:0" }, h("a", { href: "#/workflows" }, "Workflows"), " / ",
      h("span", { class: "mono", id: "run-title" }, id)),
    h("span", { id: "run-status" }, badge(status)),
    running ? h("span", { class: "live" }, "● live") : null,
    h("span", { style: "flex:1" }), ...buttons].filter(Boolean));
}

function renderSummary(el, info, described, events) {
  const item = (label, value) => h("div", {}, h("span", {}, label), h("b", { class: "mono" }, value ?? ""));
  const started = events.length ? attributesOf(events[0]) : {};
  const parent = started.parentWorkflowExecution;
  el.replaceChildren(...[
    item("Run ID", info.execution.runId), item("Type", info.type && info.type.name),
    parent ? item("Parent workflow", runLink(parent, "parent-link")) : null,
    item("Task queue", info.taskQueue), item("Start", fmtTime(info.startTime)),
    item("Close", fmtTime(info.closeTime)), item("History events", info.historyLength),
    item("Workflow task attempt", described.pendingWorkflowTaskAttempt || "")].filter(Boolean));
}

const runLink = (execution, id, cls) => h("a", { id, class: cls,
  href: `#/workflows/${encodeURIComponent(execution.workflowId)}?${new URLSearchParams({ run: execution.runId || "" })}` },
execution.workflowId);

const CHILD_OUTCOME = {
  EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_COMPLETED: "Completed", EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_FAILED: "Failed",
  EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_CANCELED: "Canceled", EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TIMED_OUT: "TimedOut",
  EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_TERMINATED: "Terminated",
};

// The run's child workflows as its history tells them: initiated, started (the run
// id to link to), then their outcome; keyed by the initiating event.
function childrenOf(events) {
  const byInitiated = new Map();
  for (const e of events) {
    const a = attributesOf(e);
    const t = ms(e.eventTime);
    if (e.eventType === "EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED") {
      byInitiated.set(String(e.eventId), { workflowId: a.workflowId, runId: "", type: a.workflowType ? a.workflowType.name : "",
        status: "Initiated", initiated: t, end: null });
      continue;
    }
    const child = byInitiated.get(String(a.initiatedEventId));
    if (!child) continue;
    if (e.eventType === "EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED") {
      Object.assign(child, { runId: a.workflowExecution.runId, status: "Running", started: t });
    } else if (e.eventType === "EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_FAILED") {
      Object.assign(child, { status: "StartFailed", end: t, cause: a.cause });
    } else if (CHILD_OUTCOME[e.eventType]) {
      Object.assign(child, { status: CHILD_OUTCOME[e.eventType], end: t });
    }
  }
  return [...byInitiated.values()];
}

function renderChildren(el, events) {
  const children = childrenOf(events);
  if (!children.length) { el.replaceChildren(); return; }
  el.replaceChildren(h("h3", {}, "Child workflows"), h("table", { id: "child-workflows" },
    h("thead", {}, h("tr", {}, ["Status", "Workflow ID", "Type", "Run ID", "Initiated"].map((c) => h("th", {}, c)))),
    h("tbody", {}, children.map((c) => h("tr", { class: "child-row" },
      h("td", {}, badge(c.status, c.status === "StartFailed" ? "Failed" : c.status)),
      h("td", { class: "mono" }, c.runId ? runLink(c, undefined, "child-link") : c.workflowId),
      h("td", {}, c.type), h("td", { class: "mono muted" }, c.runId || (c.cause || "")),
      h("td", {}, fmtTime(c.initiated)))))));
}

function closeEvent(events) {
  return events.find((e) => /^EVENT_TYPE_WORKFLOW_EXECUTION_(COMPLETED|FAILED|TIMED_OUT|CANCELED|TERMINATED|CONTINUED_AS_NEW)$/.test(e.eventType));
}

function renderIO(el, events) {
  const started = events.length ? attributesOf(events[0]) : {};
  const input = started.input ? started.input.payloads : [];
  const close = closeEvent(events);
  let outcome = h("pre", { class: "muted" }, "(running)");
  let title = "Result";
  if (close) {
    const a = attributesOf(close);
    if (a.result) outcome = h("pre", { id: "result" }, json(a.result.payloads.length === 1 ? a.result.payloads[0] : a.result.payloads));
    else if (a.failure) { title = "Failure"; outcome = h("pre", { id: "failure" }, json(a.failure)); }
    else { title = eventName(close.eventType); outcome = h("pre", {}, json(a)); }
  }
  el.replaceChildren(
    h("div", { class: "panel" }, h("h3", { style: "margin-top:0" }, "Input"),
      h("pre", { id: "input" }, json(input.length === 1 ? input[0] : input))),
    h("div", { class: "panel" }, h("h3", { style: "margin-top:0" }, title), outcome));
}

function renderPending(el, described, events) {
  const acts = described.pendingActivities || [];
  const timers = pendingTimers(events);
  const parts = [];
  if (acts.length) {
    parts.push(h("h3", {}, "Pending activities"), h("table", { id: "pending-activities" },
      h("thead", {}, h("tr", {}, ["Activity ID", "Type", "Attempt", "Scheduled", "Started", "Worker", "Last failure"].map((c) => h("th", {}, c)))),
      h("tbody", {}, acts.map((a) => h("tr", {},
        h("td", { class: "mono" }, a.activityId), h("td", {}, a.activityType ? a.activityType.name : ""),
        h("td", {}, a.attempt || 1), h("td", {}, fmtTime(a.scheduledTime)),
        h("td", {}, a.lastStartedTime ? fmtTime(a.lastStartedTime) : "not started"),
        h("td", {}, a.lastWorkerIdentity || ""),
        h("td", {}, a.lastFailure ? a.lastFailure.message : ""))))));
  }
  if (timers.length) {
    parts.push(h("h3", {}, "Pending timers"), h("table", { id: "pending-timers" },
      h("thead", {}, h("tr", {}, ["Timer ID", "Started", "Duration"].map((c) => h("th", {}, c)))),
      h("tbody", {}, timers.map((t) => h("tr", {}, h("td", { class: "mono" }, t.id),
        h("td", {}, fmtTime(t.start)), h("td", {}, t.duration))))));
  }
  el.replaceChildren(...parts);
}

function pendingTimers(events) {
  const open = new Map();
  for (const e of events) {
    const a = attributesOf(e);
    if (e.eventType === "EVENT_TYPE_TIMER_STARTED") open.set(a.timerId, { id: a.timerId, start: e.eventTime, duration: a.startToFireTimeout });
    else if (e.eventType === "EVENT_TYPE_TIMER_FIRED" || e.eventType === "EVENT_TYPE_TIMER_CANCELED") open.delete(a.timerId);
  }
  return [...open.values()];
}

// The events table; a refresh appends the rows of new events only (a long history is
// not redrawn, and an event opened for its attributes stays open).
function renderEvents(el, events, runId) {
  let table = el.querySelector("table#events");
  if (!table || table.dataset.run !== runId || Number(table.dataset.rows) > events.length) {
    table = h("table", { id: "events", "data-run": runId, "data-rows": 0 },
      h("thead", {}, h("tr", {}, ["ID", "Time", "Type", "Details"].map((c) => h("th", {}, c)))), h("tbody", {}));
    el.replaceChildren(table);
  }
  const shown = Number(table.dataset.rows);
  table.tBodies[0].append(...events.slice(shown).map((e) => h("tr", { class: "event-row" },
    h("td", {}, e.eventId), h("td", { class: "mono" }, fmtPrecise(e.eventTime)),
    h("td", { class: "mono" }, eventName(e.eventType)),
    h("td", {}, h("details", {}, h("summary", { class: "muted" }, summarize(e)), h("pre", {}, json(attributesOf(e))))))));
  table.dataset.rows = String(events.length);
}

function summarize(e) {
  const a = attributesOf(e);
  const bits = [a.activityId, a.activityType && a.activityType.name, a.timerId, a.signalName,
    a.attempt ? `attempt ${a.attempt}` : null, a.failure && a.failure.message, a.reason];
  return bits.filter(Boolean).join(" · ") || "attributes";
}

// ------------------------------------------------------------------ timeline

const OUTCOME = {
  EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "completed", EVENT_TYPE_ACTIVITY_TASK_FAILED: "failed",
  EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "timedout", EVENT_TYPE_ACTIVITY_TASK_CANCELED: "canceled",
};

// The timeline's rows: the run, then one row per activity (the attempts of a DAG task,
// activity ids "<task>#<n>", share one row), then one per timer.
function timelineRows(events, end) {
  const rows = [];
  const start = ms(events[0].eventTime);
  const closed = closeEvent(events);
  const runRow = { label: "workflow run", bars: [{ from: start, to: end, cls: "workflow",
    title: closed ? `the run, ${eventName(closed.eventType).toLowerCase()}` : "the run, running" }], marks: [] };
  rows.push(runRow);
  const acts = new Map();
  const byRow = new Map();
  const timers = new Map();
  for (const e of events) {
    const a = attributesOf(e);
    const t = ms(e.eventTime);
    if (e.eventType === "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") {
      const act = { id: a.activityId, type: a.activityType ? a.activityType.name : "", scheduled: t, started: null, end: null, outcome: "running", attempt: 1 };
      acts.set(e.eventId, act);
      const m = a.activityId.match(/^(.*?)#(compensation#)?\d+$/);
      const type = a.activityType ? a.activityType.name : "";
      const key = m ? (m[2] ? `${m[1]} (compensation)` : m[1]) : `${a.activityId} · ${type}`;
      if (!byRow.has(key)) byRow.set(key, { label: key, bars: [], marks: [], acts: [] });
      byRow.get(key).acts.push(act);
    } else if (e.eventType === "EVENT_TYPE_ACTIVITY_TASK_STARTED") {
      const act = acts.get(a.scheduledEventId);
      if (act) { act.started = t; act.attempt = a.attempt || 1; act.lastFailure = a.lastFailure; }
    } else if (OUTCOME[e.eventType]) {
      const act = acts.get(a.scheduledEventId);
      if (act) { act.end = t; act.outcome = OUTCOME[e.eventType]; act.failure = a.failure; }
    } else if (e.eventType === "EVENT_TYPE_TIMER_STARTED") {
      timers.set(a.timerId, { label: `timer ${a.timerId}`, bars: [{ from: t, to: null, cls: "timer", title: `timer ${a.timerId} (${a.startToFireTimeout})` }], marks: [] });
    } else if (e.eventType === "EVENT_TYPE_TIMER_FIRED" || e.eventType === "EVENT_TYPE_TIMER_CANCELED") {
      const timer = timers.get(a.timerId);
      if (timer) timer.bars[0].to = t;
    } else if (e.eventType === "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED") {
      runRow.marks.push({ at: t, cls: "signal", title: `signal ${a.signalName}` });
    } else if (e.eventType === "EVENT_TYPE_WORKFLOW_TASK_COMPLETED") {
      runRow.marks.push({ at: t, cls: "task", title: `workflow task completed (event ${e.eventId})` });
    }
  }
  for (const row of byRow.values()) {
    for (const act of row.acts) {
      const upto = act.started || act.end || end;
      row.bars.push({ from: act.scheduled, to: upto, cls: "queued", title: `${act.id}: scheduled, waiting for a worker` });
      if (act.started) {
        const retried = act.attempt > 1 ? ` (${act.attempt - 1} earlier attempt(s) failed: ${act.lastFailure ? act.lastFailure.message : ""})` : "";
        row.bars.push({ from: act.started, to: act.end || end, cls: act.outcome, label: `#${act.attempt}`,
          title: `${act.id} ${act.type}: attempt ${act.attempt}, ${act.outcome}${retried}${act.failure ? ` - ${act.failure.message}` : ""}` });
      }
    }
    rows.push(row);
  }
  for (const timer of timers.values()) { timer.bars[0].to = timer.bars[0].to || end; rows.push(timer); }
  for (const c of childrenOf(events)) {
    rows.push({ label: `child ${c.workflowId}`, marks: [], bars: [{ from: c.initiated, to: c.end || end,
      cls: c.end ? (c.status === "Completed" ? "completed" : "failed") : "running", title: `child workflow ${c.workflowId} (${c.type}): ${c.status}` }] });
  }
  return rows;
}

// An attempt's label: inside its bar when it fits, else just after it.
function barLabel(text, x1, x2, y) {
  const inside = x2 - x1 > 24;
  return svg("text", { class: "bar-label", x: inside ? x1 + 4 : x2 + 3, y: y + 17,
    style: inside ? "fill:#fff" : "" }, text);
}

function renderTimeline(el, events, info, state) {
  if (!events.length) { el.replaceChildren(h("p", { class: "muted" }, "No events yet.")); return; }
  const closed = closeEvent(events);
  const end = closed ? ms(closed.eventTime) : Math.max(Date.now(), ms(events[events.length - 1].eventTime));
  const start = ms(events[0].eventTime);
  const span = Math.max(end - start, 1);
  const rows = timelineRows(events, end);
  const W = 1100, LABEL = 230, ROW = 26, TOP = 24;
  const x = (t) => LABEL + ((t - start) / span) * (W - LABEL - 20);
  const height = TOP + rows.length * ROW + 10;
  const axis = svg("g", { class: "axis" });
  for (let i = 0; i <= 5; i++) {
    const t = start + (span * i) / 5;
    axis.append(svg("line", { x1: x(t), x2: x(t), y1: TOP - 6, y2: height }),
      svg("text", { x: x(t), y: 12, "text-anchor": "middle" }, `+${((t - start) / 1000).toFixed(span < 10000 ? 2 : 0)}s`));
  }
  // The bar last clicked stays described across refreshes.
  const detail = h("pre", { id: "timeline-detail", class: "muted" }, state.detail || "Click a bar for its details.");
  const body = rows.map((row, i) => {
    const y = TOP + i * ROW;
    return svg("g", { class: "timeline-row" },
      svg("text", { x: 4, y: y + 16 }, row.label.length > 34 ? `${row.label.slice(0, 33)}…` : row.label),
      row.bars.map((b) => svg("g", {},
        svg("rect", { class: `bar ${b.cls}`, x: x(b.from), y: y + 4, width: Math.max(x(b.to) - x(b.from), 2), height: ROW - 8, rx: 3,
          onclick: () => { state.detail = detail.textContent = `${b.title}\n${fmtTime(b.from)} → ${fmtTime(b.to)} (${((b.to - b.from) / 1000).toFixed(3)} s)`; } },
        svg("title", {}, b.title)),
        b.label ? barLabel(b.label, x(b.from), x(b.to), y) : null)),
      row.marks.map((m) => svg("circle", { class: `mark ${m.cls}`, cx: x(m.at), cy: y + ROW / 2, r: m.cls === "signal" ? 5 : 3 },
        svg("title", {}, m.title))));
  });
  el.replaceChildren(h("div", { class: "panel scroll" },
    svg("svg", { id: "timeline", width: W, height, viewBox: `0 0 ${W} ${height}` }, axis, body)),
  h("div", { class: "legend muted" }, "bars: light = waiting for a worker, then the attempt (#n) coloured by outcome; dots: workflow tasks, signals"),
  h("div", { class: "panel" }, detail));
}

// ------------------------------------------------------------------ DAG runs

// The DAG's state: the interpreter's "status" query (a worker answers), with the
// attempts a worker runs right now marked RUNNING (pending activities); without a
// worker, what the history shows.
async function dagState(id, runId, events, described, running) {
  let state = null;
  try {
    const answer = await api("POST", `${wfPath(id)}/query/status?${new URLSearchParams({ runId })}`, {}, 3);
    const payloads = answer.queryResult && answer.queryResult.payloads;
    state = payloads && payloads[0];
    if (state) state.source = "status query";
  } catch (error) {
    state = null;
  }
  if (!state) state = dagFromHistory(events);
  if (!state) return null;
  const started = new Map();
  for (const p of described.pendingActivities || []) if (p.lastStartedTime) started.set(p.activityId, p);
  for (const [tid, task] of Object.entries(state.task_states || {})) {
    if (task.status === "SCHEDULED" && started.has(`${tid}#${task.attempts}`)) {
      task.status = "RUNNING";
      task.worker = started.get(`${tid}#${task.attempts}`).lastWorkerIdentity || task.worker;
    }
  }
  return state;
}

function dagFromHistory(events) {
  if (!events.length) return null;
  const input = attributesOf(events[0]).input;
  const request = input && input.payloads && input.payloads[0];
  if (!request || !request.definition || !Array.isArray(request.definition.tasks)) return null;
  const states = {};
  for (const t of request.definition.tasks) {
    states[t.id] = { task_id: t.id, name: t.name || null, dependencies: t.depends_on || [], status: "PENDING",
      executor: t.executor, attempts: 0, max_attempts: (t.retry_policy && t.retry_policy.max_attempts) || 1, errors: [] };
  }
  const byEvent = new Map();
  let paused = false;
  for (const e of events) {
    const a = attributesOf(e);
    if (e.eventType === "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") {
      const m = a.activityId.match(/^(.*)#(\d+)$/);
      if (!m || !states[m[1]] || a.activityId.includes("#compensation#")) continue;
      byEvent.set(e.eventId, states[m[1]]);
      Object.assign(states[m[1]], { status: "SCHEDULED", attempts: Number(m[2]) });
      states[m[1]].start_time = states[m[1]].start_time || e.eventTime;
    } else if (byEvent.has(a.scheduledEventId)) {
      const task = byEvent.get(a.scheduledEventId);
      if (e.eventType === "EVENT_TYPE_ACTIVITY_TASK_STARTED") task.status = "RUNNING";
      else if (e.eventType === "EVENT_TYPE_ACTIVITY_TASK_COMPLETED") {
        task.status = "COMPLETED"; task.end_time = e.eventTime;
        task.result = a.result && a.result.payloads ? a.result.payloads[0] : null;
      } else if (OUTCOME[e.eventType]) {
        task.status = task.attempts < task.max_attempts ? "RETRY" : "FAILED";
        task.error = { type: a.failure && a.failure.applicationFailureInfo ? a.failure.applicationFailureInfo.type : "Error", message: a.failure ? a.failure.message : "" };
        task.errors.push(task.error);
      }
    } else if (e.eventType === "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED") {
      if (a.signalName === "pause") paused = true;
      if (a.signalName === "resume") paused = false;
    }
  }
  const closed = closeEvent(events);
  const status = closed ? statusName(closed.eventType.replace("EVENT_TYPE_WORKFLOW_EXECUTION_", "")).toUpperCase() : (paused ? "PAUSED" : "RUNNING");
  return { status, task_states: states, task_order: Object.keys(states), source: "history" };
}

function dagLayout(state) {
  const order = state.task_order || Object.keys(state.task_states);
  const depth = {};
  const depthOf = (tid, seen = new Set()) => {
    if (depth[tid] !== undefined) return depth[tid];
    if (seen.has(tid)) return 0;
    seen.add(tid);
    const deps = (state.task_states[tid].dependencies || []).filter((d) => state.task_states[d]);
    depth[tid] = deps.length ? 1 + Math.max(...deps.map((d) => depthOf(d, seen))) : 0;
    return depth[tid];
  };
  const columns = [];
  for (const tid of order) { const d = depthOf(tid); (columns[d] = columns[d] || []).push(tid); }
  const pos = {};
  const NW = 170, NH = 50, GX = 70, GY = 22;
  columns.forEach((col, c) => col.forEach((tid, r) => { pos[tid] = { x: 20 + c * (NW + GX), y: 20 + r * (NH + GY) }; }));
  const rows = Math.max(...columns.map((c) => c.length));
  return { pos, NW, NH, width: 40 + columns.length * (NW + GX) - GX, height: 40 + rows * (NH + GY) - GY };
}

function renderDag(el, state, selected, onSelect) {
  const { pos, NW, NH, width, height } = dagLayout(state);
  const edges = [];
  for (const [tid, task] of Object.entries(state.task_states)) {
    for (const dep of task.dependencies || []) {
      if (!pos[dep]) continue;
      const a = pos[dep], b = pos[tid];
      const x1 = a.x + NW, y1 = a.y + NH / 2, x2 = b.x, y2 = b.y + NH / 2;
      edges.push(svg("path", { class: "edge", d: `M${x1},${y1} C${x1 + 35},${y1} ${x2 - 35},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" }));
    }
  }
  const shownStatus = (task) => (state.status === "PAUSED" && task.status === "PENDING" ? "PAUSED" : task.status);
  const nodes = Object.entries(state.task_states).map(([tid, task]) => {
    const p = pos[tid];
    const st = shownStatus(task);
    return svg("g", { class: `dag-node n-${st}${tid === selected ? " selected" : ""}`, "data-task": tid, "data-status": st,
      transform: `translate(${p.x},${p.y})`, onclick: () => onSelect && onSelect(tid) },
    svg("rect", { width: NW, height: NH, rx: 6 }),
    svg("text", { x: 10, y: 20 }, tid.length > 22 ? `${tid.slice(0, 21)}…` : tid),
    svg("text", { x: 10, y: 38, class: "sub" }, `${st}${task.attempts ? ` · attempt ${task.attempts}/${task.max_attempts}` : ""}`),
    svg("title", {}, `${tid}: ${st}`));
  });
  const defs = svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8893a2" })));
  const legend = h("div", { class: "legend" }, ["PENDING", "SCHEDULED", "RUNNING", "RETRY", "COMPLETED", "FAILED", "PAUSED"].map((s) => badge(s)));
  const task = selected && state.task_states[selected];
  const detail = h("div", { class: "panel", id: "task-detail" }, task ? taskDetail(selected, task) : h("span", { class: "muted" }, "Click a task for its details."));
  el.replaceChildren(
    h("div", { class: "row" }, h("b", {}, "DAG status "), h("span", { id: "dag-status" }, badge(state.status)),
      h("span", { class: "muted" }, ` (from the ${state.source})`), h("span", { style: "flex:1" }), legend),
    h("div", { class: "panel scroll" }, svg("svg", { id: "dag", width, height, viewBox: `0 0 ${width} ${height}` }, defs, edges, nodes)),
    detail);
}

function taskDetail(tid, task) {
  const rows = [["Status", task.status], ["Executor", task.executor], ["Attempts", `${task.attempts} of ${task.max_attempts}`],
    ["Worker", task.worker], ["Started", fmtTime(task.start_time)], ["Ended", fmtTime(task.end_time)],
    ["Next retry", fmtTime(task.next_retry_time)], ["Depends on", (task.dependencies || []).join(", ")]];
  return [h("h3", { style: "margin-top:0" }, `Task ${tid}`),
    h("table", {}, h("tbody", {}, rows.filter(([, v]) => v).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))))),
    task.parameters !== undefined && task.parameters !== null ? [h("h3", {}, "Parameters"), h("pre", {}, json(task.parameters))] : null,
    task.result !== undefined && task.result !== null ? [h("h3", {}, "Result"), h("pre", { id: "task-result" }, json(task.result))] : null,
    (task.errors || []).length ? [h("h3", {}, "Errors"), h("pre", {}, json(task.errors))] : null,
    (task.transitions || []).length ? [h("h3", {}, "Transitions"), h("table", {}, h("tbody", {},
      task.transitions.map((t) => h("tr", {}, h("td", {}, badge(t.status)), h("td", {}, fmtTime(t.time)), h("td", {}, t.attempt ? `attempt ${t.attempt}` : ""), h("td", {}, t.note || "")))))] : null];
}

// ------------------------------------------------------------------ schedules

function schedulesView() {
  const body = h("tbody", { id: "schedules" });
  const detail = h("div", { id: "schedule-detail" });
  const creator = h("button", { id: "create-schedule", class: "primary", onclick: createSchedule }, "Create schedule");
  view(h("div", { class: "row" }, h("h2", {}, "Schedules"), h("span", { style: "flex:1" }), creator),
    h("table", {}, h("thead", {}, h("tr", {},
    ["Schedule ID", "State", "Workflow", "Spec", "Actions taken", "Next runs", ""].map((c) => h("th", {}, c)))), body), detail);
  return every(async () => {
    const list = await api("GET", `${ns()}/schedules`);
    showError(null);
    const entries = list.schedules || [];
    body.replaceChildren(...entries.map((s) => {
      const sid = s.scheduleId;
      const sched = s.schedule || {};
      const paused = sched.state && sched.state.paused;
      const wf = sched.action && sched.action.startWorkflow;
      const spec = sched.spec || {};
      const path = `${ns()}/schedules/${encodeURIComponent(sid)}`;
      const info = s.info || {};
      const button = (label, idp, text, perform, cls) => h("button", { class: cls, id: `${idp}-${sid}`,
        onclick: () => act(`${label} schedule`, text, [], perform) }, label);
      return h("tr", { class: "schedule-row" },
        h("td", { class: "mono" }, h("a", { href: "#", onclick: async (e) => { e.preventDefault(); detail.replaceChildren(h("div", { class: "panel" }, h("h3", { style: "margin-top:0" }, sid), h("pre", {}, json(await api("GET", path))))); } }, sid)),
        h("td", {}, badge(paused ? "Paused" : "Active", paused ? "PAUSED" : "Running")),
        h("td", {}, wf && wf.workflowType ? wf.workflowType.name : ""),
        h("td", { class: "mono" }, [...(spec.cronExpressions || []), ...(spec.intervals || []).map((i) => `every ${i.interval}`)].join(", ")),
        h("td", {}, info.actionCount || 0),
        h("td", {}, (info.futureActionTimes || []).slice(0, 2).map(fmtTime).join(", ")),
        h("td", {}, h("div", { class: "row" },
          paused ? button("Unpause", "unpause", `Resume ${sid}.`, () => api("POST", `${path}/unpause`, {}))
            : button("Pause", "pause", `Pause ${sid}: no runs start until it is unpaused.`, () => api("POST", `${path}/pause`, {})),
          button("Trigger", "trigger", `Start ${sid}'s workflow now.`, () => api("POST", `${path}/trigger`, {})),
          button("Delete", "delete", `Delete ${sid}; its runs are not affected.`, () => api("DELETE", path), "danger"))));
    }));
    if (!entries.length) body.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No schedules.")));
    return true;
  });
}

// "90s", "1h30m", "1d" -> "5400s" (a protobuf Duration's JSON form).
function durationJson(text) {
  const m = text.trim().match(/^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/);
  if (!text.trim() || !m) throw new Error(`Interval ${JSON.stringify(text)} is not like 90s, 1h30m or 1d`);
  const [d, hr, mi, se] = m.slice(1).map((v) => Number(v || 0));
  const seconds = ((d * 24 + hr) * 60 + mi) * 60 + se;
  if (!seconds) throw new Error("Interval must be longer than 0s");
  return `${seconds}s`;
}

// Create a schedule (CreateSchedule), behind the dialog: a cron expression or an
// interval (or both), and the workflow each action starts.
function createSchedule() {
  return act("Create schedule", "Start a workflow on a cron expression or at an interval.", [
    { name: "scheduleId", label: "Schedule ID", required: true },
    { name: "cron", label: "Cron expression (e.g. 0 2 * * *)" },
    { name: "interval", label: "Or every (e.g. 90s, 1h30m, 1d)" },
    { name: "timeZone", label: "Time zone of the cron expression (empty: UTC)" },
    { name: "type", label: "Workflow type", required: true },
    { name: "taskQueue", label: "Task queue", required: true },
    { name: "workflowId", label: "Workflow ID prefix (empty: the schedule ID)" },
    { name: "input", label: "Arguments (a JSON array, optional)", multiline: true, placeholder: '["eu"]' },
  ], async (v) => {
    const args = parseField("Arguments", v.input, []);
    if (!Array.isArray(args)) throw new Error('Arguments must be a JSON array, e.g. ["eu"]');
    const spec = { timezoneName: v.timeZone.trim() };
    if (v.cron.trim()) spec.cronExpressions = [v.cron.trim()];
    if (v.interval.trim()) spec.intervals = [{ interval: durationJson(v.interval) }];
    if (!spec.cronExpressions && !spec.intervals) throw new Error("Give a cron expression or an interval");
    const sid = v.scheduleId.trim();
    await api("POST", `${ns()}/schedules/${encodeURIComponent(sid)}`, { schedule: { spec, action: { startWorkflow: {
      workflowId: v.workflowId.trim() || sid, workflowType: { name: v.type.trim() }, taskQueue: { name: v.taskQueue.trim() },
      input: { payloads: args } } } }, requestId: newId() });
  }, "Create");
}

// ------------------------------------------------------------------ routing

function view(...children) {
  document.getElementById("view").replaceChildren(...children);
}

function route() {
  viewToken += 1;
  clearTimeout(refreshTimer);
  if (follower) { follower.abort(); follower = null; }
  showError(null, true);
  const hash = location.hash.replace(/^#/, "") || "/workflows";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", hash.startsWith(a.getAttribute("href").slice(1)));
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "schedules") return schedulesView();
  if (parts[0] === "workflows" && parts.length > 1) return runView(decodeURIComponent(parts.slice(1).join("/")), params);
  return listView(params);
}

function init() {
  const nsInput = document.getElementById("namespace");
  const keyInput = document.getElementById("api-key");
  nsInput.value = settings.ns;
  keyInput.value = settings.key;
  nsInput.addEventListener("change", () => { settings.ns = nsInput.value.trim(); route(); });
  keyInput.addEventListener("change", () => { settings.key = keyInput.value.trim(); route(); });
  window.addEventListener("hashchange", route);
  route();
}

init();
