----------------------------- MODULE Replication ----------------------------
(***************************************************************************)
(* Cloud / edge replication of one run: the DESIGN TO BE BUILT for the     *)
(* edge mode of ARCHITECTURE.md "Cloud, edge and device" (issue 5 item 4). *)
(* Nothing of it exists in the engine yet except the wire fields it will   *)
(* use: HistoryEvent.version ("ownership epoch of the cluster that wrote   *)
(* the event", stamped by server/_mutation.py Mutation.append from         *)
(* MutableState.version), the event type                                   *)
(* EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF with                              *)
(* WorkflowExecutionHandoffEventAttributes (from_cluster, to_cluster,      *)
(* new_version) in proto/tideflow/api/v1/history.proto, and signal         *)
(* deduplication by request id (server/_engine.py HistoryEngine.signal,    *)
(* MutableState.signal_request_ids).  Each action names the function that  *)
(* implements it (built in issue 12; tla/README.md maps them all).         *)
(*                                                                         *)
(* The model: one run, several clusters (the cloud and edge nodes), each   *)
(* with its own store holding a replica of the run's history.  Ownership   *)
(* is part of the history itself: the run's home is InitialHome until a    *)
(* HANDOFF event names another cluster with a higher epoch; a cluster is   *)
(* home exactly when the newest HANDOFF in its own replica names it.  Only *)
(* the home appends, and every event carries the epoch its writer owned    *)
(* the run with.  A handoff is written by the current home as its last     *)
(* event and reaches the new home by replication, so the new home has      *)
(* caught up by the time it learns it is home, and the old home is fenced  *)
(* by its own replica from the moment it wrote the event.                  *)
(*                                                                         *)
(* Replication is pulled: a cluster asks a peer for the events after its   *)
(* last one and applies a reply only where it continues its replica.  The  *)
(* link between clusters goes down and up; messages in flight are lost,    *)
(* duplicated (a delivered message may be delivered again) and reordered   *)
(* (the network is a set).  Signals reach any cluster that knows the run;  *)
(* a cluster that is not home keeps them in its durable inbox (a set keyed *)
(* by request id: merging is a union, so any order and any number of       *)
(* redeliveries give the same result) and forwards them to the home it     *)
(* knows whenever the link is up, until its own replica shows them applied *)
(* (offline mode: while the link is down they just wait).  The home        *)
(* applies each request id once.  Cancel and terminate requests travel    *)
(* the same way (request ids in Cancels and Terminates): the home applies  *)
(* a cancel as one CANCEL_REQUESTED (a later cancel finds it requested and *)
(* changes nothing) and a terminate as TERMINATED, which closes the run;   *)
(* a replica shows a cancel applied once it shows any CANCEL_REQUESTED,   *)
(* and every request once it shows the run closed (server/_inbox.py       *)
(* _shows).                                                                *)
(*                                                                         *)
(* The workflow waits for every signal in Signals and then completes (like *)
(* an approval workflow), so EventualConsistency also depends on signals   *)
(* crossing the link.                                                      *)
(*                                                                         *)
(* `Mutant` switches deliberately broken variants on (tla/manifest.csv);   *)
(* "none" is the design.                                                   *)
(***************************************************************************)
EXTENDS Naturals, Sequences, FiniteSets, TLC

CONSTANTS
    Clusters,     \* cluster names, e.g. "cloud", "edge1"
    InitialHome,  \* the cluster where the run started (its first home)
    Signals,      \* request ids of the signals clients send
    Cancels,      \* request ids of cancel requests
    Terminates,   \* request ids of terminate requests
    MaxHandoffs,  \* environment: handoffs in one behaviour
    NetCapacity,  \* messages in flight at most (a send into a full network loses one)
    Mutant        \* "none" or the name of a deliberately broken variant

ASSUME InitialHome \in Clusters /\ MaxHandoffs \in Nat /\ NetCapacity \in Nat \ {0}
ASSUME Signals \cap (Cancels \cup Terminates) = {} /\ Cancels \cap Terminates = {}

Requests == Signals \cup Cancels \cup Terminates
CancelsAndTerminates == Cancels \cup Terminates

VARIABLES
    hist,      \* cluster -> its replica of the run's history (history_events)
    inbox,     \* cluster -> request ids it holds, not yet seen applied
    net,       \* messages in flight between clusters (a set)
    linkUp,    \* the link between clusters is up
    sent,      \* ghost: request ids clients sent at least once
    handoffs   \* ghost: handoffs so far

vars == <<hist, inbox, net, linkUp, sent, handoffs>>

(* One history event.  `epoch` is HistoryEvent.version (the writer's       *)
(* ownership epoch); a HANDOFF also names from_cluster, to_cluster and     *)
(* new_version; a SIGNALED event carries its request id.                   *)
Ev(type, epoch) == [type |-> type, epoch |-> epoch, sid |-> "",
                    from |-> "", to |-> "", newEpoch |-> 0]
SignalEv(s, epoch) == [Ev("SIGNALED", epoch) EXCEPT !.sid = s]
CancelEv(s, epoch) == [Ev("CANCEL_REQUESTED", epoch) EXCEPT !.sid = s]
(* WorkflowExecutionTerminatedEventAttributes has no request id.           *)
TerminateEv(epoch) == Ev("TERMINATED", epoch)
HandoffEv(from, to, epoch) ==
    [Ev("HANDOFF", epoch) EXCEPT !.from = from, !.to = to, !.newEpoch = epoch + 1]

(* Messages: a reply to a replication poll (the events from position       *)
(* `start` on), and a forwarded signal.                                    *)
EventsMsg(to, start, events) == [kind |-> "events", to |-> to, start |-> start,
                                 events |-> events, sid |-> ""]
SignalMsg(to, s) == [kind |-> "signal", to |-> to, start |-> 0, events |-> <<>>, sid |-> s]

(* The possible networks after sending m.  The network is a set, so it     *)
(* reorders, and a delivered message stays in it, so it duplicates; it     *)
(* holds at most NetCapacity messages, and a send into a full network      *)
(* loses one of them (any one).  The bound only caps how many stale        *)
(* messages linger (they are what makes the state space grow); loss,       *)
(* reordering and duplication stay.                                        *)
NetAfterSending(m) ==
    IF m \in net \/ Cardinality(net) < NetCapacity THEN {net \cup {m}}
    ELSE {(net \ {lost}) \cup {m} : lost \in net}

-----------------------------------------------------------------------------
(* What a cluster derives from its own replica (MutableState after         *)
(* replaying it).                                                          *)

IsPrefix(a, b) == Len(a) <= Len(b) /\ SubSeq(b, 1, Len(a)) = a

HandoffPositions(h) == {i \in 1..Len(h) : h[i].type = "HANDOFF"}
LastHandoff(h) ==
    LET P == HandoffPositions(h)
    IN h[CHOOSE i \in P : \A j \in P : j <= i]

(* The home and the ownership epoch (MutableState.version) a replica       *)
(* shows.                                                                  *)
HomeIn(h) == IF HandoffPositions(h) = {} THEN InitialHome ELSE LastHandoff(h).to
EpochIn(h) == IF HandoffPositions(h) = {} THEN 1 ELSE LastHandoff(h).newEpoch

IsHome(c) == hist[c] # <<>> /\ HomeIn(hist[c]) = c
ClosedIn(h) == \E i \in 1..Len(h) : h[i].type \in {"COMPLETED", "TERMINATED"}
Closed(c) == ClosedIn(hist[c])
SignalsIn(h) == {h[i].sid : i \in {j \in 1..Len(h) : h[j].type = "SIGNALED"}}
CancelRequestedIn(h) == \E i \in 1..Len(h) : h[i].type = "CANCEL_REQUESTED"
(* The requests a replica shows applied, or moot (server/_inbox.py _shows): *)
(* its signals, every cancel once one was, everything once it closed.      *)
ShownIn(h) ==
    SignalsIn(h)
    \cup (IF CancelRequestedIn(h) THEN Cancels ELSE {})
    \cup (IF ClosedIn(h) THEN Requests ELSE {})
Count(s, h) == Cardinality({i \in 1..Len(h) : h[i].type = "SIGNALED" /\ h[i].sid = s})

(* The old home right after its handoff (the newest HANDOFF is its own).   *)
HandedOff(c) == HandoffPositions(hist[c]) # {} /\ LastHandoff(hist[c]).from = c

TypeOK ==
    /\ \A c \in Clusters : \A i \in 1..Len(hist[c]) :
          hist[c][i].type \in {"STARTED", "SIGNALED", "HANDOFF", "COMPLETED",
                                "CANCEL_REQUESTED", "TERMINATED"}
    /\ inbox \in [Clusters -> SUBSET Requests]
    /\ \A m \in net : m.kind \in {"events", "signal"} /\ m.to \in Clusters
    /\ linkUp \in BOOLEAN
    /\ sent \subseteq Requests

Init ==
    /\ hist = [c \in Clusters |-> IF c = InitialHome THEN <<Ev("STARTED", 1)>> ELSE <<>>]
    /\ inbox = [c \in Clusters |-> {}]
    /\ net = {}
    /\ linkUp = TRUE
    /\ sent = {}
    /\ handoffs = 0

-----------------------------------------------------------------------------
(* The home's engine: server/_engine.py HistoryEngine (exists), with the   *)
(* ownership check of the design (HistoryEngine.update refuses a run       *)
(* whose MutableState names another home: server/_home.py check_home).     *)

(* Who may apply signals, and with which epoch: the home, with the epoch   *)
(* its replica grants it.  Two mutants widen this.                         *)
MayApplySignals(c) ==
    \/ IsHome(c)
    \/ Mutant = "non_home_applies_signal" /\ hist[c] # <<>>
    \/ Mutant = "flush_after_handoff" /\ HandedOff(c)
WriterEpoch(c) ==
    IF Mutant = "flush_after_handoff" /\ HandedOff(c)
    THEN LastHandoff(hist[c]).epoch   \* stamped when buffered, before the handoff
    ELSE EpochIn(hist[c])

(* server/_engine.py HistoryEngine.signal (exists): a request id already   *)
(* applied is dropped (MutableState.signal_request_ids), anything else     *)
(* becomes WORKFLOW_EXECUTION_SIGNALED; either way the request leaves the  *)
(* inbox.  Mutant "no_signal_dedup": no request-id check.  Mutant          *)
(* "non_home_applies_signal": an offline edge applies a signal to its own  *)
(* replica instead of keeping it for the home.  Mutant                     *)
(* "flush_after_handoff": the old home flushes signals it buffered during  *)
(* a workflow task after writing HANDOFF, with the version of their        *)
(* buffering (server/_mutation.py flush_buffered stamps the version of the *)
(* flush, which is what the correct spec needs from the home's side).      *)
ApplySignal(c, s) ==
    /\ s \in Signals
    /\ MayApplySignals(c)
    /\ s \in inbox[c]
    /\ IF (s \in SignalsIn(hist[c]) /\ Mutant # "no_signal_dedup") \/ Closed(c)
       THEN UNCHANGED hist
       ELSE hist' = [hist EXCEPT ![c] = Append(@, SignalEv(s, WriterEpoch(c)))]
    /\ inbox' = [inbox EXCEPT ![c] = @ \ {s}]
    /\ UNCHANGED <<net, linkUp, sent, handoffs>>

(* server/_engine.py request_cancel and terminate at the home: a cancel    *)
(* becomes CANCEL_REQUESTED unless one was already requested, a terminate  *)
(* closes the run with TERMINATED; on a closed run both change nothing     *)
(* (the inbox takes that answer as done); either way the request leaves    *)
(* the inbox.                                                              *)
ApplyCancel(c, s) ==
    /\ s \in Cancels
    /\ IsHome(c)
    /\ s \in inbox[c]
    /\ IF CancelRequestedIn(hist[c]) \/ Closed(c)
       THEN UNCHANGED hist
       ELSE hist' = [hist EXCEPT ![c] = Append(@, CancelEv(s, EpochIn(@)))]
    /\ inbox' = [inbox EXCEPT ![c] = @ \ {s}]
    /\ UNCHANGED <<net, linkUp, sent, handoffs>>

ApplyTerminate(c, s) ==
    /\ s \in Terminates
    /\ IsHome(c)
    /\ s \in inbox[c]
    /\ IF Closed(c)
       THEN UNCHANGED hist
       ELSE hist' = [hist EXCEPT ![c] = Append(@, TerminateEv(EpochIn(@)))]
    /\ inbox' = [inbox EXCEPT ![c] = @ \ {s}]
    /\ UNCHANGED <<net, linkUp, sent, handoffs>>

ApplyRequest(c, s) == ApplySignal(c, s) \/ ApplyCancel(c, s) \/ ApplyTerminate(c, s)

(* The workflow's code has seen every signal and returns: complete_        *)
(* workflow_task (exists) appends WORKFLOW_EXECUTION_COMPLETED.            *)
CompleteRun(c) ==
    /\ IsHome(c)
    /\ ~Closed(c)
    /\ Signals \subseteq SignalsIn(hist[c])
    /\ hist' = [hist EXCEPT ![c] = Append(@, Ev("COMPLETED", EpochIn(@)))]
    /\ UNCHANGED <<inbox, net, linkUp, sent, handoffs>>

(* The home hands the run over: server/_handoff.py handoff                 *)
(* appends EVENT_TYPE_WORKFLOW_EXECUTION_HANDOFF with new_version = epoch  *)
(* + 1.  It is the old home's last event: from now on its replica names    *)
(* another home.  The new home learns it by replication, hence after       *)
(* catching up.                                                            *)
Handoff(c, t) ==
    /\ IsHome(c)
    /\ t # c
    /\ ~Closed(c)
    /\ handoffs < MaxHandoffs
    /\ hist' = [hist EXCEPT ![c] = Append(@, HandoffEv(c, t, EpochIn(@)))]
    /\ handoffs' = handoffs + 1
    /\ UNCHANGED <<inbox, net, linkUp, sent>>

(* Mutant "takeover_without_handoff": a cluster that is not home declares  *)
(* itself home with a higher epoch on its own replica (the tempting "the   *)
(* cloud takes over the run of an edge that went offline"), while the old  *)
(* home, unaware, goes on writing.                                         *)
Takeover(t) ==
    /\ Mutant = "takeover_without_handoff"
    /\ hist[t] # <<>>
    /\ ~IsHome(t)
    /\ ~Closed(t)
    /\ handoffs < MaxHandoffs
    /\ hist' = [hist EXCEPT ![t] = Append(@, HandoffEv(HomeIn(@), t, EpochIn(@)))]
    /\ handoffs' = handoffs + 1
    /\ UNCHANGED <<inbox, net, linkUp, sent>>

-----------------------------------------------------------------------------
(* Replication: server/_replication.py (Replicator).                       *)

(* Cluster r polls peer s for the events after its last one (the poll      *)
(* carries r's length: the "version vector" of ARCHITECTURE.md); s replies *)
(* with that suffix of its replica (HistoryStore.read_events, exists). The *)
(* request and the reply are one step: a lost request is a reply that is   *)
(* never sent.                                                             *)
ShipEvents(s, r) ==
    /\ linkUp
    /\ s # r
    /\ Len(hist[s]) > Len(hist[r])
    /\ Mutant = "ship_only_running" => ~Closed(s)   \* BUG: closed runs leave the replication queue
    /\ net' \in NetAfterSending(EventsMsg(r, Len(hist[r]) + 1,
                                SubSeq(hist[s], Len(hist[r]) + 1, Len(hist[s]))))
    /\ UNCHANGED <<hist, inbox, linkUp, sent, handoffs>>

(* A cluster receives request s (from a client or forwarded): into the     *)
(* inbox, unless it is not home and its replica already shows s applied    *)
(* (it answers "done").  The home always takes it: its engine dedups.      *)
Receive(c, s) ==
    IF ~IsHome(c) /\ s \in ShownIn(hist[c]) THEN inbox[c] ELSE inbox[c] \cup {s}

(* ReplicationStore.append_replicated: applies a batch only                *)
(* where it continues the replica (no gap; events it already has must be   *)
(* equal, as the (event_id, version) pairs of a version history), in one   *)
(* transaction with the inbox entries it retires.  Stale and duplicate     *)
(* batches change nothing.  Mutant "blind_apply" appends every batch.      *)
Continues(h, m) ==
    /\ m.start <= Len(h) + 1
    /\ m.start + Len(m.events) - 1 > Len(h)
    /\ \A i \in m.start..Len(h) : h[i] = m.events[i - m.start + 1]

Applied(h, m) ==
    IF Mutant = "blind_apply" THEN h \o m.events
    ELSE SubSeq(h, 1, m.start - 1) \o m.events

DeliverEvents(m) ==
    /\ linkUp
    /\ m \in net
    /\ m.kind = "events"
    /\ Mutant = "blind_apply" \/ Continues(hist[m.to], m)
    /\ LET h == Applied(hist[m.to], m)
       IN /\ hist' = [hist EXCEPT ![m.to] = h]
          /\ inbox' = [inbox EXCEPT ![m.to] = @ \ ShownIn(h)]
    /\ UNCHANGED <<net, linkUp, sent, handoffs>>   \* the network may deliver it again

(* A cluster that is not home forwards what its inbox holds to the home it *)
(* knows (server/_inbox.py Inbox.flush: a "forward" call on the link with  *)
(* the same request_id).  The entry stays until                            *)
(* replication brings the SIGNALED event back.  Mutant                     *)
(* "forget_after_forward": the entry is deleted once forwarded.            *)
ForwardSignal(c, s) ==
    /\ linkUp
    /\ ~IsHome(c)
    /\ s \in inbox[c]
    /\ net' \in NetAfterSending(SignalMsg(HomeIn(hist[c]), s))
    /\ inbox' = IF Mutant = "forget_after_forward"
                THEN [inbox EXCEPT ![c] = @ \ {s}]
                ELSE inbox
    /\ UNCHANGED <<hist, linkUp, sent, handoffs>>

(* The receiving cluster merges the request into its inbox (a union); if   *)
(* it is no longer home it forwards it on.                                 *)
DeliverSignal(m) ==
    /\ linkUp
    /\ m \in net
    /\ m.kind = "signal"
    /\ inbox' = [inbox EXCEPT ![m.to] = Receive(m.to, m.sid)]
    /\ inbox' # inbox
    /\ UNCHANGED <<hist, net, linkUp, sent, handoffs>>

LoseMessage(m) ==
    /\ m \in net
    /\ net' = net \ {m}
    /\ UNCHANGED <<hist, inbox, linkUp, sent, handoffs>>

-----------------------------------------------------------------------------
(* The environment: clients and the link.                                  *)

(* A client sends (or retries) signal s to any cluster that knows the run, *)
(* link up or not: server/_frontend.py WorkflowService.SignalWorkflow      *)
(* (exists) hands it to the engine at home, or to the durable inbox        *)
(* elsewhere (the site_inbox table in history/_schema.py).                 *)
(* The request id must never be empty here: HistoryEngine.signal dedups    *)
(* only non-empty ones, so the frontend has to assign one.                 *)
SendSignal(s, c) ==
    /\ hist[c] # <<>>
    /\ sent' = sent \cup {s}
    /\ inbox' = [inbox EXCEPT ![c] = Receive(c, s)]
    /\ UNCHANGED <<hist, net, linkUp, handoffs>>

(* A workflow at c addresses a child it started homed at another site      *)
(* (server/_remote_children.py, RunGateway._at_home with the child's home):*)
(* its parent-close policy, a cancel or a signal enters c's inbox even     *)
(* before c holds a replica of the child, whose home the start's answer    *)
(* named (the run's InitialHome).  The inbox forwards it once a replica    *)
(* exists.  ChildRequests: the requests sent that way, none by default     *)
(* (a model names them: CONSTANT ChildRequests <- ...).                    *)
ChildRequests == {}

AddressChild(s, c) ==
    /\ s \in ChildRequests
    /\ hist[c] = <<>> /\ c # InitialHome
    /\ sent' = sent \cup {s}
    /\ inbox' = [inbox EXCEPT ![c] = @ \cup {s}]
    /\ UNCHANGED <<hist, net, linkUp, handoffs>>

LinkFails ==
    /\ linkUp
    /\ linkUp' = FALSE
    /\ UNCHANGED <<hist, inbox, net, sent, handoffs>>

LinkRecovers ==
    /\ ~linkUp
    /\ linkUp' = TRUE
    /\ UNCHANGED <<hist, inbox, net, sent, handoffs>>

DeliverSomeEvents == \E m \in net : DeliverEvents(m)
DeliverSomeSignal == \E m \in net : DeliverSignal(m)
LoseSomeMessage == \E m \in net : LoseMessage(m)

Next ==
    \/ \E c \in Clusters :
          \/ CompleteRun(c)
          \/ Takeover(c)
          \/ \E s \in Requests : ApplyRequest(c, s) \/ ForwardSignal(c, s) \/ SendSignal(s, c)
          \/ \E s \in Requests : AddressChild(s, c)
          \/ \E t \in Clusters : Handoff(c, t) \/ ShipEvents(c, t)
    \/ DeliverSomeEvents
    \/ DeliverSomeSignal
    \/ LoseSomeMessage
    \/ LinkFails
    \/ LinkRecovers

(* Weak fairness for what the home does on its own; strong fairness for    *)
(* what needs the link, which may go down between any two steps: polls and *)
(* forwards retried whenever the link is up eventually go out, and a       *)
(* message sent again and again is eventually delivered (a fair-lossy      *)
(* link).  Nothing is fair about handoffs, clients, losses or the link     *)
(* itself: the properties assume []<>linkUp instead.  (One fairness        *)
(* condition per kind of step, not per cluster, message or signal: TLC's   *)
(* liveness checking time grows with their number, and these suffice.)     *)
HomeWork == \E c \in Clusters : CompleteRun(c) \/ \E s \in Requests : ApplyRequest(c, s)
Replicate == \E s, r \in Clusters : ShipEvents(s, r)
Forward == \E c \in Clusters, s \in Requests : ForwardSignal(c, s)

Spec ==
    /\ Init /\ [][Next]_vars
    /\ WF_vars(HomeWork)
    /\ SF_vars(Replicate) /\ SF_vars(Forward)
    /\ SF_vars(DeliverSomeEvents) /\ SF_vars(DeliverSomeSignal)

(* Mutant "fairness too weak": weak fairness on what needs the link.  A    *)
(* network that loses every message right after it is sent (or a link that *)
(* fails right after every send) defeats it.                               *)
SpecWeakLinkFairness ==
    /\ Init /\ [][Next]_vars
    /\ WF_vars(HomeWork)
    /\ WF_vars(Replicate) /\ WF_vars(Forward)
    /\ WF_vars(DeliverSomeEvents) /\ WF_vars(DeliverSomeSignal)

-----------------------------------------------------------------------------
(* Properties                                                              *)

(* Every run has one home, its only writer.  (During a handoff there is    *)
(* none: the old home wrote HANDOFF, the new one has not received it.)     *)
SingleHome == \A c, d \in Clusters : IsHome(c) /\ IsHome(d) => c = d

(* A replica's history is always a prefix of the home's.                   *)
ReplicaIsPrefix ==
    \A h \in Clusters : IsHome(h) => \A c \in Clusters : IsPrefix(hist[c], hist[h])

(* A handoff never forks the history: any two replicas are prefixes of one *)
(* another (this also covers the handoff window with no home), and every   *)
(* event carries the epoch in force where it stands (the one the last      *)
(* earlier HANDOFF granted), so epochs never decrease along a history.     *)
NoForkOnHandoff ==
    /\ \A c, d \in Clusters : IsPrefix(hist[c], hist[d]) \/ IsPrefix(hist[d], hist[c])
    /\ \A c \in Clusters : \A i \in 2..Len(hist[c]) :
          /\ hist[c][i].epoch = EpochIn(SubSeq(hist[c], 1, i - 1))
          /\ hist[c][i - 1].epoch <= hist[c][i].epoch

(* Safety half of SignalsExactlyOnce: no request id is applied twice.      *)
SignalsAtMostOnce == \A c \in Clusters, s \in Signals : Count(s, hist[c]) <= 1

(* A run is asked to cancel at most once, and nothing follows its closing  *)
(* event (a terminate or a request after the close changes nothing).       *)
CancelAtMostOnce ==
    \A c \in Clusters :
        Cardinality({i \in 1..Len(hist[c]) : hist[c][i].type = "CANCEL_REQUESTED"}) <= 1
ClosedIsLast ==
    \A c \in Clusters : \A i \in 1..Len(hist[c]) :
        hist[c][i].type \in {"COMPLETED", "TERMINATED"} => i = Len(hist[c])

(* The design document's EventualConsistency: once the run is COMPLETED at *)
(* home and the link is up infinitely often, every replica sees it         *)
(* COMPLETED.                                                              *)
EventualConsistency ==
    []<>linkUp =>
        ((\E h \in Clusters : IsHome(h) /\ Closed(h)) ~> (\A c \in Clusters : Closed(c)))

(* Every signal a client sent, to whichever cluster, ends up exactly once  *)
(* in every replica (at most once by SignalsAtMostOnce; this is the "at    *)
(* least", which offline buffering and forwarding must ensure).            *)
SignalsExactlyOnce ==
    []<>linkUp =>
        \A s \in Signals : (s \in sent) ~> (\A c \in Clusters : Count(s, hist[c]) = 1)

(* The design document's formula as written, without the link premise. It  *)
(* does not hold (an edge whose link never comes back never sees the       *)
(* completion): Replication_unconditional.cfg expects TLC to reject it.    *)
DesignDocEventualConsistency ==
    (\E h \in Clusters : IsHome(h) /\ Closed(h)) ~> (\A c \in Clusters : Closed(c))
=============================================================================
