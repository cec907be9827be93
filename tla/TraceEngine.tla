---------------------------- MODULE TraceEngine ----------------------------
(***************************************************************************)
(* Trace validation: is the log of one real run a behaviour of EngineCore? *)
(*                                                                           *)
(* TraceLog is the run's trace (server/_trace.py, one line per committed   *)
(* transition), converted by tla/trace_to_tla.py into EngineCore's         *)
(* vocabulary: the action, the arguments the engine was given or decided   *)
(* (task row, token, commands, timer row, retry and re-arm decisions,     *)
(* eager, sticky and heartbeat flags), the events it appended, the rows it *)
(* wrote and                                                               *)
(* consumed, and the projection of the state it committed.  The spec       *)
(* evolves its own state                                                   *)
(* from StartRun with EngineCore's operators; each step takes line l,      *)
(* requires the engine's guard for it, computes the transition with the    *)
(* logged arguments and requires that it appends exactly the logged events,*)
(* writes and consumes exactly the logged rows and commits a state that    *)
(* projects to the logged one, and that the history still satisfies the   *)
(* safety properties the specs state (gap-free ids, at most one outcome   *)
(* per activity, the state agrees with the history, signals seen before a *)
(* close, and for a DAG run TaskDependencyCorrectness).                    *)
(*                                                                           *)
(* Verdict (TLC 2.15, run with -deadlock): TraceConsumed violated (exit    *)
(* 12) = every line was matched, the real run is a behaviour of the spec; *)
(* exit 0 = line l had no matching step: TLC prints                        *)
(* <<"TRACE REJECTED", "line", l, action, why>> (tla/trace_to_tla.py       *)
(* reports it).                                                            *)
(***************************************************************************)
EXTENDS EngineCore, TraceData

(***************************************************************************)
(* TraceData is the module tla/trace_to_tla.py generates next to a copy of *)
(* this one: TraceLog (the lines), Deps (a DAG run: task -> the tasks it   *)
(* depends on; else EmptyFn) and ActTask (a DAG run: activity id           *)
(* "<task>#<n>" -> task; else EmptyFn).  They are definitions in an        *)
(* EXTENDed module rather than CONSTANTs substituted in the cfg because    *)
(* TLC 2.15 evaluates a definition substituted with `<-` at every use (the  *)
(* whole trace for every line), whereas it evaluates an ordinary           *)
(* zero-arity definition once.                                             *)
(***************************************************************************)

VARIABLES
    ms,      \* the run's mutable state, as the spec computes it
    seen,    \* what the history appended so far says (Summary below)
    tasks,   \* task rows in the store (WORKFLOW and ACTIVITY kinds)
    timers,  \* timer rows in the store (the kinds EngineCore models)
    l        \* the next line of TraceLog

vars == <<ms, seen, tasks, timers, l>>

(* The history is checked event by event as it is appended, against this  *)
(* summary of the events before (keeping the history itself in the state   *)
(* would make every step, and TLC's fingerprints and error trace, grow     *)
(* with the run).                                                          *)
NoHistory ==
    [len |-> 0,              \* events so far (the last event id)
     sched |-> EmptyFn,      \* ACTIVITY_TASK_SCHEDULED id -> activity id
     resolved |-> {},        \* scheduled ids that have an outcome
     answered |-> {},        \* WORKFLOW_TASK_STARTED ids that have an outcome
     wftSched |-> {},        \* WORKFLOW_TASK_SCHEDULED ids
     timerStarted |-> EmptyFn, \* TIMER_STARTED id -> timer id
     closed |-> FALSE,       \* a close event was appended
     lastSignal |-> 0,       \* id of the last WORKFLOW_EXECUTION_SIGNALED
     lastCompleted |-> 0,    \* started id of the last WORKFLOW_TASK_COMPLETED
     done |-> {}]            \* DAG tasks with a completed attempt

Init == /\ ms = InitMs /\ seen = NoHistory /\ tasks = {} /\ timers = {} /\ l = 1

(* What the trace records of a state (server/_trace.py: _state).           *)
Project(s) ==
    [status |-> s.status,
     next_event_id |-> s.next_event_id,
     sticky |-> s.sticky,
     cancel_requested |-> s.cancel_requested,
     has_parent |-> s.has_parent,
     children |-> [x \in DOMAIN s.children |->
                     [started |-> s.children[x].started,
                      parent_closed |-> s.children[x].parent_closed]],
     external |-> s.external,
     wft |-> [scheduled |-> s.wft.scheduled, started |-> s.wft.started,
              attempt |-> s.wft.attempt, transient |-> s.wft.transient,
              sticky |-> s.wft.sticky],
     activities |-> [x \in DOMAIN s.activities |->
                       [activity_id |-> s.activities[x].activity_id,
                        attempt |-> s.activities[x].attempt,
                        started |-> s.activities[x].started,
                        backing_off |-> s.activities[x].backing_off,
                        cancel_requested |-> s.activities[x].cancel_requested]],
     timers |-> s.timers,
     buffered |-> s.buffered]

-----------------------------------------------------------------------------
(* One line: the engine's guard and EngineCore's transition                *)

(* The commands as the model sees them: a command the engine refused for a *)
(* reason the model abstracts (empty ids, timeouts, retry policy...) is    *)
(* "Invalid"; refusals the model can see itself (duplicate ids, closing    *)
(* over an unhandled signal) are left to CommandsValid.                    *)
CmdsOf(t) ==
    IF t.rejectedAt = 0 THEN t.cmds
    ELSE [t.cmds EXCEPT ![t.rejectedAt] = Cmd("Invalid", "", FALSE)]

Guard(t) ==
    /\ (t.action = "StartRun") = (l = 1)
    /\ CASE t.action = "StartRun" -> TRUE
         [] t.action = "RecordWorkflowTaskStarted" ->
               t.task \in tasks /\ WftTaskValid(ms, t.task)
         [] t.action = "RecordActivityStarted" ->
               t.task \in tasks /\ ActivityTaskValid(ms, t.task)
         [] t.action \in {"CompleteWorkflowTask", "FailWorkflowTask"} ->
               WftTokenValid(ms, t.wtok)
         [] t.action \in {"CompleteActivity", "FailActivity", "RecordHeartbeat"} ->
               ActivityTokenValid(ms, t.atok)
         [] t.action = "ActivityCanceled" -> ActivityCanceledValid(ms, t.atok)
         [] t.action = "RequestCancel" -> RequestCancelValid(ms)
         [] t.action \in {"RecordChildStarted", "RecordExternalOutcome"} -> t.task \in tasks
         \* the row is the child run's; the parent's transition always commits
         [] t.action = "RecordChildClosed" -> TRUE
         [] t.action = "FireTimer" -> t.row \in timers /\ FireTimerValid(ms, t.row)
         [] t.action = "Signal" -> ms.status = RUNNING /\ SignalIsNew(ms, t.rid)
         [] t.action = "Terminate" -> ms.status = RUNNING
         [] t.action = "Unstick" -> UnstickValid(ms)
         [] OTHER -> FALSE

(* Only evaluated when Guard(t) holds.                                     *)
Mut(t) ==
    CASE t.action = "StartRun" -> StartRunEagerly(t.attempt, t.runTimeout, t.rid, t.hasParent,
                                                 t.eagerWft)
      [] t.action = "RecordWorkflowTaskStarted" -> RecordWorkflowTaskStarted(ms, t.task)
      [] t.action = "RecordActivityStarted" -> RecordActivityStarted(ms, t.task)
      [] t.action = "CompleteWorkflowTask" ->
            CompleteWorkflowTaskWith(ms, CmdsOf(t), t.sticky, t.forceNew, t.returnNew)
      [] t.action = "FailWorkflowTask" -> FailWorkflowTaskWith(ms, t.reset)
      [] t.action = "CompleteActivity" -> CompleteActivity(ms, t.atok, t.eagerWft)
      [] t.action = "FailActivity" -> FailActivity(ms, t.atok, t.retry)
      [] t.action = "RecordHeartbeat" -> RecordHeartbeat(ms, t.atok)
      [] t.action = "ActivityCanceled" -> ActivityCanceled(ms, t.atok)
      [] t.action = "RequestCancel" -> RequestCancel(ms)
      [] t.action = "RecordChildStarted" -> RecordChildStarted(ms, t.task, t.failed)
      [] t.action = "RecordChildClosed" ->
            RecordChildClosed(ms, t.task, t.initiated, t.childClose)
      [] t.action = "RecordExternalOutcome" ->
            RecordExternalOutcome(ms, t.task, t.failed, t.cancel)
      [] t.action = "FireTimer" -> FireTimerWith(ms, t.row, t.retry, t.rearm)
      [] t.action = "Signal" -> Signal(ms, t.rid)
      [] t.action = "Terminate" -> Terminate(ms)
      [] t.action = "Unstick" -> Unstick(ms)

-----------------------------------------------------------------------------
(* Safety properties of the specs, checked on every appended event e       *)
(* against the summary s of the history before it                          *)

(* The DAG task an activity id runs ("" for other activities, e.g.         *)
(* compensations).                                                         *)
TaskOf(ref) == IF ref \in DOMAIN ActTask THEN ActTask[ref] ELSE ""

(* Why e cannot be appended after s, or <<>>.                              *)
EventProblem(s, e) ==
    IF e.id # s.len + 1
    THEN <<"HistoryGapFree violated: event id", e.id, "after", s.len>>
    ELSE IF s.closed
    THEN <<"an event after the run's close event", e>>
    ELSE IF e.type \in ActivityOutcomes /\ e.scheduled \notin DOMAIN s.sched
    THEN <<"an activity outcome without its ACTIVITY_TASK_SCHEDULED", e>>
    ELSE IF e.type \in ActivityOutcomes /\ e.scheduled \in s.resolved
    THEN <<"ExactlyOnceOutcomes violated: a second outcome of activity", e.scheduled, e>>
    ELSE IF e.type \in WftOutcomes /\ e.started \in s.answered
    THEN <<"ExactlyOnceOutcomes violated: a second outcome of workflow task", e.started, e>>
    ELSE IF e.type \in CommandCloseEvents
            /\ s.lastSignal >= s.lastCompleted
    THEN <<"SignalsSeenBeforeClose violated: signal", s.lastSignal,
           "is not in the history of the workflow task that closed the run">>
    ELSE IF e.type = "ACTIVITY_TASK_SCHEDULED" /\ TaskOf(e.ref) # ""
            /\ ~(Deps[TaskOf(e.ref)] \subseteq s.done)
    THEN <<"TaskDependencyCorrectness violated: scheduled", e.ref, "before",
           Deps[TaskOf(e.ref)] \ s.done, "completed">>
    ELSE <<>>

Absorb(s, e) ==
    [s EXCEPT
        !.len = e.id,
        !.sched = IF e.type = "ACTIVITY_TASK_SCHEDULED" THEN Put(@, e.id, e.ref) ELSE @,
        !.resolved = IF e.type \in ActivityOutcomes THEN @ \cup {e.scheduled} ELSE @,
        !.answered = IF e.type \in WftOutcomes THEN @ \cup {e.started} ELSE @,
        !.wftSched = IF e.type = "WORKFLOW_TASK_SCHEDULED" THEN @ \cup {e.id} ELSE @,
        !.timerStarted = IF e.type = "TIMER_STARTED" THEN Put(@, e.id, e.ref) ELSE @,
        !.closed = @ \/ e.type \in CloseEvents,
        !.lastSignal = IF e.type = "WORKFLOW_EXECUTION_SIGNALED" THEN e.id ELSE @,
        !.lastCompleted = IF e.type = "WORKFLOW_TASK_COMPLETED" THEN e.started ELSE @,
        !.done = IF e.type = "ACTIVITY_TASK_COMPLETED" /\ TaskOf(s.sched[e.scheduled]) # ""
                 THEN @ \cup {TaskOf(s.sched[e.scheduled])} ELSE @]

(* [why |-> <<>>, s |-> the summary after the events], or [why |-> the     *)
(* first event's problem, s |-> the summary before it].                    *)
RECURSIVE AbsorbAll(_, _)
AbsorbAll(s, evs) ==
    IF evs = <<>> THEN [why |-> <<>>, s |-> s]
    ELSE LET why == EventProblem(s, Head(evs))
         IN IF why # <<>> THEN [why |-> why, s |-> s]
            ELSE AbsorbAll(Absorb(s, Head(evs)), Tail(evs))

(* History.StateMatchesHistory: the committed state agrees with the        *)
(* history (s: the summary after the step).                                *)
StateMatches(st, s) ==
    /\ st.next_event_id = s.len + 1
    /\ (st.status = RUNNING) <=> ~s.closed
    /\ \A x \in DOMAIN st.activities :
          /\ x \in DOMAIN s.sched /\ s.sched[x] = st.activities[x].activity_id
          /\ x \notin s.resolved
    /\ \A t \in DOMAIN st.timers :
          st.timers[t] \in DOMAIN s.timerStarted /\ s.timerStarted[st.timers[t]] = t
    /\ HasWft(st) /\ ~st.wft.transient => st.wft.scheduled \in s.wftSched

-----------------------------------------------------------------------------
(* Matching a line                                                         *)

StateDiff(m, t) ==
    LET p == Project(m.ms)
    IN [f \in {f \in DOMAIN p : p[f] # t.state[f]} |-> <<"model", p[f], "trace", t.state[f]>>]

(* Why line t does not match (m: its transition, a: AbsorbAll of its      *)
(* events, both only evaluated once the guard holds), or <<>> if it does.  *)
Mismatch(t, m, a) ==
    IF ~Guard(t)
    THEN <<"the engine's guard for this action does not hold in the spec's state",
           [wft |-> ms.wft, activities |-> ms.activities, status |-> ms.status,
            rowTaken |-> t.task, rowInStore |-> t.task \in tasks,
            timerFired |-> t.row, timerInStore |-> t.row \in timers]>>
    ELSE IF m.events # t.events
    THEN <<"the appended events differ", "model", m.events, "trace", t.events>>
    ELSE IF Project(m.ms) # t.state
    THEN <<"the committed state differs", StateDiff(m, t)>>
    ELSE IF m.new_tasks # t.newTasks \/ m.done_tasks # t.doneTasks
    THEN <<"the task rows differ", "model", <<m.new_tasks, m.done_tasks>>,
           "trace", <<t.newTasks, t.doneTasks>>>>
    ELSE IF m.new_timers # t.newTimers \/ m.done_timers # t.doneTimers
    THEN <<"the timer rows differ", "model", <<m.new_timers, m.done_timers>>,
           "trace", <<t.newTimers, t.doneTimers>>>>
    ELSE IF a.why # <<>> THEN a.why
    ELSE IF ~StateMatches(m.ms, a.s) THEN <<"StateMatchesHistory violated">>
    ELSE <<>>

(* A line whose commit raised in the engine (t.unknown: the caller was     *)
(* cancelled mid-commit, server/_engine.py update) may or may not have     *)
(* committed: the spec tries both, and the trace is accepted if either     *)
(* way consumes it.                                                         *)
Next ==
    /\ l <= Len(TraceLog)
    /\ LET t == TraceLog[l]
           m == Mut(t)
           a == AbsorbAll(seen, m.events)
           why == Mismatch(t, m, a)
       IN \/ /\ t.unknown
             /\ l' = l + 1
             /\ UNCHANGED <<ms, seen, tasks, timers>>
          \/ /\ why = <<>>
             /\ ms' = m.ms
             /\ seen' = a.s
             /\ tasks' = (tasks \ m.done_tasks) \cup m.new_tasks
             /\ timers' = (timers \ m.done_timers) \cup m.new_timers
             /\ l' = l + 1
          \/ /\ why # <<>> /\ ~t.unknown
             /\ PrintT(<<"TRACE REJECTED", "line", t.line, t.action, why>>)
             /\ FALSE

(* Violated (TLC exit 12) exactly when the whole trace was matched.        *)
TraceConsumed == l <= Len(TraceLog)
=============================================================================
