"""The tideflow server: frontend, history engine, matching and timer queue.

Start one in-process with ``async with TideflowServer(url, port=0) as server`` or from
the command line with ``tideflow server start-dev``.
"""

from ._auth import (
    AuthConfig,
    AuthMode,
    Authorizer,
    ClaimMapper,
    DefaultAuthorizer,
    JWTConfig,
    PermissionsClaimMapper,
    Principal,
    Role,
)
from ._config import Clock, ServerConfig, SystemClock
from ._server import TideflowServer
from ._time_skipping import SkippingClock, TimeSkipper
from ._tls import ServerTLSConfig, UpstreamTLSConfig

__all__ = [
    "AuthConfig",
    "AuthMode",
    "Authorizer",
    "ClaimMapper",
    "Clock",
    "DefaultAuthorizer",
    "JWTConfig",
    "PermissionsClaimMapper",
    "Principal",
    "Role",
    "ServerConfig",
    "ServerTLSConfig",
    "SkippingClock",
    "SystemClock",
    "TideflowServer",
    "TimeSkipper",
    "UpstreamTLSConfig",
]
