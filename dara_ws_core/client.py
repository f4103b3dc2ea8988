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

* **One frame**: a server frame of more than ``max_message_values`` (250,000, the server's own
  default) JSON values, counted before it is decoded as the server counts them, or nested too
  deep, is a protocol error of the server: the client closes the connection with 1009 and
  records it in ``last_close``. What one frame costs in memory and loop time is bounded so.
* **Responders**: at most ``max_responders`` (64) server requests are answered at once. The
  client keeps reading at the cap: replies to its own requests, pongs and pushes never wait
  behind responders, so a responder may itself ``request()`` from the server. Further server
  requests wait in a backlog of ``max_backlog`` (1,024) requests and ``max_backlog_bytes``
  (16 MiB, charged as in the inbox), and start as responders finish. Beyond the backlog a request
  is dropped, counted in ``requests_dropped`` and logged at a limited rate: the protocol has no
  error answer on the client's side (section 2), so the server's ``send_and_wait`` times out.
* **Inbox**: pushes not yet taken by :meth:`DaraClient.receive` are kept up to ``max_queue``
  (10,000) messages and ``max_queue_bytes`` (32 MiB). A push is charged its frame text as a
  ``str`` holds it (1, 2 or 4 bytes a character: an ASCII text with one emoji takes 4 times its
  UTF-8) plus 120 bytes per JSON value, what its decoded objects hold at worst, so the byte bound bounds memory
  and not only text. Beyond either bound, the oldest are dropped (counted in ``dropped``, logged
  at a limited rate): a client that only sends requests and never calls ``receive()`` keeps
  working, its replies and pongs unaffected.
* **A dead server**: with ``ping_interval`` set, a connection on which no frame at all arrives
  within ``idle_timeout`` (twice ``ping_interval`` by default: a live server answers each ping)
  is aborted as closed with 1006, and reconnected when ``reconnect`` is set.
