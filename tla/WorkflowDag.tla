---------------------------- MODULE WorkflowDag ----------------------------
(***************************************************************************)
(* A DAG workflow as tideflow runs it: the DAG interpreter                 *)
(* (worker_sdk/dag/_interpreter.py, DagWorkflow) is ordinary workflow code *)
(* on the engine (EngineCore = server/_engine.py).  As the interpreter     *)
(* does, every attempt n of task t is its own activity, id "t#n", with     *)
(* maximum_attempts = 1 (the engine never retries it); a failed or timed   *)
(* out attempt is followed by a backoff on a durable timer and attempt n+1,*)
(* up to the task's max_attempts; once a task FAILED for good (failure     *)
(* policy fail_workflow, the default) no task or attempt is started any    *)
(* more, backoff timers are cancelled, running attempts are left to finish *)
(* and the run then fails; when every task COMPLETED the run completes.    *)
(*                                                                           *)
(* Workers are unreliable: an activity worker may die holding a task (the *)
(* start-to-close timer then times the attempt out), run an attempt and    *)
(* report it late (after its timeout, after the run moved on), or have its *)
(* report delivered several times; a workflow worker may answer late with  *)
(* a stale token or not at all (its task times out).  The scheduled event  *)
(* id and the attempt in a task token are the fencing tokens that keep a   *)
(* late report from being applied.                                         *)
(*                                                                           *)
(* Left out: payloads, compensations (saga), pause/resume and cancellation *)
(* signals, the CONTINUE failure policy, the DagStatus search-attribute    *)
(* upserts (they append events but decide nothing), non-retryable errors.  *)
(***************************************************************************)
EXTENDS EngineCore

CONSTANTS
    Tasks,             \* task ids of the DAG definition
    Deps,              \* Deps[t]: the tasks t depends on (acyclic)
    MaxAttempts,       \* every task's retry_policy.max_attempts
    MaxWftAttempts,    \* environment: a workflow worker answers by this attempt
    EagerModes,        \* subset of BOOLEAN: request_eager_execution choices
    MaxWorkerCrashes   \* environment: activity workers that die holding a task

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

