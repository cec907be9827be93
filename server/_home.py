"""Which site writes a run: its home (tla/Replication.tla ``IsHome``).

Kept apart from the engine, which asks it before every transition, and from
server/_sites.py, which wires the sites together.
"""

from __future__ import annotations

from tideflow.api.v1 import state_pb2
from tideflow.history import RunKey, home_of

from ._errors import NotHomeError


def check_home(key: RunKey, ms: state_pb2.MutableState, site: str) -> None:
    """Refuse a transition of a run ``site`` is not the home of: a replica, or the
    old home after its HANDOFF event (NotHomeError names the home it knows)."""
    home = home_of(ms, site)
    if home != site:
        raise NotHomeError(home, key)


__all__ = ["NotHomeError", "check_home"]
