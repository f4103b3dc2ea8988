"""The ``websockets`` transport (asyncio API, websockets >= 14): serve an endpoint, or connect.

Thin by design: it only translates between ``websockets`` and the core's ``Transport`` contract.
Authentication runs in ``process_request``, before the upgrade, so a rejection is an HTTP 403 and
nothing is created. Size limit and keepalive come from the endpoint's ``ServerConfig``.

    async with serve(endpoint, "127.0.0.1", 8000) as server:  # a dara_ws_core.Server
        await server.native.serve_forever()  # websockets' own Server
"""

from __future__ import annotations

__all__ = ["Server", "WebsocketsTransport", "connect", "serve"]

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

try:
    import websockets
    from websockets.asyncio.connection import Connection
    from websockets.asyncio.server import Server as WsServer
    from websockets.asyncio.server import ServerConnection
    from websockets.asyncio.server import serve as ws_serve
    from websockets.exceptions import InvalidMessage
    from websockets.frames import Frame, Opcode
    from websockets.http11 import Request, Response
    from websockets.protocol import Side, State
    from websockets.server import ServerProtocol
    from websockets.version import version as websockets_version
except ImportError as exc:  # the extra is missing: say which one to install
    raise ImportError(
        'dara_ws_websockets needs the websockets library: pip install "dara-ws-core[websockets]"', name=exc.name
    ) from exc


if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

    from dara_ws_core.auth import Identity

from dara_ws_core.auth import holder_of
from dara_ws_core.endpoint import UNAVAILABLE, Admission, Endpoint, host_of
from dara_ws_core.exceptions import AuthenticationFailed, CloseCode, ConnectionClosed, EndpointClosed
from dara_ws_core.tls import CountedTLS
from dara_ws_core.transport import (
    ClientFrameHeaders,
    HandshakeRequest,
    ReceivingCharge,
    RequestHead,
    Server,
    SharedBufferReads,
    end_after_held,
    feed_held_later,
    held_behind_request,
    hold_behind_request,
    read_behind_request,
    text_frame_header,
)
from dara_ws_core.upgrade import NOT_FOUND, Refusal, check_target, check_upgrade_request, refusal_of_request_line

#: websockets' ``process_request``: a function or a coroutine function.
ProcessRequest = Callable[[ServerConnection, Request], "Response | Awaitable[Response | None] | None"]

#: The oldest websockets whose connection internals the adapter relies on (the asyncio server's
#: write path changed in 16): an older one would fail every connection with 1011.
MIN_WEBSOCKETS = (16, 0)


def _check_websockets_version(found: str) -> None:
    try:
        major_minor = tuple(int(part) for part in found.split(".")[:2])
    except ValueError:  # a development build: assume it is recent
        return
    if major_minor < MIN_WEBSOCKETS:
        raise ImportError(
            f"dara_ws_websockets needs websockets {MIN_WEBSOCKETS[0]} or later, and {found} is installed: "
            'pip install -U "dara-ws-core[websockets]"', name="websockets")


_check_websockets_version(websockets_version)


def _closed(exc: websockets.ConnectionClosed) -> ConnectionClosed:
    # The peer's close frame says how it ended; without one, the close frame websockets sent for
    # the peer's bad input (1002, 1007, 1009...), as on every transport. Its 1011 goes for a
    # ping left unanswered (or an internal error): the connection was found dead, and no close
    # frame came, so 1006 (RFC 6455 7.1.5), as aiohttp, ASGI and picows record it.
    frame = exc.rcvd or exc.sent
    if frame is None or (exc.rcvd is None and frame.code == CloseCode.INTERNAL_ERROR):
        return ConnectionClosed(CloseCode.ABNORMAL, frame.reason if frame is not None else "connection lost")
    return ConnectionClosed(frame.code, frame.reason)


_WRITE_LIMIT = 32 * 1024  # websockets' default write_limit (high-water mark)
_OPEN, _SERVER = State.OPEN, Side.SERVER
#: The last frame send_nowait wrote and its framing (header and payload): one tuple, replaced
#: at once, so that a fan-out frames its frame once. It keeps that one frame alive until the next.
_framed: tuple[bytes, bytes] = (b"", text_frame_header(0))


