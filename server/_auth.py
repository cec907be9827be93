"""Authentication and per-namespace authorization of the gRPC API.

Modelled on Temporal's ``common/authorization``: an *authenticator* turns the
credentials of a call (gRPC metadata) into a ``Principal`` (an identity name and its
roles per namespace), and an ``Authorizer`` decides whether that principal may call
this RPC on this namespace. Both are pluggable (``AuthConfig``); the defaults are

* ``api-key`` mode: keys made by ``tideflow server create-api-key``, stored hashed in
  the database (``tideflow.history.ApiKeyStore``), each bound to a name and its grants;
* ``jwt`` mode: signed JWTs (HS256 with a shared secret, RS256/ES256 with a public
  key), issuer/audience/expiry checked, claims mapped to grants by a ``ClaimMapper``
  (default: a ``permissions`` claim such as ``["ns1:writer", "ns2:reader"]``);
* ``DefaultAuthorizer``: the role table ``RPC_ACCESS`` below.

Credentials travel as ``authorization: Bearer <key or JWT>`` (or ``x-tideflow-api-key:
<key>``). The frontend's ``_rpc`` boundary (server/_frontend.py) calls ``check`` once
per RPC, before the handler, with the namespace the call acts on: the request's, or
for a task-token call the namespace inside the verified token, so a worker of A cannot
act on B's tasks with a token of B.
"""

from __future__ import annotations

import argparse
import enum
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import jwt

from tideflow.history._api_keys import ApiKeyStore

from ._errors import ServiceError
from ._peers import NodeCredential, node_of


class UnauthenticatedError(ServiceError):
    """No credentials, or credentials the server does not accept."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ServiceError):
    """An authenticated identity outside its grants."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Role(enum.Enum):
    READER = "reader"
    WRITER = "writer"
    WORKER = "worker"
    ADMIN = "admin"


class Access(enum.Enum):
    """What an RPC does, hence which roles may call it."""

    READ = "read"
    WRITE = "write"
    WORK = "work"
    ADMIN = "admin"


# Which access each role has. A worker reads too: it fetches histories of its tasks
# (GetHistory) and checks the server (GetSystemInfo); it cannot start or signal runs.
ROLE_ACCESS: Mapping[Role, frozenset[Access]] = {
    Role.READER: frozenset({Access.READ}),
    Role.WRITER: frozenset({Access.READ, Access.WRITE}),
    Role.WORKER: frozenset({Access.READ, Access.WORK}),
    Role.ADMIN: frozenset(Access),
}

# Every RPC of WorkflowService. tests/test_security_auth_roles.py checks that this
# table names each one, so a new RPC cannot go unauthorized by omission.
RPC_ACCESS: Mapping[str, Access] = {
    "GetSystemInfo": Access.READ,
    "GetHistory": Access.READ,
    "DescribeWorkflow": Access.READ,
    "QueryWorkflow": Access.READ,
    "ListWorkflowExecutions": Access.READ,
    "CountWorkflowExecutions": Access.READ,
    "DescribeSchedule": Access.READ,
    "ListSchedules": Access.READ,
    "DescribeTaskQueue": Access.READ,
    "StartWorkflow": Access.WRITE,
    "SignalWorkflow": Access.WRITE,
    "RequestCancelWorkflow": Access.WRITE,
    "TerminateWorkflow": Access.WRITE,
    "PollWorkflowTask": Access.WORK,
    "PollActivityTask": Access.WORK,
    "RespondWorkflowTaskCompleted": Access.WORK,
    "RespondWorkflowTaskFailed": Access.WORK,
    "RespondActivityTaskCompleted": Access.WORK,
    "RespondActivityTaskFailed": Access.WORK,
    "RespondActivityTaskCanceled": Access.WORK,
    "RecordActivityHeartbeat": Access.WORK,
    # Its items are authorized one by one as well, each on its task token's namespace.
    "RespondTasksCompleted": Access.WORK,
    "RespondQueryTaskCompleted": Access.WORK,
    "ShutdownWorker": Access.WORK,
    "RegisterNamespace": Access.ADMIN,
    "CreateSchedule": Access.ADMIN,
    "PatchSchedule": Access.ADMIN,
    "DeleteSchedule": Access.ADMIN,
    "DescribeCluster": Access.ADMIN,  # on ANY_NAMESPACE (NAMESPACE_FREE_RPCS)
}

