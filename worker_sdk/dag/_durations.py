"""Durations in DAG files: ``5m``, ``1h30m``, ``500ms`` or seconds."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

# -------------------------------------------------------------- durations

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|d|h|m|s)")
_UNIT_US = {"d": 86_400_000_000, "h": 3_600_000_000, "m": 60_000_000, "s": 1_000_000}
_UNIT_US |= {"ms": 1_000, "us": 1}


def parse_duration(value: Any) -> timedelta:
    """``timedelta``, seconds (int/float) or a string like ``"1h30m"``, ``"500ms"``,
    ``"2.5s"`` (units d, h, m, s, ms, us; a leading ``-`` is allowed so validation can
    say what is wrong with a negative value). Raises ``ValueError``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: expected a string like '5m' or seconds")
    text = value.strip().replace(" ", "")
    sign = 1
    if text.startswith("-"):
        sign, text = -1, text[1:]
    if not text:
        raise ValueError(f"invalid duration {value!r}")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return timedelta(seconds=sign * float(text))
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_US[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(
            f"invalid duration {value!r}: use units d, h, m, s, ms, us (e.g. '5m', '1h30m')"
        )
    return timedelta(microseconds=sign * round(total))


def format_duration(value: timedelta) -> str:
    """The canonical text of a duration (``parse_duration`` reads it back exactly)."""
    micros = value // timedelta(microseconds=1)
    if micros == 0:
        return "0s"
    if micros < 0:
        return "-" + format_duration(-value)
    parts = []
    for unit in ("d", "h", "m", "s", "ms", "us"):
        size = _UNIT_US[unit]
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