#: The websockets releases (major versions) the push hand-over of ``receive_pushed`` is checked
#: against: their frames reach ``Connection.process_event``, and their message assembler keeps a
#: queue of frames. Another release gets every message through ``recv()``: slower, and never
#: stuck on internals that moved (a hand-over nobody feeds would wait forever).
PUSH_RELEASES = frozenset({16, 17})
_PUSHES = int(websockets_version.split(".", 1)[0]) in PUSH_RELEASES


class WebsocketsTransport:
    """A ``websockets`` connection (server or client side) as a core ``Transport``."""

    __slots__ = ("_corked", "_push_left", "_pusher", "_waiter", "_ws")

    def __init__(self, ws: Connection) -> None:
        self._ws = ws
        self._corked = 0  # bytes corked since the last flush (an upper bound: see flush)
        # While receive_pushed() waits with nothing buffered: who takes each message, how many
        # more, and the wait (its result True: the pusher stopped taking messages).
        self._pusher: Callable[[str | bytes], bool] | None = None
        self._push_left = 0
        self._waiter: asyncio.Future[bool] | None = None

    async def send(self, frame: bytes) -> None:
        try:
            await self._ws.send(frame, text=True)  # UTF-8 bytes sent as a text frame, no re-encode
        except websockets.ConnectionClosed as exc:
            raise _closed(exc) from None

    def send_nowait(self, frame: bytes) -> bool:
        # What websockets.broadcast does, plus the write-buffer check it skips: never grow the
        # buffer past the connection's write limit (the caller queues instead).
        global _framed
        ws = self._ws
        protocol = ws.protocol
        if protocol.state is not _OPEN or ws.send_in_progress is not None:
            return False
        transport = ws.transport
        if transport.is_closing() or transport.get_write_buffer_size() > _WRITE_LIMIT:
            return False
        if protocol.side is _SERVER and not protocol.extensions and not protocol.writes:
            # What send_text() and send_data() do, without a Frame per message (see send_corked);
            # nothing of websockets' is pending, so nothing is overtaken. A fan-out writes the
            # same frame to every recipient: framed once (the last frame framed is kept).
            last = _framed
            if last[0] is not frame:
                _framed = last = (frame, text_frame_header(len(frame)) + frame)
            transport.write(last[1])
        else:
            protocol.send_text(frame)
            ws.send_data()
        return True

    def send_corked(self, frame: bytes) -> bool:
        # The frame goes into the protocol's pending output (protocol.writes), which websockets
        # itself writes out on its next send_data(): a send(), a close or a pong sends corked
        # frames first, in order. The write limit counts the corked bytes too.
        ws = self._ws
        protocol = ws.protocol
        if protocol.state is not _OPEN or ws.send_in_progress is not None:
            return False
        transport = ws.transport
        if transport.is_closing() or transport.get_write_buffer_size() + self._corked > _WRITE_LIMIT:
            return False
        if protocol.side is _SERVER and not protocol.extensions:
            # What send_text() appends, without building and serializing a Frame per message
            # (most of a delivery's cost): an unmasked final text frame is a header and the
            # payload. With an extension (compression) or on the client side websockets frames.
            protocol.writes += (text_frame_header(len(frame)), frame)
        else:
            protocol.send_text(frame)
        self._corked += len(frame)
        return True

    def flush(self) -> bool:
        corked, self._corked = self._corked, 0
        ws = self._ws
        if ws.transport.is_closing():  # aborted or lost: what is pending is dropped with it
            return not corked
        writes = ws.protocol.data_to_send()
        if not writes:
            return True
        if all(writes):  # one send() for the whole burst
            ws.transport.write(writes[0] if len(writes) == 1 else b"".join(writes))
        else:  # an end-of-stream marker (after a close): let websockets act on it
            ws.protocol.writes[:0] = writes
            ws.send_data()
        return True

    async def receive(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except websockets.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive_pushed(self, push: Callable[[str | bytes], bool], limit: int) -> str | bytes | None:
        """``receive()``, handing the text messages that arrive while it waits to ``push`` from
        the connection's ``data_received`` (``SupportsPush``): an answer resolves its request
        without waking the receive loop. Only on connections :func:`serve` created, while
        websockets' own message buffer is empty; anything else (a binary or fragmented message,
        invalid UTF-8, the end of the connection) stops the hand-over and goes through
        ``recv()``, which keeps websockets' outcomes and flow control for it."""
        ws = self._ws
        if _PUSHES and type(ws) is _ServerConnection and ws.protocol.state is State.OPEN:
            messages = ws.recv_messages
            # The assembler's queue of frames: without it, no hand-over.
            frames = getattr(messages, "frames", None)
            if frames is not None and not messages.closed and not len(frames):
                self._pusher, self._push_left = push, limit
                self._waiter = waiter = ws.loop.create_future()
                ws.dara_push = self
                try:
                    if await waiter:
                        return None
                finally:
                    ws.dara_push = self._pusher = self._waiter = None
        return await self.receive()

    def _take(self, text: str) -> None:
        # A text message read while receive_pushed() waits: handled now, in order.
        self._push_left -= 1
        if not self._pusher(text) or not self._push_left:  # type: ignore[misc]  # set while pushing
            self._stop(True)

    def _stop(self, stopped: bool) -> None:
        # Called from the connection: the hand-over ends (what follows is buffered by websockets).
        self._ws.dara_push = self._pusher = None  # type: ignore[attr-defined]  # a _ServerConnection
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(stopped)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code, reason)

    def abort(self) -> None:
        self._ws.transport.abort()

    @property
    def closed(self) -> bool:
        return self._ws.state in (State.CLOSING, State.CLOSED)

    @property
    def disconnected(self) -> bool:
        # websockets resolves this future in connection_lost: the TCP connection is gone.
        return self._ws.connection_lost_waiter.done()


