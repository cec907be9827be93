"""One link between two sites: calls in both directions over one gRPC stream.

The edge opens the stream (``SiteService.Link``) and the cloud answers on it; after
that the two ends are alike: either may call the other (a replication pull, a
forwarded signal, a change hint), each call a ``SiteFrame`` matched to its reply by
call id. Bodies are zlib-compressed serialized messages: histories compress well.

A link is over when its stream ends, whichever side ends it; every call in flight
then fails with ``LinkDown`` and the caller tries again on the next link (every call
on a link is idempotent: pulls read, forwarded requests carry the client's request
id). Nothing here is durable: what must survive a crash is in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from google.protobuf.message import Message

from tideflow.api.v1.replication_pb2 import SiteFrame

log = logging.getLogger("tideflow.server.sites")

M = TypeVar("M", bound=Message)
#: A call's handler: the request's body (decompressed) -> the reply message.
Handler = Callable[["SiteLink", bytes], Awaitable[Message]]
_CALL_TIMEOUT_S = 60.0
# zlib level: the fastest level already shrinks histories several times over.
_COMPRESSION_LEVEL = 1


class LinkDown(Exception):
    """The link ended (or a call on it failed) before the reply arrived."""


class CallRefused(LinkDown):
    """The other site answered the call with an error (the stream is still open)."""


def pack(message: Message) -> bytes:
    return zlib.compress(message.SerializeToString(), _COMPRESSION_LEVEL)


def unpack(body: bytes, message_type: type[M]) -> M:
    return message_type.FromString(zlib.decompress(body))


class SiteLink:
    """Calls over one stream. ``send`` writes one frame (one writer at a time: the
    link's own writer task); ``receive`` returns the next frame or None at the end."""

    def __init__(
        self,
        peer: str,
        role: str,
        send: Callable[[SiteFrame], Awaitable[None]],
        receive: Callable[[], Awaitable[SiteFrame | None]],
        handlers: Mapping[str, Handler],
    ) -> None:
        self.peer = peer
        self.role = role
        self._send = send
        self._receive = receive
        self._handlers = handlers
        self._outbox: asyncio.Queue[SiteFrame | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[SiteFrame]] = {}
        self._ids = itertools.count(1)
        self._serving: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        # Bytes of frame bodies sent and received (bench/edge.py: bytes per event).
        self.bytes_sent = 0
        self.bytes_received = 0

    async def call(self, method: str, request: Message, reply_type: type[M]) -> M:
        """Call ``method`` on the other site; LinkDown if the link ends first or the
        other side failed the call."""
        reply = await self.call_serialized(method, request.SerializeToString())
        return reply_type.FromString(reply)

    async def call_serialized(self, method: str, request: bytes) -> bytes:
        """``call`` with the request and the reply serialized (a call another node of
        this site makes over this link: server/_site_nodes.py)."""
        if self.closed.is_set():
            raise LinkDown(f"link to {self.peer} is down")
        call_id = next(self._ids)
        reply: asyncio.Future[SiteFrame] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = reply
        body = zlib.compress(request, _COMPRESSION_LEVEL)
        self.bytes_sent += len(body)
        self._outbox.put_nowait(SiteFrame(call_id=call_id, method=method, body=body))
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                frame = await reply
        except TimeoutError:
            raise LinkDown(f"{method} on {self.peer}: no reply in {_CALL_TIMEOUT_S:g} s") from None
        finally:
            self._pending.pop(call_id, None)
        if frame.error:
            raise CallRefused(f"{method} on {self.peer}: {frame.error}")
        self.bytes_received += len(frame.body)
        return zlib.decompress(frame.body)

    async def run(self) -> None:
        """Read and write frames until the stream ends; then fail what is pending."""
        writer = asyncio.create_task(self._write_loop(), name=f"tideflow-link-writer-{self.peer}")
        try:
            while True:
                frame = await self._receive()
                if frame is None:
                    return
                if frame.reply:
                    waiter = self._pending.get(frame.call_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(frame)
                else:
                    task = asyncio.create_task(self._serve(frame))
                    self._serving.add(task)
                    task.add_done_callback(self._serving.discard)
        finally:
            self.close()
            writer.cancel()
            for task in list(self._serving):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self._outbox.put_nowait(None)
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(LinkDown(f"link to {self.peer} went down"))

    async def _write_loop(self) -> None:
        while True:
            frame = await self._outbox.get()
            if frame is None:
                return
            await self._send(frame)

    async def _serve(self, frame: SiteFrame) -> None:
        reply = SiteFrame(call_id=frame.call_id, reply=True, method=frame.method)
        handler = self._handlers.get(frame.method)
        try:
            if handler is None:
                raise LinkDown(f"unknown method {frame.method!r}")
            self.bytes_received += len(frame.body)
            body = pack(await handler(self, zlib.decompress(frame.body)))
            self.bytes_sent += len(body)
            reply.body = body
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the caller retries; the error is its message
            log.debug("site call %s from %s failed", frame.method, self.peer, exc_info=True)
            reply.error = f"{type(exc).__name__}: {exc}"
        if not self.closed.is_set():
            self._outbox.put_nowait(reply)


def message_of(body: bytes, message_type: type[M]) -> M:
    """A handler's request (its body is already decompressed)."""
    return message_type.FromString(body)
