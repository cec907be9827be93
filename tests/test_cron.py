"""Cron specs of schedules, checked against a brute-force reference written from cron(5).

The server computes a schedule's fire times with ``CompiledSpec`` (``validate_schedule``
compiles the stored spec; the scheduler's decisions and ``describe``'s next action
times both call its ``next_after``). The property tests draw random valid five-field
expressions (values, ranges, steps, lists, names, in every field) and random start
times, and compare the next fire times with ``_Reference``: a day-by-day matcher that
reads each field as cron(5) defines it, including the day rule ("if both fields are
restricted (i.e., don't start with *), the command will be run when either field
matches the current time"; otherwise a day must match both). The reference shares no
code with the server.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tideflow.api.v1 import service_pb2
from tideflow.history import micros_of
from tideflow.server._cron import CompiledSpec
from tideflow.server._errors import InvalidArgumentError
from tideflow.server._schedules import validate_schedule

_MONTH_NAMES = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAY_NAMES = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
# (low, high, names) of minute, hour, day of month, month, day of week.
_BOUNDS: tuple[tuple[int, int, list[str]], ...] = (
    (0, 59, []),
    (0, 23, []),
    (1, 31, []),
    (1, 12, _MONTH_NAMES),
    (0, 7, _DAY_NAMES),
)
_HORIZON_DAYS = 366 * 6
_COUNT = 6


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# ==================================================================== reference


def _value(text: str, low: int, names: list[str]) -> int:
    if text.upper() in names:
        return names.index(text.upper()) + low if low == 1 else names.index(text.upper())
    return int(text)


def _field(text: str, low: int, high: int, names: list[str]) -> set[int]:
    """cron(5): a list of ``*``, ``n`` or ``n-m``, each optionally ``/step``; ``n/step``
    (an extension the server documents) runs from n to the end of the range."""
    values: set[int] = set()
    for item in text.split(","):
        body, _, step = item.partition("/")
        if body == "*":
            first, last = low, high
        elif "-" in body:
            a, b = body.split("-")
            first, last = _value(a, low, names), _value(b, low, names)
        else:
            first = _value(body, low, names)
            last = high if step else first
        values.update(range(first, last + 1, int(step) if step else 1))
    return values


@dataclass(frozen=True)
class _Reference:
    minutes: list[int]
    hours: list[int]
    days: set[int]
    months: set[int]
    weekdays: set[int]  # 0 = Sunday
    either_day: bool  # both day fields restricted: a day matching either one

    @staticmethod
    def parse(expression: str) -> _Reference:
        fields = expression.split()
        sets = [_field(f, *bounds) for f, bounds in zip(fields, _BOUNDS, strict=True)]
        return _Reference(
            minutes=sorted(sets[0]),
            hours=sorted(sets[1]),
            days=sets[2],
            months=sets[3],
            weekdays={d % 7 for d in sets[4]},
            either_day=not fields[2].startswith("*") and not fields[4].startswith("*"),
        )

    def day_matches(self, day: date) -> bool:
        in_month = day.day in self.days
        in_week = day.isoweekday() % 7 in self.weekdays
        return (in_month or in_week) if self.either_day else (in_month and in_week)

    def upcoming(self, after: datetime, count: int) -> list[datetime]:
        """The first ``count`` matching minutes after ``after`` within the horizon."""
        found: list[datetime] = []
        day = after.date()
        for _ in range(_HORIZON_DAYS):
            if day.month in self.months and self.day_matches(day):
                for hour in self.hours:
                    for minute in self.minutes:
                        moment = datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
                        if moment > after:
                            found.append(moment)
                            if len(found) == count:
                                return found
            day += timedelta(days=1)
        return found


def _reference_in_zone(
    expression: str, zone: ZoneInfo, after: datetime, count: int
) -> list[datetime]:
    """The matching wall-clock minutes in ``zone`` as Debian's cron runs them across
    daylight-saving changes: a job whose minute and hour fields do not start with
    ``*`` runs a skipped time once, at the first minute after the gap, and a repeated
    time once, at its first occurrence; any other job follows the wall clock (skipped
    minutes do not run, repeated ones run twice)."""
    reference = _Reference.parse(expression)
    minute, hour = expression.split()[:2]
    fixed = not minute.startswith("*") and not hour.startswith("*")
    found: set[datetime] = set()
    day = after.astimezone(zone).date() - timedelta(days=1)
    extra_days = 2  # a shifted time can move past midnight: look one day further
    for _ in range(_HORIZON_DAYS):
        if day.month in reference.months and reference.day_matches(day):
            for h in reference.hours:
                for m in reference.minutes:
                    wall = datetime(day.year, day.month, day.day, h, m)
                    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
                    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
                    if first.astimezone(zone).replace(tzinfo=None) != wall:  # in a gap
                        if fixed:
                            while (
                                wall.replace(tzinfo=zone)
                                .astimezone(UTC)
                                .astimezone(zone)
                                .replace(tzinfo=None)
                                != wall
                            ):
                                wall += timedelta(minutes=1)
                            found.add(wall.replace(tzinfo=zone).astimezone(UTC))
                        continue
                    found.add(first)
                    if second != first and not fixed:
                        found.add(second)
        if len([t for t in found if t > after]) >= count:
            extra_days -= 1
            if not extra_days:
                break
        day += timedelta(days=1)
    return sorted(t for t in found if t > after)[:count]


# ==================================================================== strategies


@st.composite
def _cron_field(draw: st.DrawFn, low: int, high: int, names: list[str]) -> str:
    def value() -> str:
        number = draw(st.integers(low, high))
        if names and number <= len(names) - 1 + (low == 1) and draw(st.booleans()):
            name = names[number - low] if low == 1 else names[number % 7]
            return draw(st.sampled_from([name, name.lower()]))
        return str(number)

    def item() -> str:
        kind = draw(st.sampled_from(["*", "*/n", "n", "a-b", "a-b/n", "a/n"]))
        step = draw(st.integers(1, high - low + 1))
        if kind == "*":
            return "*"
        if kind == "*/n":
            return f"*/{step}"
        if kind == "n":
            return value()
        first = draw(st.integers(low, high))
        last = draw(st.integers(first, high))
        if kind == "a-b":
            return f"{first}-{last}"
        if kind == "a-b/n":
            return f"{first}-{last}/{step}"
        return f"{first}/{step}"

    return ",".join(item() for _ in range(draw(st.integers(1, 3))))


@st.composite
def _cron_expression(draw: st.DrawFn) -> str:
    return " ".join(draw(_cron_field(*bounds)) for bounds in _BOUNDS)


def _compiled(*crons: str, timezone_name: str = "") -> CompiledSpec:
    """The spec as the server compiles a schedule it is asked to create."""
    schedule = service_pb2.Schedule()
    schedule.spec.cron_expressions.extend(crons)
    schedule.spec.timezone_name = timezone_name
    info = schedule.action.start_workflow
    info.workflow_id, info.workflow_type.name, info.task_queue.name = "id", "Type", "queue"
    return validate_schedule(schedule)


def _server_upcoming(spec: CompiledSpec, after: datetime, count: int) -> list[datetime]:
    return [
        datetime.fromtimestamp(t / 1_000_000, UTC) for t in spec.upcoming(micros_of(after), count)
    ]


def _never_fires(expression: str) -> bool:
    """Day-of-month values that no month of the expression has (``0 0 30 2 *``):
    the server refuses these."""
    reference = _Reference.parse(expression)
    longest = max(29 if m == 2 else 30 if m in (4, 6, 9, 11) else 31 for m in reference.months)
    return not reference.either_day and min(reference.days) > longest


# ======================================================================== tests


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expression=_cron_expression(),
    after=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 12, 31)),
)
def test_fire_times_match_the_cron5_reference(expression: str, after: datetime) -> None:
    after = after.replace(tzinfo=UTC)
    if _never_fires(expression):
        with pytest.raises(InvalidArgumentError, match="never fires"):
            _compiled(expression)
        return
    want = _Reference.parse(expression).upcoming(after, _COUNT)
    got = _server_upcoming(_compiled(expression), after, _COUNT)
    assert got[: len(want)] == want, expression
    if len(want) < _COUNT and len(got) > len(want):
        # The reference looks a few years ahead; anything the server finds later
        # must lie beyond that horizon.
        assert got[len(want)] >= after + timedelta(days=_HORIZON_DAYS - 1), expression


@settings(max_examples=100, deadline=None)
@given(
    expression=_cron_expression(),
    after=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1)),
)
def test_union_of_crons_is_the_merge_of_each(expression: str, after: datetime) -> None:
    after = after.replace(tzinfo=UTC)
    other = "*/7 3 * * MON"
    if _never_fires(expression):
        return
    each = sorted(
        set(_Reference.parse(expression).upcoming(after, _COUNT))
        | set(_Reference.parse(other).upcoming(after, _COUNT))
    )[:_COUNT]
    assert _server_upcoming(_compiled(expression, other), after, _COUNT) == each


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        # Regression: the day-of-month step was ignored and this fired every day.
        (
            "0 0 */2 * *",
            _utc(2024, 1, 30, 12),
            [_utc(2024, 1, 31), _utc(2024, 2, 1), _utc(2024, 2, 3), _utc(2024, 2, 5)],
        ),
        # Regression: a day-of-week step was ignored (every day). 2024-01-01 is a Monday.
        (
            "30 6 * * 1-5/2",
            _utc(2024, 1, 1, 7),
            [_utc(2024, 1, 3, 6, 30), _utc(2024, 1, 5, 6, 30), _utc(2024, 1, 8, 6, 30)],
        ),
        (
            "0 0 * * */3",  # Sunday, Wednesday, Saturday
            _utc(2024, 1, 1),
            [_utc(2024, 1, 3), _utc(2024, 1, 6), _utc(2024, 1, 7), _utc(2024, 1, 10)],
        ),
        # Regression: `*/10` starts with `*`, so the day must match both fields (the
        # 1st, 11th, 21st or 31st that is a Monday), not every Monday.
        (
            "0 0 */10 * 1",
            _utc(2024, 1, 1, 1),
            [_utc(2024, 3, 11), _utc(2024, 4, 1), _utc(2024, 7, 1), _utc(2024, 10, 21)],
        ),
        # Both restricted: either one (the 13th, or a Friday; 2024-10-13 is a Sunday).
        (
            "0 12 13 * FRI",
            _utc(2024, 10, 1),
            [_utc(2024, 10, 4, 12), _utc(2024, 10, 11, 12), _utc(2024, 10, 13, 12)],
        ),
        ("@daily", _utc(2024, 2, 28, 0, 0), [_utc(2024, 2, 29), _utc(2024, 3, 1)]),
        ("@yearly", _utc(2024, 1, 1), [_utc(2025, 1, 1), _utc(2026, 1, 1)]),
        (
            "0 9 1 jan-mar,Dec sun",
            _utc(2024, 1, 1, 10),
            [_utc(2024, 1, 7, 9), _utc(2024, 1, 14, 9)],
        ),
    ],
)
def test_day_field_steps_and_names(
    expression: str, after: datetime, expected: list[datetime]
) -> None:
    assert _server_upcoming(_compiled(expression), after, len(expected)) == expected
    if not expression.startswith("@"):
        assert _Reference.parse(expression).upcoming(after, len(expected)) == expected


# =================================================================== time zones

BERLIN = ZoneInfo("Europe/Berlin")
# Zones whose clocks change by an hour away from midnight (Berlin, New York, St John's
# at a half-hour offset) or never (Kolkata). Not Lord Howe (a half-hour change): there
# cronsim skips up to half an hour of a wildcard-hour job right after its autumn change.
_ZONES = ["Europe/Berlin", "America/New_York", "America/St_Johns", "Asia/Kolkata"]


def _changes_2024(zone: str) -> list[datetime]:
    """The instants of 2024 at which ``zone``'s clocks change (a half-hourly scan)."""
    tz = ZoneInfo(zone)
    moments = [_utc(2024, 1, 1) + timedelta(minutes=30 * i) for i in range(366 * 48)]
    return [
        b
        for a, b in itertools.pairwise(moments)
        if a.astimezone(tz).utcoffset() != b.astimezone(tz).utcoffset()
    ]