#: Stop reading from a peer while this much is waiting to be written to it.
_PAUSE_READING_ABOVE = 1024 * 1024

#: The largest payload the parser may keep once its frame is handled (see _detach_payload).
_HELD_FRAME_LIMIT = 4096

_send_data = ServerConnection.send_data
_CONT = Opcode.CONT


def _detach_payload(frame: Frame) -> Frame:
    """``frame``'s payload in a new ``Frame``, taken out of ``frame``, which keeps an empty one.

    websockets' parser keeps the last frame it parsed in a local variable until the next frame
    arrives: an idle connection would hold a copy of the last message it received, up to
    ``max_message_size``, for as long as it stays idle. The copy goes on to be handled (and is
    freed with it); the frame the parser keeps is left with nothing. Called for frames over
    :data:`_HELD_FRAME_LIMIT` only: below it a new frame costs more than the bytes it frees."""
    data, frame.data = frame.data, b""
    return Frame(frame.opcode, data, frame.fin, frame.rsv1, frame.rsv2, frame.rsv3)


class _ServerProtocol(ServerProtocol):
    """websockets' server protocol, answering a close that comes between the fragments of a
    message (RFC 6455 5.4: control frames may) with its code, as the other transports do: the
    unfinished message is dropped. websockets fails the connection on it with 1002."""

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.CLOSE:
            self.current_size = None  # the message being received, abandoned
        super().recv_frame(frame)


