----------------------------- MODULE ShardLease -----------------------------
(***************************************************************************)
(* Shard ownership with leases and range-id fencing for several server    *)
(* nodes (ARCHITECTURE.md "Several nodes"; issue 5 item 3, issue 11).      *)
(* Built: history/_cluster.py (the statements), history/_store.py (the     *)
(* fence in every write transaction), server/_shards.py (the node's        *)
(* loops).  Each action below names the function that implements it.       *)
(*                                                                         *)
(* The model: one shard, one run on it, several nodes.  The store holds    *)
(* the shard row and the run's history.  A node acquires the shard by a    *)
(* read followed by a conditional UPDATE ... WHERE range_id = <read>,      *)
(* which bumps range_id: range_id is the fencing token.  Every append      *)
(* commits in a transaction that first checks shards.range_id against the  *)
(* token the node holds, so a node whose lease was taken over cannot       *)
(* write, whatever it believes.  Nodes pause (GC pause, or a partition     *)
(* between node and store: the same thing from the store's side), crash    *)
(* (losing memory) and restart.                                            *)
(*                                                                         *)
(* Time is one bit, `leaseExpired` (lease_expires_at < now).  A lease      *)
(* lapses freely when its owner cannot renew it (paused, down, or no       *)
(* longer holding the current token); it may also lapse under a live owner *)
(* that renewed too late (clock skew, a slow store), a fault with a        *)
(* budget.  Safety must not depend on any clock: nodes never consult their *)
(* own lease deadline before writing, which is the worst case (a paused    *)
(* node cannot check it anyway).                                           *)
(*                                                                         *)
(* Environment faults are bounded (MaxFaults pauses + crashes + releases,  *)
(* MaxLateRenewals lapses under a live owner) so that range ids, and so    *)
(* the state space, stay finite: every acquisition follows a lapse, and    *)
(* every lapse follows a fault.                                            *)
(*                                                                         *)
(* `Mutant` switches deliberately broken variants on (tla/manifest.csv);   *)
(* "none" is the design.                                                   *)
(***************************************************************************)
EXTENDS Naturals, Sequences, FiniteSets, TLC

CONSTANTS
    Nodes,            \* server node identities (the value of shards.owner)
    MaxEvents,        \* the run's history stops growing at this length
    MaxFaults,        \* environment: pauses + crashes + releases in one behaviour
    MaxLateRenewals,  \* environment: leases lapsing under a live owner
    Mutant            \* "none" or the name of a deliberately broken variant

ASSUME MaxEvents \in Nat /\ MaxFaults \in Nat /\ MaxLateRenewals \in Nat

NoNode == "none"   \* shards.owner of a row nobody acquired yet
NoRange == 0       \* a node's token when it believes it owns nothing
NotRead == 0       \* no acquisition in progress (range ids start at 1)

VARIABLES
    (* the store: the shards row ...                                       *)
    owner,         \* shards.owner
    rangeId,       \* shards.range_id
    leaseExpired,  \* shards.lease_expires_at < now
    (* ... and the run's history_events, each tagged for the invariants:   *)
    (* writer and token are what the writing node sent; storeOwner and     *)
    (* storeRange are the shard row as the commit found it.                *)
    history,
    (* the nodes                                                           *)
    nodeState,     \* "running", "paused" (GC pause / partition) or "down"
    token,         \* the range id the node believes it owns the shard with
    readRange,     \* range id read by an acquisition in progress, or NotRead
    (* ghosts: fault budgets spent                                         *)
    faults,
    lateRenewals

store == <<owner, rangeId, leaseExpired, history>>
vars == <<owner, rangeId, leaseExpired, history, nodeState, token, readRange,
          faults, lateRenewals>>

TypeOK ==
    /\ owner \in Nodes \cup {NoNode}
    /\ rangeId \in Nat \ {0}
    /\ leaseExpired \in BOOLEAN
    /\ \A i \in 1..Len(history) :
          history[i] \in [writer : Nodes, token : Nat, storeOwner : Nodes \cup {NoNode},
                          storeRange : Nat]
    /\ nodeState \in [Nodes -> {"running", "paused", "down"}]
    /\ token \in [Nodes -> Nat]
    /\ readRange \in [Nodes -> Nat]

Init ==
    \* The row exists with range_id 1 and no owner.  (The code creates it with
    \* the first acquisition, an INSERT whose primary key plays the CAS.)
    /\ owner = NoNode
    /\ rangeId = 1
    /\ leaseExpired = TRUE
    /\ history = <<>>
    /\ nodeState = [n \in Nodes |-> "running"]
    /\ token = [n \in Nodes |-> NoRange]
    /\ readRange = [n \in Nodes |-> NotRead]
    /\ faults = 0
    /\ lateRenewals = 0

Running(n) == nodeState[n] = "running"

(* The store's fencing check, run inside every write transaction of the    *)
(* shard: the shards row's range_id compared with the node's token.  Check *)
(* and append are one step here, so the implementation must make them      *)
(* atomic against acquire_shard: read the row with SELECT ... FOR SHARE    *)
(* (a plain SELECT under READ COMMITTED lets an acquisition commit between *)
(* the check and the append) or run at SERIALIZABLE, as on CockroachDB.    *)
StoreAccepts(n) ==
    IF Mutant = "no_fencing"
    THEN TRUE                       \* BUG: appends do not check range_id
    ELSE token[n] = rangeId

(* A node whose writes the store would commit if it sent one now.          *)
Writer(n) == token[n] # NoRange /\ StoreAccepts(n)

(* The owner is alive and holds the current token: it renews in time.      *)
OwnerRenewing == owner # NoNode /\ Running(owner) /\ token[owner] = rangeId

-----------------------------------------------------------------------------
(* Node actions: server/_shards.py ShardController.                        *)

(* The row is free for n: its lease lapsed (a released row has an expired  *)
(* lease too), or the row still names n itself: n restarted (it holds no   *)
(* token) and takes its own row back at once, the bump fencing its former  *)
(* incarnation (history/_cluster.py acquire_shard_txn: owner = :me).       *)
(* Learned from the implementation; the first version waited for the      *)
(* lease of a restarted node's own row to lapse.                           *)
FreeFor(n) == leaseExpired \/ owner = n

(* The acquire loop (ShardController._balance) reads the row:             *)
(* history/_store.py HistoryStore.read_shards: SELECT owner, range_id,     *)
(* lease_expires_at.  It goes on only if the row is free for it.           *)
ReadShard(n) ==
    /\ Running(n)
    /\ token[n] = NoRange
    /\ readRange[n] = NotRead
    /\ IF Mutant = "acquire_requires_free_row"
       THEN owner = NoNode          \* BUG: waits for a release that a crash never does
       ELSE FreeFor(n)
    /\ readRange' = [readRange EXCEPT ![n] = rangeId]
    /\ UNCHANGED <<store, nodeState, token, faults, lateRenewals>>

(* history/_store.py HistoryStore.acquire_shard                           *)
(* (history/_cluster.py acquire_shard_txn):                                *)
(*   UPDATE shards SET owner = :n, range_id = :read + 1,                   *)
(*                     lease_expires_at = now + ttl                        *)
(*   WHERE shard_id = :s AND range_id = :read                              *)
(*     AND (lease_expires_at < now OR owner = :n OR owner = '')            *)
(* (owner '' is a released row, whose lease is expired: leaseExpired.)     *)
(* One row updated: the node owns the shard with token read + 1.  None:    *)
(* another node acquired (or the owner renewed) since the read.            *)
AcquireCasSucceeds(n) ==
    IF Mutant = "acquire_no_cas"
    THEN TRUE                       \* BUG: a plain UPDATE, last writer wins
    ELSE rangeId = readRange[n] /\ FreeFor(n)

NewRange(n) ==
    IF Mutant = "no_range_bump"
    THEN readRange[n]               \* BUG: a lease without a fencing token
    ELSE readRange[n] + 1

AcquireShard(n) ==
    /\ Running(n)
    /\ readRange[n] # NotRead
    /\ IF AcquireCasSucceeds(n)
       THEN /\ owner' = n
            /\ rangeId' = NewRange(n)
            /\ leaseExpired' = FALSE
            /\ token' = [token EXCEPT ![n] = NewRange(n)]
       ELSE UNCHANGED <<owner, rangeId, leaseExpired, token>>
    /\ readRange' = [readRange EXCEPT ![n] = NotRead]
    /\ UNCHANGED <<history, nodeState, faults, lateRenewals>>

(* The renew loop: history/_store.py HistoryStore.renew_shard:             *)
(* UPDATE shards SET lease_expires_at = now + ttl WHERE shard_id =         *)
(* :s AND range_id = :token.  No row: the shard was taken over, the node   *)
(* drops it (ShardOwnershipLostError, history/_errors.py).  A lease that   *)
(* lapsed but that nobody took over (range_id unchanged) is renewed: the   *)
(* node never stopped being the only one the store accepts.                *)
RenewLease(n) ==
    /\ Running(n)
    /\ token[n] # NoRange
    /\ IF token[n] = rangeId
       THEN /\ leaseExpired' = FALSE
            /\ UNCHANGED token
       ELSE /\ token' = [token EXCEPT ![n] = NoRange]
            /\ UNCHANGED leaseExpired
    /\ UNCHANGED <<owner, rangeId, history, nodeState, readRange, faults, lateRenewals>>

(* A graceful stop (ShardController.stop, SIGTERM) or a rebalance         *)
(* (ShardController._shed): the node drops the shard (no new write carries *)
(* its token), then history/_store.py HistoryStore.release_shard           *)
(* (history/_cluster.py release_shard_txn): UPDATE shards SET owner = '',  *)
(* lease_expires_at = 0 WHERE shard_id = :s AND range_id = :token.  The    *)
(* range id stays: the next owner bumps it, so any node acquires at once.  *)
(* A write the node submitted before the drop may still commit after the   *)
(* release, with the unchanged range id: it commutes with the release (a   *)
(* release changes no field the fence reads and an append changes no field *)
(* of the row), so the model lets it commit before the release.  Releases *)
(* count against the fault budget: each one leads to an acquisition that  *)
(* bumps range_id, and stops and rebalances are finitely many.             *)
ReleaseShard(n) ==
    /\ Running(n)
    /\ token[n] = rangeId
    /\ owner = n
    /\ faults < MaxFaults
    /\ owner' = NoNode
    /\ leaseExpired' = TRUE
    /\ token' = [token EXCEPT ![n] = NoRange]
    /\ faults' = faults + 1
    /\ UNCHANGED <<rangeId, history, nodeState, readRange, lateRenewals>>

(* One transition of the run: server/_engine.py HistoryEngine.update       *)
(* -> history/_store.py HistoryStore.apply / _apply_batch, whose first     *)
(* statement is the range check of StoreAccepts in the same transaction    *)
(* (history/_cluster.py check_fence_txn, SELECT ... FOR SHARE).  A         *)
(* rejected append changes nothing in the store and makes the node drop    *)
(* the shard (ShardController._fenced).                                    *)
AppendEvent(n) ==
    /\ Running(n)
    /\ token[n] # NoRange
    /\ Len(history) < MaxEvents
    /\ IF StoreAccepts(n)
       THEN /\ history' = Append(history, [writer |-> n, token |-> token[n],
                                           storeOwner |-> owner, storeRange |-> rangeId])
            /\ UNCHANGED token
       ELSE /\ token' = [token EXCEPT ![n] = NoRange]
            /\ UNCHANGED history
    /\ UNCHANGED <<owner, rangeId, leaseExpired, nodeState, readRange, faults, lateRenewals>>

-----------------------------------------------------------------------------
(* The environment: time and faults.                                       *)

(* Time passes lease_expires_at while nobody renews.                       *)
LeaseLapses ==
    /\ ~leaseExpired
    /\ ~OwnerRenewing
    /\ leaseExpired' = TRUE
    /\ UNCHANGED <<owner, rangeId, history, nodeState, token, readRange, faults, lateRenewals>>

(* The owner is alive but its renewal came too late (clock skew, a slow    *)
(* store): the lease lapses under it, and it still believes it owns.       *)
LeaseLapsesUnderLiveOwner ==
    /\ ~leaseExpired
    /\ OwnerRenewing
    /\ lateRenewals < MaxLateRenewals
    /\ leaseExpired' = TRUE
    /\ lateRenewals' = lateRenewals + 1
    /\ UNCHANGED <<owner, rangeId, history, nodeState, token, readRange, faults>>

(* A GC pause or a partition from the store: the node keeps its memory,    *)
(* including its token, and comes back believing it still owns the shard.  *)
Pause(n) ==
    /\ Running(n)
    /\ faults < MaxFaults
    /\ nodeState' = [nodeState EXCEPT ![n] = "paused"]
    /\ faults' = faults + 1
    /\ UNCHANGED <<store, token, readRange, lateRenewals>>

Resume(n) ==
    /\ nodeState[n] = "paused"
    /\ nodeState' = [nodeState EXCEPT ![n] = "running"]
    /\ UNCHANGED <<store, token, readRange, faults, lateRenewals>>

(* A crash loses the node's memory; the store keeps the row as it was.     *)
Crash(n) ==
    /\ nodeState[n] # "down"
    /\ faults < MaxFaults
    /\ nodeState' = [nodeState EXCEPT ![n] = "down"]
    /\ token' = [token EXCEPT ![n] = NoRange]
    /\ readRange' = [readRange EXCEPT ![n] = NotRead]
    /\ faults' = faults + 1
    /\ UNCHANGED <<store, lateRenewals>>

Restart(n) ==
    /\ nodeState[n] = "down"
    /\ nodeState' = [nodeState EXCEPT ![n] = "running"]
    /\ UNCHANGED <<store, token, readRange, faults, lateRenewals>>

Next ==
    \/ \E n \in Nodes :
          \/ ReadShard(n) \/ AcquireShard(n) \/ RenewLease(n) \/ AppendEvent(n)
          \/ ReleaseShard(n)
          \/ Pause(n) \/ Resume(n) \/ Crash(n) \/ Restart(n)
    \/ LeaseLapses
    \/ LeaseLapsesUnderLiveOwner

(* Weak fairness: nodes run their acquire, renew and append loops, paused  *)
(* nodes resume, crashed nodes restart, and a lease nobody renews lapses.  *)
(* Nothing is fair about faults, late renewals or releases.                *)
NodeLoops ==
    \A n \in Nodes :
        /\ WF_vars(ReadShard(n))
        /\ WF_vars(AcquireShard(n))
        /\ WF_vars(RenewLease(n))
        /\ WF_vars(AppendEvent(n))
        /\ WF_vars(Resume(n))

Restarts == \A n \in Nodes : WF_vars(Restart(n))

Spec == Init /\ [][Next]_vars /\ NodeLoops /\ Restarts /\ WF_vars(LeaseLapses)

(* A crashed node may never come back (a machine lost for good): its      *)
(* shard is taken over once its lease lapses.  A restarted node takes its  *)
(* own row back at once (FreeFor), so a model in which every crashed node  *)
(* restarts makes progress even without lease expiry; this one does not.   *)
SpecDeadNodes == Init /\ [][Next]_vars /\ NodeLoops /\ WF_vars(LeaseLapses)

(* Mutant "fairness removed": a lease may never lapse, so the shard of a   *)
(* crashed owner that never comes back is never taken over (a lease        *)
(* without expiry).                                                        *)
SpecNoLeaseExpiry == Init /\ [][Next]_vars /\ NodeLoops

-----------------------------------------------------------------------------
(* Properties                                                              *)

(* At any moment the store commits the writes of at most one node.  A      *)
(* paused node that lost its lease may still believe it owns the shard;    *)
(* what matters is that the store refuses it.                              *)
AtMostOneWriter == \A m, n \in Nodes : Writer(m) /\ Writer(n) => m = n

(* A node that lost its lease can never append: every event was written    *)
(* with the range id current at its commit, by the node that the shard row *)
(* named, and the range-id tags along the history never decrease.          *)
NoStaleAppend ==
    \A i \in 1..Len(history) :
        /\ history[i].token = history[i].storeRange
        /\ history[i].writer = history[i].storeOwner
        /\ i > 1 => history[i - 1].token <= history[i].token

(* Liveness under weak fairness, whatever faults happened (they are        *)
(* finite): the run's appends proceed to the end ...                       *)
AppendsProceed == <>(Len(history) = MaxEvents)

(* ... and the shard is always eventually served by a running node whose   *)
(* writes the store accepts.                                               *)
ShardEventuallyServed == []<>(\E n \in Nodes : Running(n) /\ Writer(n))
=============================================================================
