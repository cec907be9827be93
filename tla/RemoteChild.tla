---------------------------- MODULE RemoteChild ----------------------------
(***************************************************************************)
(* A child workflow homed at another site (server/_remote_children.py).    *)
(*                                                                         *)
(* The parent's home P has recorded START_CHILD_WORKFLOW_EXECUTION_        *)
(* INITIATED and holds the START_CHILD transfer row (its outbox, durable). *)
(* While that row exists P sends the start over the sites' link (a         *)
(* "start_child" call) with one request id, derived from the parent run    *)
(* and the initiated event.  The child's home C starts a run for it, or,   *)
(* the request id seen before, answers with the run it started then        *)
(* (HistoryEngine.start_workflow: the current run's start_request_id).  P  *)
(* records the answer (CHILD_WORKFLOW_EXECUTION_STARTED, once: a second    *)
(* answer finds the child started) and deletes the row in that commit      *)
(* (_cross_run.record_child_started).  When the child closes, C writes a   *)
(* CHILD_CLOSED row in the child's outbox in the same commit; while it     *)
(* exists C sends the close ("child_closed"); P records the child's        *)
(* outcome once (CHILD_STARTED first if the start's answer was lost:       *)
(* _cross_run.record_child_closed) and answers; C deletes its row only on  *)
(* that answer.                                                            *)
(*                                                                         *)
(* The parent may close before it heard that its child started (it is    *)
(* terminated, or times out).  Its close policy (TERMINATE here) reaches   *)
(* a child it knows through P's inbox (server/_inbox.py, Replication.tla). *)
(* A start whose answer never came may have started the child, or may     *)
(* still start it: a call that gets no answer on a link that stays up      *)
(* times out (60 s) while its request may still be served at C, and its    *)
(* answer come, later (CallTimesOut).  So no answer, and no "not started"  *)
(* answer either, is definite: the row keeps sending the start itself,     *)
(* closed parent or not, until it hears the run (its request id: one run), *)
(* which it records, applying the close policy to it                      *)
(* (_cross_run._late_child_started).  Asking C whether it started the      *)
(* child, starting nothing (mutant "probe_after_close", the design before) *)
(* lets a start still in flight start it after the answer "no": orphaned.  *)
(*                                                                         *)
(* The link goes down and up.  Messages are reordered (the network is a    *)
(* set) and duplicated (a delivered message stays in it); they are lost    *)
(* when the link fails (the stream they travel on breaks).  A call is      *)
(* outstanding until its answer, its timeout or the link's failure         *)
(* (SiteLink.call); a handler still running at C after its stream broke    *)
(* is a message served late, as after a timeout.  A SIGKILL of either site *)
(* loses only what is in memory: rows, runs and inbox entries are durable, *)
(* so a crash is a link failure and a replay of the rows, which these      *)
(* actions already allow.                                                  *)
(*                                                                         *)
(* `Mutant` switches deliberately broken variants on (tla/manifest.csv).   *)
(***************************************************************************)
EXTENDS Naturals, Sequences, FiniteSets

CONSTANTS
    MaxRuns,      \* bound on child runs (> 1 so the no-dedup mutant can show two)
    Mutant        \* "none" or the name of a deliberately broken variant

ASSUME MaxRuns \in Nat \ {0}

VARIABLES
    parent,        \* the parent's history at P (its child events), from INITIATED on
    parentClosed,  \* the parent closed (terminated, timed out) at P
    startRow,      \* P's START_CHILD row: "none" (deleted), "idle", "calling"
    inboxTerm,     \* P's inbox holds the close policy's terminate for the child
    runs,          \* C's child runs for the request id: a sequence of statuses
    closeRows,     \* runs at C whose CHILD_CLOSED row exists
    net,           \* messages in flight (a set)
    linkUp

vars == <<parent, parentClosed, startRow, inboxTerm, runs, closeRows, net, linkUp>>

Msg(kind, run) == [kind |-> kind, run |-> run]
Messages ==
    {Msg(k, 0) : k \in {"start", "probe", "not_started", "terminate"}} \cup
    {Msg(k, r) : k \in {"started", "closed", "closed_ack"}, r \in 1..MaxRuns}

Has(type) == \E i \in 1..Len(parent) : parent[i] = type
Count(type) == Cardinality({i \in 1..Len(parent) : parent[i] = type})
Pos(type) == CHOOSE i \in 1..Len(parent) : parent[i] = type
AllRunsClosed == \A i \in 1..Len(runs) : runs[i] = "closed"

TypeOK ==
    /\ \A i \in 1..Len(parent) :
          parent[i] \in {"INITIATED", "CHILD_STARTED", "CHILD_CLOSED"}
    /\ parentClosed \in BOOLEAN
    /\ startRow \in {"none", "idle", "calling"}
    /\ inboxTerm \in BOOLEAN
    /\ \A i \in 1..Len(runs) : runs[i] \in {"running", "closed"}
    /\ closeRows \subseteq 1..Len(runs)
    /\ net \subseteq Messages
    /\ linkUp \in BOOLEAN

Init ==
    /\ parent = <<"INITIATED">>
    /\ parentClosed = FALSE
    /\ startRow = "idle"
    /\ inboxTerm = FALSE
    /\ runs = <<>>
    /\ closeRows = {}
    /\ net = {}
    /\ linkUp = TRUE

-----------------------------------------------------------------------------
(* P: the START_CHILD row's action (_cross_run._start_child ->             *)
(* RunGateway.start_child -> RemoteChildren.start), one call at a time.    *)
(* While the link is down it fails at once and the row waits               *)
(* (LinkPendingError).  A closed parent's row sends the start all the      *)
(* same (_started_elsewhere_before_close).  Mutant                         *)
(* "drop_start_row_on_parent_close" deletes the row then, as the local     *)
(* case does; mutant "probe_after_close" asks, starting nothing, and takes *)
(* "not started" for an answer.                                            *)
SendStart ==
    /\ startRow = "idle" /\ linkUp
    /\ IF parentClosed /\ Mutant = "drop_start_row_on_parent_close"
       THEN /\ startRow' = "none"
            /\ UNCHANGED net
       ELSE /\ startRow' = "calling"
            /\ net' = net \cup {IF parentClosed /\ Mutant = "probe_after_close"
                                THEN Msg("probe", 0) ELSE Msg("start", 0)}
    /\ UNCHANGED <<parent, parentClosed, inboxTerm, runs, closeRows, linkUp>>

(* P: the call gets no answer in time on a link that stays up (its         *)
(* request, and its answer, may still be on their way: they stay in net).  *)
(* The row is tried again.  Mutant "drop_row_on_missing_answer": a closed  *)
(* parent's row is deleted instead.                                        *)
CallTimesOut ==
    /\ linkUp /\ startRow = "calling"
    /\ startRow' = IF parentClosed /\ Mutant = "drop_row_on_missing_answer" THEN "none"
                   ELSE "idle"
    /\ UNCHANGED <<parent, parentClosed, inboxTerm, runs, closeRows, net, linkUp>>

(* C: RemoteChildren._serve_start.  Mutant "no_start_dedup": every start   *)
(* makes a new run (a request id that changes per attempt).                *)
ServeStart ==
    /\ linkUp /\ Msg("start", 0) \in net
    /\ IF runs # <<>> /\ Mutant # "no_start_dedup"
       THEN /\ net' = net \cup {Msg("started", 1)}
            /\ UNCHANGED runs
       ELSE /\ Len(runs) < MaxRuns
            /\ runs' = Append(runs, "running")
            /\ net' = net \cup {Msg("started", Len(runs) + 1)}
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, closeRows, linkUp>>

(* C: RemoteChildren._started_before: the run of the request id, if any    *)
(* (asked by mutant "probe_after_close"; C still answers a peer that asks).*)
ServeProbe ==
    /\ linkUp /\ Msg("probe", 0) \in net
    /\ net' = net \cup {IF runs # <<>> THEN Msg("started", 1) ELSE Msg("not_started", 0)}
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, runs, closeRows, linkUp>>

(* P: record_child_started, which deletes the row whatever it finds; on a  *)
(* closed parent it arms the close policy for the child it now knows.      *)
RecordStarted(m) ==
    /\ linkUp /\ m \in net /\ m.kind = "started"
    /\ startRow = "calling"
    /\ startRow' = "none"
    /\ IF parentClosed
       THEN /\ inboxTerm' = (inboxTerm \/ ~Has("CHILD_STARTED"))
            /\ UNCHANGED parent
       ELSE /\ parent' = IF Has("CHILD_STARTED") \/ Has("CHILD_CLOSED") THEN parent
                         ELSE Append(parent, "CHILD_STARTED")
            /\ UNCHANGED inboxTerm
    /\ UNCHANGED <<parentClosed, runs, closeRows, net, linkUp>>

RecordNotStarted(m) ==
    /\ linkUp /\ m \in net /\ m.kind = "not_started"
    /\ startRow = "calling"
    /\ startRow' = "none"
    /\ UNCHANGED <<parent, parentClosed, inboxTerm, runs, closeRows, net, linkUp>>

(* P: the parent is terminated (or times out) before its child closed:     *)
(* Mutation.close; a child it knows started gets the TERMINATE policy,     *)
(* whose row puts a terminate in P's inbox (_apply_parent_close_policy).   *)
ParentCloses ==
    /\ ~parentClosed /\ ~Has("CHILD_CLOSED")
    /\ parentClosed' = TRUE
    /\ inboxTerm' = Has("CHILD_STARTED")
    /\ UNCHANGED <<parent, startRow, runs, closeRows, net, linkUp>>

(* P's inbox forwards the terminate while the link is up and retires it    *)
(* once it sees the child closed (its replica at P: the home's state, a    *)
(* little later).                                                          *)
ForwardTerminate ==
    /\ inboxTerm /\ linkUp
    /\ net' = net \cup {Msg("terminate", 0)}
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, runs, closeRows, linkUp>>

RetireTerminate ==
    /\ inboxTerm /\ runs # <<>> /\ runs[1] = "closed"
    /\ inboxTerm' = FALSE
    /\ UNCHANGED <<parent, parentClosed, startRow, runs, closeRows, net, linkUp>>

(* C: the child closes, by its own code (it may also wait for ever) or by  *)
(* the terminate: Mutation.close writes CHILD_CLOSED in the same commit.   *)
Closing(r) ==
    /\ runs' = [runs EXCEPT ![r] = "closed"]
    /\ closeRows' = closeRows \cup {r}

ChildCloses(r) ==
    /\ r \in 1..Len(runs) /\ runs[r] = "running"
    /\ Closing(r)
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, net, linkUp>>

ApplyTerminate ==
    /\ linkUp /\ Msg("terminate", 0) \in net
    /\ runs # <<>> /\ runs[1] = "running"
    /\ Closing(1)
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, net, linkUp>>

(* C: the CHILD_CLOSED row's action (_cross_run._report_child_closed ->    *)
(* RemoteChildren.report_closed).  Mutant "delete_close_row_on_send": the  *)
(* row goes when the close is sent, not when P answered.                   *)
SendClose(r) ==
    /\ linkUp /\ r \in closeRows
    /\ net' = net \cup {Msg("closed", r)}
    /\ closeRows' = IF Mutant = "delete_close_row_on_send" THEN closeRows \ {r}
                    ELSE closeRows
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, runs, linkUp>>

(* P: RemoteChildren._serve_closed -> record_child_closed: on a running    *)
(* parent the outcome once, after a CHILD_STARTED (appended first when the *)
(* start's answer never came; mutant "close_skips_started" leaves it out); *)
(* then P answers.                                                         *)
RecordClosed(m) ==
    /\ linkUp /\ m \in net /\ m.kind = "closed"
    /\ parent' = IF Has("CHILD_CLOSED") \/ parentClosed THEN parent
                 ELSE IF Has("CHILD_STARTED") \/ Mutant = "close_skips_started"
                      THEN Append(parent, "CHILD_CLOSED")
                      ELSE parent \o <<"CHILD_STARTED", "CHILD_CLOSED">>
    /\ net' = net \cup {Msg("closed_ack", m.run)}
    /\ UNCHANGED <<parentClosed, startRow, inboxTerm, runs, closeRows, linkUp>>

(* C: the answer came: the row is deleted (store.delete_task).             *)
AckClose(m) ==
    /\ linkUp /\ m \in net /\ m.kind = "closed_ack"
    /\ m.run \in closeRows
    /\ closeRows' = closeRows \ {m.run}
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, runs, net, linkUp>>

(* The link fails: the messages on its stream are lost and the calls on it *)
(* fail (the START_CHILD row waits to be tried again).                     *)
LinkFails ==
    /\ linkUp /\ linkUp' = FALSE
    /\ net' = {}
    /\ startRow' = IF startRow = "calling" THEN "idle" ELSE startRow
    /\ UNCHANGED <<parent, parentClosed, inboxTerm, runs, closeRows>>

LinkRecovers ==
    /\ ~linkUp /\ linkUp' = TRUE
    /\ UNCHANGED <<parent, parentClosed, startRow, inboxTerm, runs, closeRows, net>>

DeliverStarted == \E m \in net : RecordStarted(m) \/ RecordNotStarted(m)
DeliverClosed == \E m \in net : RecordClosed(m)
DeliverAck == \E m \in net : AckClose(m)
SendAnyClose == \E r \in 1..MaxRuns : SendClose(r)

Next ==
    \/ SendStart \/ CallTimesOut \/ ServeStart \/ ServeProbe \/ DeliverStarted
    \/ SendAnyClose \/ DeliverClosed \/ DeliverAck
    \/ ParentCloses \/ ForwardTerminate \/ ApplyTerminate \/ RetireTerminate
    \/ \E r \in 1..MaxRuns : ChildCloses(r)
    \/ LinkFails
    \/ LinkRecovers

(* What needs the link is strongly fair (it may fail between any two      *)
(* steps), one condition per kind of step; retiring is weakly fair.        *)
(* Nothing is fair about the child's own close (it may wait for ever), the *)
(* parent's close, a call's timeout, or the link itself: the properties    *)
(* assume []<>linkUp.                                                      *)
Spec ==
    /\ Init /\ [][Next]_vars
    /\ SF_vars(SendStart) /\ SF_vars(ServeStart) /\ SF_vars(ServeProbe)
    /\ SF_vars(DeliverStarted) /\ SF_vars(SendAnyClose) /\ SF_vars(DeliverClosed)
    /\ SF_vars(DeliverAck) /\ SF_vars(ForwardTerminate) /\ SF_vars(ApplyTerminate)
    /\ WF_vars(RetireTerminate)

-----------------------------------------------------------------------------
(* Properties                                                              *)

(* One child run for the parent's one initiated event, whatever the link   *)
(* did to the start (repeats, lost answers).                               *)
OneChildRun == Len(runs) <= 1

(* The parent records its child's start and its outcome once each, the     *)
(* start first.                                                            *)
ParentRecordsOnce ==
    /\ Count("CHILD_STARTED") <= 1
    /\ Count("CHILD_CLOSED") <= 1
    /\ Has("CHILD_CLOSED") => Has("CHILD_STARTED") /\ Pos("CHILD_STARTED") < Pos("CHILD_CLOSED")

(* With the link up infinitely often (and the start's calls timing out     *)
(* only finitely often): a child's close reaches its running parent; a     *)
(* closed parent leaves no child running (its close policy finds every     *)
(* child, started before or after it closed); the outboxes and the inbox   *)
(* empty.                                                                  *)
ParentLearnsOutcome ==
    []<>linkUp =>
        ((runs # <<>> /\ runs[1] = "closed") ~> (Has("CHILD_CLOSED") \/ parentClosed))
(* The row's calls may time out, but not for ever: C, slow for a while,    *)
(* answers in time again (else no start is ever known to be done).         *)
TimeoutsEnd == ~[]<><<CallTimesOut>>_vars
NoOrphanChild ==
    ([]<>linkUp /\ TimeoutsEnd) => (parentClosed ~> (startRow = "none" /\ AllRunsClosed))
Drained ==
    ([]<>linkUp /\ TimeoutsEnd) => <>[](startRow = "none" /\ closeRows = {} /\ ~inboxTerm)
=============================================================================