_CHANGES = [(zone, change) for zone in _ZONES for change in _changes_2024(zone)]


@st.composite
def _near_a_clock_change(draw: st.DrawFn) -> tuple[str, datetime, str]:
    """A zone, a start up to a day before one of its clock changes, and an expression
    that fires every day (its day fields are ``*``), so the change is among its next
    fire times whenever its hours reach it."""
    zone, change = draw(st.sampled_from(_CHANGES))
    after = change - timedelta(minutes=draw(st.integers(0, 26 * 60)))
    minute, hour = (draw(_cron_field(*bounds)) for bounds in _BOUNDS[:2])
    return zone, after, f"{minute} {hour} * * *"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_near_a_clock_change())
def test_fire_times_across_clock_changes_match_cron(case: tuple[str, datetime, str]) -> None:
    zone, after, expression = case
    want = _reference_in_zone(expression, ZoneInfo(zone), after, _COUNT)
    got = _server_upcoming(_compiled(expression, timezone_name=zone), after, _COUNT)
    assert got == want, (expression, zone)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expression=_cron_expression(),
    zone=st.sampled_from(_ZONES),
    after=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 12, 31)),
)
def test_fire_times_in_a_time_zone_match_cron(expression: str, zone: str, after: datetime) -> None:
    after = after.replace(tzinfo=UTC)
    if _never_fires(expression):
        return
    want = _reference_in_zone(expression, ZoneInfo(zone), after, _COUNT)
    got = _server_upcoming(_compiled(expression, timezone_name=zone), after, _COUNT)
    assert got[: len(want)] == want, (expression, zone)