# Task-token RPCs: the namespace they act on is the verified token's; the value says
# whether the token is an activity's.
TOKEN_RPCS: Mapping[str, bool] = {
    "RespondWorkflowTaskCompleted": False,
    "RespondWorkflowTaskFailed": False,
    "RespondQueryTaskCompleted": False,
    "RespondActivityTaskCompleted": True,
    "RespondActivityTaskFailed": True,
    "RespondActivityTaskCanceled": True,
    "RecordActivityHeartbeat": True,
}

# A grant on this namespace holds on every namespace.
ANY_NAMESPACE = "*"

# RPCs whose request names no namespace -> the namespace they are authorized on: ""
# (any one: DefaultAuthorizer) for GetSystemInfo, ANY_NAMESPACE for a cluster-wide
# call, which only a "*" grant holds.
NAMESPACE_FREE_RPCS: Mapping[str, str] = {"GetSystemInfo": "", "DescribeCluster": ANY_NAMESPACE}


def parse_grant(text: str) -> tuple[str, Role]:
    """``namespace:role`` (``*:admin`` for every namespace); ValueError otherwise."""
    namespace, sep, role = text.rpartition(":")
    if not sep or not namespace:
        raise ValueError(f"grant {text!r} is not NAMESPACE:ROLE")
    try:
        return namespace, Role(role.strip().lower())
    except ValueError:
        roles = ", ".join(r.value for r in Role)
        raise ValueError(f"grant {text!r}: unknown role {role!r} (one of {roles})") from None


