---------------------------- MODULE WorkflowDag ----------------------------
(***************************************************************************)
(* A DAG workflow executed by this engine.  The DAG's tasks are activities *)
(* (activity id = task name); the DAG interpreter is the workflow's code:  *)
(* in every workflow task it reads the history it was sent and schedules   *)
(* the tasks whose dependencies all COMPLETED, fails the workflow when a   *)
(* task FAILED (retries exhausted; policy "fail fast"), and completes it   *)
(* when every task COMPLETED.  Everything else is the engine as built      *)
(* (EngineCore): activity attempts and server-side retries fenced by       *)
(* attempt numbers, workflow tasks with transient attempts and timeouts,   *)
(* outcomes buffered while a workflow task runs.                           *)
(*                                                                           *)
(* Workers are unreliable: an activity worker may crash before it reports  *)
(* (the start-to-close timer then fires and the engine retries), execute an *)
(* attempt and report it late (after a retry or after the run moved on),   *)
(* or have its report delivered several times; a workflow worker may never *)
(* answer (its task times out) or answer late with a stale token.          *)
(*                                                                           *)
(* Code map: the interpreter is the coming DAG model of issue 4 (worker_sdk)*)
(* ; every other action is server/_engine.py (see README.md).              *)
(***************************************************************************)
EXTENDS EngineCore

CONSTANTS
    Tasks,             \* task names (activity ids)
    Deps,              \* Deps[t]: the tasks t depends on (acyclic)
    MaxAttempts,       \* RetryPolicy.maximum_attempts of every task
    MaxWftAttempts,    \* environment: a workflow worker answers by this attempt
    EagerModes,        \* subset of BOOLEAN: request_eager_execution choices
    MaxWorkerCrashes,  \* environment: activity workers that die holding a task
    ScheduleAllReady   \* TRUE: schedule every ready task at once (the DAG
                       \* interpreter); FALSE: any subset, e.g. gather stages

VARIABLES
    hist,        \* the run's history (store)
    ms,          \* the run's mutable state (store)
    version,     \* db_version
    tasks,       \* task rows (matching dispatches every row it holds)
    timers,      \* timer rows (the timer queue fires every row it holds)
    wftTokens,   \* workflow task tokens handed out
    actTokens,   \* activity task tokens handed out
    reports,     \* activity results sent by workers: [sid, attempt, ok]
    executions,  \* ghost: times a worker ran each task (at least once...)
    lost,        \* activity tokens whose worker died before running them
    applied,     \* ghost: [task, attempt] of every result the engine applied
    closedBy     \* ghost: "" or what closed the run ("command", "engine")

vars == <<hist, ms, version, tasks, timers, wftTokens, actTokens, reports, executions,
          lost, applied, closedBy>>

Init ==
    LET m == StartRun IN
    /\ hist = m.events
    /\ ms = m.ms
    /\ version = 1
    /\ tasks = m.new_tasks
    /\ timers = m.new_timers
    /\ wftTokens = {}
    /\ actTokens = {}
    /\ reports = {}
    /\ executions = [t \in Tasks |-> 0]
    /\ lost = {}
    /\ applied = {}
    /\ closedBy = ""

Commit(m) ==
    /\ hist' = hist \o m.events
    /\ ms' = m.ms
    /\ version' = version + 1
    /\ tasks' = (tasks \ m.done_tasks) \cup m.new_tasks
    /\ timers' = (timers \ m.done_timers) \cup m.new_timers

-----------------------------------------------------------------------------
(* The DAG as the history tells it                                         *)

SidOf(h, t) == CHOOSE i \in 1..Len(h) : h[i].type = "ACTIVITY_TASK_SCHEDULED" /\ h[i].ref = t
IsScheduled(h, t) == \E i \in 1..Len(h) : h[i].type = "ACTIVITY_TASK_SCHEDULED" /\ h[i].ref = t
HasOutcome(h, t, types) ==
    IsScheduled(h, t) /\ \E i \in 1..Len(h) : h[i].type \in types /\ h[i].scheduled = SidOf(h, t)
DoneIn(h, t) == HasOutcome(h, t, {"ACTIVITY_TASK_COMPLETED"})
FailedIn(h, t) == HasOutcome(h, t, {"ACTIVITY_TASK_FAILED", "ACTIVITY_TASK_TIMED_OUT"})

(* The DAG interpreter: the commands of a workflow task that was sent `p`. *)
DagCommands(p) ==
    LET done == {t \in Tasks : DoneIn(p, t)}
        failed == {t \in Tasks : FailedIn(p, t)}
        scheduled == {t \in Tasks : IsScheduled(p, t)}
        running == scheduled \ (done \cup failed)
        ready == {t \in Tasks \ scheduled :
                    IF Mutant = "schedule_unready"
                    THEN Deps[t] \subseteq scheduled      \* BUG: started, not COMPLETED
                    ELSE Deps[t] \subseteq done}
        choices == IF ScheduleAllReady THEN {ready}
                   ELSE {S \in SUBSET ready : S # {} \/ running # {} \/ ready = {}}
        close == IF failed # {} /\ Mutant # "ignore_failure" /\ Mutant # "wait_on_failure"
                 THEN "Fail"
                 ELSE IF done = Tasks \/ (Mutant = "ignore_failure" /\ ready = {} /\ running = {})
                 THEN "Complete"
                 ELSE ""
    IN IF close # "" THEN {<<Cmd(close, "", FALSE)>>}
       ELSE {[i \in 1..Cardinality(S) |-> Cmd("ScheduleActivity", SetToSeq(S)[i], e)] :
               S \in choices, e \in EagerModes}

Seen(tok) == SubSeq(hist, 1, tok.seen)

-----------------------------------------------------------------------------
(* Engine actions and the unreliable workers                                *)

NameOf(sid) == hist[sid].ref

(* Matching hands a workflow task row to a poller: record_workflow_task_started *)
RecordWorkflowTaskStartedA(task) ==
    /\ task \in tasks /\ task.kind = "WORKFLOW"
    /\ IF WftTaskValid(ms, task)
       THEN \E m \in {RecordWorkflowTaskStarted(ms, task)} :
              /\ Commit(m)
              /\ wftTokens' = wftTokens \cup {WftToken(m.ms)}
              /\ UNCHANGED <<actTokens, reports, executions, lost, applied, closedBy>>
       ELSE /\ tasks' = tasks \ {task}   \* stale: delete_task
            /\ UNCHANGED <<hist, ms, version, timers, wftTokens, actTokens, reports,
                           executions, lost, applied, closedBy>>

RecordActivityStartedA(task) ==
    /\ task \in tasks /\ task.kind = "ACTIVITY"
    /\ IF ActivityTaskValid(ms, task)
       THEN \E m \in {RecordActivityStarted(ms, task)} :
              /\ Commit(m)
              /\ actTokens' = actTokens \cup {[sid |-> task.ref, attempt |-> task.attempt]}
              /\ UNCHANGED <<wftTokens, reports, executions, lost, applied, closedBy>>
       ELSE /\ tasks' = tasks \ {task}
            /\ UNCHANGED <<hist, ms, version, timers, wftTokens, actTokens, reports,
                           executions, lost, applied, closedBy>>

(* A workflow worker answers by this attempt (otherwise time would never   *)
(* let it answer); activity timeouts are bounded by MaxAttempts.           *)
TimeMayFire(row) == ~(row.kind = "WORKFLOW_TASK_TIMEOUT" /\ row.attempt >= MaxWftAttempts)

RetryChoices(attempt) == IF attempt < MaxAttempts THEN {TRUE} ELSE {FALSE}

FireTimerA(row) ==
    /\ row \in timers
    /\ IF FireTimerValid(ms, row)
       THEN /\ TimeMayFire(row)
            /\ \E retry \in (IF row.kind = "ACTIVITY_START_TO_CLOSE"
                             THEN RetryChoices(row.attempt) ELSE {FALSE}) :
                 \E m \in {FireTimer(ms, row, retry)} :
                    /\ Commit(m)
                    /\ UNCHANGED <<wftTokens, actTokens, reports, executions, lost, applied, closedBy>>
       ELSE /\ timers' = timers \ {row}
            /\ UNCHANGED <<hist, ms, version, tasks, wftTokens, actTokens, reports,
                           executions, lost, applied, closedBy>>

(* A workflow worker replays the DAG interpreter and answers.  Any token   *)
(* it ever got may arrive (late, twice); _check_workflow_task fences them. *)
RespondWorkflowTaskCompletedA(tok, cmds) ==
    /\ tok \in wftTokens /\ WftTokenValid(ms, tok)
    /\ \E m \in {CompleteWorkflowTask(ms, cmds)} :
         /\ Commit(m)
         /\ actTokens' = actTokens \cup
                {[sid |-> s, attempt |-> m.ms.activities[s].attempt] : s \in Range(m.eager)}
         /\ closedBy' = IF m.ms.status # RUNNING THEN "command" ELSE closedBy
         /\ UNCHANGED <<wftTokens, reports, executions, lost, applied>>

(* An activity worker runs an attempt it was handed and sends its result   *)
(* (ok or failed).  Not running it at all is a crash.                      *)
ExecuteActivity(tok, ok) ==
    /\ tok \in actTokens /\ tok \notin lost
    /\ ~\E r \in reports : r.sid = tok.sid /\ r.attempt = tok.attempt
    /\ reports' = reports \cup {[sid |-> tok.sid, attempt |-> tok.attempt, ok |-> ok]}
    /\ executions' = [executions EXCEPT ![NameOf(tok.sid)] = @ + 1]
    /\ UNCHANGED <<hist, ms, version, tasks, timers, wftTokens, actTokens, lost, applied,
                   closedBy>>

(* An activity worker dies (SIGKILL) holding a task it has not run: only   *)
(* the engine's start-to-close timer can now move the activity on.         *)
WorkerCrashes(tok) ==
    /\ tok \in actTokens /\ tok \notin lost /\ Cardinality(lost) < MaxWorkerCrashes
    /\ ~\E r \in reports : r.sid = tok.sid /\ r.attempt = tok.attempt
    /\ lost' = lost \cup {tok}
    /\ UNCHANGED <<hist, ms, version, tasks, timers, wftTokens, actTokens, reports, executions,
                   applied, closedBy>>

(* Mutant "engine_autocompletes": the engine itself completes the run once *)
(* its last activity finishes (a workflow must complete by its own code).  *)
AutoComplete(m) ==
    IF /\ Mutant = "engine_autocompletes"
       /\ m.ms.status = RUNNING /\ DOMAIN m.ms.activities = {}
       /\ \A t \in Tasks : DoneIn(hist \o m.events, t)
    THEN Close(m, COMPLETED, "WORKFLOW_EXECUTION_COMPLETED")
    ELSE m

(* The network delivers a report (possibly again, possibly late):          *)
(* RespondActivityTaskCompleted / RespondActivityTaskFailed.                *)
DeliverReport(r) ==
    /\ r \in reports
    /\ ActivityTokenValid(ms, r)
    /\ IF r.ok
       THEN \E m \in {AutoComplete(CompleteActivity(ms, r, FALSE))} :
              /\ Commit(m)
              /\ applied' = applied \cup {[task |-> NameOf(r.sid), attempt |-> r.attempt]}
              /\ closedBy' = IF m.ms.status # RUNNING THEN "engine" ELSE closedBy
              /\ UNCHANGED <<wftTokens, actTokens, reports, executions, lost>>
       ELSE \E retry \in RetryChoices(ms.activities[r.sid].attempt) :
              \E m \in {FailActivity(ms, r, retry)} :
                /\ Commit(m)
                /\ UNCHANGED <<wftTokens, actTokens, reports, executions, lost, applied, closedBy>>

DispatchSome == \E task \in tasks : RecordWorkflowTaskStartedA(task) \/ RecordActivityStartedA(task)
FireSome == \E row \in timers : FireTimerA(row)
WorkflowWorkerAnswers ==
    \E tok \in wftTokens : WftTokenValid(ms, tok) /\
       \E cmds \in DagCommands(Seen(tok)) : RespondWorkflowTaskCompletedA(tok, cmds)
ActivityWorkerRuns == \E tok \in actTokens : \E ok \in BOOLEAN : ExecuteActivity(tok, ok)
ActivityWorkerCrashes == \E tok \in actTokens : WorkerCrashes(tok)
NetworkDelivers == \E r \in reports : DeliverReport(r)

Next == DispatchSome \/ FireSome \/ WorkflowWorkerAnswers \/ ActivityWorkerRuns
        \/ NetworkDelivers \/ ActivityWorkerCrashes

(* Weak fairness of every action: matching and the timer queue work off    *)
(* what they hold, a workflow worker eventually answers, an activity worker *)
(* eventually runs what it was handed, and the network eventually delivers *)
(* a report whose attempt is still current.  Workers may still "crash": a  *)
(* timeout may fire first, and late or repeated reports may arrive anytime. *)
Spec ==
    /\ Init /\ [][Next]_vars
    /\ WF_vars(DispatchSome) /\ WF_vars(FireSome) /\ WF_vars(WorkflowWorkerAnswers)
    /\ WF_vars(ActivityWorkerRuns) /\ WF_vars(NetworkDelivers)

(* Mutant "fairness removed": nothing forces matching to hand out a task.   *)
SpecNoDispatchFairness ==
    /\ Init /\ [][Next]_vars
    /\ WF_vars(FireSome) /\ WF_vars(WorkflowWorkerAnswers)
    /\ WF_vars(ActivityWorkerRuns) /\ WF_vars(NetworkDelivers)

-----------------------------------------------------------------------------
(* Properties                                                              *)

AllEvents == hist \o ms.buffered

(* The state of a DAG task (issue 4's task states), read off the engine.    *)
TaskState(t) ==
    IF ~IsScheduled(hist, t) THEN "PENDING"
    ELSE LET sid == SidOf(hist, t) IN
         IF \E e \in Range(AllEvents) : e.type = "ACTIVITY_TASK_COMPLETED" /\ e.scheduled = sid
         THEN "COMPLETED"
         ELSE IF \E e \in Range(AllEvents) :
                    e.type \in {"ACTIVITY_TASK_FAILED", "ACTIVITY_TASK_TIMED_OUT"}
                    /\ e.scheduled = sid
         THEN "FAILED"
         ELSE IF sid \notin DOMAIN ms.activities THEN "ABANDONED"   \* run closed
         ELSE IF ms.activities[sid].started THEN "RUNNING"
         ELSE IF ms.activities[sid].backing_off THEN "BACKING_OFF"
         ELSE "SCHEDULED"

(* The attempt whose outcome the engine recorded (ACTIVITY_TASK_STARTED).   *)
RecordedAttempts(t) ==
    {e.attempt : e \in {x \in Range(AllEvents) :
                          x.type = "ACTIVITY_TASK_STARTED" /\ IsScheduled(hist, t)
                          /\ x.scheduled = SidOf(hist, t)}}

WorkflowSafety ==
    /\ ms.status = COMPLETED => \A t \in Tasks : TaskState(t) = "COMPLETED"
    /\ (ms.status \in {COMPLETED, FAILED} /\ \E t \in Tasks : TaskState(t) = "FAILED")
          => ms.status = FAILED
    /\ \A t \in Tasks : TaskState(t) = "FAILED" => RecordedAttempts(t) = {MaxAttempts}

(* Every task that left PENDING (scheduled, running, backing off, done or  *)
(* failed) had all of its dependencies COMPLETED.                           *)
TaskDependencyCorrectness ==
    \A t \in Tasks : TaskState(t) # "PENDING" => \A d \in Deps[t] : TaskState(d) = "COMPLETED"

(* A task's result is applied at most once, and it is the result of the     *)
(* attempt the history records, however many times workers ran it and      *)
(* however often their reports arrive.                                     *)
ExactlyOnceEffect ==
    \A t \in Tasks :
       /\ Cardinality({a \in applied : a.task = t}) <= 1
       /\ \A a \in applied : a.task = t => RecordedAttempts(t) = {a.attempt}

(* A workflow completes only through a command of its own code.             *)
CompletesOnlyByCommand == ms.status = COMPLETED => closedBy = "command"

Termination == <>(ms.status \in Closed)
FailedTaskFailsWorkflow == \A t \in Tasks : (TaskState(t) = "FAILED") ~> (ms.status = FAILED)
=============================================================================