class _ServerConnection(ServerConnection, SharedBufferReads):
    """Stops reading while the write buffer is over ``_PAUSE_READING_ABOVE``: websockets answers
    every ping with a pong written without flow control, so a peer that floods pings and reads
    nothing would grow the buffer without bound. Reading resumes once the buffer drains.

    And hands text messages to the transport waiting in ``receive_pushed`` (``dara_push``), from
    ``data_received``, instead of buffering them for ``recv()`` and waking the receive loop.

    Reads go through one buffer for each thread (:class:`~dara_ws_core.transport.SharedBufferReads`)."""

    # Slots, not attributes in the instance dict: websockets' connection sets 27 attributes,
    # which its connections keep in a dict sharing its keys with every other connection (about
    # 300 bytes each). CPython 3.11 shares at most 29 keys and sizes each dict's values when the
    # connection is built: two keys more, added later, give every connection a dict of its own
    # (1.6 KiB), as much again as everything else the core keeps per idle connection.
    __slots__ = ("_paused_for_writes", "dara_admission", "dara_charge", "dara_endpoint", "dara_frames",
                 "dara_head", "dara_host", "dara_identity", "dara_linger", "dara_message", "dara_push")
    #: What process_request authenticated, set there before the handler runs.
    dara_identity: Identity | None

    def __init__(self, *args: Any, dara_endpoint: Endpoint, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self.protocol) is ServerProtocol:
            self.protocol.__class__ = _ServerProtocol
        self.dara_endpoint = dara_endpoint
        self.dara_identity = None  # the caller's handler's connections keep it
        #: The endpoint's answer for this socket (max_connections), from connection_made on,
        #: and the peer's host it was counted under.
        self.dara_admission: Admission | None = None
        self.dara_host: str | None = None
        if _PUSHES:
            # websockets sets these two in connection_made, later. Each connection built
            # shrinks by one the room the class's shared key table has left (CPython 3.11):
            # with enough handshakes overlapping the first one's, the table was full before they
            # were added, and every connection of the process got a dict of its own. Set here,
            # every key is in the table from the first connection on.
            self.recv_messages = None  # type: ignore[assignment]
            self.transport = None  # type: ignore[assignment]
        self._paused_for_writes = False
        #: The timer that drops the socket at websockets' close deadline (see data_received).
        self.dara_linger: asyncio.TimerHandle | None = None
        #: The transport waiting in receive_pushed() with nothing buffered, else None.
        self.dara_push: WebsocketsTransport | None = None
        #: The client's frame headers, followed once the connection is open (see data_received).
        self.dara_frames: ClientFrameHeaders | None = None
        #: Until then, where its request ends, and what it sent behind it.
        self.dara_head: RequestHead | None = None
        #: The fragmented message being received: its first frame, its payload a bytearray that
        #: the continuations are appended to (see _dara_fragment).
        self.dara_message: Frame | None = None

    def process_event(self, event: Any) -> None:
        if type(event) is Frame:
            if not event.fin or self.dara_message is not None:  # a fragment, or a control between
                event = self._dara_fragment(event)
                if event is None:
                    return
            elif len(event.data) > _HELD_FRAME_LIMIT:
                event = _detach_payload(event)
        target = self.dara_push
        if target is not None and type(event) is Frame:
            opcode = event.opcode
            if opcode is Opcode.TEXT and event.fin:
                try:
                    text = str(event.data, "utf-8")
                except UnicodeDecodeError:  # recv() fails the connection with 1007 for it
                    pass
                else:
                    target._take(text)
                    return
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
                target._stop(False)  # this message and what follows: through recv(), in order
        super().process_event(event)

    def _dara_fragment(self, frame: Frame) -> Frame | None:
        """A frame while a message is fragmented: a fragment is kept in one buffer (``None``:
        nothing to hand on yet), the last one hands on the whole message, a control frame goes
        through. websockets hands each fragment to its message assembler, which keeps an object
        per fragment (some 140 bytes, an empty one too) until the last, up to 4,096 of them: a
        peer sending empty fragments made the server hold half a megabyte a connection, counted
        nowhere, and a message in more fragments failed with 1009 here only. The parser has
        checked the sequence (a continuation follows a first fragment, a new message waits for
        the last) and the message's size (``max_size``)."""
        opcode = frame.opcode
        if opcode is _CONT:
            message = self.dara_message
            assert message is not None  # websockets' parser refuses a continuation out of a message
            cast(bytearray, message.data).extend(frame.data)
            if len(frame.data) > _HELD_FRAME_LIMIT:
                frame.data = b""  # the parser keeps its last frame: not a copy of what is gathered
            if not frame.fin:
                return None
            self.dara_message = None
            return Frame(message.opcode, message.data)
        if frame.fin:  # a control frame between fragments
            return frame
        self.dara_message = Frame(opcode, bytearray(frame.data), fin=False)
        if len(frame.data) > _HELD_FRAME_LIMIT:
            frame.data = b""
        return None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Every socket counts against max_connections from its accept: a handshake in progress
        # holds a descriptor too.
        self.dara_host = host = host_of(transport.get_extra_info("peername"))
        self.dara_admission = admission = self.dara_endpoint.take_slot(host, self.dara_evict)
        super().connection_made(transport)
        if admission is Admission.DROP:
            cast(asyncio.Transport, transport).abort()  # the handshake fails at once, quietly

    def dara_evict(self) -> bool:
        """Close the socket to make room while its request has not all arrived: the key it
        waits under in the endpoint's slots until process_request (a bound method, equal each
        time it is taken, and stored nowhere on the connection: no reference cycle)."""
        self.transport.abort()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.dara_linger is not None:
            self.dara_linger.cancel()
        admission, self.dara_admission = self.dara_admission, None
        if admission is not None:
            self.dara_endpoint.free_slot(admission, self.dara_host, self.dara_evict)
        super().connection_lost(exc)
        if self.dara_frames is not None:
            self.dara_frames.release()  # the message in progress is not coming
        target = self.dara_push
        if target is not None:  # recv() raises the connection's ConnectionClosed
            target._stop(False)

    def data_received(self, data: bytes) -> None:
        # websockets takes payload lengths in any form; RFC 6455 5.2 wants the shortest, and a
        # 64-bit one with its top bit clear: such frames close with 1002, as on every transport.
        frames = self.dara_frames
        held = frames is not None and frames.more  # the next share is already on its way
        data = frames.feed_failing(data) if frames is not None else self._dara_before_open(data)
        super().data_received(data)
        if frames is not None and frames.more and not held:  # frames past a feed's share: the next turn
            feed_held_later(self)
        transport = self.transport
        if not self._paused_for_writes and transport.get_write_buffer_size() > _PAUSE_READING_ABOVE:
            self._paused_for_writes = True
            transport.pause_reading()
        if self.close_deadline is not None and self.dara_linger is None:
            # websockets expects the TCP close (it failed the connection on a frame, or sent a
            # close) and discards what comes, but enforces its deadline only in a send or a
            # close() awaiting it: a client that sent on after websockets failed its connection
            # was discarded for as long as it sent, the socket never let go. It goes at the
            # deadline (close_timeout), as after websockets' own close.
            self.dara_linger = self.loop.call_at(self.close_deadline, transport.abort)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # websockets' never keeps the transport
        # The end of stream waits for the frames still held: websockets would fail the
        # connection on it at once, and drop them (see end_after_held).
        if end_after_held(self):
            return True
        super().eof_received()
        return None

    def dara_ended(self) -> None:
        super().eof_received()
        self.transport.close()

    def dara_resumable(self) -> bool:
        # Once the held frames are handed on (feed_held_later): unless a full write buffer or
        # websockets' full message queue paused reading too (they resume it).
        return not self._paused_for_writes and not self.recv_messages.paused

    def _dara_before_open(self, data: bytes) -> bytes:
        # Before the connection opens, websockets gets the request's head only. It would parse
        # what follows as frames at once, while the handshake is answered: out of the header
        # checks, which start at the first byte of a frame, and failed there with no close frame
        # (no answer at all). Frames a client sent without waiting for the 101 are held, reading
        # stops, and _dara_opened reads them as if they came after it (RFC 6455 allows neither
        # side to send frames before the handshake completes, but clients do).
        head = self.dara_head
        if head is None:
            self.dara_head = head = RequestHead()
        return hold_behind_request(head, data, self.transport)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            if self.protocol.state is _OPEN:
                # After websockets' own check of the outcome and the handler's start, as a read
                # would come: a frame held that fails the connection then closes it with 1002
                # through the handler, as it would after the answer.
                self.loop.call_soon(self._dara_opened)
            else:  # refused, failed or timed out: the socket goes, unread
                self.dara_head = None

    def _dara_opened(self) -> None:
        held = held_behind_request(self.dara_head, self.transport)
        self.dara_head, self.dara_frames = None, self._dara_frame_headers()
        read_behind_request(self, held)

    def send_data(self) -> None:
        # Called once per read (and per send() or control frame): one check, then websockets'.
        if self.protocol.handshake_exc is not None:
            self._dara_answer_refused()
        _send_data(self)

    def _dara_answer_refused(self) -> None:
        # websockets' parser refused the request (one that declares a body, a malformed head,
        # another HTTP version than 1.0 or 1.1) and ends the stream with no answer; the other
        # transports answer what check_upgrade_request says: 505 for another version (read
        # from the request line), else 400. Written once, ahead of the end of stream websockets
        # queued.
        protocol = self.protocol
        if type(protocol.handshake_exc) is InvalidMessage and b"" in protocol.writes:
            head = self.dara_head
            line = head.line.text if head is not None else ""
            self.transport.write(refusal_of_request_line(line).encode())

    def _dara_frame_headers(self) -> ClientFrameHeaders:
        # Messages in progress count against the process's budget, under the holder the chunk
        # shares use (the user; the address of an anonymous peer).
        charge = getattr(self, "dara_charge", None)
        if charge is None:  # no handshake authenticated (a refused one's socket)
            charge = ReceivingCharge(self.dara_endpoint.config.max_receiving_total_bytes,
                                     holder_of(None, self.dara_host))
        return ClientFrameHeaders(charge)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._paused_for_writes:
            self._paused_for_writes = False
            if not self.recv_messages.paused:  # else the message queue is full: it resumes
                self.transport.resume_reading()


