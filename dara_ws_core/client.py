"""A Python client for the protocol: the frontend's side, for tests, benchmarks and services.

It speaks exactly what the stock Dara client speaks (protocol.md section 2) and adds what that
client lacks: timeouts on requests, error replies surfaced as :class:`RemoteError`, chunked
answers, and reconnection with exponential backoff and jitter.

It runs over any :class:`~dara_ws_core.transport.Transport`; a *connector* is a coroutine
function returning a connected one (``dara_ws_websockets.connect``, ``dara_ws_aiohttp.connect``,
or :class:`~dara_ws_core.memory.MemoryServer.connect`)::

    client = DaraClient(lambda: connect("ws://127.0.0.1:8000/api/core/ws?token=..."))
    client.on_request(lambda payload: {"answer": 42})
    await client.connect()
    reply = await client.request("echo", {"x": 1}, timeout=5)

A server is a peer like any other, and the client bounds what one can make it hold (every
default can be changed in the constructor):

* **Responders**: at most ``max_responders`` (64) server requests are answered at once. At the
  cap the client stops reading until one finishes: the server's frames wait in the socket
  buffers, and TCP holds the rest back, as websockets does when its ``max_queue`` is full.
  The protocol has no "busy" answer for the client's side (section 2), so waiting is the
  outcome that loses nothing.
* **Inbox**: pushes not yet taken by :meth:`DaraClient.receive` are kept up to ``max_queue``
  (10,000) messages and ``max_queue_bytes`` (32 MiB of frame text). Beyond either, the oldest are
  dropped (counted in ``dropped``, logged at a limited rate): a client that only sends requests
  and never calls ``receive()`` keeps working, its replies and pongs unaffected.
* **A dead server**: with ``ping_interval`` set, a connection on which no frame at all arrives
  within ``idle_timeout`` (twice ``ping_interval`` by default: a live server answers each ping)
  is aborted as closed with 1006, and reconnected when ``reconnect`` is set. Time the client
  spends not reading (the responder cap above) is not counted against the server.
"""

from __future__ import annotations

__all__ = ["Chunked", "Connector", "DaraClient", "PushedMessage", "Request"]

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .codec import decode_server_frame, dumps
from .exceptions import (
    CloseCode,
    ConnectionClosed,
    DaraWSError,
    InvalidFrame,
    InvalidMessage,
    RemoteError,
    RequestTimeout,
)
from .logs import ConnectionLogger
from .messages import (
    CustomServerMessage,
    DaraServerMessage,
    InitMessage,
    PongMessage,
    ServerMessage,
)
from .transport import Transport

logger = logging.getLogger("dara_ws_core.client")

Connector = Callable[[], Awaitable[Transport]]
_PING = b'{"type":"ping","message":null}'


@dataclass(frozen=True, slots=True)
class Chunked:
    """Return this from a responder to answer in ``len(parts)`` chunks.

    ``indexed=True`` adds the **[ext]** ``chunk_index``; ``shuffle=True`` sends the indexed parts
    out of order (for testing servers).
    """

    parts: Sequence[Any]
    indexed: bool = False
    shuffle: bool = False


@dataclass(frozen=True, slots=True)
class Request:
    """A server request as seen by a responder."""

    rchan: str
    payload: dict[str, Any]
    custom: bool
    typename: str | None


Responder = Callable[[Request], Any]

#: What :meth:`DaraClient.receive` returns: pushes (``init`` and ``pong`` are handled inside).
PushedMessage = DaraServerMessage | CustomServerMessage


