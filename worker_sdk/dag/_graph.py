"""Graph walks over a DAG given as ``{task id: [dependency ids]}`` in definition order.

Every walk is iterative (``graphlib`` or an explicit stack): a definition may hold
100,000 tasks in one chain, far deeper than Python's recursion limit. Dependencies
on ids that are not keys of the mapping are ignored here (validation reports them).
"""

from __future__ import annotations

import graphlib
from collections.abc import Iterable, Mapping, Sequence

Graph = Mapping[str, Sequence[str]]


def _known(graph: Graph) -> dict[str, list[str]]:
    return {tid: [d for d in deps if d in graph] for tid, deps in graph.items()}


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as a path ``[a, b, c, a]`` in execution order (dependency first),
    or None. Deterministic: the search starts at tasks in definition order and
    follows dependencies in their listed order."""
    deps = _known(graph)
    color: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in deps:
        if root in color:
            continue
        path: list[str] = [root]
        # One iterator per node on the path: where its dependency scan resumes.
        pending = [iter(deps[root])]
        color[root] = 1
        while pending:
            dep = next(pending[-1], None)
            if dep is None:
                color[path.pop()] = 2
                pending.pop()
            elif color.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                return list(reversed(cycle))
            elif dep not in color:
                color[dep] = 1
                path.append(dep)
                pending.append(iter(deps[dep]))
    return None


def topological_order(graph: Graph) -> list[str] | None:
    """Task ids, dependencies first, or None if there is a cycle.

    Stage by stage: every task whose dependencies are all placed joins the next stage,
    and ties within a stage keep definition order, so the order is stable and the
    same on every replay."""
    position = {tid: i for i, tid in enumerate(graph)}
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter(_known(graph))
    try:
        sorter.prepare()
    except graphlib.CycleError:
        return None
    order: list[str] = []
    while sorter.is_active():
        stage = sorted(sorter.get_ready(), key=position.__getitem__)
        order.extend(stage)
        sorter.done(*stage)
    return order


def dependents(graph: Graph) -> dict[str, list[str]]:
    """The reverse edges: each task's direct dependents, in definition order."""
    result: dict[str, list[str]] = {tid: [] for tid in graph}
    for tid, deps in _known(graph).items():
        for dep in deps:
            result[dep].append(tid)
    return result


def reachable(edges: Mapping[str, Sequence[str]], start: str) -> set[str]:
    """Every node reached from ``start`` along ``edges`` (``start`` excluded unless
    on a cycle)."""
    seen: set[str] = set()
    stack = list(edges.get(start, ()))
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(edges.get(node, ()))
    return seen


def depths(graph: Graph, order: Iterable[str]) -> dict[str, int]:
    """Each task's stage: 0 without dependencies, else one more than its deepest
    dependency (``order`` is a topological order)."""
    deps = _known(graph)
    depth: dict[str, int] = {}
    for tid in order:
        depth[tid] = 1 + max((depth[d] for d in deps[tid]), default=-1)
    return depth