def _respond(connection: ServerConnection, refusal: Refusal) -> Response:
    """The HTTP answer of a refused opening request (its status, body and headers)."""
    response = connection.respond(HTTPStatus(refusal.status), refusal.text)
    for name, value in refusal.headers:
        response.headers[name] = value
    return response


@asynccontextmanager
async def serve(
    endpoint: Endpoint,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    process_request: ProcessRequest | None = None,
    handler: Callable[[ServerConnection], Awaitable[None]] | None = None,
    **kwargs: Any,
) -> AsyncIterator[Server[WsServer]]:
    """Serve ``endpoint`` on ``ws://host:port{endpoint.path}``; other paths get 404.

    Yields a :class:`~dara_ws_core.Server` (``port=0`` picks a free port) whose ``native`` is
    websockets' ``Server``. Extra keyword arguments go to ``websockets.asyncio.server.serve``
    (e.g. ``ssl=``). On exit listening stops, then the endpoint shuts down gracefully
    (connections close with 1001). Raises ``OSError`` if the address cannot be bound.

    Your own server's parts, as websockets takes them: ``process_request(connection, request)``
    (a function or a coroutine function) runs first for every request, the endpoint's included;
    a ``Response`` it returns is the answer, ``None`` goes on to the endpoint's checks and
    authentication; anything else is a ``TypeError`` (logged by websockets with the traceback,
    that client answered 500), as is an exception it raises. ``handler(connection)`` serves
    the upgrades to every other path (after websockets' own checks) instead of the 404; a
    target naming no path (a malformed percent-encoding) still gets the endpoint's 400. Raises
    ``TypeError`` for ``create_connection``, which the adapter needs for its own.
    """
    if "create_connection" in kwargs:
        raise TypeError("serve() builds websockets' connections itself (frame checks, flow control, "
                        "max_connections): create_connection cannot be passed")
    config = endpoint.config

    async def answer(connection: ServerConnection, request: Request) -> Response | None:
        endpoint.settled(connection.dara_evict)  # type: ignore[attr-defined]  # its request is whole
        # Before websockets' own checks (after authentication), whose statuses differ. (A
        # websockets before 17 has no method nor protocol: its parser took only GET HTTP/1.1.)
        method, protocol = getattr(request, "method", "GET"), getattr(request, "protocol", "HTTP/1.1")
        # request.path is the target as sent (websockets decodes nothing): the core decides
        # what it names, as on every transport.
        refusal = (check_upgrade_request(method, protocol, request.headers.raw_items())
                   or check_target(request.path, endpoint.path))
        if refusal is not None:
            return _respond(connection, refusal)
        handshake = HandshakeRequest.build(
            request.path, request.headers.raw_items(), connection.remote_address
        )
        if connection.dara_admission is not Admission.ADMIT:  # type: ignore[attr-defined]
            return _respond(connection, UNAVAILABLE)
        try:
            connection.dara_identity = identity = await endpoint.authenticate(handshake)  # type: ignore[attr-defined]
            # In the handshake's context: the client's address as authenticate() found it.
            connection.dara_charge = endpoint.receiving_charge(identity, connection.dara_host)  # type: ignore[attr-defined]
        except EndpointClosed:  # the shutdown overtook it: going away, not refusing the client
            return _respond(connection, UNAVAILABLE)
        except AuthenticationFailed:
            return connection.respond(HTTPStatus.FORBIDDEN, "Forbidden\n")
        return None

    async def first(connection: ServerConnection, request: Request) -> Response | None:
        if process_request is not None:  # the caller's, as websockets calls it
            response = process_request(connection, request)
            if inspect.isawaitable(response):
                response = await response
            if response is not None and not isinstance(response, Response):
                # websockets took it for a Response and failed writing it: the client got no
                # answer it could read, and the log named no mistake. Raised here, websockets
                # logs it ("process_request failed") and answers that client 500.
                raise TypeError(f"process_request returned {type(response).__name__}, not a websockets "
                                "Response or None (build one with connection.respond(status, text); the "
                                "(status, headers, body) tuple of websockets' legacy server is not one)")
            if response is not None:
                endpoint.settled(connection.dara_evict)  # type: ignore[attr-defined]  # its request is whole
                return response
        if handler is not None and check_target(request.path, endpoint.path) is NOT_FOUND:
            # Another path, the caller's handler's: websockets' own checks and answers. (A
            # target naming no path gets the endpoint's 400, as on every adapter.)
            endpoint.settled(connection.dara_evict)  # type: ignore[attr-defined]
            return None
        return await answer(connection, request)

    async def dara_process_request(connection: ServerConnection, request: Request) -> Response | None:
        response = await first(connection, request)
        if connection.protocol.eof_sent:
            # The peer ended its stream (EOF) behind its request: websockets failed the
            # connection on it and half-closed it, so no answer can go out. (Bytes behind the
            # request, such as a second, pipelined request, no longer reach websockets' parser:
            # they wait for the connection to open, see _dara_before_open, and go with it when
            # it does not.) Its handshake would still send one, and a second end of stream
            # trips an assertion logged as an ERROR with a traceback, once per connection at
            # the peer's will. Closed here, the connection gets no answer and no record:
            # websockets sends nothing once connection_lost has run (next loop iteration).
            connection.transport.abort()
            await connection.connection_lost_waiter
        return response

    def dara_handler(connection: ServerConnection) -> Awaitable[None]:
        # A plain function returning serve()'s coroutine: one coroutine frame less per idle
        # connection than an async def awaiting it.
        identity = connection.dara_identity  # type: ignore[attr-defined]
        if identity is None:  # authenticated by no one: the caller's path
            return cast(Callable[[ServerConnection], Awaitable[None]], handler)(connection)
        return endpoint.serve(WebsocketsTransport(connection), identity)

    options: dict[str, Any] = {
        "process_request": dara_process_request,
        "max_size": config.max_message_size,
        "ping_interval": config.ping_interval,
        "ping_timeout": config.ping_timeout,
        "close_timeout": config.close_timeout,
        "open_timeout": config.handshake_timeout,
        "compression": None,
        "create_connection": functools.partial(_ServerConnection, dara_endpoint=endpoint),
    }
    options.update(kwargs)
    # Over TLS, each socket counted from its accept (its TLS handshake bounded by handshake_timeout):
    # websockets listens on plain TCP, and each of its connections comes through the gate.
    if (tls := CountedTLS.take_from(options, (endpoint,))) is not None:
        create = options["create_connection"]
        options["create_connection"] = lambda *args, **kw: tls.gate(functools.partial(create, *args, **kw))
    endpoint.open()
    async with ws_serve(dara_handler, host, port, **options) as server:
        port = int(next(iter(server.sockets)).getsockname()[1])
        try:
            yield Server.build(host, port, endpoint.path, server, secure=tls is not None)
        finally:
            # No newcomer while the connections close: one would get 403 from the endpoint shut
            # down, where a refused connection sends a client on to another process at once.
            server.server.close()
            await endpoint.shutdown()