class DaraClient:
    """One logical client; with ``reconnect=True`` it survives connection loss (new channel each
    time, like the stock client).

    ``ping_interval`` (seconds, ``None`` for no pings) paces the keepalive pings. The bounds on
    what the server can make the client hold are described in the module documentation:
    ``max_responders`` server requests answered at once (more wait unread), ``max_queue``
    pushes and ``max_queue_bytes`` of their frame text in the inbox (the oldest dropped beyond,
    counted in ``dropped``), and ``idle_timeout``, the silence after which the connection is
    given up as dead (default twice ``ping_interval``; ``None`` without pings). Raises
    ``ValueError`` for a bound under 1, or an ``idle_timeout`` not longer than ``ping_interval``.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        ping_interval: float | None = 5.0,
        reconnect: bool = False,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        max_attempts: int | None = 20,
        max_queue: int = 10_000,
        max_queue_bytes: int = 32 * 1024 * 1024,
        max_responders: int = 64,
        idle_timeout: float | None = None,
        init_timeout: float = 10.0,
    ) -> None:
        if max_responders < 1 or max_queue < 1 or max_queue_bytes < 1:
            raise ValueError("max_responders, max_queue and max_queue_bytes must be at least 1")
        if idle_timeout is None and ping_interval:
            idle_timeout = 2 * ping_interval
        if idle_timeout is not None and ping_interval and idle_timeout <= ping_interval:
            raise ValueError("idle_timeout must be longer than ping_interval, or a live but "
                             "quiet server is taken for dead between two pongs")
        self._connector = connector
        self.ping_interval = ping_interval
        #: No frame from the server for this long (seconds) means the connection is dead;
        #: ``None`` (the default without pings) never decides so.
        self.idle_timeout = idle_timeout
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_responders = max_responders
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_attempts = max_attempts
        self.init_timeout = init_timeout
        self._channel: str | None = None
        self._transport: Transport | None = None
        self._responder: Responder | None = None
        self._inbox: deque[tuple[PushedMessage, int]] = deque()
        self._inbox_bytes = 0
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._responding = 0
        self._responder_done: asyncio.Future[None] | None = None
        # When the last frame arrived (time.monotonic: a C call, cheaper per frame than the
        # loop's clock); +inf while the client itself does not read.
        self._last_frame = math.inf
        self._idle_close: ConnectionClosed | None = None
        self._log = ConnectionLogger(logger, {})
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        #: Close information of the last connection lost, and counters.
        self.last_close: ConnectionClosed | None = None
        self.connections = 0
        self.pongs = 0
        #: Pushes dropped from a full inbox (oldest first), and connections given up as dead.
        self.dropped = 0
        self.idle_closes = 0

    # ------------------------------------------------------------------ setup

    def on_request(self, responder: Responder) -> None:
        """Answer server requests (``send_and_wait``) with ``responder(request)``: its return value
        (awaited if a coroutine) is the answer; return :class:`Chunked` to answer in parts."""
        self._responder = responder

    async def connect(self) -> str:
        """Connect, wait for ``init`` and return the channel id. Raises what the connector raises
        (e.g. a 403 rejection) and ``ConnectionClosed`` if the server closes before ``init``."""
        self._closing = False
        await self._open()
        self._runner = asyncio.get_running_loop().create_task(self._run())
        return self.channel

    async def _open(self) -> None:
        transport = await self._connector()
        try:
            async with asyncio.timeout(self.init_timeout):
                while True:
                    message = decode_server_frame(await transport.receive())
                    if isinstance(message, InitMessage):
                        break
        except BaseException:
            await transport.close()
            raise
        self._transport = transport
        self._channel = message.message.channel
        self.connections += 1
        self._connected.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            transport = self._transport
            assert transport is not None
            keepalive = []
            if self.ping_interval:
                keepalive.append(loop.create_task(self._ping(transport)))
            if self.idle_timeout is not None:
                keepalive.append(loop.create_task(self._watch(transport, self.idle_timeout)))
            try:
                await self._read(transport)
            finally:
                for task in keepalive:
                    task.cancel()
                self._connected.clear()
                self._fail_pending(self.last_close or ConnectionClosed())
            if self._closing or not self.reconnect or not await self._reconnect():
                self._wake_inbox()
                return

    async def _reconnect(self) -> bool:
        attempt = 0
        while not self._closing and (self.max_attempts is None or attempt < self.max_attempts):
            delay = min(self.backoff_max, self.backoff_initial * 2**attempt)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            attempt += 1
            try:
                await self._open()
                return True
            except (OSError, DaraWSError, TimeoutError) as exc:
                logger.info("reconnect attempt %d failed: %s", attempt, exc)
            except Exception as exc:  # connector-specific errors (e.g. handshake status)
                logger.info("reconnect attempt %d failed: %r", attempt, exc)
        return False

    async def _ping(self, transport: Transport) -> None:
        assert self.ping_interval is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.ping_interval)
                await transport.send(_PING)

    async def _watch(self, transport: Transport, idle_timeout: float) -> None:
        """Abort the connection once no frame has come for ``idle_timeout`` while reading.

        A separate task, not a timeout on each ``receive()``: it costs the read loop one clock
        reading per frame, and it fires even when a send (a ping to a server that reads nothing)
        is stuck.
        """
        while True:
            late = time.monotonic() - self._last_frame  # -inf while the client does not read
            if late >= idle_timeout:
                break
            await asyncio.sleep(idle_timeout - late if late > -math.inf else idle_timeout)
        self.idle_closes += 1
        self._idle_close = ConnectionClosed(
            CloseCode.ABNORMAL, f"no frame from the server for {idle_timeout:g} s"
        )
        logger.warning("closing a connection that looks dead: %s", self._idle_close.reason)
        transport.abort()

    # ------------------------------------------------------------------ inbound

    async def _read(self, transport: Transport) -> None:
        clock = time.monotonic
        self._idle_close = None
        self._last_frame = clock()  # before the watcher's first look: it starts after this
        while True:
            try:
                frame = await transport.receive()
            except ConnectionClosed as exc:
                self.last_close = self._idle_close or exc
                return
            self._last_frame = clock()
            try:
                message = decode_server_frame(frame)
            except (InvalidFrame, InvalidMessage) as exc:
                self._log.peer_error(logging.WARNING, "undecodable server frame: %s", exc)
                continue
            self._dispatch(message, len(frame))
            if self._responding >= self.max_responders:
                await self._wait_for_a_responder()
                self._last_frame = clock()

    async def _wait_for_a_responder(self) -> None:
        """Read nothing more until a responder finishes (backpressure, see the module doc)."""
        self._last_frame = math.inf
        while self._responding >= self.max_responders:
            self._responder_done = asyncio.get_running_loop().create_future()
            try:
                await self._responder_done
            finally:
                self._responder_done = None

    def _dispatch(self, message: ServerMessage, size: int) -> None:
        if isinstance(message, PongMessage):
            self.pongs += 1
            return
        if isinstance(message, InitMessage):
            self._channel = message.message.channel
            return
        payload = message.message
        if isinstance(message, CustomServerMessage):
            waiter = self._pending.get(payload.response_for or "")
            if waiter is not None:
                if not waiter.done():
                    error = message.message.error
                    if error is not None:
                        waiter.set_exception(RemoteError(error.code, error.message))
                    else:
                        waiter.set_result(message.message.data)
                return
        if payload.rchan is not None and self._responder is not None:
            if self._closing:  # read after close(): an answer could no longer be sent
                return
            request = Request(
                rchan=payload.rchan,
                payload=payload.model_dump(by_alias=True, exclude={"rchan", "response_for"}),
                custom=isinstance(message, CustomServerMessage),
                typename=message.typename if isinstance(message, DaraServerMessage) else None,
            )
            self._responding += 1
            task = asyncio.ensure_future(self._respond(request))
            self._tasks.add(task)
            task.add_done_callback(self._responder_finished)
            return
        inbox = self._inbox
        if len(inbox) >= self.max_queue or self._inbox_bytes + size > self.max_queue_bytes:
            self._make_room(size)
        inbox.append((message, size))
        self._inbox_bytes += size
        self._wake_inbox()

    def _make_room(self, size: int) -> None:
        """Drop the oldest pushes until one of ``size`` fits within both bounds of the inbox."""
        inbox = self._inbox
        while inbox and (
            len(inbox) >= self.max_queue or self._inbox_bytes + size > self.max_queue_bytes
        ):
            self._inbox_bytes -= inbox.popleft()[1]
            self.dropped += 1
            self._log.peer_error(
                logging.WARNING, "inbox over max_queue=%d or max_queue_bytes=%d: dropped the oldest push",
                self.max_queue, self.max_queue_bytes,
            )

    def _wake_inbox(self) -> None:
        if self._inbox_waiter is not None and not self._inbox_waiter.done():
            self._inbox_waiter.set_result(None)

    async def _respond(self, request: Request) -> None:
        assert self._responder is not None
        try:
            answer = self._responder(request)
            if inspect.isawaitable(answer):
                answer = await answer
            await self.answer(request.rchan, answer)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("responder failed for request %s", request.rchan)

    def _responder_finished(self, task: asyncio.Task[Any]) -> None:
        # A done callback, not a ``finally``: a task cancelled before its first step runs none
        # of its code, and the count would never come down.
        self._tasks.discard(task)
        self._responding -= 1
        done = self._responder_done
        if done is not None and not done.done():
            done.set_result(None)

    async def receive(self, timeout: float | None = None) -> PushedMessage:
        """The next pushed message (not pongs, replies, or requests a responder answers).

        Raises ``TimeoutError`` after ``timeout`` and ``ConnectionClosed`` once the client is
        closed and the inbox is empty.
        """
        async with asyncio.timeout(timeout):
            while not self._inbox:
                if self._runner is None or self._runner.done():
                    raise self.last_close or ConnectionClosed(CloseCode.NORMAL, "client closed")
                self._inbox_waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._inbox_waiter
                finally:
                    self._inbox_waiter = None
        message, size = self._inbox.popleft()
        self._inbox_bytes -= size
        return message

    def received_nowait(self) -> list[PushedMessage]:
        """Take every message already in the inbox."""
        items = [message for message, _ in self._inbox]
        self._inbox.clear()
        self._inbox_bytes = 0
        return items

    # ------------------------------------------------------------------ outbound

    def _require(self) -> Transport:
        if self._transport is None or self._transport.closed or not self._connected.is_set():
            raise self.last_close or ConnectionClosed(CloseCode.NORMAL, "not connected")
        return self._transport

    async def send_raw(self, frame: str | bytes) -> None:
        """Send an arbitrary text frame (``str`` or UTF-8 ``bytes``), for tests of bad input."""
        await self._require().send(frame.encode() if isinstance(frame, str) else frame)

    async def send_custom(self, kind: str, data: Any = None) -> None:
        """Send a fire-and-forget custom message."""
        await self._require().send(
            dumps({"type": "custom", "message": {"kind": kind, "data": data}})
        )

    async def request(self, kind: str, data: Any = None, *, timeout: float | None = 10.0) -> Any:
        """Send a custom request and return the reply's ``data``.

        Raises ``RemoteError`` for an error reply, ``RequestTimeout``, ``ConnectionClosed``.
        """
        transport = self._require()
        rchan = uuid.uuid4().hex
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rchan] = waiter
        try:
            frame = {"type": "custom", "message": {"kind": kind, "data": data, "__rchan": rchan}}
            await transport.send(dumps(frame))
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError:
            raise RequestTimeout(f"no reply to {kind!r} within {timeout} s") from None
        finally:
            self._pending.pop(rchan, None)

    async def answer(self, rchan: str, value: Any) -> None:
        """Answer a server request (a *response* frame), in chunks if ``value`` is ``Chunked``."""
        transport = self._require()
        if not isinstance(value, Chunked):
            await transport.send(dumps(
                {"type": "message", "channel": rchan, "chunk_count": None, "message": value}
            ))
            return
        count = len(value.parts)
        order = list(range(count))
        if value.shuffle:
            random.shuffle(order)
        for i in order:
            frame: dict[str, Any] = {"type": "message", "channel": rchan, "chunk_count": count,
                                     "message": value.parts[i]}
            if value.indexed:
                frame["chunk_index"] = i
            await transport.send(dumps(frame))

    def _fail_pending(self, exc: ConnectionClosed) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(exc)
        self._pending.clear()

    # ------------------------------------------------------------------ closing

    @property
    def channel(self) -> str:
        """The channel id of the current (or last) connection; ``RuntimeError`` before the first."""
        if self._channel is None:
            raise RuntimeError("not connected yet: await connect() first")
        return self._channel

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> str:
        """Wait until connected (after a reconnect) and return the channel id."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()
        return self.channel

    async def wait_closed(self, timeout: float | None = None) -> ConnectionClosed | None:
        """Wait until the client stops (server close without reconnect, or :meth:`close`)."""
        if self._runner is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._runner)
        return self.last_close

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection and stop reconnecting; idempotent."""
        self._closing = True
        if self._transport is not None:
            await self._transport.close(code, reason)
        # Responders can no longer answer; cancelled first, they free a reader held at the cap.
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._runner), 10)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> DaraClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
