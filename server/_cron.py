"""When a schedule fires: cron expressions (via ``cronsim``), intervals, time zones.

Cron expressions have the five fields of cron(5): minute (0-59), hour (0-23),
day of month (1-31), month (1-12 or JAN-DEC), day of week (0-7, 0 and 7 are Sunday,
or SUN-SAT); each field is ``*``, a value, a range ``a-b``, a step ``*/n``, ``a-b/n``
or ``a/n``, or a comma-separated list of these. Names are case-insensitive. The
extensions ``L`` (last day of the month), ``LW`` (last weekday of the month), ``5L``
(the month's last Friday) and ``5#2`` (its second Friday) are accepted too. The
macros ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily``
(``@midnight``) and ``@hourly`` stand for their five-field forms.

The expression is evaluated by ``cronsim``, which follows Debian's (Vixie) cron:
when the day-of-month or the day-of-week field starts with ``*`` (``*/2`` too), a
day must match both fields; when both are restricted, a day matching either one
matches. We checked ``croniter`` as well; it disagreed with cron(5) on about a third
of random expressions with steps and lists in the day fields, cronsim on none.

A spec's ``timezone_name`` (an IANA name such as ``Europe/Berlin``; empty is UTC)
is the zone its cron expressions are read in. Across daylight-saving changes the
expressions fire as Debian's cron runs jobs: a job at a fixed time (neither minute
nor hour starts with ``*``) whose time is skipped when the clocks go forward fires
once, at the first minute after the gap, and a fixed time that occurs twice when the
clocks go back fires once, at its first occurrence; jobs whose minute or hour starts
with ``*`` follow the wall clock (skipped minutes do not fire, repeated ones do).
(One known deviation, in cronsim: on the half-hour change of Australia/Lord_Howe a
job whose hour starts with ``*`` may miss up to half an hour of slots right after the
clocks go back.) Intervals fire at every multiple of the interval since the Unix epoch, shifted by
the phase (offset), whatever the zone; the smallest interval is one second.
"""

from __future__ import annotations

import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

from cronsim import CronSim, CronSimError

from tideflow.api.v1 import service_pb2
from tideflow.history import datetime_of, micros_of

from ._errors import InvalidArgumentError

MIN_INTERVAL_US = 1_000_000
_MAX_TIMEZONE_NAME = 255

_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_ALLOWED = {
    "minute": "0-59",
    "hour": "0-23",
    "day-of-month": "1-31, L or LW",
    "month": "1-12 or JAN-DEC",
    "day-of-week": "0-7 or SUN-SAT (0 and 7 are Sunday), nL or n#k",
}


class CronError(ValueError):
    """A cron expression cronsim refuses; the message names the field at fault."""