def grants_of(texts: Iterable[str]) -> dict[str, frozenset[Role]]:
    """The roles per namespace that ``namespace:role`` strings give."""
    out: dict[str, set[Role]] = {}
    for text in texts:
        namespace, role = parse_grant(text)
        out.setdefault(namespace, set()).add(role)
    return {ns: frozenset(roles) for ns, roles in out.items()}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its name (logged by the audit) and its roles per
    namespace (``ANY_NAMESPACE`` for all)."""

    name: str
    grants: Mapping[str, frozenset[Role]] = field(default_factory=dict)

    def roles(self, namespace: str) -> frozenset[Role]:
        return self.grants.get(namespace, frozenset()) | self.grants.get(ANY_NAMESPACE, frozenset())


class Authorizer(Protocol):
    """Decides one call. Returns None to allow it, or the reason it is refused (sent
    with PERMISSION_DENIED). ``namespace`` is "" for GetSystemInfo (no namespace)."""

    def authorize(self, principal: Principal, rpc: str, namespace: str) -> str | None: ...


class DefaultAuthorizer:
    """The role table: ``RPC_ACCESS`` of the RPC against ``ROLE_ACCESS`` of the roles
    the principal holds on the namespace. An RPC without a namespace (GetSystemInfo)
    needs its access on any one namespace."""

    def authorize(self, principal: Principal, rpc: str, namespace: str) -> str | None:
        access = RPC_ACCESS.get(rpc)
        if access is None:
            return f"{rpc} is not a known RPC"
        if namespace:
            held = principal.roles(namespace)
        else:
            held = frozenset(r for roles in principal.grants.values() for r in roles)
        if any(access in ROLE_ACCESS[role] for role in held):
            return None
        needed = " or ".join(r.value for r in Role if access in ROLE_ACCESS[r])
        where = f"namespace {namespace!r}" if namespace else "any namespace"
        return f"{principal.name!r} may not call {rpc} on {where}: it needs the role {needed}"


class ClaimMapper(Protocol):
    """Turns the verified claims of a JWT into a principal (Temporal's ClaimMapper)."""

    def map_claims(self, claims: Mapping[str, Any]) -> Principal: ...


class PermissionsClaimMapper:
    """The default mapper: the ``sub`` claim names the caller, and a list claim
    (``permissions`` by default) holds ``namespace:role`` strings, as Temporal's
    default claim mapper reads them. Unknown roles are ignored (a token may carry
    permissions meant for other services)."""

    def __init__(self, claim: str = "permissions") -> None:
        self.claim = claim

    def map_claims(self, claims: Mapping[str, Any]) -> Principal:
        raw = claims.get(self.claim, [])
        grants: dict[str, set[Role]] = {}
        if isinstance(raw, list):
            for item in raw:
                if not isinstance(item, str):
                    continue
                try:
                    namespace, role = parse_grant(item)
                except ValueError:
                    continue
                grants.setdefault(namespace, set()).add(role)
        return Principal(
            str(claims.get("sub", "")) or "jwt",
            {ns: frozenset(r) for ns, r in grants.items()},
        )


class Authenticator(Protocol):
    """Turns the credentials of a call into a principal; raises UnauthenticatedError."""

    async def authenticate(self, credential: str) -> Principal: ...


class ApiKeyAuthenticator:
    """API keys of ``tideflow server create-api-key``, looked up in the store on every
    call, so a revoked key is refused from the next call on."""

    def __init__(self, keys: ApiKeyStore) -> None:
        self._keys = keys

    async def authenticate(self, credential: str) -> Principal:
        record = await self._keys.verify(credential)
        if record is None:
            raise UnauthenticatedError("the API key is not valid (unknown, wrong or revoked)")
        return Principal(record.name, grants_of(record.grants))


_JWT_ALGORITHMS = ("HS256", "RS256", "ES256")


@dataclass(frozen=True, slots=True, kw_only=True)
class JWTConfig:
    """How JWTs are verified: ``key`` is the HS256 secret or the PEM public key of
    RS256/ES256 (``algorithms`` names which are accepted; a token's own header cannot
    widen it). ``issuer`` and ``audience``, when set, must match; ``exp`` is always
    required. ``leeway_s`` allows for clock skew."""

    key: bytes
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    issuer: str | None = None
    audience: str | None = None
    leeway_s: float = 30.0

    def __repr__(self) -> str:
        # Never print the (possibly secret) key.
        return f"JWTConfig(algorithms={self.algorithms}, issuer={self.issuer!r})"

    def __post_init__(self) -> None:
        unknown = set(self.algorithms) - set(_JWT_ALGORITHMS)
        if not self.algorithms or unknown:
            raise ValueError(f"JWT algorithms must be among {', '.join(_JWT_ALGORITHMS)}")
        if "HS256" in self.algorithms and len(self.algorithms) > 1:
            # A public key given as an HMAC secret would let anyone sign (the classic
            # algorithm confusion): a key is for HS256 or for the public-key algorithms.
            raise ValueError("HS256 cannot be combined with RS256/ES256 (one key, one kind)")


class JWTAuthenticator:
    def __init__(self, config: JWTConfig, mapper: ClaimMapper | None = None) -> None:
        self._config = config
        self._mapper = mapper or PermissionsClaimMapper()

    async def authenticate(self, credential: str) -> Principal:
        config = self._config
        key: Any = config.key if "HS256" in config.algorithms else config.key.decode()
        try:
            claims = jwt.decode(
                credential,
                key,
                algorithms=list(config.algorithms),
                issuer=config.issuer,
                audience=config.audience,
                leeway=config.leeway_s,
                options={
                    "require": ["exp"],
                    "verify_aud": config.audience is not None,
                },
            )
        except jwt.PyJWTError as error:
            raise UnauthenticatedError(f"the JWT is not valid: {error}") from None
        return self._mapper.map_claims(claims)


class AuthMode(enum.Enum):
    OFF = "off"
    API_KEY = "api-key"
    JWT = "jwt"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """What ``TideflowServer(auth=...)`` enforces. ``mode`` OFF accepts every call
    (the behaviour without auth); ``authenticator`` replaces the mode's default one
    (then ``mode`` only needs not to be OFF), ``authorizer`` the role table."""

    mode: AuthMode = AuthMode.OFF
    jwt: JWTConfig | None = None
    claim_mapper: ClaimMapper | None = None
    authenticator: Authenticator | None = None
    authorizer: Authorizer | None = None

    def __post_init__(self) -> None:
        if self.mode is AuthMode.JWT and self.jwt is None and self.authenticator is None:
            raise ValueError(
                "auth mode jwt needs a JWT key (--auth-jwt-key or --auth-jwt-key-file)"
            )


_API_KEY_HEADER = "x-tideflow-api-key"


def credential_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The bearer token or API key of a call's metadata; None when there is none."""
    for name, value in metadata or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if name == "authorization":
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == _API_KEY_HEADER and text.strip():
            return text.strip()
    return None


class AuthGate:
    """What the frontend asks, once per call: who is calling (``authenticate``) and
    may they do this (``authorize``). A call a node of the cluster makes on its own
    behalf (server/_peers.py) carries the node credential instead: it may do anything."""

    def __init__(
        self,
        authenticator: Authenticator,
        authorizer: Authorizer,
        nodes: NodeCredential | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._authorizer = authorizer
        self._nodes = nodes

    async def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        node_header = node_of(metadata)
        if node_header is not None and self._nodes is not None:
            node_id = await self._nodes.verify(node_header)
            if node_id is None:
                raise UnauthenticatedError("the node credential is not valid for this cluster")
            return Principal(f"node:{node_id}", {ANY_NAMESPACE: frozenset(Role)})
        credential = credential_of(metadata)
        if credential is None:
            raise UnauthenticatedError(
                "authentication required: send 'authorization: Bearer <API key or JWT>' "
                "(Client.connect(..., api_key=...))"
            )
        return await self._authenticator.authenticate(credential)

    def authorize(self, principal: Principal, rpc: str, namespace: str) -> None:
        reason = self._authorizer.authorize(principal, rpc, namespace)
        if reason is not None:
            raise PermissionDeniedError(f"permission denied: {reason}")


def gate_for(
    config: AuthConfig, api_keys: ApiKeyStore, nodes: NodeCredential | None = None
) -> AuthGate | None:
    """The gate ``config`` asks for on a store's database; None when auth is off.
    ``nodes`` lets the cluster's own nodes in (server/_peers.py)."""
    if config.mode is AuthMode.OFF:
        return None
    authenticator = config.authenticator
    if authenticator is None:
        if config.mode is AuthMode.API_KEY:
            authenticator = ApiKeyAuthenticator(api_keys)
        else:
            assert config.jwt is not None  # AuthConfig checks it
            authenticator = JWTAuthenticator(config.jwt, config.claim_mapper)
    return AuthGate(authenticator, config.authorizer or DefaultAuthorizer(), nodes)


# ------------------------------------------------------------------ flags


def add_auth_arguments(parser: Any, *, default_mode: AuthMode) -> None:
    """Add the authentication flags to a server command's parser. ``start-dev``
    defaults to ``off``, ``start`` to ``api-key`` (disable with ``--auth off``)."""
    group = parser.add_argument_group("authentication")
    group.add_argument(
        "--auth",
        choices=[m.value for m in AuthMode],
        default=default_mode.value,
        help=f"who may call the API (default: {default_mode.value}): off, api-key "
        "(keys of 'tideflow server create-api-key'), jwt (signed JWTs)",
    )
    group.add_argument("--auth-jwt-key", default=None, help="HS256 secret (prefer the file flag)")
    group.add_argument(
        "--auth-jwt-key-file",
        default=None,
        help="file with the HS256 secret or the PEM public key (RS256/ES256)",
    )
    group.add_argument(
        "--auth-jwt-algorithms",
        default=None,
        help="comma-separated: HS256, or RS256,ES256 (default: HS256 with --auth-jwt-key, "
        "else RS256,ES256)",
    )
    group.add_argument("--auth-jwt-issuer", default=None, help="required 'iss' claim")
    group.add_argument("--auth-jwt-audience", default=None, help="required 'aud' claim")
    group.add_argument(
        "--auth-jwt-permissions-claim",
        default="permissions",
        help="the claim with NAMESPACE:ROLE strings (default: permissions)",
    )


def auth_from_args(args: argparse.Namespace) -> AuthConfig:
    """The auth config the flags ask for; ValueError with a one-line reason."""
    mode = AuthMode(args.auth)
    jwt_flags = (args.auth_jwt_key, args.auth_jwt_key_file, args.auth_jwt_issuer)
    if mode is not AuthMode.JWT:
        if any(flag is not None for flag in jwt_flags):
            raise ValueError("the --auth-jwt-* flags need --auth jwt")
        return AuthConfig(mode=mode)
    if (args.auth_jwt_key is None) == (args.auth_jwt_key_file is None):
        raise ValueError("--auth jwt needs one of --auth-jwt-key and --auth-jwt-key-file")
    if args.auth_jwt_key is not None:
        key = args.auth_jwt_key.encode()
    else:
        try:
            with open(args.auth_jwt_key_file, "rb") as f:
                key = f.read().strip()
        except OSError as error:
            raise ValueError(
                f"--auth-jwt-key-file {os.fspath(args.auth_jwt_key_file)}: {error.strerror}"
            ) from None
    if args.auth_jwt_algorithms:
        algorithms = tuple(a.strip().upper() for a in args.auth_jwt_algorithms.split(",") if a)
    else:
        algorithms = ("RS256", "ES256") if b"-----BEGIN " in key else ("HS256",)
    if "HS256" not in algorithms and b"-----BEGIN " not in key:
        raise ValueError("RS256/ES256 need a PEM public key in --auth-jwt-key-file")
    config = JWTConfig(
        key=key,
        algorithms=algorithms,
        issuer=args.auth_jwt_issuer,
        audience=args.auth_jwt_audience,
    )
    return AuthConfig(
        mode=mode, jwt=config, claim_mapper=PermissionsClaimMapper(args.auth_jwt_permissions_claim)
    )
