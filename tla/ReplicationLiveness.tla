------------------------- MODULE ReplicationLiveness -------------------------
(***************************************************************************)
(* The temporal properties of Replication.tla checked with cancels and     *)
(* terminates (tla/README.md, "Liveness with cancels and terminates").     *)
(*                                                                         *)
(* Replication's own Spec states its fairness one condition per kind of   *)
(* step, which is enough for one request: with several, TLC finds          *)
(* behaviours where one request's step satisfies the condition forever    *)
(* while another request starves (a client retries a cancel at the home,  *)
(* which applies it again and again and never the signal beside it; an     *)
(* old home forwards, forever, a request its replica already shows).  The  *)
(* code has no such starvation: each loop handles every request it holds   *)
(* (below).  LiveFairness states the fairness on the steps that make       *)
(* progress, which is what those loops provide, and which is no stronger   *)
(* than per-request fairness.                                              *)
(*                                                                         *)
(* The model size: clients send (and retry, to any cluster, online or not) *)
(* at most MaxRequests distinct request ids in one behaviour (LiveNext).  *)
(***************************************************************************)
EXTENDS Replication

CONSTANT MaxRequests  \* distinct request ids clients send in one behaviour

ASSUME MaxRequests \in Nat

(* Replication's Next, clients sending (server/_frontend.py, SendSignal) at *)
(* most MaxRequests distinct request ids in a behaviour; a retry of a sent  *)
(* one, to either cluster, any time.  Every other step is Next's, whatever  *)
(* Next grows to.                                                           *)
LiveNext == Next /\ Cardinality(sent') <= MaxRequests

-----------------------------------------------------------------------------
(* Fairness: the steps that make progress, and the code that takes them.   *)

(* The home completes the run (a worker's workflow task) or applies a      *)
(* request it holds that changes the history: server/_inbox.py apply_request *)
(* for every forwarded request as it arrives, Inbox.flush for what a new    *)
(* home holds itself (Sites._inbox_loop every 2 s, the forward loops every *)
(* second).  A request the history already shows changes nothing, and     *)
(* leaving it in the model's inbox delays nothing.  Each of these steps,    *)
(* once enabled, stays enabled until it or another of them is taken (or a   *)
(* handoff, of which there are finitely many), so weak fairness of each     *)
(* gives weak fairness of their disjunction.                                *)
UsefulHomeWork ==
    \E c \in Clusters :
        \/ CompleteRun(c)
        \/ \E r \in Requests : ApplyRequest(c, r) /\ hist' # hist

(* A cluster that is not home forwards a request its replica does not show *)
(* yet: Inbox.forward_loop flushes every second while the link is up and   *)
(* sends each such entry again 3 s after its last forward (_RESEND_AFTER_S), *)
(* on this link or the next one; an entry the replica shows is retired,    *)
(* never forwarded.  The link is redialled with backoff for ever (capped at *)
(* 2 s while unreachable, 60 s while refused), so a link that can come up   *)
(* does: that is the premise []<>linkUp.                                    *)
UsefulForward ==
    \E c \in Clusters, r \in Requests : ForwardSignal(c, r) /\ r \notin ShownIn(hist[c])

(* The network delivers a forwarded request the receiver does not show    *)
(* yet (a fair-lossy link: strong fairness of each message's delivery      *)
(* implies strong fairness of the disjunction).                            *)
UsefulDeliverSignal ==
    \E m \in net : DeliverSignal(m) /\ m.sid \notin ShownIn(hist[m.to])

(* Replicate (a full pass when the link comes up and every 5 s, and the   *)
(* peer's hints: server/_replication.py Replicator.pull_loop) and          *)
(* DeliverSomeEvents (only a batch that continues the replica is enabled)  *)
(* are Replication's own.                                                  *)
LiveFairness ==
    /\ WF_vars(UsefulHomeWork)
    /\ SF_vars(Replicate) /\ SF_vars(DeliverSomeEvents)
    /\ SF_vars(UsefulForward) /\ SF_vars(UsefulDeliverSignal)

LiveSpec == Init /\ [][LiveNext]_vars /\ LiveFairness

(* Mutant: weak fairness on the steps that need the link.                  *)
LiveSpecWeakLinkFairness ==
    /\ Init /\ [][LiveNext]_vars
    /\ WF_vars(UsefulHomeWork)
    /\ WF_vars(Replicate) /\ WF_vars(DeliverSomeEvents)
    /\ WF_vars(UsefulForward) /\ WF_vars(UsefulDeliverSignal)

-----------------------------------------------------------------------------
(* Properties, each under the premise that the link is up infinitely often *)
(* (without it none holds: replication-unconditional).                     *)

(* Every request a client sent, to either cluster, is applied at the home  *)
(* (at most once: SignalsAtMostOnce, CancelAtMostOnce, ClosedIsLast) or    *)
(* made moot by the run's close, and every replica shows it.  ShownIn only *)
(* grows along a replica, so "infinitely often, every request sent so far  *)
(* is shown everywhere" is "each sent request is eventually shown          *)
(* everywhere" (one temporal formula instead of one per request).          *)
AllSentShown == \A r \in sent : \A c \in Clusters : r \in ShownIn(hist[c])
RequestsDelivered == []<>linkUp => []<>AllSentShown

(* The replicas converge: from some point on, every cluster holds the same *)
(* history (this implies EventualConsistency).                             *)
Converged == \A c, d \in Clusters : hist[c] = hist[d]
ReplicasConverge == []<>linkUp => <>[]Converged

(* A handoff completes: a moment with no home (the HANDOFF written, not    *)
(* yet received) is always followed by one with a home.  For a state      *)
(* predicate, []<>HasHome is (~HasHome ~> HasHome).                        *)
HasHome == \E c \in Clusters : IsHome(c)
HandoffCompletes == []<>linkUp => []<>HasHome
=============================================================================