* **A server that stops reading**: a send that waits more than ``send_timeout`` (10 s, the
  server's own default) for the connection to take its frame (the library makes a send wait
  once its write buffer is full) means the server reads nothing, even if it keeps sending: the
  connection is aborted as closed with 1006 (counted in ``send_stalls``), the send raises
  :class:`~dara_ws_core.exceptions.ConnectionClosed`, and the client reconnects when
  ``reconnect`` is set. This holds for every frame the client sends (requests, answers to the
  server's requests, custom messages, pings). A request's ``timeout`` counts its send too:
  :class:`~dara_ws_core.exceptions.RequestTimeout` comes when it ends, whether the frame is
  still waiting to go out or the answer has not come (a frame given up so stays in the
  library's buffer, and the connection is kept: the next send that waits too long ends it).
  A reply that arrives after its request timed out or was cancelled is dropped (counted in
  ``late_replies``), not taken for a push: the last 1,024 requests given up on are remembered,
  each for 60 s.
* **Opening**: the connector (the TCP connect and the upgrade handshake) is given at most
  ``open_timeout`` (10 s, as websockets' own default), whatever the connector's library would
  wait, then ``init`` at most ``init_timeout`` (10 s): a server that accepts and never answers
  the upgrade, or never sends ``init``, ends :meth:`DaraClient.connect` (or a reconnection
  attempt) with ``TimeoutError``.
* **Closing**: :meth:`DaraClient.close` gives the closing handshake at most ``close_timeout``
  (5 s, as the server's), whatever state the connection is in (a send stuck on a full socket, a
  server that never answers the close), then aborts the connection; a reconnection in progress
  (a backoff, a connection being opened) is cancelled. The sends still waiting end with it.
* **Reconnecting** (``reconnect=True``): the delay before an attempt doubles from
  ``backoff_initial`` up to ``backoff_max``, with jitter. Attempts count until a connection stays
  up for ``stable_after`` (``backoff_max`` by default), so a server that accepts and closes at
  once is retried ever more slowly and given up after ``max_attempts``. The close code counts too:
  1013 (try again later) waits at least the full backoff, and a code saying the server refused
  this client (1002, 1003, 1007, 1008, 1009, 1010, or 4000-4999, the applications' codes such as
  an authentication failure) waits ``backoff_max``.
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
from sys import getsizeof
from typing import Any

from .codec import _EXACT_ABOVE, count_json_values, decode_server_frame, dumps
from .exceptions import (
    CloseCode,
    ConnectionClosed,
    DaraWSError,
    FrameTooLarge,
    InvalidFrame,
    InvalidMessage,
    RemoteError,
    RequestTimeout,
)
from .logs import ConnectionLogger, _name_of
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
#: What one JSON value is charged in the inbox and the request backlog, in bytes: at worst what
#: its decoded Python objects take (an empty list, a small dict entry), as the server reckons it.
_VALUE_BYTES = 120
#: Close codes by which a server refuses this client rather than going away: a reconnection
#: would meet the same answer, so it waits ``backoff_max`` (see :func:`_reconnect_delay`).
_REFUSALS = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
#: The requests given up on (timed out or cancelled) whose late replies are dropped rather than
#: taken for pushes: at most this many, the oldest forgotten first, each for at most this long.
_GIVEN_UP_MAX = 1024
_GIVEN_UP_AGE = 60.0
#: How much of a server's request id a log record carries.
_LOGGED_ID = 64


def _charge(frame: str | bytes, values: int) -> int:
    """What a decoded server message holds at worst, in bytes: its text and its values' objects
    (``values`` when already counted, else ``0``). Its text as the frame's ``str`` holds it
    (``sys.getsizeof``: exact, in O(1)), at 1, 2 or 4 bytes a character (PEP 393), which bounds
    its strings decoded at their own widths: an ASCII text with one emoji holds 4 times its
    UTF-8. Charged once the frame is decoded, a non-ASCII one with the UTF-8 copy the decoder
    left cached in it (an upper bound, as the values are)."""
    return getsizeof(frame) + _VALUE_BYTES * (values or count_json_values(frame, _EXACT_ABOVE))


def _request(message: CustomServerMessage | DaraServerMessage) -> Request:
    payload = message.message
    assert payload.rchan is not None
    return Request(
        rchan=payload.rchan,
        payload=payload.model_dump(by_alias=True, exclude={"rchan", "response_for"}),
        custom=isinstance(message, CustomServerMessage),
        typename=message.typename if isinstance(message, DaraServerMessage) else None,
    )


def _reraise_cancellation() -> None:
    """In an ``except TimeoutError`` around ``asyncio.timeout``: raise ``CancelledError`` if the
    task is being cancelled. On Python 3.11 a cancellation that comes as the time runs out can
    surface as the ``TimeoutError``, and a close() must not swallow it (see
    ``backplane.node.wait_event``)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it, cancelling again every second (a cancellation can be
    lost on Python 3.11, see ``backplane.node.cancel_task``)."""
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=1.0)
    if not task.cancelled():
        task.exception()  # retrieved: an error of the runner was already logged or reported


def _refuses(code: int | None) -> bool:
    """Whether a close ``code`` says the server refused this client (policy, protocol, an
    application's 4000-4999 code such as failed authentication), not that it went away."""
    return code is not None and (code in _REFUSALS or 4000 <= code <= 4999)


def _reconnect_delay(code: int | None, attempts: int, initial: float, maximum: float,
                    jitter: float) -> float:
    """Seconds to wait before reconnect attempt number ``attempts`` (0 for the first since a
    stable connection), after a connection closed with ``code`` (``None``: an attempt failed).

    The backoff doubles from ``initial`` up to ``maximum``; ``jitter`` (0 to 1) spreads clients.
    A normal loss waits half to all of it; 1013 (try again later) at least all of it, up to half
    more; a refusal (:func:`_refuses`) ``maximum`` and up to half more.
    """
    backoff = min(maximum, initial * 2.0 ** min(attempts, 64))
    if _refuses(code):
        return maximum * (1 + jitter / 2)
    if code == CloseCode.TRY_AGAIN_LATER:
        return backoff * (1 + jitter / 2)
    return backoff * (0.5 + jitter / 2)


@dataclass(frozen=True, slots=True)
class Chunked:
    """Return this from a responder to answer in ``len(parts)`` chunks.

    ``indexed=True`` adds the **[ext]** ``chunk_index``; ``shuffle=True`` sends the indexed parts
    out of order (for testing servers). Raises ``ValueError`` for no parts: the protocol's
    ``chunk_count`` is at least 1, and an answer of no chunk would leave the server waiting
    for its whole timeout.
    """

    parts: Sequence[Any]
    indexed: bool = False
    shuffle: bool = False

    def __post_init__(self) -> None:
        if not len(self.parts):
            raise ValueError("Chunked needs at least one part (answer an empty list unchunked)")


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
    ``max_message_values`` JSON values in one server frame (beyond, the client closes with
    1009), ``max_responders`` server requests answered at once, ``max_backlog`` requests and
    ``max_backlog_bytes`` waiting for a responder (more are dropped, counted in
    ``requests_dropped``), ``max_queue`` pushes and ``max_queue_bytes`` in the inbox (a push
    charged its text and 120 bytes per JSON value; the oldest dropped beyond, counted in
    ``dropped``), and ``idle_timeout``, the silence after which the connection is given up as
    dead (default twice ``ping_interval``; ``None`` without pings). ``open_timeout`` is how long
    the connector may take to open a connection, and ``init_timeout`` how long the server may
    then take to send ``init``. ``send_timeout`` is how long
    one frame may wait for the server to take it before the connection is aborted as dead
    (``None``: no bound, then only a request's ``timeout`` ends its wait), and
    ``close_timeout`` how long :meth:`close` waits for the closing handshake before it aborts
    the connection. With ``reconnect``,
    ``max_attempts`` counts the attempts since the last connection that stayed up
    ``stable_after`` seconds (default ``backoff_max``). Raises ``ValueError`` for a bound under
    1, an ``open_timeout``, ``send_timeout`` or ``close_timeout`` not above 0, or an ``idle_timeout`` not longer
    than ``ping_interval``; ``TypeError`` for a ``connector`` that is not callable (a URL
    string among them: pass ``lambda: connect(url)``).
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
        max_backlog: int = 1024,
        max_backlog_bytes: int = 16 * 1024 * 1024,
        max_message_values: int = 250_000,
        idle_timeout: float | None = None,
        init_timeout: float = 10.0,
        open_timeout: float = 10.0,
        stable_after: float | None = None,
        send_timeout: float | None = 10.0,
        close_timeout: float = 5.0,
    ) -> None:
        if isinstance(connector, str):
            raise TypeError(
                "DaraClient takes a connector, a callable returning a connected transport, not a "
                f"URL: DaraClient(lambda: connect({connector!r})) with connect from "
                "dara_ws_websockets (or dara_ws_aiohttp)")
        if not callable(connector):
            raise TypeError(f"DaraClient's connector must be a callable, not {type(connector).__name__}")
        if min(max_responders, max_queue, max_queue_bytes, max_backlog, max_backlog_bytes,
               max_message_values) < 1:
            raise ValueError("max_responders, max_queue, max_queue_bytes, max_backlog, "
                             "max_backlog_bytes and max_message_values must be at least 1")
        if not (close_timeout > 0 and open_timeout > 0) or (send_timeout is not None and not send_timeout > 0):
            raise ValueError("open_timeout, send_timeout and close_timeout must be above 0")
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
        #: Seconds one frame may wait for the server to take it (``None``: no bound); past it,
        #: the server is taken to read nothing and the connection is aborted.
        self.send_timeout = send_timeout
        #: Seconds :meth:`close` waits for the closing handshake before aborting the connection.
        self.close_timeout = close_timeout
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self.max_responders = max_responders
        self.max_backlog = max_backlog
        self.max_backlog_bytes = max_backlog_bytes
        self.max_message_values = max_message_values
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_attempts = max_attempts
        #: A connection up this long (seconds) ends a run of failed attempts: the backoff and the
        #: attempt count start over.
        self.stable_after = backoff_max if stable_after is None else stable_after
        # Reconnect attempts since the last stable connection (see _run).
        self._attempts = 0
        self.init_timeout = init_timeout
        #: Seconds the connector may take to return a connection (the connect and the upgrade),
        #: whatever its library's own bound: past it, the attempt ends with ``TimeoutError``.
        self.open_timeout = open_timeout
        self._channel: str | None = None
        self._transport: Transport | None = None
        self._responder: Responder | None = None
        self._inbox: deque[tuple[PushedMessage, int]] = deque()
        self._inbox_bytes = 0
        self._inbox_waiter: asyncio.Future[None] | None = None
        self._responding = 0
        # Server requests waiting for a responder, with what each is charged (as in the inbox).
        self._backlog: deque[tuple[Request, int]] = deque()
        self._backlog_bytes = 0
        # When the last frame arrived (time.monotonic: a C call, cheaper per frame than the
        # loop's clock); +inf before the first read.
        self._last_frame = math.inf
        # The sends waiting for the server to take their frame, in the order they started: when
        # each started (time.monotonic), or the close that ended the wait (see _watch_sends).
        self._sending: dict[int, float | ConnectionClosed] = {}
        self._sends = 0
        # Why the client gave up the current connection (no frame for idle_timeout, a send stuck
        # past send_timeout) before aborting it: what last_close records instead of the abort.
        self._given_up: ConnectionClosed | None = None
        self._log = ConnectionLogger(logger, {})
        self._pending: dict[str, asyncio.Future[Any]] = {}
        # Requests given up on, by rchan: when (time.monotonic), oldest first (see _drop_late_reply).
        self._gave_up: dict[str, float] = {}
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
        #: Connections given up because a frame waited more than ``send_timeout`` to be taken.
        self.send_stalls = 0
        #: Server requests dropped because the responders and their backlog were full.
        self.requests_dropped = 0
        #: Replies dropped because they came after their request had timed out or was cancelled.
        self.late_replies = 0

    # ------------------------------------------------------------------ setup

    def on_request(self, responder: Responder) -> None:
        """Answer server requests (``send_and_wait``) with ``responder(request)``: its return value
        (awaited if a coroutine) is the answer; return :class:`Chunked` to answer in parts.

        A responder that raises is logged (``dara_ws_core.client``, ERROR) and sends nothing: the
        protocol has no error answer from a client, so the server's ``send_and_wait`` raises
        ``RequestTimeout`` when its timeout passes. Without a responder, server requests wait in
        the inbox like pushes (:meth:`receive`), to be answered with :meth:`answer`."""
        self._responder = responder

    async def connect(self) -> str:
        """Connect, wait for ``init`` and return the channel id. Raises what the connector raises
        (e.g. a 403 rejection), ``ConnectionClosed`` if the server closes before ``init``, and
        ``TimeoutError`` past ``open_timeout`` (the connector) or ``init_timeout``."""
        self._closing = False
        self._attempts = 0
        await self._open()
        self._runner = asyncio.get_running_loop().create_task(self._run())
        return self.channel

    async def _open(self) -> None:
        # The connector's library may wait far longer (aiohttp: 300 s) on a server that accepts
        # and never answers the upgrade; cancelled, a connector closes what it opened.
        async with asyncio.timeout(self.open_timeout):
            transport = await self._connector()
        try:
            async with asyncio.timeout(self.init_timeout):
                while True:
                    message, _ = self._decode(await transport.receive())
                    if isinstance(message, InitMessage):
                        break
        except FrameTooLarge as exc:  # before init too, a frame costing too much is refused
            await self._shut(transport, exc.close_code or CloseCode.PROTOCOL_ERROR, str(exc))
            raise
        except BaseException:
            await self._shut(transport)
            raise
        self._transport = transport
        self._channel = message.message.channel
        self.connections += 1
        self._connected.set()

    async def _run(self) -> None:
        try:
            await self._serve()
        finally:  # ended, or cancelled by close() between two connections
            self._wake_inbox()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            transport = self._transport
            assert transport is not None
            opened = loop.time()
            keepalive = []
            if self.ping_interval:
                keepalive.append(loop.create_task(self._ping(transport)))
            if self.idle_timeout is not None:
                keepalive.append(loop.create_task(self._watch(transport, self.idle_timeout)))
            if self.send_timeout is not None:
                keepalive.append(loop.create_task(self._watch_sends(transport, self.send_timeout)))
            try:
                await self._read(transport)
            finally:
                for task in keepalive:
                    task.cancel()
                # Read to its end: nothing of it may linger (a library that closes its socket
                # gracefully keeps output a server that reads nothing never takes, and the sends
                # waiting behind it). Unless close() is closing it: a library may end this read
                # before it writes the close frame (aiohttp), and close() aborts it after.
                if not self._closing:
                    transport.abort()
                self._connected.clear()
                self._fail_pending(self.last_close or ConnectionClosed())
                self._clear_backlog()  # requests of a channel that is gone: none can be answered
            if loop.time() - opened >= self.stable_after:
                self._attempts = 0  # a run of failures ends only with a connection that lasted
            code = self.last_close.code if self.last_close is not None else None
            if self._closing or not self.reconnect or not await self._reconnect(code):
                return

    async def _reconnect(self, code: int | None) -> bool:
        """Reconnect after a connection closed with ``code``; ``False`` once ``max_attempts``
        attempts since the last stable connection failed or ended early (see the module doc)."""
        while not self._closing:
            if self.max_attempts is not None and self._attempts >= self.max_attempts:
                logger.warning("giving up reconnecting: %d attempts since the last connection "
                               "that stayed up %g s", self._attempts, self.stable_after)
                return False
            await asyncio.sleep(_reconnect_delay(
                code, self._attempts, self.backoff_initial, self.backoff_max, random.random()))
            self._attempts += 1
            try:
                await self._open()
                return True
            except (OSError, DaraWSError, TimeoutError) as exc:
                logger.info("reconnect attempt %d failed: %s", self._attempts, exc)
            except Exception as exc:  # connector-specific errors (e.g. handshake status)
                logger.info("reconnect attempt %d failed: %r", self._attempts, exc)
            code = None
        return False

    async def _ping(self, transport: Transport) -> None:
        assert self.ping_interval is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.ping_interval)
                await self._send(transport, _PING)

    async def _watch(self, transport: Transport, idle_timeout: float) -> None:
        """Abort the connection once no frame has come for ``idle_timeout`` while reading.

        A separate task, not a timeout on each ``receive()``: it costs the read loop one clock
        reading per frame, and it fires even when a send (a ping to a server that reads nothing)
        is stuck.
        """
        while True:
            late = time.monotonic() - self._last_frame  # -inf before the first read
            if late >= idle_timeout:
                break
            await asyncio.sleep(idle_timeout - late if late > -math.inf else idle_timeout)
        self.idle_closes += 1
        self._give_up(transport, f"no frame from the server for {idle_timeout:g} s")

    async def _watch_sends(self, transport: Transport, send_timeout: float) -> None:
        """Abort the connection once a frame has waited ``send_timeout`` for the server to take
        it: the server reads nothing, even if it keeps sending (the idle watchdog sees frames).

        A separate task, as :meth:`_watch`: a send costs a clock reading and a dict entry, not a
        timer of its own. The sends waiting then fail with the connection's close.
        """
        sending = self._sending
        while True:
            oldest = next(iter(sending.values()), None)  # in order: the first started first
            waited = time.monotonic() - oldest if isinstance(oldest, float) else 0.0
            if waited >= send_timeout:
                break
            await asyncio.sleep(send_timeout - waited)
        self.send_stalls += 1
        lost = self._give_up(transport, f"the server took no frame for {send_timeout:g} s "
                                        "(send_timeout)")
        for key in sending:
            sending[key] = lost

    def _give_up(self, transport: Transport, why: str) -> ConnectionClosed:
        """Abort a connection that looks dead, recording ``why`` as its close (1006) when it is
        the current one; returns that close."""
        lost = ConnectionClosed(CloseCode.ABNORMAL, why)
        if transport is self._transport and self._given_up is None:
            self._given_up = lost
        logger.warning("closing a connection that looks dead: %s", why)
        transport.abort()
        return lost

    # ------------------------------------------------------------------ inbound

    def _decode(self, frame: str | bytes) -> tuple[ServerMessage, int]:
        """Decode a server frame, with the JSON values counted when they could exceed the bound
        (``0`` otherwise). Raises ``FrameTooLarge`` before decoding a frame over
        ``max_message_values``, and what :func:`decode_server_frame` raises."""
        max_values = self.max_message_values
        values = count_json_values(frame, max_values) if len(frame) > max_values else 0
        if values > max_values:
            raise FrameTooLarge(f"a server frame of more than {max_values} JSON values")
        return decode_server_frame(frame), values

    async def _read(self, transport: Transport) -> None:
        clock = time.monotonic
        max_values = self.max_message_values
        self._given_up = None
        self._last_frame = clock()  # before the watcher's first look: it starts after this
        while True:
            try:
                frame = await transport.receive()
            except ConnectionClosed as exc:
                self.last_close = self._given_up or exc
                return
            self._last_frame = clock()
            # As _decode, inline: a method call less per frame on the round trip's path.
            values = count_json_values(frame, max_values) if len(frame) > max_values else 0
            try:
                if values > max_values:
                    raise FrameTooLarge(f"a server frame of more than {max_values} JSON values")
                message = decode_server_frame(frame)
            except FrameTooLarge as exc:  # values, nesting, digits: what decoding would cost
                await self._close_on(transport, exc)
                return
            except (InvalidFrame, InvalidMessage) as exc:
                self._log.peer_error(logging.WARNING, "undecodable server frame: %s", exc)
                continue
            self._dispatch(message, frame, values)

    async def _close_on(self, transport: Transport, exc: FrameTooLarge) -> None:
        """Close the connection on a server's protocol error, as the server closes a client's."""
        code = exc.close_code or CloseCode.PROTOCOL_ERROR
        self.last_close = ConnectionClosed(code, str(exc))
        logger.warning("closing the connection with %d: %s", code, exc)
        await self._shut(transport, code, str(exc))

    def _dispatch(self, message: ServerMessage, frame: str | bytes, values: int) -> None:
        if isinstance(message, PongMessage):
            self.pongs += 1
            return
        if isinstance(message, InitMessage):
            self._channel = message.message.channel
            return
        payload = message.message
        if isinstance(message, CustomServerMessage) and payload.response_for is not None:
            waiter = self._pending.get(payload.response_for)
            if waiter is not None:
                if not waiter.done():
                    error = message.message.error
                    if error is not None:
                        waiter.set_exception(RemoteError(error.code, error.message))
                    else:
                        waiter.set_result(message.message.data)
                return
            gave_up_at = self._gave_up.pop(payload.response_for, None)
            if gave_up_at is not None and time.monotonic() - gave_up_at < _GIVEN_UP_AGE:
                self.late_replies += 1  # the caller had its RequestTimeout: not a push
                return
        if payload.rchan is not None and self._responder is not None:
            if self._closing:  # read after close(): an answer could no longer be sent
                return
            if self._responding < self.max_responders:
                self._start(_request(message))
                return
            size = _charge(frame, values)
            if (len(self._backlog) >= self.max_backlog
                    or self._backlog_bytes + size > self.max_backlog_bytes):
                self.requests_dropped += 1
                self._log.peer_error(
                    logging.WARNING, "server request dropped: %d running (max_responders) and the "
                    "backlog full (max_backlog=%d, max_backlog_bytes=%d)",
                    self._responding, self.max_backlog, self.max_backlog_bytes,
                )
                return
            self._backlog.append((_request(message), size))
            self._backlog_bytes += size
            return
        size = _charge(frame, values)
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

    def _start(self, request: Request) -> None:
        self._responding += 1
        task = asyncio.ensure_future(self._respond(request))
        self._tasks.add(task)
        task.add_done_callback(self._responder_finished)

    def _clear_backlog(self) -> None:
        self._backlog.clear()
        self._backlog_bytes = 0

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
        except Exception as exc:
            # The server chooses what a responder fails on, as often as it likes, and the id
            # (any text as long as a frame, newlines included): within the budget of
            # application failures (the first of each kind always written), its id cut and
            # escaped, so that a server can neither flood the log nor forge lines in it.
            self._log.app_error(logging.ERROR, "responder %s failed for request %r",
                                ("responder", type(exc).__name__), _name_of(self._responder),
                                request.rchan[:_LOGGED_ID], exc_info=True)

    def _responder_finished(self, task: asyncio.Task[Any]) -> None:
        # A done callback, not a ``finally``: a task cancelled before its first step runs none
        # of its code, and the count would never come down.
        self._tasks.discard(task)
        self._responding -= 1
        if self._backlog and not self._closing:
            request, size = self._backlog.popleft()
            self._backlog_bytes -= size
            self._start(request)

    async def receive(self, timeout: float | None = None) -> PushedMessage:
        """The next pushed message: not pongs, not requests a responder answers, not replies to
        :meth:`request` (nor late replies to one that timed out or was cancelled: dropped and
        counted in ``late_replies``). Any other reply comes out here, as a push: to a request
        sent with :meth:`send_raw`, or one the server sends twice or for an id never sent.

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
            if not self.connections:  # a mistake, not a connection lost: say which
                raise RuntimeError("not connected yet: await connect() first, or use "
                                   "`async with DaraClient(...)`")
            raise self.last_close or ConnectionClosed(CloseCode.NORMAL, "not connected")
        return self._transport

    async def _send(self, transport: Transport, frame: bytes) -> None:
        """Send ``frame``, noted in ``_sending`` while it waits: past ``send_timeout``, the
        watchdog (:meth:`_watch_sends`) aborts the connection, and the send raises its
        ``ConnectionClosed`` (1006), whatever the library reports (websockets returns)."""
        sending = self._sending
        key = self._sends = self._sends + 1
        sending[key] = time.monotonic()
        try:
            await transport.send(frame)
        except ConnectionClosed as exc:
            given_up = sending.pop(key)
            raise given_up if isinstance(given_up, ConnectionClosed) else exc from None
        except BaseException:
            del sending[key]
            raise
        given_up = sending.pop(key)
        if isinstance(given_up, ConnectionClosed):
            raise given_up

    async def send_raw(self, frame: str | bytes) -> None:
        """Send an arbitrary text frame (``str`` or UTF-8 ``bytes``), for tests of bad input.

        Raises ``ConnectionClosed`` as :meth:`send_custom` does."""
        await self._send(self._require(), frame.encode() if isinstance(frame, str) else frame)

    async def send_custom(self, kind: str, data: Any = None) -> None:
        """Send a fire-and-forget custom message.

        Raises ``RuntimeError`` before the first connection (call :meth:`connect`),
        ``ConnectionClosed`` when no longer connected, or when the server has not taken the
        frame within ``send_timeout`` (the connection is then aborted, see the module doc)."""
        await self._send(
            self._require(), dumps({"type": "custom", "message": {"kind": kind, "data": data}})
        )

    async def request(self, kind: str, data: Any = None, *, timeout: float | None = 10.0) -> Any:
        """Send a custom request and return the reply's ``data``.

        ``timeout`` counts from the call: the send of the request (which may wait for a server
        that reads slowly) and the wait for its answer. Raises ``RemoteError`` for an error
        reply, ``RequestTimeout`` when ``timeout`` ends first, ``RuntimeError`` before the first
        connection, ``ConnectionClosed`` when the connection is lost, including when the
        request's frame waited ``send_timeout`` (if shorter than ``timeout``) for the server to
        take it.
        """
        transport = self._require()
        rchan = uuid.uuid4().hex
        # Encoded first: data JSON cannot carry raises here, before a waiter is registered.
        frame = dumps({"type": "custom", "message": {"kind": kind, "data": data, "__rchan": rchan}})
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rchan] = waiter
        try:
            async with asyncio.timeout(timeout):
                await self._send(transport, frame)
                return await waiter
        except TimeoutError:
            _reraise_cancellation()
            raise RequestTimeout(f"no reply to {kind!r} within {timeout} s") from None
        finally:
            self._pending.pop(rchan, None)
            # Timed out or cancelled (the awaited waiter is cancelled with the task, or never
            # awaited if the send was): its reply may still come.
            if waiter.cancelled() or not waiter.done():
                self._drop_late_reply(rchan)

    def _drop_late_reply(self, rchan: str) -> None:
        """Remember ``rchan`` so that a late reply to it is dropped, within the table's bounds:
        ``_GIVEN_UP_MAX`` entries, each at most ``_GIVEN_UP_AGE`` seconds."""
        gave_up = self._gave_up
        now = time.monotonic()
        while gave_up:  # oldest first: forget the expired, and one to make room at the bound
            oldest, at = next(iter(gave_up.items()))
            if now - at < _GIVEN_UP_AGE and len(gave_up) < _GIVEN_UP_MAX:
                break
            del gave_up[oldest]
        gave_up[rchan] = now

    async def answer(self, rchan: str, value: Any) -> None:
        """Answer a server request (a *response* frame), in chunks if ``value`` is ``Chunked``.

        Each frame waits at most ``send_timeout`` for the server to take it (then
        ``ConnectionClosed``, as :meth:`send_custom`)."""
        transport = self._require()
        if not isinstance(value, Chunked):
            await self._send(transport, dumps(
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
            await self._send(transport, dumps(frame))

    def _fail_pending(self, exc: ConnectionClosed) -> None:
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(exc)
        self._pending.clear()

    # ------------------------------------------------------------------ closing

    def __repr__(self) -> str:
        # Never the connector (a URL with a token in it, headers with a cookie): the state.
        channel = "" if self._channel is None else f" channel={self._channel}"
        if self._connected.is_set():
            state = "connected"
        elif self._closing or (self._runner is not None and self._runner.done()):
            close = self.last_close
            state = "closed" if close is None or close.code is None else f"closed ({close.code})"
        elif self._runner is not None:
            state = "reconnecting"
        else:
            state = "not connected"
        return f"<DaraClient{channel} {state}>"

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

    async def _shut(self, transport: Transport, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close ``transport`` with ``code`` within ``close_timeout``, then abort it: past that
        time (a send stuck on a full socket, a server that never answers the close), and after
        a close too, since a library may end one by closing its socket gracefully with output
        still waiting (aiohttp), which a server that reads nothing would hold forever."""
        try:
            async with asyncio.timeout(self.close_timeout):
                await transport.close(code, reason)
        except TimeoutError:
            logger.warning("the closing handshake took more than %g s (close_timeout): "
                           "connection aborted", self.close_timeout)
            _reraise_cancellation()
        except ConnectionClosed:
            pass
        finally:  # also when cleaning up after a cancellation
            transport.abort()

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection and stop reconnecting; idempotent.

        Takes at most about twice ``close_timeout``: the closing handshake is given
        ``close_timeout``, then the connection is aborted; a reconnection in progress (a backoff,
        a connection being opened) is cancelled."""
        self._closing = True
        self._clear_backlog()
        runner = self._runner
        if runner is not None and not self._connected.is_set():
            runner.cancel()  # between two connections: no transport of its own to close
        if self._transport is not None:
            await self._shut(self._transport, code, reason)
        # Responders can no longer answer.
        for task in list(self._tasks):
            task.cancel()
        if runner is not None:
            # The connection is closed or aborted: its read ends at once (a reconnection that
            # was cancelled closes what it opened, within close_timeout).
            await asyncio.wait((runner,), timeout=self.close_timeout)
            await _cancel(runner)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> DaraClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