(* The interpreter's activity id of attempt n of task t, and the timer of  *)
(* the backoff after it (the SDK numbers timers; the model names them).    *)
ActId(t, n) == t \o "#" \o ToString(n)
BackoffId(t, n) == ActId(t, n) \o "#backoff"
AttemptIds == {ActId(t, n) : t \in Tasks, n \in 1..MaxAttempts}
TaskOf(id) == CHOOSE t \in Tasks : \E n \in 1..MaxAttempts : ActId(t, n) = id
AttemptOf(id) == CHOOSE n \in 1..MaxAttempts : ActId(TaskOf(id), n) = id

Max(S) == CHOOSE x \in S : \A y \in S : y <= x

ScheduledEvent(h, id) ==
    {e \in Range(h) : e.type = "ACTIVITY_TASK_SCHEDULED" /\ e.ref = id}
(* The outcome event types of activity `id` in h ({} while it runs).       *)
OutcomeTypes(h, id) ==
    {x.type : x \in {x \in Range(h) : x.type \in ActivityOutcomes
                                      /\ \E e \in ScheduledEvent(h, id) : x.scheduled = e.id}}
LastAttempt(h, t) ==
    LET ns == {n \in 1..MaxAttempts : ScheduledEvent(h, ActId(t, n)) # {}}
    IN IF ns = {} THEN 0 ELSE Max(ns)
HasTimerEvent(h, type, tid) == \E e \in Range(h) : e.type = type /\ e.ref = tid

(* What the interpreter's TaskStatus of t is once it replayed h: PENDING,  *)
(* RUNNING (an attempt SCHEDULED or RUNNING: the history cannot tell),     *)
(* COMPLETED, RETRY (an attempt failed, more are allowed) or FAILED.       *)
StatusF[h \in Any, t \in Any] ==
    LET n == LastAttempt(h, t)
        oc == IF n = 0 THEN {} ELSE OutcomeTypes(h, ActId(t, n))
    IN IF n = 0 THEN "PENDING"
       ELSE IF "ACTIVITY_TASK_COMPLETED" \in oc THEN "COMPLETED"
       ELSE IF oc = {} THEN "RUNNING"
       ELSE IF n >= MaxAttempts THEN "FAILED"
       ELSE "RETRY"
Status(h, t) == StatusF[h, t]

(* The DAG interpreter: the commands of a workflow task that was sent `p`  *)
(* (DagWorkflow._execute / _schedule_ready / _attempts / _finish).  A     *)
(* function, not an operator: see EngineCore's header (ENABLED and TLC).   *)
DagCommandsF[p \in Any] ==
    LET st == [t \in Tasks |-> Status(p, t)]
        n == [t \in Tasks |-> LastAttempt(p, t)]
        failing == Mutant # "ignore_failure" /\ \E t \in Tasks : st[t] = "FAILED"
        inRetry == {t \in Tasks : st[t] = "RETRY"}
        backoffOpen == {t \in inRetry : HasTimerEvent(p, "TIMER_STARTED", BackoffId(t, n[t]))
                           /\ ~HasTimerEvent(p, "TIMER_FIRED", BackoffId(t, n[t]))
                           /\ ~HasTimerEvent(p, "TIMER_CANCELED", BackoffId(t, n[t]))}
        running == {t \in Tasks : st[t] = "RUNNING"}
        ready == {t \in Tasks : st[t] = "PENDING" /\
                    IF Mutant = "schedule_unready"
                    THEN \A d \in Deps[t] : st[d] # "PENDING"   \* BUG: started, not COMPLETED
                    ELSE \A d \in Deps[t] : st[d] = "COMPLETED"}
        backoffs == {t \in inRetry : ~HasTimerEvent(p, "TIMER_STARTED", BackoffId(t, n[t]))}
        retries == {t \in inRetry : HasTimerEvent(p, "TIMER_FIRED", BackoffId(t, n[t]))}
        Seq1(S, F(_)) == [i \in 1..Cardinality(S) |-> F(SetToSeq(S)[i])]
        Cancel(t) == Cmd("CancelTimer", BackoffId(t, n[t]), FALSE)
        Backoff(t) == Cmd("StartTimer", BackoffId(t, n[t]), FALSE)
    IN IF failing
       THEN {Seq1(backoffOpen, Cancel)
             \o (IF running = {} /\ Mutant # "wait_on_failure" THEN <<Cmd("Fail", "", FALSE)>>
                 ELSE <<>>)}
       ELSE IF \A t \in Tasks : st[t] = "COMPLETED"
       THEN {<<Cmd("Complete", "", FALSE)>>}
       ELSE IF Mutant = "ignore_failure" /\ ready = {} /\ running = {} /\ inRetry = {}
       THEN {<<Cmd("Complete", "", FALSE)>>}   \* BUG: completes although a task FAILED
       ELSE {Seq1(ready, LAMBDA t : Cmd("ScheduleActivity", ActId(t, 1), e))
             \o Seq1(retries, LAMBDA t : Cmd("ScheduleActivity", ActId(t, n[t] + 1), e))
             \o Seq1(backoffs, Backoff) : e \in EagerModes}

DagCommands(p) == DagCommandsF[p]

(* The token a workflow worker gets, with the commands its replay of the  *)
(* history it is sent yields (`choices`: one per eager mode).  They are     *)
(* computed once, here, because workflow code is a function of that        *)
(* history: deciding them again at every answer would be the same, slower.  *)
DagTokenF[ms1 \in Any, h \in Any] ==
    LET tok == WftToken(ms1)
    IN [scheduled |-> tok.scheduled, started |-> tok.started, attempt |-> tok.attempt,
        seen |-> tok.seen, choices |-> DagCommands(SubSeq(h, 1, tok.seen))]
DagToken(ms1, h) == DagTokenF[ms1, h]

-----------------------------------------------------------------------------
(* Engine actions and the unreliable workers                                *)

(* The DAG task an activity (scheduled event id) is an attempt of.         *)
TaskOfSid(sid) == TaskOf(hist[sid].ref)

(* Matching hands a workflow task row to a poller: record_workflow_task_started *)
RecordWorkflowTaskStartedA(task) ==
    /\ task \in tasks /\ task.kind = "WORKFLOW"
    /\ IF WftTaskValid(ms, task)
       THEN \E m \in {RecordWorkflowTaskStarted(ms, task)} :
              /\ Commit(m)
              /\ wftTokens' = wftTokens \cup {DagToken(m.ms, hist \o m.events)}
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
(* let it answer).                                                          *)
TimeMayFire(row) == ~(row.kind = "WORKFLOW_TASK_TIMEOUT" /\ row.attempt >= MaxWftAttempts)

(* _retry.next_retry: the interpreter's activities have maximum_attempts=1, *)
(* so the engine never retries an attempt (the interpreter does).           *)
RetryChoices(attempt) == {FALSE}

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
    /\ executions' = [executions EXCEPT ![TaskOfSid(tok.sid)] = @ + 1]
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
       /\ \A t \in Tasks : Status(hist \o m.events, t) = COMPLETED
    THEN Close(m, COMPLETED, "WORKFLOW_EXECUTION_COMPLETED")
    ELSE m

(* What applying report r means for the DAG: attempt n of task t is done. *)
Applied(r) == [task |-> TaskOfSid(r.sid), attempt |-> AttemptOf(hist[r.sid].ref)]

DeliverValidReport(r) ==
    IF r.ok
       THEN \E m \in {AutoComplete(CompleteActivity(ms, r, FALSE))} :
              /\ Commit(m)
              /\ applied' = applied \cup {Applied(r)}
              /\ closedBy' = IF m.ms.status # RUNNING THEN "engine" ELSE closedBy
              /\ UNCHANGED <<wftTokens, actTokens, reports, executions, lost>>
       ELSE \E retry \in RetryChoices(ms.activities[r.sid].attempt) :
              \E m \in {FailActivity(ms, r, retry)} :
                /\ Commit(m)
                /\ UNCHANGED <<wftTokens, actTokens, reports, executions, lost, applied, closedBy>>

(* Mutant "accept_late_reports": the engine applies a completion of an    *)
(* attempt that is no longer pending (it timed out; the worker was slow).  *)
LateCompletion(r) ==
    LET m1 == AppendOrBuffer(NewMutation(ms), [Ev("ACTIVITY_TASK_COMPLETED") EXCEPT
                                                  !.scheduled = r.sid])
    IN ScheduleWorkflowTask(m1, 1)

(* The network delivers a report (possibly again, possibly late):          *)
(* RespondActivityTaskCompleted / RespondActivityTaskFailed, fenced by      *)
(* _check_activity (the scheduled event id and the attempt of the token).  *)
DeliverReport(r) ==
    /\ r \in reports
    /\ IF /\ Mutant = "accept_late_reports" /\ r.ok /\ ms.status = RUNNING
          /\ r.sid \notin DOMAIN ms.activities
       THEN /\ Commit(LateCompletion(r))
            /\ applied' = applied \cup {Applied(r)}
            /\ UNCHANGED <<wftTokens, actTokens, reports, executions, lost, closedBy>>
       ELSE ActivityTokenValid(ms, r) /\ DeliverValidReport(r)

DispatchSome == \E task \in tasks : RecordWorkflowTaskStartedA(task) \/ RecordActivityStartedA(task)
FireSome == \E row \in timers : FireTimerA(row)
WorkflowWorkerAnswers ==
    \E tok \in wftTokens : WftTokenValid(ms, tok) /\
       \E cmds \in tok.choices : RespondWorkflowTaskCompletedA(tok, cmds)
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

(* The TaskStatus of t that the run's events (buffered ones included) give. *)
TaskStates == [t \in Tasks |-> Status(AllEvents, t)]
TaskState(t) == TaskStates[t]

AttemptsWith(t, types) ==
    {n \in 1..MaxAttempts : OutcomeTypes(AllEvents, ActId(t, n)) \cap types # {}}

WorkflowSafety ==
    (* a COMPLETED run has every task COMPLETED                            *)
    /\ ms.status = COMPLETED => \A t \in Tasks : TaskState(t) = "COMPLETED"
    (* a run that closed with a task FAILED for good is FAILED             *)
    /\ (ms.status \in {COMPLETED, FAILED} /\ \E t \in Tasks : TaskState(t) = "FAILED")
          => ms.status = FAILED
    (* a task FAILED only after max_attempts attempts, each one failed     *)
    /\ \A t \in Tasks : TaskState(t) = "FAILED" =>
          AttemptsWith(t, {"ACTIVITY_TASK_FAILED", "ACTIVITY_TASK_TIMED_OUT"}) = 1..MaxAttempts

(* Every task that left PENDING (an attempt scheduled, running, failed or  *)
(* done) had all of its dependencies COMPLETED.                             *)
TaskDependencyCorrectness ==
    \A t \in Tasks : TaskState(t) # "PENDING" => \A d \in Deps[t] : TaskState(d) = "COMPLETED"

(* A task's result is applied at most once, and it is the result of the     *)
(* one attempt the history records as completed, however many times        *)
(* workers ran its attempts and however often their reports arrive.        *)
ExactlyOnceEffect ==
    \A t \in Tasks :
       /\ Cardinality({a \in applied : a.task = t}) <= 1
       /\ Cardinality(AttemptsWith(t, {"ACTIVITY_TASK_COMPLETED"})) <= 1
       /\ \A a \in applied : a.task = t => AttemptsWith(t, {"ACTIVITY_TASK_COMPLETED"}) = {a.attempt}

(* A workflow completes only through a command of its own code.             *)
CompletesOnlyByCommand == ms.status = COMPLETED => closedBy = "command"

Termination == <>(ms.status \in Closed)
(* Once a task FAILED for good the run eventually FAILS (the interpreter   *)
(* first lets running attempts finish, so this is a leads-to, not an        *)
(* invariant).  "\A t : P(t) ~> Q" written as the equivalent "(\E t : P(t)) *)
(* ~> Q": one tableau instead of one per task.                              *)
FailedTaskFailsWorkflow == (\E t \in Tasks : TaskState(t) = "FAILED") ~> (ms.status = FAILED)
=============================================================================