async def connect(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    max_size: int | None = 16 * 1024 * 1024,
    **kwargs: Any,
) -> WebsocketsTransport:
    """Open a client connection as a core ``Transport`` (for ``DaraClient``).

    Raises ``AuthenticationFailed`` when the server rejects the handshake with 401 or 403 (the
    ``websockets.InvalidStatus`` is its ``__cause__``), like the aiohttp adapter and
    ``MemoryServer``; other refusals raise ``websockets.InvalidStatus``.
    """
    # Imported here: the client side pulls in urllib.request, http.client and email (proxy
    # support), half a MiB that a server process never needs.
    from websockets.asyncio.client import connect as ws_connect

    options: dict[str, Any] = {"max_size": max_size, "compression": None, "ping_interval": None,
                               "create_connection": _client_connection()}
    options.update(kwargs)
    try:
        ws: ClientConnection = await ws_connect(url, additional_headers=headers, **options)
    except websockets.InvalidStatus as exc:
        if exc.response.status_code in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
            raise AuthenticationFailed(f"handshake rejected: HTTP {exc.response.status_code}") from exc
        raise
    return WebsocketsTransport(ws)


@functools.cache
def _client_connection() -> type[ClientConnection]:
    """websockets' client connection, reading into the thread's buffer as the server's does
    (:class:`~dara_ws_core.transport.SharedBufferReads`): asyncio would allocate 256 KiB per read.
    Built at the first :func:`connect`, which imports the client side."""
    from websockets.asyncio.client import ClientConnection as Base

    class _ClientConnection(Base, SharedBufferReads):
        __slots__ = ()

    return _ClientConnection


def port_of(server: Server[WsServer] | WsServer) -> int:
    """The TCP port a server listens on (useful with ``port=0``); ``server.port`` says the same."""
    if isinstance(server, Server):
        return server.port
    return int(next(iter(server.sockets)).getsockname()[1])


__all__ += ["port_of"]
