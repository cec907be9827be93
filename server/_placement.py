"""Placement: which workers may run an activity task, and which of them should.

An activity says where it may run (``Placement``: a tier, cloud / edge / device, or
``auto``, plus requirements: labels such as ``gpu``, minimum memory and cores). A worker
advertises its site, tier and capabilities with every activity poll
(``WorkerPlacement``). Matching (server/_matching.py) hands a task only to a poller
this module says admits it, and among several waiting pollers to the best ranked:

1. a worker of the run's home site (the data is there): ``home_of``;
2. a worker of a site whose link is up (``LinkState.reachable``; the sites work feeds
   it, a lone server reaches only itself);
3. the least loaded: the worker with the most polls parked (each parked poll is a free
   slot of that worker).

A task no connected worker admits waits in the backlog (``Matching.waiting_reason``
says why, for describe); one no worker of its run's home admits is also offered to the
linked sites whose advertised workers could meet it (server/_remote_tasks.py), the
home still recording it. Where a
task ran is recorded from the poll that took it, by the server: the site and tier on
ActivityTaskStarted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from tideflow.api.v1 import common_pb2
from tideflow.history import RunKey

from ._errors import InvalidArgumentError

ES = common_pb2.ExecutionSite
TIERS = {"cloud": ES.EXECUTION_SITE_CLOUD, "edge": ES.EXECUTION_SITE_EDGE}
_TIER_NAMES: dict[int, str] = {
    ES.EXECUTION_SITE_CLOUD: "cloud",
    ES.EXECUTION_SITE_EDGE: "edge",
    ES.EXECUTION_SITE_DEVICE: "device",
    ES.EXECUTION_SITE_AUTO: "auto",
}
# Longest label and most labels a worker or a task may state (bounded like any input).
_MAX_LABELS = 64
_MAX_LABEL_LENGTH = 200


def tier_name(tier: int) -> str:
    return _TIER_NAMES.get(tier, "any")


@dataclass(frozen=True, slots=True)
class WorkerSite:
    """A polling worker as placement sees it."""

    identity: str
    site: str
    tier: int
    labels: frozenset[str] = frozenset()
    memory_mb: int = 0
    cores: int = 0

    def to_proto(self) -> common_pb2.WorkerPlacement:
        return common_pb2.WorkerPlacement(
            site=self.site,
            tier=self.tier,  # type: ignore[arg-type]
            labels=sorted(self.labels),
            memory_mb=self.memory_mb,
            cores=self.cores,
        )


@dataclass(frozen=True, slots=True)
class TaskPlacement:
    """Where an activity task may run (decoded from ``TaskRow.placement``)."""

    tier: int
    labels: frozenset[str]
    min_memory_mb: int
    min_cores: int

    def admits(self, worker: WorkerSite) -> bool:
        anywhere = self.tier in (ES.EXECUTION_SITE_UNSPECIFIED, ES.EXECUTION_SITE_AUTO)
        return (
            (anywhere or worker.tier == self.tier)
            and self.labels <= worker.labels
            and worker.memory_mb >= self.min_memory_mb
            and worker.cores >= self.min_cores
        )

    def describe(self) -> str:
        parts = [f"placement {tier_name(self.tier)}"]
        if self.labels:
            parts.append("labels " + ", ".join(sorted(self.labels)))
        if self.min_memory_mb:
            parts.append(f"memory >= {self.min_memory_mb} MB")
        if self.min_cores:
            parts.append(f"cores >= {self.min_cores}")
        return "; ".join(parts)


@functools.lru_cache(maxsize=4096)
def decode(data: bytes) -> TaskPlacement | None:
    """The placement of a task row; None: any worker (cached: rows of one activity
    type usually carry the same bytes)."""
    if not data:
        return None
    p = common_pb2.Placement.FromString(data)
    r = p.requirements
    return TaskPlacement(p.tier, frozenset(r.labels), r.min_memory_mb, r.min_cores)


def encode(placement: common_pb2.Placement) -> bytes:
    """``TaskRow.placement`` of an activity: empty when it may run anywhere."""
    r = placement.requirements
    if placement.tier == ES.EXECUTION_SITE_UNSPECIFIED and not (
        r.labels or r.min_memory_mb or r.min_cores
    ):
        return b""  # anywhere, to the longest waiting poller (``auto`` is ranked)
    return placement.SerializeToString(deterministic=True)


def placement_problem(tier: int, requirements: common_pb2.PlacementRequirements) -> str:
    """What is wrong with an activity's placement (a schedule command); empty if fine."""
    if tier not in _TIER_NAMES and tier != ES.EXECUTION_SITE_UNSPECIFIED:
        return f"unknown placement {tier}"
    if requirements.min_memory_mb < 0 or requirements.min_cores < 0:
        return "minimum memory and cores must not be negative"
    return _labels_problem(requirements.labels)


