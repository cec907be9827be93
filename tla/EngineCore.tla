----------------------------- MODULE EngineCore -----------------------------
(***************************************************************************)
(* The transitions of one run, as the engine (server/_engine.py and its    *)
(* transition modules) and server/_mutation.py compute them.  Nothing here *)
(* is a TLA+ action: every operator maps a                                 *)
(* Mutation (server/_mutation.py: Mutation) to a Mutation, exactly as the   *)
(* engine's `fn(m)` callbacks do before `HistoryEngine.update` commits      *)
(* them as one store transaction.  History.tla and WorkflowDag.tla EXTEND   *)
(* this module and add the store, the nodes, the workers and the network.   *)
(*                                                                           *)
(* Names follow the code: ms = MutableState, wft = ms.workflow_task,        *)
(* activities = ms.pending_activities (key: scheduled event id "sid"),      *)
(* timers = ms.pending_timers (timer id -> started event id), buffered =    *)
(* ms.buffered_events, signal_ids = ms.signal_request_ids, sticky =         *)
(* (ms.sticky_task_queue # ""), wft.sticky = (wft.task_queue.kind = STICKY).*)
(*                                                                           *)
(* Abstractions (see README.md): time is not modelled (any armed timer may *)
(* fire at any moment; the engine validates every timer against the state, *)
(* which is what safety depends on; the activity timeouts are flags of     *)
(* the command that say which timers the engine arms); payloads,           *)
(* identities, request ids of tasks, the run timeout and activity          *)
(* cancellation are left out.                                              *)
(*                                                                           *)
(* Every operator Op(m, ...) that builds a Mutation is a function        *)
(* OpF[m \in Any, ...] behind a one-line wrapper: a function application   *)
(* evaluates its arguments once, whereas TLC 2.15 re-evaluates operator    *)
(* arguments at every use when it computes ENABLED for fairness, which is  *)
(* exponential in the depth of these compositions.                         *)
(*                                                                           *)
(* `Mutant` switches deliberately broken variants on (tla/manifest.csv);    *)
(* "none" is the engine as built.                                          *)
(***************************************************************************)
EXTENDS Integers, Sequences, FiniteSets, TLC

CONSTANTS
    Mutant,     \* "none" or the name of a deliberately broken variant
    MaxEager    \* _MAX_EAGER_ACTIVITIES (3 in the code)

RUNNING == "RUNNING"
COMPLETED == "COMPLETED"
FAILED == "FAILED"
TERMINATED == "TERMINATED"
TIMED_OUT == "TIMED_OUT"
CANCELED == "CANCELED"
CONTINUED_AS_NEW == "CONTINUED_AS_NEW"
Closed == {COMPLETED, FAILED, TERMINATED, TIMED_OUT, CANCELED, CONTINUED_AS_NEW}

(* history_pb2.EventType names without the EVENT_TYPE_ prefix, as in traces *)
ActivityOutcomes == {"ACTIVITY_TASK_COMPLETED", "ACTIVITY_TASK_FAILED",
                     "ACTIVITY_TASK_TIMED_OUT", "ACTIVITY_TASK_CANCELED"}
WftOutcomes == {"WORKFLOW_TASK_COMPLETED", "WORKFLOW_TASK_FAILED",
                "WORKFLOW_TASK_TIMED_OUT"}
CloseEvents == {"WORKFLOW_EXECUTION_COMPLETED", "WORKFLOW_EXECUTION_FAILED",
                "WORKFLOW_EXECUTION_TERMINATED", "WORKFLOW_EXECUTION_TIMED_OUT",
                "WORKFLOW_EXECUTION_CANCELED", "WORKFLOW_EXECUTION_CONTINUED_AS_NEW"}
(* The close events a workflow's own command writes                        *)
CommandCloseEvents == {"WORKFLOW_EXECUTION_COMPLETED", "WORKFLOW_EXECUTION_FAILED",
                       "WORKFLOW_EXECUTION_CANCELED", "WORKFLOW_EXECUTION_CONTINUED_AS_NEW"}
CloseCommands == {"Complete", "Fail", "CancelWorkflow", "ContinueAsNew"}
(* Events that come from outside workflow code: append_or_buffer          *)
ExternalTypes == ActivityOutcomes \cup {"ACTIVITY_TASK_STARTED", "TIMER_FIRED",
                                        "WORKFLOW_EXECUTION_SIGNALED",
                                        "WORKFLOW_EXECUTION_CANCEL_REQUESTED"}

(* One history event: the fields tideflow.server._trace exports.  `ref` is *)
(* the activity id (ACTIVITY_TASK_SCHEDULED), the timer id (TIMER_ events) or *)
(* the signal request id (WORKFLOW_EXECUTION_SIGNALED).                    *)
Ev(type) == [id |-> 0, type |-> type, scheduled |-> 0, started |-> 0,
             attempt |-> 0, ref |-> ""]

(* Store rows (history/_records.py TaskRow / TimerRow, without fire_at).   *)
TaskRow(kind, ref, attempt) == [kind |-> kind, ref |-> ref, attempt |-> attempt]
TimerRow(kind, ref, attempt) == [kind |-> kind, ref |-> ref, attempt |-> attempt]
NoKey == TaskRow("NONE", 0, 0)
(* An outbox row of the transfer processor (Mutation.add_transfer): `ref` *)
(* the event it is about, `attempt` the slot (0, or 1 / 2 for the          *)
(* parent-close policy of a child).                                        *)
TransferRow(ref, slot) == TaskRow("TRANSFER", ref, slot)

EmptyFn == [x \in {} |-> 0]
NoWft == [scheduled |-> 0, started |-> 0, attempt |-> 0, transient |-> FALSE,
          sticky |-> FALSE, timer_keys |-> {}]

HasWft(ms) == ms.wft.attempt > 0                     \* HasField("workflow_task")
WftStarted(ms) == HasWft(ms) /\ ms.wft.started # 0   \* Mutation.workflow_task_started

(* The workflow task row key of the scheduled task: Mutation.workflow_task_row_key *)
WftRow(wft) == TaskRow("WORKFLOW", IF wft.transient THEN 0 ELSE wft.scheduled, wft.attempt)

NewMutation(ms) == [ms |-> ms, events |-> <<>>, new_tasks |-> {}, done_tasks |-> {},
                    new_timers |-> {}, done_timers |-> {}, eager |-> <<>>]

RECURSIVE SetToSeq(_)
SetToSeq(S) == IF S = {} THEN <<>>
               ELSE LET x == CHOOSE x \in S : TRUE IN <<x>> \o SetToSeq(S \ {x})

Put(f, k, v) == [x \in DOMAIN f \cup {k} |-> IF x = k THEN v ELSE f[x]]
Del(f, k) == [x \in DOMAIN f \ {k} |-> f[x]]

-----------------------------------------------------------------------------
(* Mutation.append / append_or_buffer / append_activity_outcome / flush    *)

AppendEventF[m \in Any, e \in Any] ==
    [m EXCEPT !.ms.next_event_id = @ + 1,
              !.events = Append(@, [e EXCEPT !.id = m.ms.next_event_id])]
AppendEvent(m, e) == AppendEventF[m, e]

LastId(m) == m.ms.next_event_id - 1

AppendOrBufferF[m \in Any, e \in Any] ==
    IF WftStarted(m.ms)
    THEN IF Mutant = "buffer_assigns_ids"
         \* BUG: give the buffered event its id now (flush keeps it).
         THEN [m EXCEPT !.ms.buffered = Append(@, [e EXCEPT !.id = m.ms.next_event_id]),
                        !.ms.next_event_id = @ + 1]
         ELSE [m EXCEPT !.ms.buffered = Append(@, e)]
    ELSE AppendEvent(m, e)
AppendOrBuffer(m, e) == AppendOrBufferF[m, e]

AppendActivityOutcomeF[m \in Any, sid \in Any, type \in Any] ==
    LET info == m.ms.activities[sid]
        st == [Ev("ACTIVITY_TASK_STARTED") EXCEPT !.scheduled = sid, !.attempt = info.attempt]
        oc == [Ev(type) EXCEPT !.scheduled = sid]
    IN IF WftStarted(m.ms)
       THEN AppendOrBuffer(AppendOrBuffer(m, st), oc)
       ELSE LET m1 == AppendEvent(m, st)
            IN AppendEvent(m1, [oc EXCEPT !.started = LastId(m1)])
AppendActivityOutcome(m, sid, type) == AppendActivityOutcomeF[m, sid, type]

StartedIdOf(pairs, sid) ==
    IF \E p \in pairs : p[1] = sid THEN (CHOOSE p \in pairs : p[1] = sid)[2] ELSE 0

FlushEventsF[m \in Any, buf \in Any, pairs \in Any] ==
    IF buf = <<>> THEN m
    ELSE LET e == Head(buf)
             id == IF Mutant = "buffer_assigns_ids" THEN e.id ELSE m.ms.next_event_id
             e1 == IF e.type \in ActivityOutcomes
                   THEN [e EXCEPT !.started = StartedIdOf(pairs, e.scheduled)] ELSE e
             m1 == [m EXCEPT !.ms.next_event_id =
                                IF Mutant = "buffer_assigns_ids" THEN @ ELSE @ + 1,
                             !.events = Append(@, [e1 EXCEPT !.id = id])]
         IN FlushEventsF[m1, Tail(buf),
                        IF e.type = "ACTIVITY_TASK_STARTED"
                        THEN pairs \cup {<<e.scheduled, id>>} ELSE pairs]
FlushEvents(m, buf, pairs) == FlushEventsF[m, buf, pairs]

(* Mutation.flush_buffered (the caller asks `m.ms.buffered # <<>>` first)  *)
FlushBufferedF[m \in Any] ==
    LET m1 == FlushEvents(m, m.ms.buffered, {}) IN [m1 EXCEPT !.ms.buffered = <<>>]
FlushBuffered(m) == FlushBufferedF[m]

-----------------------------------------------------------------------------
(* Mutation.schedule_workflow_task / clear_workflow_task / close           *)

(* Attempts after the first are transient (no events until one completes);*)
(* from attempt 3 on a WORKFLOW_TASK_RETRY backoff timer comes first       *)
(* (_workflow_tasks.fail: delay only when next_attempt > 2).               *)
(* A first attempt of a run with a sticky worker waits on that worker's    *)
(* queue, with a STICKY_SCHEDULE_TO_START timer (the row key has no queue).*)
ScheduleWorkflowTaskF[m \in Any, attempt \in Any] ==
    IF HasWft(m.ms) \/ m.ms.status # RUNNING THEN m
    ELSE LET m1 == IF attempt = 1
                   THEN AppendEvent(m, [Ev("WORKFLOW_TASK_SCHEDULED") EXCEPT !.attempt = 1])
                   ELSE m
             sched == IF attempt = 1 THEN LastId(m1) ELSE 0
             delayed == attempt > 2
             sticky == attempt = 1 /\ m.ms.sticky
             retry == TimerRow("WORKFLOW_TASK_RETRY", 0, attempt)
             stickyRow == TimerRow("STICKY_SCHEDULE_TO_START", sched, attempt)
             wft == [scheduled |-> sched, started |-> 0, attempt |-> attempt,
                     transient |-> attempt # 1, sticky |-> sticky,
                     timer_keys |-> IF delayed THEN {retry}
                                    ELSE IF sticky THEN {stickyRow} ELSE {}]
         IN [m1 EXCEPT !.ms.wft = wft,
                       !.new_timers = IF delayed THEN @ \cup {retry}
                                      ELSE IF sticky THEN @ \cup {stickyRow} ELSE @,
                       !.new_tasks = IF delayed THEN @ ELSE @ \cup {WftRow(wft)}]
ScheduleWorkflowTask(m, attempt) == ScheduleWorkflowTaskF[m, attempt]

(* Mutation.unstick: forget the sticky worker; a task still waiting on its  *)
(* queue moves to the normal queue (same row key: deleted and re-inserted). *)
UnstickMutF[m \in Any] ==
    LET m1 == [m EXCEPT !.ms.sticky = FALSE]
    IN IF HasWft(m.ms) /\ m.ms.wft.started = 0 /\ m.ms.wft.sticky
       THEN [m1 EXCEPT !.ms.wft.sticky = FALSE,
                       !.done_tasks = @ \cup {WftRow(m.ms.wft)},
                       !.new_tasks = @ \cup {WftRow(m.ms.wft)}]
       ELSE m1
UnstickMut(m) == UnstickMutF[m]

ClearWorkflowTaskF[m \in Any] ==
    IF HasWft(m.ms)
    THEN [m EXCEPT !.done_timers = @ \cup m.ms.wft.timer_keys, !.ms.wft = NoWft]
    ELSE m
ClearWorkflowTask(m) == ClearWorkflowTaskF[m]

UserTimerRow(startedId) == TimerRow("USER_TIMER", startedId, 0)
(* The run's own timer (ms.timer_keys): its run timeout, or the execution   *)
(* deadline of a continue-as-new chain, whichever comes first.             *)
RunTimeoutRow == TimerRow("WORKFLOW_RUN_TIMEOUT", 0, 1)

CloseF[m \in Any, status \in Any, closeType \in Any] ==
    LET wft == m.ms.wft
        m1 == IF WftStarted(m.ms) /\ ~wft.transient
              THEN AppendEvent(m, [Ev("WORKFLOW_TASK_FAILED") EXCEPT
                                      !.scheduled = wft.scheduled, !.started = wft.started])
              ELSE m
        m2 == IF HasWft(m.ms) /\ wft.started = 0
              THEN [m1 EXCEPT !.done_tasks = @ \cup {WftRow(wft)}] ELSE m1
        m3a == ClearWorkflowTask(m2)
        m3 == IF Mutant = "close_without_flush" THEN m3a ELSE FlushBuffered(m3a)
        acts == m3.ms.activities
        tms == m3.ms.timers
        m4 == [m3 EXCEPT
                 !.done_timers = @ \cup UNION {acts[s].timer_keys : s \in DOMAIN acts}
                                   \cup {UserTimerRow(tms[t]) : t \in DOMAIN tms}
                                   \cup m3.ms.timer_keys,
                 !.ms.timer_keys = {},
                 !.done_tasks = @ \cup {acts[s].task_key :
                                          s \in {x \in DOMAIN acts : acts[x].task_key # NoKey}},
                 !.ms.activities = EmptyFn,
                 !.ms.timers = EmptyFn]
        m5 == AppendEvent(m4, Ev(closeType))
        kids == m5.ms.children
        \* children stay listed, each gets its parent-close policy (transfer
        \* slot 1) unless ABANDON; the last run of a child's chain reports its
        \* close to the parent (a CHILD_CLOSED transfer)
        m6 == [m5 EXCEPT
                 !.ms.children = [x \in DOMAIN kids |-> [kids[x] EXCEPT !.parent_closed = TRUE]],
                 !.ms.external = {},
                 !.new_tasks = @ \cup {TransferRow(x, 1) : x \in {y \in DOMAIN kids :
                                                                     ~kids[y].abandon}}
                               \cup (IF m5.ms.has_parent /\ status # CONTINUED_AS_NEW
                                     THEN {TransferRow(LastId(m5), 0)} ELSE {})]
    IN [m6 EXCEPT !.ms.status = status]
Close(m, status, closeType) == CloseF[m, status, closeType]

-----------------------------------------------------------------------------
(* Activities (server/_activities.py): dispatch_attempt,                   *)
(* start_attempt, finish, attempt_failed                                   *)

DispatchActivityAttemptF[m \in Any, sid \in Any] ==
    LET info == m.ms.activities[sid]
        row == TaskRow("ACTIVITY", sid, info.attempt)
        s2s == IF info.s2s THEN {TimerRow("ACTIVITY_SCHEDULE_TO_START", sid, info.attempt)}
               ELSE {}
    IN [m EXCEPT !.ms.activities[sid].backing_off = FALSE,
                 !.ms.activities[sid].task_key = row,
                 !.ms.activities[sid].timer_keys = @ \cup s2s,
                 !.new_tasks = @ \cup {row},
                 !.new_timers = @ \cup s2s]
DispatchActivityAttempt(m, sid) == DispatchActivityAttemptF[m, sid]

StartActivityAttemptF[m \in Any, sid \in Any] ==
    LET info == m.ms.activities[sid]
        s2s == {k \in info.timer_keys : k.kind = "ACTIVITY_SCHEDULE_TO_START"}
        row == TimerRow("ACTIVITY_START_TO_CLOSE", sid, info.attempt)
        hb == IF info.hb THEN {TimerRow("ACTIVITY_HEARTBEAT", sid, info.attempt)} ELSE {}
    IN IF Mutant = "no_start_to_close_timer"
       \* BUG: the attempt is handed to a worker with nothing durable that
       \* would ever retry it if the worker dies.
       THEN [m EXCEPT !.ms.activities[sid].task_key = NoKey,
                      !.ms.activities[sid].started = TRUE]
       ELSE [m EXCEPT !.ms.activities[sid].task_key = NoKey,
                      !.ms.activities[sid].started = TRUE,
                      !.ms.activities[sid].timer_keys = (@ \ s2s) \cup {row} \cup hb,
                      !.done_timers = @ \cup s2s,
                      !.new_timers = @ \cup {row} \cup hb]
StartActivityAttempt(m, sid) == StartActivityAttemptF[m, sid]

FinishActivityF[m \in Any, sid \in Any] ==
    LET info == m.ms.activities[sid]
        m1 == [m EXCEPT !.done_timers = @ \cup info.timer_keys,
                        !.done_tasks = IF info.task_key # NoKey THEN @ \cup {info.task_key}
                                       ELSE @,
                        !.ms.activities = IF Mutant = "keep_finished_activity"
                                          THEN @   \* BUG: the finished activity stays pending
                                          ELSE Del(@, sid)]
    IN ScheduleWorkflowTask(m1, 1)
FinishActivity(m, sid) == FinishActivityF[m, sid]

(* `retry` is _retry.next_retry's decision, made by the caller.            *)
AttemptFailedF[m \in Any, sid \in Any, retry \in Any, timedOut \in Any] ==
    IF retry
    THEN LET info == m.ms.activities[sid]
             row == TimerRow("ACTIVITY_RETRY", sid, info.attempt + 1)
             \* the schedule-to-close deadline spans all attempts
             keep == {k \in info.timer_keys : k.kind = "ACTIVITY_SCHEDULE_TO_CLOSE"}
         IN [m EXCEPT !.done_timers = @ \cup (info.timer_keys \ keep),
                      !.ms.activities[sid].attempt = @ + 1,
                      !.ms.activities[sid].started = FALSE,
                      !.ms.activities[sid].backing_off = TRUE,
                      !.ms.activities[sid].timer_keys = keep \cup {row},
                      !.new_timers = @ \cup {row}]
    ELSE FinishActivity(AppendActivityOutcome(m, sid, IF timedOut THEN "ACTIVITY_TASK_TIMED_OUT"
                                                      ELSE "ACTIVITY_TASK_FAILED"), sid)
AttemptFailed(m, sid, retry, timedOut) == AttemptFailedF[m, sid, retry, timedOut]

-----------------------------------------------------------------------------
(* Workflow tasks                                                          *)

(* _workflow_tasks.start                                                   *)
StartWorkflowTaskF[m \in Any] ==
    LET wft == m.ms.wft
        m1 == IF wft.transient
              THEN [m EXCEPT !.ms.wft.scheduled = m.ms.next_event_id,
                             !.ms.wft.started = m.ms.next_event_id + 1]
              ELSE LET m0 == AppendEvent(m, [Ev("WORKFLOW_TASK_STARTED") EXCEPT
                                                !.scheduled = wft.scheduled])
                   IN [m0 EXCEPT !.ms.wft.started = LastId(m0)]
        row == TimerRow("WORKFLOW_TASK_TIMEOUT", m1.ms.wft.scheduled, wft.attempt)
    IN [m1 EXCEPT !.ms.wft.timer_keys = @ \cup {row}, !.new_timers = @ \cup {row}]
StartWorkflowTask(m) == StartWorkflowTaskF[m]

(* record_workflow_task_started: the guard, then the transition            *)
WftTaskValid(ms, task) ==
    /\ task.kind = "WORKFLOW"
    /\ ms.status = RUNNING
    /\ HasWft(ms)
    /\ ms.wft.started = 0
    /\ ms.wft.attempt = task.attempt
    /\ (IF ms.wft.transient THEN 0 ELSE ms.wft.scheduled) = task.ref

RecordWorkflowTaskStartedF[ms \in Any, task \in Any] ==
    StartWorkflowTask([NewMutation(ms) EXCEPT !.done_tasks = {task}])
RecordWorkflowTaskStarted(ms, task) == RecordWorkflowTaskStartedF[ms, task]

(* The task token of the started workflow task (_task_responses.token),    *)
(* plus `seen`: how many events of history the worker is sent.             *)
WftToken(ms) ==
    [scheduled |-> ms.wft.scheduled, started |-> ms.wft.started, attempt |-> ms.wft.attempt,
     seen |-> IF ms.wft.transient THEN ms.wft.scheduled - 1 ELSE ms.wft.started]

(* _workflow_tasks.check_token                                             *)
WftTokenValid(ms, tok) ==
    /\ ms.status = RUNNING
    /\ WftStarted(ms)
    /\ ms.wft.scheduled = tok.scheduled
    /\ ms.wft.started = tok.started
    /\ (Mutant = "wft_no_attempt_fence" \/ ms.wft.attempt = tok.attempt)

(* _workflow_tasks.fail.  `reset`: the cause is RESET_STICKY_TASK_QUEUE (a  *)
(* sticky worker that no longer caches the run): a fresh first attempt.     *)
FailWftResetF[m \in Any, timedOut \in Any, reset \in Any] ==
    LET wft == m.ms.wft
        m0 == UnstickMut(m)
        m1 == IF ~wft.transient
              THEN AppendEvent(m0, [Ev(IF timedOut THEN "WORKFLOW_TASK_TIMED_OUT"
                                       ELSE "WORKFLOW_TASK_FAILED") EXCEPT
                                       !.scheduled = wft.scheduled, !.started = wft.started])
              ELSE m0
        m2 == ClearWorkflowTask(m1)
    IN IF m2.ms.buffered # <<>>
       THEN ScheduleWorkflowTask(FlushBuffered(m2), 1)
       ELSE IF reset THEN ScheduleWorkflowTask(m2, 1)
       ELSE ScheduleWorkflowTask(m2, wft.attempt + 1)
FailWftF[m \in Any, timedOut \in Any] == FailWftResetF[m, timedOut, FALSE]
FailWft(m, timedOut) == FailWftF[m, timedOut]

FailWorkflowTaskWithF[ms \in Any, reset \in Any] == FailWftResetF[NewMutation(ms), FALSE, reset]
FailWorkflowTaskWith(ms, reset) == FailWorkflowTaskWithF[ms, reset]
FailWorkflowTaskF[ms \in Any] == FailWorkflowTaskWith(ms, FALSE)
FailWorkflowTask(ms) == FailWorkflowTaskF[ms]

(* Commands (command_pb2.CommandType) as the model sees them:              *)
(*   [type |-> "ScheduleActivity", id |-> activity id, eager |-> BOOLEAN,  *)
(*    s2c, s2s, hb |-> BOOLEAN (ActCmd)]                                   *)
(*   [type |-> "StartTimer", id |-> timer id]                              *)
(*   [type |-> "CancelTimer", id |-> timer id]                             *)
(*   [type |-> "RecordMarker", id |-> ""]                                  *)
(*   [type |-> "UpsertSearchAttributes", id |-> ""]                        *)
(*   [type |-> "RequestCancelActivity", sid |-> scheduled event id]        *)
(*   [type |-> "Complete", id |-> ""]   [type |-> "Fail", id |-> ""]       *)
(*   [type |-> "CancelWorkflow", id |-> ""]                                *)
(*   [type |-> "StartChild", abandon |-> BOOLEAN] (ChildCmd),               *)
(*   [type |-> "SignalExternal"], [type |-> "CancelExternal"]: a request to  *)
(*   another run, carried out by the transfer processor                     *)
(*   [type |-> "ContinueAsNew", id |-> ""]: this run closes; its successor  *)
(*   is a new run (_commands._apply_continue_as_new), with a trace of its  *)
(*   own                                                                   *)
(*   [type |-> "Invalid", id |-> ""]: any command _commands.validate       *)
(*   refuses                                                               *)
Cmd(type, id, eager) ==
    [type |-> type, id |-> id, eager |-> eager, s2c |-> FALSE, s2s |-> FALSE, hb |-> FALSE,
     sid |-> 0, abandon |-> FALSE]
(* StartChild: `abandon` = parent_close_policy ABANDON.                     *)
ChildCmd(abandon) == [Cmd("StartChild", "", FALSE) EXCEPT !.abandon = abandon]
(* RequestCancelActivity names the activity by its scheduled event id.     *)
CancelActivityCmd(sid) == [Cmd("RequestCancelActivity", "", FALSE) EXCEPT !.sid = sid]
(* ScheduleActivity with its timeouts, as _commands._scheduled_attributes  *)
(* normalizes them: `s2c` a schedule-to-close timeout is set; `s2s` a      *)
(* schedule-to-start timeout shorter than it (each dispatch then arms one);*)
(* `hb` a heartbeat timeout (each start arms one).                         *)
ActCmd(id, eager, s2c, s2s, hb) ==
    [Cmd("ScheduleActivity", id, eager) EXCEPT !.s2c = s2c, !.s2s = s2s, !.hb = hb]

HasBufferedSignal(ms) ==
    \E i \in 1..Len(ms.buffered) : ms.buffered[i].type = "WORKFLOW_EXECUTION_SIGNALED"

PendingActivityIds(ms) == {ms.activities[s].activity_id : s \in DOMAIN ms.activities}

(* Timers that fired while the workflow task ran (TIMER_FIRED buffered):   *)
(* the workflow has not seen the fire and may still cancel them.           *)
FiredUnseen(ms) ==
    {ms.buffered[i].ref : i \in {j \in 1..Len(ms.buffered) :
                                     ms.buffered[j].type = "TIMER_FIRED"}}

(* _commands.validate (the parts the model can violate)                    *)
CommandsValid(ms, cmds) ==
    /\ \A i \in 1..Len(cmds) : cmds[i].type # "Invalid"
    /\ \A i \in 1..Len(cmds) : cmds[i].type = "ScheduleActivity" =>
          /\ cmds[i].id \notin PendingActivityIds(ms)
          /\ \A j \in 1..(i - 1) : ~(cmds[j].type = "ScheduleActivity" /\ cmds[j].id = cmds[i].id)
    /\ \A i \in 1..Len(cmds) : cmds[i].type = "StartTimer" =>
          /\ cmds[i].id \notin DOMAIN ms.timers
          /\ \A j \in 1..(i - 1) : ~(cmds[j].type = "StartTimer" /\ cmds[j].id = cmds[i].id)
    /\ \A i \in 1..Len(cmds) : cmds[i].type = "CancelTimer" =>
          /\ cmds[i].id \in DOMAIN ms.timers \cup FiredUnseen(ms)
                            \cup {cmds[j].id : j \in {k \in 1..(i - 1) :
                                                   cmds[k].type = "StartTimer"}}
          /\ \A j \in 1..(i - 1) : ~(cmds[j].type = "CancelTimer" /\ cmds[j].id = cmds[i].id)
    /\ \A i \in 1..Len(cmds) : cmds[i].type = "RequestCancelActivity" =>
          cmds[i].sid \in DOMAIN ms.activities
    /\ (Mutant # "close_ignores_signals" /\ HasBufferedSignal(ms)) =>
          \A i \in 1..Len(cmds) : cmds[i].type \notin CloseCommands

(* _commands._apply_schedule_activity                                      *)
ScheduleActivityF[m \in Any, c \in Any] ==
    LET m1 == AppendEvent(m, [Ev("ACTIVITY_TASK_SCHEDULED") EXCEPT !.ref = c.id])
        sid == LastId(m1)
        s2c == IF c.s2c THEN {TimerRow("ACTIVITY_SCHEDULE_TO_CLOSE", sid, 0)} ELSE {}
        info == [activity_id |-> c.id, attempt |-> 1, started |-> FALSE,
                 backing_off |-> FALSE, task_key |-> NoKey, timer_keys |-> s2c,
                 s2s |-> c.s2s, hb |-> c.hb, cancel_requested |-> FALSE]
        m2 == [m1 EXCEPT !.ms.activities = Put(@, sid, info), !.new_timers = @ \cup s2c]
    IN IF c.eager /\ Len(m2.eager) < MaxEager
       THEN [StartActivityAttempt(m2, sid) EXCEPT !.eager = Append(@, sid)]
       ELSE DispatchActivityAttempt(m2, sid)
ScheduleActivity(m, c) == ScheduleActivityF[m, c]

(* _commands.apply                                                         *)
ApplyCommandF[m \in Any, c \in Any] ==
    CASE c.type = "ScheduleActivity" -> ScheduleActivity(m, c)
      [] c.type = "StartTimer" ->
            LET m1 == AppendEvent(m, [Ev("TIMER_STARTED") EXCEPT !.ref = c.id])
            IN [m1 EXCEPT !.ms.timers = Put(@, c.id, LastId(m1)),
                          !.new_timers = @ \cup {UserTimerRow(LastId(m1))}]
      [] c.type = "CancelTimer" /\ c.id \in DOMAIN m.ms.timers ->
            LET sid == m.ms.timers[c.id]
                m1 == AppendEvent(m, [Ev("TIMER_CANCELED") EXCEPT !.ref = c.id,
                                                                  !.started = sid])
            IN [m1 EXCEPT !.ms.timers = Del(@, c.id),
                          !.done_timers = @ \cup {UserTimerRow(sid)}]
      [] c.type = "CancelTimer" ->
            \* It fired while the task ran: the cancel wins, the buffered
            \* TIMER_FIRED is dropped (Mutation.drop_buffered_timer_fired).
            LET b == m.ms.buffered
                i == CHOOSE j \in 1..Len(b) : b[j].type = "TIMER_FIRED" /\ b[j].ref = c.id
                m1 == IF Mutant = "cancel_keeps_fired" THEN m
                      ELSE [m EXCEPT !.ms.buffered = SubSeq(b, 1, i - 1) \o SubSeq(b, i + 1, Len(b))]
            IN AppendEvent(m1, [Ev("TIMER_CANCELED") EXCEPT !.ref = c.id,
                                                            !.started = b[i].started])
      [] c.type = "RecordMarker" -> AppendEvent(m, Ev("MARKER_RECORDED"))
      [] c.type = "UpsertSearchAttributes" ->
            AppendEvent(m, Ev("UPSERT_WORKFLOW_SEARCH_ATTRIBUTES"))
      [] c.type = "RequestCancelActivity" ->
            LET m1 == AppendEvent(m, [Ev("ACTIVITY_TASK_CANCEL_REQUESTED") EXCEPT
                                         !.scheduled = c.sid])
            IN IF m1.ms.activities[c.sid].started
               \* the worker learns it from its next heartbeat
               THEN [m1 EXCEPT !.ms.activities[c.sid].cancel_requested = TRUE]
               \* not running anywhere: cancelled at once
               ELSE FinishActivity(AppendEvent(m1, [Ev("ACTIVITY_TASK_CANCELED") EXCEPT
                                                      !.scheduled = c.sid]), c.sid)
      [] c.type = "StartChild" ->
            LET m1 == AppendEvent(m, Ev("START_CHILD_WORKFLOW_EXECUTION_INITIATED"))
                id == LastId(m1)
            IN [m1 EXCEPT !.ms.children = Put(@, id, [started |-> FALSE,
                                                      parent_closed |-> FALSE,
                                                      abandon |-> c.abandon]),
                          !.new_tasks = @ \cup {TransferRow(id, 0)}]
      [] c.type \in {"SignalExternal", "CancelExternal"} ->
            LET m1 == AppendEvent(m, Ev(IF c.type = "SignalExternal"
                                        THEN "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED"
                                        ELSE "REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED"))
                id == LastId(m1)
            IN [m1 EXCEPT !.ms.external = @ \cup {id}, !.new_tasks = @ \cup {TransferRow(id, 0)}]
      [] c.type = "CancelWorkflow" -> Close(m, CANCELED, "WORKFLOW_EXECUTION_CANCELED")
      [] c.type = "ContinueAsNew" ->
            Close(m, CONTINUED_AS_NEW, "WORKFLOW_EXECUTION_CONTINUED_AS_NEW")
      [] c.type = "Complete" -> Close(m, COMPLETED, "WORKFLOW_EXECUTION_COMPLETED")
      [] c.type = "Fail" -> Close(m, FAILED, "WORKFLOW_EXECUTION_FAILED")
ApplyCommand(m, c) == ApplyCommandF[m, c]

ApplyCommandsF[m \in Any, cmds \in Any] ==
    IF cmds = <<>> \/ m.ms.status # RUNNING THEN m   \* commands after a close are ignored
    ELSE ApplyCommandsF[ApplyCommand(m, Head(cmds)), Tail(cmds)]
ApplyCommands(m, cmds) == ApplyCommandsF[m, cmds]

(* _workflow_tasks.materialize_transient                                   *)
MaterializeTransientF[m \in Any] ==
    LET wft == m.ms.wft
    IN IF ~wft.transient THEN m
       ELSE LET m1 == AppendEvent(m, [Ev("WORKFLOW_TASK_SCHEDULED") EXCEPT
                                         !.attempt = wft.attempt])
            IN AppendEvent(m1, [Ev("WORKFLOW_TASK_STARTED") EXCEPT !.scheduled = LastId(m1)])
MaterializeTransient(m) == MaterializeTransientF[m]

(* _workflow_tasks.start_eagerly: the workflow task this transition        *)
(* scheduled is started for the reporting worker instead of dispatched (no *)
(* task row; its timers, a sticky task's STICKY_SCHEDULE_TO_START included,*)
(* as scheduled).  complete_activity: the completing worker offers to run  *)
(* it (`eagerWft`); complete_workflow_task: return_new_workflow_task.      *)
StartEagerlyF[m \in Any, hadWft \in Any, eagerWft \in Any] ==
    IF ~eagerWft \/ hadWft \/ ~HasWft(m.ms) \/ m.ms.wft.transient THEN m
    ELSE StartWorkflowTask([m EXCEPT !.new_tasks = @ \ {WftRow(m.ms.wft)}])
StartEagerly(m, hadWft, eagerWft) == StartEagerlyF[m, hadWft, eagerWft]

(* complete_workflow_task (after _workflow_tasks.check_token passed).      *)
(* `sticky`: the worker sent sticky_attributes (it caches the run); without*)
(* them a sticky run is unstuck.  `forceNew`                               *)
(* (force_create_new_workflow_task): schedule the next task even if nothing*)
(* new happened, the heartbeat of a worker whose local activities still    *)
(* run; `returnNew` (return_new_workflow_task): start the task this        *)
(* completion scheduled for the completing worker in the same transaction  *)
(* (_workflow_tasks.start_eagerly on the run's own queue; the task may be  *)
(* sticky, its STICKY_SCHEDULE_TO_START timer then stays armed and is      *)
(* dropped as stale when it fires).  A refused completion does neither.    *)
CompleteWorkflowTaskWithF[ms \in Any, cmds \in Any, sticky \in Any, forceNew \in Any,
                          returnNew \in Any] ==
    LET m0 == NewMutation(ms)
    IN IF ~CommandsValid(ms, cmds) THEN FailWft(m0, FALSE)
       ELSE LET m1 == MaterializeTransient(m0)
                wft == m1.ms.wft
                m2a == AppendEvent(m1, [Ev("WORKFLOW_TASK_COMPLETED") EXCEPT
                                          !.scheduled = wft.scheduled, !.started = wft.started])
                m2 == IF sticky THEN [m2a EXCEPT !.ms.sticky = TRUE]
                      ELSE IF m2a.ms.sticky THEN UnstickMut(m2a) ELSE m2a
                m3 == ApplyCommands(ClearWorkflowTask(m2), cmds)
                force == forceNew /\ Mutant # "heartbeat_schedules_nothing"
                m4 == IF Mutant = "no_flush_after_completion" THEN m3
                      ELSE IF m3.ms.status = RUNNING /\ (m3.ms.buffered # <<>> \/ force)
                      THEN IF Mutant = "no_new_task_after_flush" THEN FlushBuffered(m3)
                           ELSE ScheduleWorkflowTask(FlushBuffered(m3), 1)
                      ELSE m3
            IN IF returnNew THEN StartEagerly(m4, FALSE, TRUE) ELSE m4
CompleteWorkflowTaskWith(ms, cmds, sticky, forceNew, returnNew) ==
    CompleteWorkflowTaskWithF[ms, cmds, sticky, forceNew, returnNew]
CompleteWorkflowTaskF[ms \in Any, cmds \in Any] ==
    CompleteWorkflowTaskWith(ms, cmds, FALSE, FALSE, FALSE)
CompleteWorkflowTask(ms, cmds) == CompleteWorkflowTaskF[ms, cmds]

(* _activities.check_token                                                 *)
ActivityTokenValid(ms, tok) ==
    /\ ms.status = RUNNING
    /\ tok.sid \in DOMAIN ms.activities
    /\ (Mutant = "activity_no_attempt_fence" \/ ms.activities[tok.sid].attempt = tok.attempt)
    /\ ms.activities[tok.sid].started

(* record_activity_started                                                 *)
ActivityTaskValid(ms, task) ==
    /\ task.kind = "ACTIVITY"
    /\ ms.status = RUNNING
    /\ task.ref \in DOMAIN ms.activities
    /\ ms.activities[task.ref].attempt = task.attempt
    /\ ~ms.activities[task.ref].started
    /\ ~ms.activities[task.ref].backing_off

RecordActivityStarted(ms, task) ==
    StartActivityAttempt([NewMutation(ms) EXCEPT !.done_tasks = {task}], task.ref)

CompleteActivityF[ms \in Any, tok \in Any, eagerWft \in Any] ==
    LET m1 == AppendActivityOutcome(NewMutation(ms), tok.sid, "ACTIVITY_TASK_COMPLETED")
    IN StartEagerly(FinishActivity(m1, tok.sid), HasWft(m1.ms), eagerWft)
CompleteActivity(ms, tok, eagerWft) == CompleteActivityF[ms, tok, eagerWft]

FailActivityF[ms \in Any, tok \in Any, retry \in Any] == AttemptFailed(NewMutation(ms), tok.sid, retry, FALSE)
FailActivity(ms, tok, retry) == FailActivityF[ms, tok, retry]

(* activity_canceled: the worker stopped an activity asked to cancel.     *)
ActivityCanceledValid(ms, tok) ==
    ActivityTokenValid(ms, tok) /\ ms.activities[tok.sid].cancel_requested
ActivityCanceledF[ms \in Any, tok \in Any] ==
    FinishActivity(AppendActivityOutcome(NewMutation(ms), tok.sid, "ACTIVITY_TASK_CANCELED"),
                   tok.sid)
ActivityCanceled(ms, tok) == ActivityCanceledF[ms, tok]

(* record_heartbeat (after _activities.check_token): only the time of the  *)
(* last heartbeat and its details change, neither of which the model has.  *)
RecordHeartbeat(ms, tok) == NewMutation(ms)

(* HistoryEngine.unstick: the sticky worker left (ShutdownWorker).  The    *)
(* engine commits it whenever the run is still sticky to that worker,      *)
(* closed or not.                                                          *)
UnstickValid(ms) == ms.sticky
Unstick(ms) == UnstickMut(NewMutation(ms))

(* signal: a retried request (same request id) changes nothing, so nothing *)
(* is committed; SignalIsNew is that check.                                *)
SignalIsNew(ms, rid) == Mutant = "no_signal_dedup" \/ rid \notin ms.signal_ids

SignalF[ms \in Any, rid \in Any] ==
    LET m1 == AppendOrBuffer(NewMutation(ms),
                             [Ev("WORKFLOW_EXECUTION_SIGNALED") EXCEPT !.ref = rid])
    IN ScheduleWorkflowTask([m1 EXCEPT !.ms.signal_ids = @ \cup {rid}], 1)
Signal(ms, rid) == SignalF[ms, rid]

(* Transfers (HistoryEngine.process_transfer) as they reach this run.  The *)
(* transition always consumes the row it was given; it records something  *)
(* only while the run and the request are still open.                     *)

(* _cross_run.record_child_started, after the child's start was attempted  *)
(* (`failed`: a run with that workflow id exists).                         *)
RecordChildStartedF[ms \in Any, row \in Any, failed \in Any] ==
    LET m == [NewMutation(ms) EXCEPT !.done_tasks = {row}]
        id == row.ref
        kid == ms.children[id]
    IN IF id \notin DOMAIN ms.children THEN m
       ELSE IF kid.started THEN m
       ELSE IF ms.status # RUNNING
       THEN \* the parent closed meanwhile: its policy now applies to the child
            IF kid.parent_closed /\ ~failed
            THEN [m EXCEPT !.ms.children[id].started = TRUE,
                           !.new_tasks = IF kid.abandon THEN @ ELSE @ \cup {TransferRow(id, 2)}]
            ELSE m
       ELSE IF failed
       THEN LET m1 == AppendOrBuffer(m, [Ev("START_CHILD_WORKFLOW_EXECUTION_FAILED") EXCEPT
                                            !.scheduled = id])
            IN ScheduleWorkflowTask([m1 EXCEPT !.ms.children = Del(@, id)], 1)
       ELSE LET m1 == AppendOrBuffer(m, [Ev("CHILD_WORKFLOW_EXECUTION_STARTED") EXCEPT
                                            !.scheduled = id])
            IN ScheduleWorkflowTask([m1 EXCEPT !.ms.children[id].started = TRUE], 1)
RecordChildStarted(ms, row, failed) == RecordChildStartedF[ms, row, failed]

(* _cross_run.record_child_closed: `row` is the child's CHILD_CLOSED row   *)
(* (its run's outbox), `id` the initiated event id in this run, `outcome`  *)
(* the parent's event for the child's close ("" for a close with none).    *)
RecordChildClosedF[ms \in Any, row \in Any, id \in Any, outcome \in Any] ==
    LET m == [NewMutation(ms) EXCEPT !.done_tasks = {row}]
    IN IF outcome = "" \/ id \notin DOMAIN ms.children \/ ms.status # RUNNING THEN m
       ELSE IF ms.children[id].parent_closed THEN m
       ELSE LET m1 == IF ms.children[id].started THEN m
                      \* closed before its start was recorded: started first
                      ELSE AppendOrBuffer(m, [Ev("CHILD_WORKFLOW_EXECUTION_STARTED") EXCEPT
                                                 !.scheduled = id])
                m2 == AppendOrBuffer(m1, [Ev(outcome) EXCEPT !.scheduled = id])
            IN ScheduleWorkflowTask([m2 EXCEPT !.ms.children = Del(@, id)], 1)
RecordChildClosed(ms, row, id, outcome) == RecordChildClosedF[ms, row, id, outcome]

(* _cross_run.record_external_outcome, after signalling or cancelling the  *)
(* other run.                                                              *)
RecordExternalOutcomeF[ms \in Any, row \in Any, failed \in Any, cancel \in Any] ==
    LET m == [NewMutation(ms) EXCEPT !.done_tasks = {row}]
        type == CASE cancel /\ ~failed -> "EXTERNAL_WORKFLOW_EXECUTION_CANCEL_REQUESTED"
                  [] cancel /\ failed -> "REQUEST_CANCEL_EXTERNAL_WORKFLOW_EXECUTION_FAILED"
                  [] ~cancel /\ ~failed -> "EXTERNAL_WORKFLOW_EXECUTION_SIGNALED"
                  [] ~cancel /\ failed -> "SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_FAILED"
    IN IF row.ref \notin ms.external \/ ms.status # RUNNING THEN m
       ELSE LET m1 == AppendOrBuffer(m, [Ev(type) EXCEPT !.scheduled = row.ref])
            IN ScheduleWorkflowTask([m1 EXCEPT !.ms.external = @ \ {row.ref}], 1)
RecordExternalOutcome(ms, row, failed, cancel) ==
    RecordExternalOutcomeF[ms, row, failed, cancel]

(* request_cancel: the workflow is asked to cancel itself (its code sees   *)
(* CancelledError and decides).  A second request changes nothing and      *)
(* commits nothing.                                                        *)
RequestCancelValid(ms) == ms.status = RUNNING /\ ~ms.cancel_requested
RequestCancelF[ms \in Any] ==
    LET m1 == AppendOrBuffer([NewMutation(ms) EXCEPT !.ms.cancel_requested = TRUE],
                             Ev("WORKFLOW_EXECUTION_CANCEL_REQUESTED"))
    IN ScheduleWorkflowTask(m1, 1)
RequestCancel(ms) == RequestCancelF[ms]

(* terminate                                                               *)
TerminateF[ms \in Any] == Close(NewMutation(ms), TERMINATED, "WORKFLOW_EXECUTION_TERMINATED")
Terminate(ms) == TerminateF[ms]

-----------------------------------------------------------------------------
(* fire_timer / _timeouts.fire: the guard (a timer that no longer applies  *)
(* is dropped) and the transition.  `retry` as in AttemptFailed.           *)

FireTimerValid(ms, row) ==
    /\ ms.status = RUNNING
    /\ CASE row.kind = "USER_TIMER" ->
              \E t \in DOMAIN ms.timers : ms.timers[t] = row.ref
         [] row.kind = "WORKFLOW_RUN_TIMEOUT" -> TRUE
         [] row.kind = "WORKFLOW_TASK_TIMEOUT" ->
              /\ HasWft(ms) /\ ms.wft.attempt = row.attempt
              /\ row \in ms.wft.timer_keys
              /\ ms.wft.started # 0 /\ ms.wft.scheduled = row.ref
         [] row.kind = "WORKFLOW_TASK_RETRY" ->
              /\ HasWft(ms) /\ ms.wft.attempt = row.attempt
              /\ row \in ms.wft.timer_keys
              /\ ms.wft.started = 0
         [] row.kind = "STICKY_SCHEDULE_TO_START" ->
              /\ HasWft(ms) /\ ms.wft.attempt = row.attempt
              /\ row \in ms.wft.timer_keys
              /\ ms.wft.started = 0 /\ ms.wft.sticky
         [] row.kind = "ACTIVITY_RETRY" ->
              /\ row.ref \in DOMAIN ms.activities
              /\ row \in ms.activities[row.ref].timer_keys
              /\ ms.activities[row.ref].backing_off
              /\ ms.activities[row.ref].attempt = row.attempt
         [] row.kind \in {"ACTIVITY_START_TO_CLOSE", "ACTIVITY_HEARTBEAT"} ->
              /\ row.ref \in DOMAIN ms.activities
              /\ row \in ms.activities[row.ref].timer_keys
              /\ ms.activities[row.ref].attempt = row.attempt
              /\ ms.activities[row.ref].started
         [] row.kind = "ACTIVITY_SCHEDULE_TO_START" ->
              /\ row.ref \in DOMAIN ms.activities
              /\ row \in ms.activities[row.ref].timer_keys
              /\ ms.activities[row.ref].attempt = row.attempt
              /\ ~ms.activities[row.ref].started
              /\ ~ms.activities[row.ref].backing_off
         [] row.kind = "ACTIVITY_SCHEDULE_TO_CLOSE" ->
              /\ row.ref \in DOMAIN ms.activities
              /\ row \in ms.activities[row.ref].timer_keys
         [] OTHER -> FALSE

(* `retry`: _retry.next_retry's decision for a timed-out attempt; `rearm`: *)
(* an ACTIVITY_HEARTBEAT timer found heartbeats newer than its deadline    *)
(* and re-armed itself (the same row: fire_at is not modelled).            *)
FireTimerWithF[ms \in Any, row \in Any, retry \in Any, rearm \in Any] ==
    LET m == [NewMutation(ms) EXCEPT !.done_timers = {row}]
    IN CASE row.kind = "USER_TIMER" ->
              LET tid == CHOOSE t \in DOMAIN ms.timers : ms.timers[t] = row.ref
                  m1 == AppendOrBuffer(m, [Ev("TIMER_FIRED") EXCEPT !.ref = tid,
                                                                   !.started = row.ref])
              IN ScheduleWorkflowTask([m1 EXCEPT !.ms.timers = Del(@, tid)], 1)
         [] row.kind = "WORKFLOW_RUN_TIMEOUT" ->
              Close(m, TIMED_OUT, "WORKFLOW_EXECUTION_TIMED_OUT")
         [] row.kind = "WORKFLOW_TASK_TIMEOUT" ->
              FailWft([m EXCEPT !.ms.wft.timer_keys = @ \ {row}], TRUE)
         [] row.kind = "WORKFLOW_TASK_RETRY" ->
              LET wft == ms.wft
              IN [m EXCEPT !.ms.wft.timer_keys = @ \ {row},
                           !.new_tasks = @ \cup {WftRow(wft)}]
         [] row.kind = "STICKY_SCHEDULE_TO_START" ->
              UnstickMut([m EXCEPT !.ms.wft.timer_keys = @ \ {row}])
         [] row.kind = "ACTIVITY_RETRY" ->
              DispatchActivityAttempt([m EXCEPT !.ms.activities[row.ref].timer_keys = @ \ {row}],
                                      row.ref)
         [] row.kind = "ACTIVITY_HEARTBEAT" /\ rearm ->
              [m EXCEPT !.new_timers = @ \cup {row}]
         [] row.kind = "ACTIVITY_START_TO_CLOSE" \/ (row.kind = "ACTIVITY_HEARTBEAT" /\ ~rearm) ->
              AttemptFailed([m EXCEPT !.ms.activities[row.ref].timer_keys = @ \ {row}],
                            row.ref, retry, TRUE)
         [] row.kind \in {"ACTIVITY_SCHEDULE_TO_START", "ACTIVITY_SCHEDULE_TO_CLOSE"} ->
              \* never retried: the attempt could not start in time, or the
              \* activity's whole deadline passed
              AttemptFailed([m EXCEPT !.ms.activities[row.ref].timer_keys = @ \ {row}],
                            row.ref, FALSE, TRUE)
FireTimerWith(ms, row, retry, rearm) == FireTimerWithF[ms, row, retry, rearm]
FireTimer(ms, row, retry) == FireTimerWith(ms, row, retry, FALSE)

-----------------------------------------------------------------------------
(* start_workflow: WORKFLOW_EXECUTION_STARTED, then the first workflow task *)
InitMs == [status |-> RUNNING, next_event_id |-> 1, wft |-> NoWft,
           activities |-> EmptyFn, timers |-> EmptyFn, buffered |-> <<>>,
           signal_ids |-> {}, sticky |-> FALSE, cancel_requested |-> FALSE,
           timer_keys |-> {}, children |-> EmptyFn, external |-> {}, has_parent |-> FALSE]

(* _run_start.new_run.  `attempt`: the workflow's retry attempt (a run that*)
(* a failed run's retry policy started is attempt n + 1; a continue-as-new *)
(* successor is 1); `runTimeout`: a run timeout or execution deadline arms *)
(* the run's timer; `signalRid` # "": signal-with-start, the signal (with  *)
(* the start's request id) is the run's second event; `hasParent`: a      *)
(* child's run, which reports its close to the parent.                     *)
StartRunWith(attempt, runTimeout, signalRid, hasParent) ==
    LET m1 == AppendEvent(NewMutation([InitMs EXCEPT !.has_parent = hasParent]),
                          [Ev("WORKFLOW_EXECUTION_STARTED") EXCEPT !.attempt = attempt])
        m2 == IF runTimeout
              THEN [m1 EXCEPT !.ms.timer_keys = {RunTimeoutRow},
                              !.new_timers = @ \cup {RunTimeoutRow}]
              ELSE m1
        m3 == IF signalRid # ""
              THEN [AppendEvent(m2, [Ev("WORKFLOW_EXECUTION_SIGNALED") EXCEPT !.ref = signalRid])
                    EXCEPT !.ms.signal_ids = @ \cup {signalRid}]
              ELSE m2
    IN ScheduleWorkflowTask(m3, 1)
StartRun == StartRunWith(1, FALSE, "", FALSE)

(* engine.start_workflow_eagerly: a client whose worker has a free slot asks*)
(* (request_eager_execution) for the new run's first workflow task, started *)
(* in the start's own commit (_workflow_tasks.start_eagerly: no task row;   *)
(* its WORKFLOW_TASK_TIMEOUT timer armed, so a worker that dies holding it  *)
(* is timed out and the task retried like any other).                      *)
StartRunEagerly(attempt, runTimeout, signalRid, hasParent, eagerWft) ==
    StartEagerly(StartRunWith(attempt, runTimeout, signalRid, hasParent), FALSE, eagerWft)

-----------------------------------------------------------------------------
(* Reading a history                                                       *)

Range(s) == {s[i] : i \in DOMAIN s}
EventsOf(h, type) == {e \in Range(h) : e.type = type}
ScheduledIds(h) == {e.id : e \in EventsOf(h, "ACTIVITY_TASK_SCHEDULED")}
OutcomeOf(h, sid) == {e \in Range(h) : e.type \in ActivityOutcomes /\ e.scheduled = sid}
(* An external event's identity, for "never lost" checks                   *)
EventKey(e) == <<e.type, e.scheduled, e.ref>>
=============================================================================