def _berlin(year: int, month: int, day: int, hour: int, minute: int, fold: int = 0) -> datetime:
    """A wall-clock time in Berlin (``fold=1``: the second of a repeated time), in UTC."""
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold).astimezone(UTC)


def test_fixed_time_skipped_in_spring_fires_once_after_the_gap() -> None:
    # 2024-03-31: Berlin's clocks jump from 02:00 to 03:00; 02:30 does not exist.
    spec = _compiled("30 2 * * *", timezone_name="Europe/Berlin")
    assert _server_upcoming(spec, _berlin(2024, 3, 30, 12, 0), 3) == [
        _berlin(2024, 3, 31, 3, 0),  # once, at the first minute after the gap
        _berlin(2024, 4, 1, 2, 30),
        _berlin(2024, 4, 2, 2, 30),
    ]
    # A job that follows the wall clock just has no slots in the gap.
    spec = _compiled("*/30 * * * *", timezone_name="Europe/Berlin")
    assert _server_upcoming(spec, _berlin(2024, 3, 31, 1, 15), 3) == [
        _berlin(2024, 3, 31, 1, 30),
        _berlin(2024, 3, 31, 3, 0),
        _berlin(2024, 3, 31, 3, 30),
    ]


def test_fixed_time_repeated_in_autumn_fires_once() -> None:
    # 2024-10-27: Berlin's clocks go back from 03:00 to 02:00; 02:30 occurs twice.
    spec = _compiled("30 2 * * *", timezone_name="Europe/Berlin")
    first = _berlin(2024, 10, 27, 2, 30, fold=0)
    assert _server_upcoming(spec, _berlin(2024, 10, 26, 12, 0), 3) == [
        first,
        _berlin(2024, 10, 28, 2, 30),
        _berlin(2024, 10, 29, 2, 30),
    ]
    # Asked again from within the repeated hour (after its first 02:30): not again.
    assert _server_upcoming(spec, _berlin(2024, 10, 27, 2, 10, fold=1), 1) == [
        _berlin(2024, 10, 28, 2, 30)
    ]
    assert first.hour == 0 and _berlin(2024, 10, 27, 2, 30, fold=1).hour == 1
    # A job that follows the wall clock runs in both hours.
    spec = _compiled("0,30 * * * *", timezone_name="Europe/Berlin")
    assert _server_upcoming(spec, _berlin(2024, 10, 27, 1, 45), 5) == [
        _berlin(2024, 10, 27, 2, 0, fold=0),
        _berlin(2024, 10, 27, 2, 30, fold=0),
        _berlin(2024, 10, 27, 2, 0, fold=1),
        _berlin(2024, 10, 27, 2, 30, fold=1),
        _berlin(2024, 10, 27, 3, 0),
    ]


def test_intervals_do_not_depend_on_the_time_zone() -> None:
    spec = service_pb2.ScheduleSpec(timezone_name="Asia/Kolkata")
    spec.intervals.add().interval.FromSeconds(3600)
    after = micros_of(_utc(2024, 1, 1, 0, 10))
    assert CompiledSpec.compile(spec).upcoming(after, 2) == [
        micros_of(_utc(2024, 1, 1, 1)),
        micros_of(_utc(2024, 1, 1, 2)),
    ]


@pytest.mark.parametrize(
    "name", ["Mars/Olympus", "Europe", "/etc/passwd", "../zoneinfo/UTC", "zone.tab", "UTC\0"]
)
def test_unknown_time_zone_is_invalid_argument(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="unknown time zone"):
        _compiled("0 0 * * *", timezone_name=name)
