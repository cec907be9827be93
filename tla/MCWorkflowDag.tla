--------------------------- MODULE MCWorkflowDag ---------------------------
(* DAGs for the CI models (cfg files cannot hold functions).                *)
EXTENDS WorkflowDag

(* a and b run in parallel; c needs both.                                   *)
JoinTasks == {"a", "b", "c"}
JoinDeps == ("a" :> {}) @@ ("b" :> {}) @@ ("c" :> {"a", "b"})

(* a then b.                                                                *)
ChainTasks == {"a", "b"}
ChainDeps == ("a" :> {}) @@ ("b" :> {"a"})

(* A buggy model input: a cycle, so no task is ever ready.                  *)
CycleDeps == ("a" :> {"b"}) @@ ("b" :> {"a"})
=============================================================================