def _field_problem(text: str, parts: list[str], message: str) -> str:
    """Turn cronsim's terse "Bad <field>" into a message naming the field's text."""
    field = message.removeprefix("Bad ").strip()
    if field not in _FIELDS:
        return f"cron expression {text!r}: {message}"
    index = _FIELDS.index(field)
    if field == "day-of-month":
        # cronsim refuses a day of the month that no month of the expression has
        # (``0 0 30 2 *``); say so rather than call a valid number bad.
        any_month = [*parts[:3], "*", parts[4]]
        try:
            CronSim(" ".join(any_month), datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError:
            pass
        else:
            return (
                f"cron expression {text!r} never fires: day-of-month {parts[2]!r} "
                f"does not occur in month {parts[3]!r}"
            )
    return (
        f"cron expression {text!r}: bad {field} field {parts[index]!r} "
        f"(values {_ALLOWED[field]}; *, a-b, */n, a-b/n, a/n and lists of these)"
    )


def _zone(name: str) -> tzinfo:
    """The zone named ``name`` (empty: UTC); raises InvalidArgumentError."""
    if not name:
        return UTC
    if len(name) > _MAX_TIMEZONE_NAME:
        raise InvalidArgumentError(
            f"schedule spec: timezone_name is longer than {_MAX_TIMEZONE_NAME} characters"
        )
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: not a relative zone path (``/etc/passwd``, ``../x``, NUL);
        # OSError: a directory of the database (``Europe``) on some Pythons.
        raise InvalidArgumentError(
            f"schedule spec: unknown time zone {name!r} (expected an IANA name such as "
            "'Europe/Berlin' or 'UTC')"
        ) from None


@dataclass(frozen=True, slots=True)
class CronExpression:
    """A five-field cron expression (or a macro), checked by cronsim, read in ``zone``."""

    text: str
    expanded: str
    zone: tzinfo = UTC

    @staticmethod
    def parse(text: str, zone: tzinfo = UTC) -> CronExpression:
        """Raises CronError naming the field at fault."""
        expanded = _MACROS.get(text.strip().lower(), text)
        parts = expanded.split()
        if len(parts) != 5:
            raise CronError(
                f"cron expression {text!r} has {len(parts)} fields; expected 5 "
                "(minute hour day-of-month month day-of-week)"
            )
        try:
            CronSim(expanded, datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as exc:
            raise CronError(_field_problem(text, parts, str(exc))) from None
        return CronExpression(text=text, expanded=" ".join(parts), zone=zone)

    def next_after(self, micros: int) -> int | None:
        """The first firing strictly after ``micros`` (µs since the epoch); None if
        there is none within cronsim's horizon of 50 years or before year 9999."""
        try:
            start = datetime_of(micros).astimezone(self.zone)
            # A fixed-time job is evaluated on the local wall clock, so when the clocks
            # go back cronsim may answer the first occurrence of a repeated time that
            # is already past: keep going until the answer is after ``micros``.
            for moment in CronSim(self.expanded, start):
                slot = micros_of(moment)
                if slot > micros:
                    return slot
        except (OverflowError, ValueError):
            # Beyond datetime's range (year 9999): no representable slot.
            return None
        return None  # StopIteration: no match within 50 years


@dataclass(frozen=True, slots=True)
class CompiledSpec:
    """The slots of a ``ScheduleSpec``: the union of its crons and intervals."""

    crons: tuple[CronExpression, ...]
    intervals: tuple[tuple[int, int], ...]  # (interval, phase) in microseconds
    start: int | None
    end: int | None

    @staticmethod
    def compile(spec: service_pb2.ScheduleSpec) -> CompiledSpec:
        """Raises InvalidArgumentError naming what is wrong."""
        zone = _zone(spec.timezone_name)
        crons = []
        for text in spec.cron_expressions:
            try:
                crons.append(CronExpression.parse(text, zone))
            except CronError as exc:
                raise InvalidArgumentError(f"schedule spec: {exc}") from None
        intervals = []
        for item in spec.intervals:
            every = item.interval.ToMicroseconds()
            phase = item.phase.ToMicroseconds()
            if every < MIN_INTERVAL_US:
                raise InvalidArgumentError("schedule spec: an interval must be at least 1 second")
            if not 0 <= phase < every:
                raise InvalidArgumentError(
                    "schedule spec: an interval's offset must be at least 0 and less than "
                    "the interval"
                )
            intervals.append((every, phase))
        if not crons and not intervals:
            raise InvalidArgumentError("schedule spec needs a cron expression or an interval")
        start = spec.start_time.ToMicroseconds() if spec.HasField("start_time") else None
        end = spec.end_time.ToMicroseconds() if spec.HasField("end_time") else None
        if start is not None and end is not None and end < start:
            raise InvalidArgumentError("schedule spec: end_time is before start_time")
        return CompiledSpec(tuple(crons), tuple(intervals), start, end)

    def next_after(self, micros: int) -> int | None:
        """The first slot strictly after ``micros``, or None when the spec has ended."""
        if self.start is not None:
            micros = max(micros, self.start - 1)
        candidates = [c for c in (cron.next_after(micros) for cron in self.crons) if c is not None]
        for every, phase in self.intervals:
            candidates.append(((micros - phase) // every + 1) * every + phase)
        if not candidates:
            return None
        slot = min(candidates)
        if self.end is not None and slot > self.end:
            return None
        return slot

    def upcoming(self, after: int, count: int) -> list[int]:
        slots: list[int] = []
        moment: int | None = after
        while len(slots) < count:
            moment = self.next_after(moment) if moment is not None else None
            if moment is None:
                break
            slots.append(moment)
        return slots
