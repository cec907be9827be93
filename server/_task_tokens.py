"""Task tokens that clients cannot forge: an HMAC-SHA256 under a server key.

A task token names the run, the event ids and the attempt of a started task, and
every one of those fields can be read through DescribeWorkflow and GetHistory. Plain,
they let any client complete or fail any worker's task. So every token the frontend
hands out is sealed here::

    b"tft1" | key id (4 bytes, big-endian) | HMAC-SHA256(key, prefix | key id | body) | body

where ``body`` is the serialized ``TaskToken``. The frontend opens a token (checks the
MAC under the key it names) before anything else reads it: a token altered in any
field (another run, attempt, event id, namespace or kind) or signed by an unknown or
retired key is refused INVALID_ARGUMENT. A genuine token that is merely stale (its task
completed, timed out or was retried) passes here and meets the engine's checks, which
answer as before (NOT_FOUND).

The keys live in the store (``tideflow.history.TokenKeyStore``), shared by every node
of the database. A node loads them at start, reloads them every
``token_key_refresh_s`` (so a rotation made elsewhere takes over signing), and at once
when a token names a key it does not know (a node that rotated earlier signed it), at
most once per ``_UNKNOWN_KEY_RELOAD_S`` so that junk key ids cannot hammer the store.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import struct
import time

from tideflow.history import StoreError, TokenKey, TokenKeyStore

from ._errors import InvalidArgumentError

log = logging.getLogger("tideflow.server.tokens")

_PREFIX = b"tft1"
_KEY_ID = struct.Struct(">I")
_MAC_BYTES = hashlib.sha256().digest_size
# Reloads triggered by an unknown key id, at most this often.
_UNKNOWN_KEY_RELOAD_S = 1.0
# Tokens whose MAC was checked lately, remembered (with their body) so that a token
# checked twice in one call (routing, then the handler) or again (a heartbeat, a
# retried report) costs a dict lookup. Forgotten whenever the keys are reloaded, so a
# retired key stops opening tokens as it did before.
_OPENED_CACHE_SIZE = 4096


class TaskTokenSigner:
    """Seals and opens task tokens under the store's keys."""

    def __init__(self, keys: TokenKeyStore, *, refresh_s: float) -> None:
        self._store = keys
        self._refresh_s = refresh_s
        self._keys: dict[int, TokenKey] = {}
        self._signing: TokenKey | None = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()
        # token -> body, for tokens opened since the keys were last loaded.
        self._opened: dict[bytes, bytes] = {}

    @property
    def signing_key_id(self) -> int:
        assert self._signing is not None, "keys not loaded"
        return self._signing.key_id

    async def load(self) -> None:
        """(Re)read the keys from the store; the newest one signs from now on."""
        async with self._lock:
            await self._load_locked()

    async def _load_locked(self) -> None:
        keys = await self._store.keys()
        self._keys = {key.key_id: key for key in keys}
        self._signing = keys[-1]
        self._loaded_at = time.monotonic()
        self._opened = {}

    def _stale(self) -> bool:
        return self._signing is None or time.monotonic() - self._loaded_at >= self._refresh_s

    async def _fresh(self) -> None:
        if not self._stale():
            return
        async with self._lock:
            if not self._stale():  # a caller that waited for the lock finds them fresh
                return
            if self._signing is None:
                await self._load_locked()
                return
            try:
                await self._load_locked()
            except StoreError as exc:
                # The keys held still sign and verify: a task must not be lost (or a
                # worker's report refused) because a periodic reload met an outage.
                log.warning("reloading task token keys failed, retrying in 1 s: %s", exc)
                self._loaded_at = time.monotonic() - self._refresh_s + _UNKNOWN_KEY_RELOAD_S

    async def seal(self, body: bytes, *, prefix: bytes = _PREFIX) -> bytes:
        """The token that carries ``body`` (a serialized TaskToken), signed. Another
        ``prefix`` seals another kind of token (server/_history_pages.py): the MAC
        covers the prefix, so one kind is never accepted as the other."""
        await self._fresh()
        key = self._signing
        assert key is not None
        head = prefix + _KEY_ID.pack(key.key_id)
        return head + _mac(key, head, body) + body

    async def open(
        self, token: bytes, *, prefix: bytes = _PREFIX, what: str = "task token"
    ) -> bytes:
        """The body of a token this server (or another node of its database) sealed
        with ``prefix``; INVALID_ARGUMENT (naming the token ``what``) if it was not, was
        altered, or its key was retired."""
        if not token:
            raise InvalidArgumentError(f"{what} is empty")
        await self._fresh()  # first: a reload forgets the tokens opened before it
        opened = self._opened.get(token)
        if opened is not None and token.startswith(prefix):
            return opened
        size = len(prefix) + _KEY_ID.size
        if len(token) < size + _MAC_BYTES or not token.startswith(prefix):
            raise InvalidArgumentError(
                f"{what} is malformed: not a token this server issued (tokens are signed)"
            )
        head = token[:size]
        (key_id,) = _KEY_ID.unpack(head[len(prefix) :])
        mac = token[size : size + _MAC_BYTES]
        body = token[size + _MAC_BYTES :]
        key = self._keys.get(key_id)
        if key is None and time.monotonic() - self._loaded_at >= _UNKNOWN_KEY_RELOAD_S:
            await self.load()
            key = self._keys.get(key_id)
        if key is None:
            raise InvalidArgumentError(
                f"{what} is signed by an unknown or retired key (id {key_id})"
            )
        if not hmac.compare_digest(mac, _mac(key, head, body)):
            raise InvalidArgumentError(
                f"{what} signature does not match: the token was altered or forged"
            )
        if len(self._opened) >= _OPENED_CACHE_SIZE:
            del self._opened[next(iter(self._opened))]  # the oldest entry
        self._opened[token] = body
        return body

    async def sign(self, data: bytes) -> tuple[int, bytes]:
        """``(key id, HMAC-SHA256 of data)`` under the current signing key: the same
        keys authenticate other short secrets of the cluster (server/_peers.py)."""
        await self._fresh()
        key = self._signing
        assert key is not None
        return key.key_id, _mac(key, b"", data)

    async def verify(self, data: bytes, key_id: int, mac: bytes) -> bool:
        """Whether ``mac`` is ``sign(data)``'s under key ``key_id`` (a known, unretired
        key; an unknown id reloads the keys as ``open`` does)."""
        await self._fresh()
        key = self._keys.get(key_id)
        if key is None and time.monotonic() - self._loaded_at >= _UNKNOWN_KEY_RELOAD_S:
            await self.load()
            key = self._keys.get(key_id)
        return key is not None and hmac.compare_digest(mac, _mac(key, b"", data))


def _mac(key: TokenKey, head: bytes, body: bytes) -> bytes:
    # A copy of the keyed HMAC (key schedule done once per key) costs half of a new
    # one. Not the one-shot ``hmac.digest``: it releases the GIL, and on a busy server
    # the event loop then waits to take it back from the store's writer thread (4x
    # slower per call with one busy thread beside it).
    mac = _keyed(key.secret).copy()
    mac.update(head + body)
    return mac.digest()


@functools.lru_cache(maxsize=16)
def _keyed(secret: bytes) -> hmac.HMAC:
    """HMAC-SHA256 keyed with ``secret``, before any message (copied, never updated)."""
    return hmac.new(secret, digestmod=hashlib.sha256)
