"""Where activities may run, and what workers offer (README "Placement").

An activity (``workflow.execute_activity(..., placement="device", requirements=...)``)
or a DAG task names a tier (``cloud``, ``edge``, ``device``) or ``auto`` (any tier, the
server picks), and requirements: labels every worker that runs it must have (``gpu``,
``camera``), minimum memory and cores. A worker advertises its tier and capabilities
(``Worker(..., tier="device", capabilities={"labels": ["camera"], "memory_mb": 512})``)
with each activity poll; the server gives it only tasks it meets, and records on each
task where it ran (``ExecutedAt``), from the poll that took it, not from the worker's
own claim.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tideflow.api.v1 import command_pb2, common_pb2, history_pb2

Placement = Literal["cloud", "edge", "device", "auto"]
Tier = Literal["cloud", "edge", "device"]

ES = common_pb2.ExecutionSite
_TIERS: dict[str, int] = {
    "cloud": ES.EXECUTION_SITE_CLOUD,
    "edge": ES.EXECUTION_SITE_EDGE,
    "device": ES.EXECUTION_SITE_DEVICE,
}
_PLACEMENTS: dict[str, int] = {**_TIERS, "auto": ES.EXECUTION_SITE_AUTO}
_TIER_NAMES = {value: name for name, value in _TIERS.items()}


def _labels(value: Any, where: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{where}: labels must be a list of strings, not {value!r}")
    labels = frozenset(value)
    if not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"{where}: labels must be non-empty strings")
    return labels


def _count(data: Mapping[str, Any], key: str, where: str) -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {key} must be a non-negative integer, not {value!r}")
    return value


def _fields(value: Any, counts: tuple[str, ...], where: str) -> dict[str, Any]:
    """The fields of ``Requirements`` or ``Capabilities`` from a mapping: ``labels``
    and the non-negative integers ``counts``; ValueError on anything else."""
    allowed = ("labels", *counts)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(allowed)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
    fields = {name: _count(value, name, where) for name in counts}
    return {"labels": _labels(value.get("labels", ()), where), **fields}


@dataclass(frozen=True, slots=True, kw_only=True)
class Requirements:
    """What a worker must have to run a task."""

    labels: frozenset[str] = frozenset()
    min_memory_mb: int = 0
    min_cores: int = 0

    @staticmethod
    def of(value: Requirements | Mapping[str, Any] | None) -> Requirements | None:
        """From ``Requirements`` or ``{"labels": [...], "min_memory_mb": n,
        "min_cores": n}``; ValueError on anything else."""
        if value is None or isinstance(value, Requirements):
            return value
        return Requirements(**_fields(value, ("min_memory_mb", "min_cores"), "requirements"))

    def to_proto(self) -> common_pb2.PlacementRequirements:
        return common_pb2.PlacementRequirements(
            labels=sorted(self.labels), min_memory_mb=self.min_memory_mb, min_cores=self.min_cores
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.labels:
            data["labels"] = sorted(self.labels)
        if self.min_memory_mb:
            data["min_memory_mb"] = self.min_memory_mb
        if self.min_cores:
            data["min_cores"] = self.min_cores
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class Capabilities:
    """What a worker offers: labels, memory and cores."""

    labels: frozenset[str] = frozenset()
    memory_mb: int = 0
    cores: int = 0

    @staticmethod
    def of(value: Capabilities | Mapping[str, Any] | None) -> Capabilities:
        """From ``Capabilities`` or ``{"labels": [...], "memory_mb": n, "cores": n}``."""
        if value is None:
            return Capabilities()
        if isinstance(value, Capabilities):
            return value
        return Capabilities(**_fields(value, ("memory_mb", "cores"), "capabilities"))


@dataclass(frozen=True, slots=True)
class ExecutedAt:
    """Where an activity ran, as the server recorded it: the tier (``cloud``, ``edge``,
    ``device``; empty if the worker stated none and the server has no tier for it), the
    site (cluster name) and the worker's identity."""

    tier: str
    site: str
    worker: str


def check_placement(placement: str | None) -> None:
    if placement is not None and placement not in _PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(_PLACEMENTS)}, not {placement!r}")


def check_tier(tier: str | None) -> None:
    if tier is not None and tier not in _TIERS:
        raise ValueError(f"tier must be one of {', '.join(_TIERS)}, not {tier!r}")


def apply_placement(
    attrs: command_pb2.ScheduleActivityTaskCommandAttributes,
    placement: str | None,
    requirements: Requirements | None,
) -> None:
    """Fill in a schedule-activity command's placement fields."""
    if placement is not None:
        attrs.placement = _PLACEMENTS[placement]  # type: ignore[assignment]
    if requirements is not None:
        attrs.requirements.CopyFrom(requirements.to_proto())


def worker_placement(
    tier: str | None, capabilities: Capabilities, site: str | None
) -> common_pb2.WorkerPlacement:
    """What a worker advertises with each activity poll."""
    return common_pb2.WorkerPlacement(
        site=site or "",
        tier=_TIERS[tier] if tier else ES.EXECUTION_SITE_UNSPECIFIED,  # type: ignore[arg-type]
        labels=sorted(capabilities.labels),
        memory_mb=capabilities.memory_mb,
        cores=capabilities.cores,
    )


def executed_at_of(attrs: history_pb2.ActivityTaskCompletedEventAttributes) -> ExecutedAt | None:
    """Where a completed activity ran, from its event (None: recorded by a server that
    did not record it)."""
    if not attrs.site:
        return None
    return ExecutedAt(_TIER_NAMES.get(attrs.executed_at, ""), attrs.site, attrs.identity)