def _labels_problem(labels: Collection[str]) -> str:
    if len(labels) > _MAX_LABELS:
        return f"at most {_MAX_LABELS} labels"
    if any(not label or len(label) > _MAX_LABEL_LENGTH for label in labels):
        return f"labels must be 1 to {_MAX_LABEL_LENGTH} characters"
    return ""


class LinkState(Protocol):
    """Whether a site can be reached now (the sites work implements it from its links)."""

    def reachable(self, site: str) -> bool: ...


class _LocalOnly:
    """A lone server: only its own site exists, and it is always reachable."""

    def __init__(self, site: str) -> None:
        self._site = site

    def reachable(self, site: str) -> bool:
        return site == self._site


class PlacementPolicy:
    """This site's placement decisions: who a poller is, and how pollers rank."""

    def __init__(
        self,
        cluster_name: str = "cloud",
        site_tier: str = "cloud",
        *,
        links: LinkState | None = None,
        home_of: Callable[[RunKey], str] | None = None,
    ) -> None:
        """``links``: the link state of other sites (default: only this one exists);
        ``home_of``: a run's home site (default: this one, where every run starts until
        runs can move between sites)."""
        self.cluster_name = cluster_name
        self.site_tier = TIERS[site_tier]
        self.links: LinkState = links or _LocalOnly(cluster_name)
        self.home_of: Callable[[RunKey], str] = home_of or (lambda _key: cluster_name)

    def worker(self, identity: str, advertised: common_pb2.WorkerPlacement | None) -> WorkerSite:
        """The poller behind a poll: what it advertised, the site and tier defaulting to
        this server's. Bad input -> InvalidArgumentError."""
        if advertised is None:
            return WorkerSite(identity, self.cluster_name, self.site_tier)
        if advertised.tier == ES.EXECUTION_SITE_AUTO:
            raise InvalidArgumentError("a worker's tier is cloud, edge or device, not auto")
        if advertised.tier not in _TIER_NAMES and advertised.tier != 0:
            raise InvalidArgumentError(f"unknown worker tier {advertised.tier}")
        problem = _labels_problem(advertised.labels)
        if problem:
            raise InvalidArgumentError(f"worker capabilities: {problem}")
        if advertised.memory_mb < 0 or advertised.cores < 0:
            raise InvalidArgumentError("worker memory and cores must not be negative")
        return WorkerSite(
            identity,
            advertised.site or self.cluster_name,
            advertised.tier or self.site_tier,
            frozenset(advertised.labels),
            advertised.memory_mb,
            advertised.cores,
        )

    def rank(self, key: RunKey, worker: WorkerSite, free_polls: int) -> tuple[int, int, int]:
        """Lower is better: home site, then a reachable site, then the least loaded."""
        home = self.home_of(key)
        return (
            0 if worker.site == home else 1,
            0 if self.links.reachable(worker.site) else 1,
            -free_polls,
        )
