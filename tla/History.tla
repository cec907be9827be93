------------------------------ MODULE History ------------------------------
(***************************************************************************)
(* The event-sourced run as the engine stores it: one run's history, its   *)
(* mutable state and its task / timer rows in the store (history/_store.py)*)
(* one server node with its in-memory matching backlog (server/_matching.py)*)
(* and timer heap (server/_timers.py) that a crash loses and a restart     *)
(* rebuilds from the store alone, workers that hold task tokens and may    *)
(* report late, twice or never, retried signals, and optionally a stale    *)
(* "zombie" writer (a process that loaded the run earlier) whose commits    *)
(* the optimistic db_version check must reject.                           *)
(*                                                                           *)
(* Every engine action is one HistoryEngine transition: the guard of the    *)
(* engine function, then EngineCore's Mutation committed by `Commit` as one *)
(* store transaction (HistoryStore.apply: events + state + rows, guarded by *)
(* db_version and by the (run, event_id) primary key).                     *)
(*                                                                           *)
(* With several nodes (HandOverLags) a committed row reaches the backlog    *)
(* in a later HandOver step (docs/cluster.md).                              *)
(***************************************************************************)
EXTENDS EngineCore

CONSTANTS
    Activities,           \* activity ids the workflow program schedules
    TimerIds,             \* timer ids the workflow program starts
    CancelTimerIds,       \* of those, the ones it cancels in a later workflow task
    SignalIds,            \* request ids of signals clients send (and retry)
    EagerModes,           \* subset of BOOLEAN: request_eager_execution choices
    EagerWftModes,        \* subset of BOOLEAN: eager_workflow_task_queue offered
    MaxActivityAttempts,  \* RetryPolicy.maximum_attempts of every activity
    MaxWftAttempts,       \* environment: a worker answers by this attempt
    MaxCrashes,           \* environment: server crashes
    MaxZombieReads,       \* environment: loads of the run by a stale writer
    WithTerminate,        \* clients may terminate the run
    MaxHeartbeats         \* environment: workflow task heartbeats of a worker
                          \* whose local activities outlast the task (0: none)

VARIABLES
    hist,      \* history_events of the run (a sequence; event i has id i)
    ms,        \* executions.state: the committed MutableState
    version,   \* executions.db_version
    tasks,     \* tasks rows (outbox / backlog of matching)
    timers,    \* timers rows
    up,        \* the server node is running
    backlog,   \* Matching's in-memory backlog (lost in a crash)
    heap,      \* TimerQueue's in-memory heap (lost in a crash)
    zombie,    \* a stale writer's cached [ms, version], or NoCache
    wftTokens, \* workflow task tokens handed to workers (replayable forever)
    actTokens, \* activity task tokens handed to workers (replayable forever)
    appliedWft, \* ghost: workflow task tokens whose completion was applied
    appliedAct, \* ghost: activity tokens whose completion was applied
    accepted,  \* ghost: keys of external events the engine accepted
    crashes,   \* ghost: crashes so far
    zreads     \* ghost: zombie loads so far

store == <<hist, ms, version, tasks, timers>>
node == <<up, backlog, heap, zombie>>
vars == <<hist, ms, version, tasks, timers, up, backlog, heap, zombie, wftTokens,
          actTokens, appliedWft, appliedAct, accepted, crashes, zreads>>

NoCache == [ms |-> InitMs, version |-> 0]

(* Several nodes (docs/cluster.md): a committed row reaches the backlog of  *)
(* its queue's node in a later step, HandOver, when the queue is served by  *)
(* another node or the row waits for the run's node's own polls.  FALSE:   *)
(* one node, the row is in the backlog at commit.  A model turns it on by   *)
(* `HandOverLags <- LagOn` in its cfg.                                     *)
HandOverLags == FALSE
LagOn == TRUE

(* The rows a commit puts into the backlog at once.                        *)
AtCommit(rows) == IF HandOverLags THEN {} ELSE rows

Init ==
    LET m == StartRun IN
    /\ hist = m.events
    /\ ms = m.ms
    /\ version = 1
    /\ tasks = m.new_tasks
    /\ timers = m.new_timers
    /\ up = TRUE
    /\ backlog = AtCommit(m.new_tasks)
    /\ heap = m.new_timers
    /\ zombie = NoCache
    /\ wftTokens = {}
    /\ actTokens = {}
    /\ appliedWft = {}
    /\ appliedAct = {}
    /\ accepted = {}
    /\ crashes = 0
    /\ zreads = 0

ExternalKeys(m) ==
    {EventKey(e) : e \in {x \in Range(m.events) \cup Range(m.ms.buffered) :
                              x.type \in ExternalTypes}}

(* HistoryStore._apply_batch: the executions row (db_version checked), the *)
(* events (primary key (run, event_id)), then deleted and inserted task and *)
(* timer rows, all in one transaction; then HistoryEngine._after_commit    *)
(* hands the new rows to matching and the timer queue.                     *)
CommitTaking(m, task, row) ==
    /\ hist' = hist \o m.events
    /\ ms' = m.ms
    /\ version' = version + 1
    /\ tasks' = (tasks \ m.done_tasks) \cup m.new_tasks
    /\ timers' = (timers \ m.done_timers) \cup m.new_timers
    /\ backlog' = (backlog \ {task}) \cup AtCommit(m.new_tasks)
    /\ heap' = (heap \ {row}) \cup m.new_timers
    /\ accepted' = accepted \cup ExternalKeys(m)

NoRow == TimerRow("NONE", 0, 0)
Commit(m) == CommitTaking(m, NoKey, NoRow)

(* The tokens a committed mutation hands out (eager activities).            *)
EagerTokens(m) == {[sid |-> s, attempt |-> m.ms.activities[s].attempt] : s \in Range(m.eager)}

-----------------------------------------------------------------------------
(* The node's actions.  A worker's report reaches the node only while it is *)
(* up; a report the engine rejects changes nothing (no commit: stuttering). *)

(* PollWorkflowTask -> record_workflow_task_started; a stale task's row is  *)
(* deleted (HistoryStore.delete_task).                                     *)
RecordWorkflowTaskStartedA(task) ==
    /\ up /\ task \in backlog /\ task.kind = "WORKFLOW"
    /\ IF WftTaskValid(ms, task)
       THEN \E m \in {RecordWorkflowTaskStarted(ms, task)} :
            /\ CommitTaking(m, task, NoRow)
            /\ wftTokens' = wftTokens \cup {WftToken(m.ms)}
            /\ UNCHANGED <<up, zombie, actTokens, appliedWft, appliedAct, crashes, zreads>>
       ELSE /\ backlog' = backlog \ {task}
            /\ tasks' = tasks \ {task}
            /\ UNCHANGED <<hist, ms, version, timers, up, heap, zombie, wftTokens, actTokens,
                           appliedWft, appliedAct, accepted, crashes, zreads>>

(* PollActivityTask -> record_activity_started                             *)
RecordActivityStartedA(task) ==
    /\ up /\ task \in backlog /\ task.kind = "ACTIVITY"
    /\ IF ActivityTaskValid(ms, task)
       THEN \E m \in {RecordActivityStarted(ms, task)} :
            /\ CommitTaking(m, task, NoRow)
            /\ actTokens' = actTokens \cup {[sid |-> task.ref, attempt |-> task.attempt]}
            /\ UNCHANGED <<up, zombie, wftTokens, appliedWft, appliedAct, crashes, zreads>>
       ELSE /\ backlog' = backlog \ {task}
            /\ tasks' = tasks \ {task}
            /\ UNCHANGED <<hist, ms, version, timers, up, heap, zombie, wftTokens, actTokens,
                           appliedWft, appliedAct, accepted, crashes, zreads>>

(* Environment: a worker answers its workflow task by attempt               *)
(* MaxWftAttempts, so the task's timeout does not fire after that.         *)
TimeMayFire(row) == ~(row.kind = "WORKFLOW_TASK_TIMEOUT" /\ row.attempt >= MaxWftAttempts)

(* _retry.next_retry for an attempt that failed or timed out                *)
RetryChoices(attempt) == IF attempt < MaxActivityAttempts THEN {TRUE} ELSE {FALSE}

RetryOf(row) ==
    IF row.kind = "ACTIVITY_START_TO_CLOSE" THEN RetryChoices(row.attempt) ELSE {FALSE}

(* TimerQueue fires a row of its heap -> fire_timer                         *)
FireTimerA(row) ==
    /\ up /\ row \in heap
    /\ IF FireTimerValid(ms, row)
       THEN /\ TimeMayFire(row)
            /\ \E retry \in RetryOf(row) :
                 \E m \in {FireTimer(ms, row, retry)} :
                 /\ CommitTaking(m, NoKey, row)
                 /\ UNCHANGED <<up, zombie, wftTokens, actTokens, appliedWft, appliedAct, crashes, zreads>>
       ELSE /\ heap' = heap \ {row}
            /\ timers' = timers \ {row}
            /\ UNCHANGED <<hist, ms, version, tasks, up, backlog, zombie, wftTokens, actTokens,
                           appliedWft, appliedAct, accepted, crashes, zreads>>

RespondWorkflowTaskCompletedA(tok, cmds) ==
    /\ up /\ tok \in wftTokens /\ WftTokenValid(ms, tok)
    /\ \E m \in {CompleteWorkflowTask(ms, cmds)} :
       /\ Commit(m)
       /\ actTokens' = actTokens \cup EagerTokens(m)
       /\ appliedWft' = IF CommandsValid(ms, cmds) THEN appliedWft \cup {tok} ELSE appliedWft
       /\ UNCHANGED <<up, zombie, wftTokens, appliedAct, crashes, zreads>>

(* The workflow task heartbeat (worker_sdk/_local_activity_worker.py): a   *)
(* worker whose local activities still run near the task's timeout          *)
(* completes it with no commands and force_create_new_workflow_task, so that *)
(* the run gets a next task although nothing happened; with                 *)
(* return_new_workflow_task (`returnNew`) that task is started for it in the *)
(* same transaction and its token returned.  The environment bounds how     *)
(* often: while the history holds fewer than MaxHeartbeats completed tasks.  *)
HeartbeatWorkflowTaskA(tok, returnNew) ==
    /\ up /\ tok \in wftTokens /\ WftTokenValid(ms, tok)
    /\ Cardinality(EventsOf(hist, "WORKFLOW_TASK_COMPLETED")) < MaxHeartbeats
    /\ \E m \in {CompleteWorkflowTaskWith(ms, <<>>, FALSE, TRUE, returnNew)} :
       /\ Commit(m)
       /\ wftTokens' = IF WftStarted(m.ms) THEN wftTokens \cup {WftToken(m.ms)} ELSE wftTokens
       /\ appliedWft' = appliedWft \cup {tok}
       /\ UNCHANGED <<up, zombie, actTokens, appliedAct, crashes, zreads>>

RespondWorkflowTaskFailedA(tok) ==
    /\ up /\ tok \in wftTokens /\ WftTokenValid(ms, tok)
    /\ tok.attempt < MaxWftAttempts
    /\ \E m \in {FailWorkflowTask(ms)} : Commit(m)
    /\ UNCHANGED <<up, zombie, wftTokens, actTokens, appliedWft, appliedAct, crashes, zreads>>

RespondActivityTaskCompletedA(tok, eagerWft) ==
    /\ up /\ tok \in actTokens /\ ActivityTokenValid(ms, tok)
    /\ \E m \in {CompleteActivity(ms, tok, eagerWft)} :
       /\ Commit(m)
       /\ wftTokens' = IF WftStarted(m.ms) /\ ~WftStarted(ms)
                       THEN wftTokens \cup {WftToken(m.ms)} ELSE wftTokens
       /\ appliedAct' = appliedAct \cup {tok}
       /\ UNCHANGED <<up, zombie, actTokens, appliedWft, crashes, zreads>>

RespondActivityTaskFailedA(tok) ==
    /\ up /\ tok \in actTokens /\ ActivityTokenValid(ms, tok)
    /\ \E retry \in RetryChoices(ms.activities[tok.sid].attempt) :
         \E m \in {FailActivity(ms, tok, retry)} : Commit(m)
    /\ UNCHANGED <<up, zombie, wftTokens, actTokens, appliedWft, appliedAct, crashes, zreads>>

(* SignalWorkflow -> signal (a client retries with the same request id)    *)
SignalA(rid) ==
    /\ up /\ ms.status = RUNNING /\ SignalIsNew(ms, rid)
    /\ \E m \in {Signal(ms, rid)} : Commit(m)
    /\ UNCHANGED <<up, zombie, wftTokens, actTokens, appliedWft, appliedAct, crashes, zreads>>

TerminateA ==
    /\ up /\ WithTerminate /\ ms.status = RUNNING
    /\ \E m \in {Terminate(ms)} : Commit(m)
    /\ UNCHANGED <<up, zombie, wftTokens, actTokens, appliedWft, appliedAct, crashes, zreads>>

(* The server process dies: everything in memory is gone.                   *)
Crash ==
    /\ up /\ crashes < MaxCrashes
    /\ up' = FALSE /\ backlog' = {} /\ heap' = {}
    /\ crashes' = crashes + 1
    /\ UNCHANGED <<store, zombie, wftTokens, actTokens, appliedWft, appliedAct, accepted, zreads>>

(* The run's node hands a committed row to its queue's node (TaskForwarder *)
(* AddTasks, or a held task released to the queue's owner); sent again     *)
(* until delivered while the row is in the store and the node is up.  A row *)
(* in tasks and not in the backlog is one not handed over yet (dispatch and *)
(* stale-row deletion remove a row from both).                             *)
HandOver(task) ==
    /\ HandOverLags /\ up /\ task \in tasks \ backlog
    /\ backlog' = backlog \cup {task}
    /\ UNCHANGED <<store, up, heap, zombie, wftTokens, actTokens, appliedWft, appliedAct,
                   accepted, crashes, zreads>>

(* TideflowServer.start: Matching.recover and the TimerQueue refill read   *)
(* the store; the run's state is loaded on first use (HistoryEngine._load). *)
Restart ==
    /\ ~up
    /\ up' = TRUE /\ backlog' = tasks /\ heap' = timers
    /\ UNCHANGED <<store, zombie, wftTokens, actTokens, appliedWft, appliedAct, accepted, crashes, zreads>>

-----------------------------------------------------------------------------
(* A stale writer: it loaded the run at some point and later commits a     *)
(* transition computed from that copy.  HistoryEngine.update's commit       *)
(* carries the version it read; the store rejects it unless nothing was     *)
(* committed since (ConditionFailedError: forget the cache and reload).     *)

ZombieLoad ==
    /\ zreads < MaxZombieReads /\ zombie = NoCache
    /\ zombie' = [ms |-> ms, version |-> version]
    /\ zreads' = zreads + 1
    /\ UNCHANGED <<store, up, backlog, heap, wftTokens, actTokens, appliedWft, appliedAct, accepted, crashes>>

(* What the stale copy lets the zombie compute (tokens and rows it got     *)
(* from the store or from workers).                                        *)
ZombieMutations(zms) ==
    {RecordActivityStarted(zms, t) : t \in {t \in tasks : ActivityTaskValid(zms, t)}}
    \cup {RecordWorkflowTaskStarted(zms, t) : t \in {t \in tasks : WftTaskValid(zms, t)}}
    \cup {FireTimer(zms, r, FALSE) : r \in {r \in timers : FireTimerValid(zms, r) /\ TimeMayFire(r)}}
    \cup {CompleteActivity(zms, t, FALSE) : t \in {t \in actTokens : ActivityTokenValid(zms, t)}}

(* The store's checks: db_version, and the primary key of history_events.  *)
StoreAccepts(v, m) ==
    \/ v = version
    \/ /\ Mutant = "no_version_check"
       /\ \A i \in DOMAIN m.events : m.events[i].id > Len(hist)
    \/ Mutant = "upsert_no_version_check"

Max2(a, b) == IF a > b THEN a ELSE b

(* INSERT OR REPLACE of events by id (the "upsert" mutant)                  *)
Upsert(h, evs) ==
    LET ids == {evs[i].id : i \in DOMAIN evs}
        n == IF evs = <<>> THEN Len(h) ELSE Max2(Len(h), evs[Len(evs)].id)
    IN [i \in 1..n |-> IF i \in ids THEN evs[CHOOSE j \in DOMAIN evs : evs[j].id = i]
                       ELSE h[i]]

ZombieCommit ==
    /\ zombie # NoCache
    /\ \E m \in ZombieMutations(zombie.ms) :
         IF StoreAccepts(zombie.version, m)
         THEN /\ hist' = IF Mutant = "upsert_no_version_check" THEN Upsert(hist, m.events)
                         ELSE hist \o m.events
              /\ ms' = m.ms
              /\ version' = version + 1
              /\ tasks' = (tasks \ m.done_tasks) \cup m.new_tasks
              /\ timers' = (timers \ m.done_timers) \cup m.new_timers
              /\ zombie' = NoCache   \* one commit per load: it then lost the run
              /\ UNCHANGED <<up, backlog, heap, wftTokens, actTokens, appliedWft, appliedAct,
                             accepted, crashes, zreads>>
         ELSE /\ zombie' = NoCache   \* ConditionFailedError: _forget
              /\ UNCHANGED <<store, up, backlog, heap, wftTokens, actTokens, appliedWft,
                             appliedAct, accepted, crashes, zreads>>

-----------------------------------------------------------------------------
(* The workflow program of the model: it schedules every activity and      *)
(* starts every timer in its first workflow task (activities eagerly or    *)
(* not); in its next task it cancels the timers of CancelTimerIds whose    *)
(* fire it has not seen (which may have fired meanwhile: the race the      *)
(* engine resolves for the cancel); and it completes (or fails, if an      *)
(* activity failed) once everything it started is resolved in the history  *)
(* it was sent.                                                            *)

ProgramF[p \in Any] ==
    LET schedAids == {e.ref : e \in EventsOf(p, "ACTIVITY_TASK_SCHEDULED")}
        sids == ScheduledIds(p)
        open == {s \in sids : OutcomeOf(p, s) = {}}
        failed == {s \in sids : \E e \in OutcomeOf(p, s) : e.type # "ACTIVITY_TASK_COMPLETED"}
        tids == {e.ref : e \in EventsOf(p, "TIMER_STARTED")}
        resolved == {e.ref : e \in EventsOf(p, "TIMER_FIRED") \cup EventsOf(p, "TIMER_CANCELED")}
        cancel == (tids \cap CancelTimerIds) \ resolved
        cancels == [i \in 1..Cardinality(cancel) |-> Cmd("CancelTimer", SetToSeq(cancel)[i], FALSE)]
        newA == SetToSeq(Activities \ schedAids)
        newT == SetToSeq(TimerIds \ tids)
    IN IF Len(newA) + Len(newT) > 0
       THEN {[i \in 1..Len(newA) |-> Cmd("ScheduleActivity", newA[i], e)]
              \o [i \in 1..Len(newT) |-> Cmd("StartTimer", newT[i], FALSE)] : e \in EagerModes}
       ELSE IF open # {} \/ tids \ (resolved \cup cancel) # {} THEN {cancels}
       ELSE {cancels \o <<Cmd(IF failed # {} THEN "Fail" ELSE "Complete", "", FALSE)>>}
(* A function, not an operator: see EngineCore's header (ENABLED and TLC).  *)
Program(p) == ProgramF[p]

Seen(tok) == SubSeq(hist, 1, tok.seen)

-----------------------------------------------------------------------------
DispatchWorkflowTask == \E task \in backlog : RecordWorkflowTaskStartedA(task)
DispatchActivityTask == \E task \in backlog : RecordActivityStartedA(task)
FireSomeTimer == \E row \in heap : FireTimerA(row)
WorkerCompletesWorkflowTask ==
    \E tok \in wftTokens :
       WftTokenValid(ms, tok) /\ \E cmds \in Program(Seen(tok)) : RespondWorkflowTaskCompletedA(tok, cmds)
WorkerCompletesActivity ==
    \E tok \in actTokens : \E e \in EagerWftModes : RespondActivityTaskCompletedA(tok, e)

HandOverSome == \E task \in tasks : HandOver(task)

Next ==
    \/ HandOverSome
    \/ DispatchWorkflowTask
    \/ DispatchActivityTask
    \/ FireSomeTimer
    \/ WorkerCompletesWorkflowTask
    \/ WorkerCompletesActivity
    \/ \E tok \in wftTokens : RespondWorkflowTaskFailedA(tok)
    \/ \E tok \in wftTokens : \E r \in BOOLEAN : HeartbeatWorkflowTaskA(tok, r)
    \/ \E tok \in actTokens : RespondActivityTaskFailedA(tok)
    \/ \E rid \in SignalIds : SignalA(rid)
    \/ TerminateA
    \/ Crash
    \/ Restart
    \/ ZombieLoad
    \/ ZombieCommit

(* Weak fairness: the node restarts, dispatches and fires what it holds,   *)
(* and workers eventually answer with their code's commands.  Nothing is   *)
(* fair about crashes, failures, signals or terminate: they may happen or  *)
(* not.                                                                    *)
Fairness ==
    /\ WF_vars(Restart)
    /\ WF_vars(DispatchWorkflowTask)
    /\ WF_vars(DispatchActivityTask)
    /\ WF_vars(FireSomeTimer)
    /\ WF_vars(WorkerCompletesActivity)
    /\ WF_vars(WorkerCompletesWorkflowTask)

Spec == Init /\ [][Next]_vars /\ Fairness

(* Several nodes: the run's node keeps sending a row until it is delivered. *)
SpecHandOver == Spec /\ WF_vars(HandOverSome)

(* Mutant "hand-over not retried": a row whose delivery failed is given up  *)
(* (nothing forces HandOver), and the run never ends.                      *)
SpecHandOverNotRetried == Spec

(* Mutant "fairness removed": nothing forces a crashed node to restart.     *)
SpecNoRestartFairness ==
    /\ Init /\ [][Next]_vars
    /\ WF_vars(DispatchWorkflowTask)
    /\ WF_vars(DispatchActivityTask)
    /\ WF_vars(FireSomeTimer)
    /\ WF_vars(WorkerCompletesActivity)
    /\ WF_vars(WorkerCompletesWorkflowTask)

-----------------------------------------------------------------------------
(* Properties                                                              *)

(* Event ids are 1..n in order: no gap, no duplicate.                      *)
HistoryGapFree == \A i \in 1..Len(hist) : hist[i].id = i

(* Events are never rewritten or removed.                                  *)
AppendOnly == [][Len(hist') >= Len(hist) /\ SubSeq(hist', 1, Len(hist)) = hist]_hist

BufferedOutcome(s) ==
    \E i \in 1..Len(ms.buffered) : ms.buffered[i].type \in ActivityOutcomes
                                   /\ ms.buffered[i].scheduled = s

(* One transition = one atomic append + state update: the stored state is  *)
(* always the one the stored history leads to.                            *)
StateMatchesHistory ==
    /\ ms.next_event_id = Len(hist) + 1
    /\ (ms.status = RUNNING) <=> (\A i \in 1..Len(hist) : hist[i].type \notin CloseEvents)
    /\ \A s \in DOMAIN ms.activities :
          /\ s \in 1..Len(hist) /\ hist[s].type = "ACTIVITY_TASK_SCHEDULED"
          /\ hist[s].ref = ms.activities[s].activity_id
          /\ OutcomeOf(hist, s) = {}
    /\ ms.status = RUNNING =>
          \A s \in ScheduledIds(hist) :
             OutcomeOf(hist, s) = {} => (s \in DOMAIN ms.activities \/ BufferedOutcome(s))
    /\ \A t \in DOMAIN ms.timers :
          /\ ms.timers[t] \in 1..Len(hist)
          /\ hist[ms.timers[t]].type = "TIMER_STARTED" /\ hist[ms.timers[t]].ref = t
    /\ HasWft(ms) /\ ~ms.wft.transient =>
          /\ ms.wft.scheduled \in 1..Len(hist)
          /\ hist[ms.wft.scheduled].type = "WORKFLOW_TASK_SCHEDULED"

(* A result is applied at most once: one outcome per activity, one outcome *)
(* per started workflow task.                                              *)
ExactlyOnceOutcomes ==
    /\ \A s \in ScheduledIds(hist) : Cardinality(OutcomeOf(hist, s)) <= 1
    /\ \A i, j \in 1..Len(hist) :
          (i < j /\ hist[i].type \in WftOutcomes /\ hist[j].type \in WftOutcomes)
             => hist[i].started # hist[j].started

(* Stale task tokens are rejected: every applied completion belongs to the *)
(* attempt the history records for it.                                     *)
StaleTokensRejected ==
    /\ \A tok \in appliedAct :
          \E e \in Range(hist) \cup Range(ms.buffered) :
             e.type = "ACTIVITY_TASK_STARTED" /\ e.scheduled = tok.sid /\ e.attempt = tok.attempt
    /\ \A tok \in appliedWft :
          /\ tok.scheduled \in 1..Len(hist)
          /\ hist[tok.scheduled].type = "WORKFLOW_TASK_SCHEDULED"
          /\ hist[tok.scheduled].attempt = tok.attempt
          /\ \E e \in Range(hist) : e.type = "WORKFLOW_TASK_COMPLETED" /\ e.started = tok.started

(* A signal retried with the same request id is delivered once.            *)
SignalsDeliveredOnce ==
    \A i, j \in 1..(Len(hist) + Len(ms.buffered)) :
       LET all == hist \o ms.buffered IN
       (i < j /\ all[i].type = "WORKFLOW_EXECUTION_SIGNALED"
              /\ all[j].type = "WORKFLOW_EXECUTION_SIGNALED") => all[i].ref # all[j].ref

(* Workflow tasks never lose buffered events (signals, activity outcomes,  *)
(* timers): every one accepted is in history or still buffered, and a      *)
(* closed run has nothing buffered.  The one exception is decided by the   *)
(* workflow: a timer fire it had not seen when it cancelled the timer gives *)
(* way to the TIMER_CANCELED in history.                                   *)
BufferedEventsNeverLost ==
    /\ accepted \subseteq {EventKey(e) : e \in Range(hist) \cup Range(ms.buffered)}
                         \cup {EventKey([e EXCEPT !.type = "TIMER_FIRED"]) :
                                 e \in EventsOf(hist, "TIMER_CANCELED")}
    /\ ms.status # RUNNING => ms.buffered = <<>>

(* A started timer is resolved at most once: fired or cancelled.           *)
TimerResolvedOnce ==
    \A t \in {e.ref : e \in EventsOf(hist, "TIMER_STARTED")} :
       Cardinality({i \in 1..(Len(hist) + Len(ms.buffered)) :
                      LET e == (hist \o ms.buffered)[i]
                      IN e.type \in {"TIMER_FIRED", "TIMER_CANCELED"} /\ e.ref = t}) <= 1

(* A workflow closes itself only after seeing every signal in its history: *)
(* signals that arrive while its last task runs fail the completion.       *)
SignalsSeenBeforeClose ==
    \A i \in 1..Len(hist) :
       hist[i].type \in CommandCloseEvents =>
          LET k == CHOOSE k \in 1..i : hist[k].type = "WORKFLOW_TASK_COMPLETED"
                                       /\ \A j \in (k + 1)..i :
                                             hist[j].type # "WORKFLOW_TASK_COMPLETED"
          IN \A j \in 1..Len(hist) :
                hist[j].type = "WORKFLOW_EXECUTION_SIGNALED" => j < hist[k].started

(* Crash and recovery from the store alone: every piece of outstanding work *)
(* has a row in the store that recovery turns back into a dispatch or a    *)
(* timer.                                                                  *)
RecoverableFromStore ==
    ms.status = RUNNING =>
      /\ HasWft(ms) /\ ms.wft.started = 0 =>
            WftRow(ms.wft) \in tasks \/ TimerRow("WORKFLOW_TASK_RETRY", 0, ms.wft.attempt) \in timers
      /\ WftStarted(ms) =>
            TimerRow("WORKFLOW_TASK_TIMEOUT", ms.wft.scheduled, ms.wft.attempt) \in timers
      /\ \A s \in DOMAIN ms.activities :
            LET a == ms.activities[s] IN
            /\ a.started => TimerRow("ACTIVITY_START_TO_CLOSE", s, a.attempt) \in timers
            /\ a.backing_off => TimerRow("ACTIVITY_RETRY", s, a.attempt) \in timers
            /\ ~a.started /\ ~a.backing_off => TaskRow("ACTIVITY", s, a.attempt) \in tasks
      /\ \A t \in DOMAIN ms.timers : UserTimerRow(ms.timers[t]) \in timers

(* Liveness under weak fairness                                            *)
Termination == <>(ms.status \in Closed)
BufferDrains == <>[](ms.buffered = <<>>)
=============================================================================
