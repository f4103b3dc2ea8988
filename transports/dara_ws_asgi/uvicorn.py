"""The uvicorn-specific part of :mod:`dara_ws_asgi`: :func:`serve` (re-exported there) runs an
endpoint under uvicorn; :func:`hook_uvicorn`, which :class:`~dara_ws_asgi.ASGIApp`'s lifespan and
:func:`~dara_ws_asgi.lifespan` call, gives a uvicorn server the shutdown order and the bounds it
lacks."""

from __future__ import annotations

__all__ = ["hook_uvicorn", "serve"]

import asyncio
import contextlib
import functools
import logging
import math
import signal
import socket
import ssl as _ssl
import weakref
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, cast

try:
    import uvicorn
except ImportError as exc:  # the extra is missing: say which one to install
    raise ImportError(
        'dara_ws_asgi needs the uvicorn library: pip install "dara-ws-core[asgi]"', name=exc.name
    ) from exc

from dara_ws_core.endpoint import RETRY_AFTER, Admission, Endpoint, Evict, host_of
from dara_ws_core.logs import RepeatedRecords
from dara_ws_core.tls import CountedTLS
from dara_ws_core.transport import (
    ClientFrameHeaders,
    ReceivingCharge,
    RequestHead,
    Server,
    SharedBufferReads,
    end_after_held,
    feed_held_later,
    held_behind_request,
    hold_behind_request,
    read_behind_request,
)
from dara_ws_core.upgrade import UNPARSABLE, Refusal, check_upgrade_request, connection_upgrades, loose_line_ends

#: Stop reading from a peer while this much is waiting to be written to it.
_PAUSE_READING_ABOVE = 1024 * 1024
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"retry-after: %d\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % RETRY_AFTER
)
#: The most bytes of a request kept to check its line ends under h11 (uvicorn's h11 refuses a
#: head over 16 KiB, its h11_max_incomplete_event_size, itself).
_RAW_HEAD_LIMIT = 64 * 1024
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


#: uvicorn's warnings of each request it cannot parse, and of each upgrade to another protocol
#: than WebSocket (``Upgrade: h2c``), which any peer can repeat at will: rate-limited
#: (:class:`~dara_ws_core.logs.RepeatedRecords` on ``uvicorn.error``).
_INVALID_REQUESTS = ("Invalid HTTP request received.", "Unsupported upgrade request.")


#: The ASGI scope extension naming the endpoints that counted the socket from its accept
#: (:class:`~dara_ws_asgi.ASGIApp` then takes no slot of its own).
COUNTED = "dara_ws.counted"
#: The ASGI scope extension holding the :class:`~dara_ws_core.transport.ReceivingCharge` the
#: socket's messages in progress count in, set by the app before it accepts (its holder is known
#: once the handshake is authenticated).
RECEIVING = "dara_ws.receiving"
#: The key of a ``websocket.receive`` message (its ``text`` then ``None``) holding a text
#: message's UTF-8 bytes, for the app that set :data:`RECEIVING` (ours): it decodes them as it
#: handles the message. Decoded, a text takes 1, 2 or 4 bytes a character (PEP 393), up to 4
#: times its bytes (an ASCII text with one emoji): what waits in uvicorn's queue is its bytes.
TEXT_BYTES = "dara_ws.text_bytes"


class LateText(dict[str, Any]):
    """A ``websocket.receive`` message of a text kept as its UTF-8 bytes (:data:`TEXT_BYTES`),
    which our app decodes as it handles the message. Anyone else who reads the message (an ASGI
    middleware around the app) finds ``text`` as the ASGI spec has it: decoded at its first
    read (``[]``, ``get`` or ``in``), with U+FFFD for bytes that are not UTF-8 (which our app
    then closes with 1007, as uvicorn does)."""

    __slots__ = ()

    def __missing__(self, key: str) -> Any:
        if key != "text":
            raise KeyError(key)
        data = dict.__getitem__(self, TEXT_BYTES)
        try:
            text = self["text"] = str(data, "utf-8")
        except UnicodeDecodeError:  # not kept: our app decodes the bytes, and closes with 1007
            return str(data, "utf-8", "replace")
        return text

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key == "text" else dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        return key == "text" or dict.__contains__(self, key)


class _SocketSlots:
    """One socket's slots, from its accept, in each endpoint hooked on its uvicorn server (each
    endpoint's ``max_connections`` then bounds the server's sockets), until it is gone."""

    __slots__ = ("admissions", "endpoints", "evict", "host")

    def __init__(self, endpoints: list[Endpoint], host: str | None, evict: Evict) -> None:
        self.endpoints = tuple(endpoints)
        self.host, self.evict = host, evict
        self.admissions = [endpoint.take_slot(host, evict) for endpoint in self.endpoints]

    @property
    def admitted(self) -> bool:
        return all(admission is Admission.ADMIT for admission in self.admissions)

    def settle(self) -> None:
        for endpoint in self.endpoints:
            endpoint.settled(self.evict)

    def free(self) -> None:
        for endpoint, admission in zip(self.endpoints, self.admissions, strict=True):
            endpoint.free_slot(admission, self.host, self.evict)


class _CountedWebSocket:
    """What the bounded WebSocket protocol adds: the slots handed over by the HTTP protocol."""

    dara_slots: _SocketSlots | None = None

    def dara_adopt(self, slots: _SocketSlots | None, deadline: float) -> None:
        """Take over the socket from the HTTP protocol: its slots, and its handshake deadline
        (a loop time), held until the socket is gone and the handshake is complete."""
        raise NotImplementedError


class _UpgradeParser:
    """uvicorn's httptools parser, keeping what a read held behind an upgrade request: httptools
    says where the request ended (``HttpParserUpgrade``'s argument, an offset in that read), and
    uvicorn hands the WebSocket protocol the request alone, dropping the rest."""

    __slots__ = ("_parser", "behind")

    def __init__(self, parser: Any) -> None:
        self._parser = parser
        self.behind = b""

    def feed_data(self, data: bytes) -> None:
        from httptools import HttpParserUpgrade  # imported by uvicorn already: its parser's

        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.behind = bytes(data[exc.args[0] :])  # "the offset of the non-HTTP data"
            raise

    def __getattr__(self, name: str) -> Any:  # the rest of the parser's methods, as they are
        return getattr(self._parser, name)


def _bounded_http(base: type[Any], handshake_timeout: float) -> type[Any]:
    """``base``, uvicorn's h11 or httptools protocol (the same shape), with the HTTP bounds of
    :func:`_uvicorn_protocols`."""
    class HTTPProtocol(base, SharedBufferReads):  # type: ignore[misc]
        _handshake_timer: asyncio.TimerHandle | None = None
        #: The slots this socket holds from its accept (see _SocketSlots), or None.
        _dara_slots: _SocketSlots | None = None
        #: Under h11, the bytes of the request being read, from its first (at most
        #: _RAW_HEAD_LIMIT): h11 takes bare LFs and folded lines, which every other parser
        #: answers 400 (upgrade.loose_line_ends). None under httptools, which refuses them.
        _dara_raw: bytearray | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            parser = getattr(self, "parser", None)  # httptools (h11 keeps the bytes itself)
            if parser is not None:
                self.parser = _UpgradeParser(parser)
            else:
                self._dara_raw = bytearray()

        def data_received(self, data: bytes) -> None:
            raw = self._dara_raw
            if raw is not None and len(raw) < _RAW_HEAD_LIMIT:
                raw += data[: _RAW_HEAD_LIMIT - len(raw)]
            super().data_received(data)

        def _dara_loose_head(self) -> bool:
            # Whether the request being upgraded came with line ends or folds only h11 takes.
            raw = self._dara_raw
            if raw is None:
                return False
            ends = [end for end in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if end >= 0]
            return loose_line_ends(bytes(raw[: min(ends) if ends else len(raw)]))

        def _get_upgrade(self) -> bytes | None:
            # uvicorn reads the last Connection header alone: with the upgrade token in an
            # earlier one (Connection: Upgrade, then Connection: keep-alive) the upgrade went to
            # the application as plain HTTP, answered 404. Every one counts, as on every transport.
            upgrade: bytes | None = super()._get_upgrade()
            if upgrade is None and connection_upgrades(
                    value.decode("latin-1") for name, value in self.headers if name == b"connection"):
                upgrades = [value.lower() for name, value in self.headers if name == b"upgrade"]
                return upgrades[-1] if upgrades else None  # uvicorn's: the last one
            return upgrade

        def _behind_request(self) -> bytes:
            # What the read that ended the upgrade request held after it.
            parser = getattr(self, "parser", None)
            if isinstance(parser, _UpgradeParser):
                return parser.behind
            return bytes(self.conn.trailing_data[0])  # h11's buffer: what it has not parsed

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            endpoints = _served.get(self.server_state)
            if endpoints:
                self._dara_slots = slots = _SocketSlots(endpoints, host_of(self.client), self._evict)
                if Admission.DROP in slots.admissions:
                    cast(asyncio.Transport, transport).abort()
                    return
            self._arm_handshake_timer()

        def _evict(self) -> bool:
            # To make room while no request is being served (none yet, or an unfinished head).
            transport, cycle = self.transport, self.cycle
            if (cycle is None or cycle.response_complete) and transport.get_protocol() is self:
                transport.abort()
                return True
            return False

        def on_response_complete(self) -> None:
            # The next request (on a kept-alive connection) gets its own handshake_timeout.
            if not self.transport.is_closing():
                self._arm_handshake_timer()
            super().on_response_complete()
            if self._dara_raw is not None:  # the next request's bytes: what h11 has not parsed
                self._dara_raw = bytearray(self.conn.trailing_data[0][:_RAW_HEAD_LIMIT])

        def connection_lost(self, exc: Exception | None) -> None:
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            slots, self._dara_slots = self._dara_slots, None
            if slots is not None:
                slots.free()
            super().connection_lost(exc)

        def _arm_handshake_timer(self) -> None:
            if self._handshake_timer is not None:
                self._handshake_timer.cancel()
            self._handshake_timer = self.loop.call_later(handshake_timeout, self._handshake_expired)

        def _handshake_expired(self) -> None:
            # Between requests (none yet, or the last one answered: what arrives since is an
            # unfinished head or an unread body) and not upgraded (the WebSocket protocol took
            # over). A request still being served re-arms the timer when its response ends.
            self._handshake_timer = None
            transport, cycle = self.transport, self.cycle
            idle = cycle is None or cycle.response_complete
            if idle and transport.get_protocol() is self and not transport.is_closing():
                transport.close()

        def handle_websocket_upgrade(self, *event: Any) -> None:
            # What every transport refuses, with the same status (a header over websockets'
            # limits too: websockets-sansio, re-parsing the request, would never answer it).
            # uvicorn hands websockets HTTP/1.1 whatever was sent, and authentication comes
            # before websockets' own checks: the version, HEAD... are only seen here.
            scope = self.scope
            refusal = UNPARSABLE if self._dara_loose_head() else check_upgrade_request(
                scope["method"], scope["http_version"],
                [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self.headers],
            )
            self._dara_raw = None
            if refusal is not None:
                self.transport.write(refusal.encode())
                self.transport.close()
                return
            # max_connections(_per_address), counted from the accept: ASGI can refuse only
            # with a 403 (a close before accept), which tells a client its credentials failed;
            # answered here, it is a 503 to retry later.
            slots = self._dara_slots
            if slots is not None:
                slots.settle()
                if not slots.admitted:
                    self.transport.write(_FULL)
                    self.transport.close()
                    return
            super().handle_websocket_upgrade(*event)
            self._hand_over()
            protocol = self.transport.get_protocol()
            if isinstance(protocol, _CountedWebSocket):
                # Frames the client sent without waiting for the answer: uvicorn would drop
                # them (a client's first frames lost, and the stream read from the middle of
                # one). The WebSocket protocol holds them until the connection is open.
                behind = self._behind_request()
                if behind:
                    cast(asyncio.Protocol, protocol).data_received(behind)

        def _hand_over(self) -> None:
            # The WebSocket protocol now owns the socket: it takes its slots, freed when the
            # socket is gone (never before, whatever became of the request), and the rest of
            # its handshake_timeout, which holds until the handshake is complete.
            slots, self._dara_slots = self._dara_slots, None
            timer, self._handshake_timer = self._handshake_timer, None
            if timer is not None:
                timer.cancel()
            protocol = self.transport.get_protocol()
            if isinstance(protocol, _CountedWebSocket):
                deadline = timer.when() if timer is not None else self.loop.time() + handshake_timeout
                protocol.dara_adopt(slots, deadline)
            elif slots is not None:  # a protocol of the caller's: ASGIApp counts the connection itself
                slots.free()

    HTTPProtocol.__name__ = HTTPProtocol.__qualname__ = f"Bounded{base.__name__}"
    return HTTPProtocol


def _uvicorn_protocols(handshake_timeout: float, close_timeout: float = 5.0,
                       ) -> tuple[dict[type[Any], type[Any]], type[Any]]:
    """:func:`_protocols` (the same classes for the same bounds, however the call names them)."""
    return _protocols(float(handshake_timeout), float(close_timeout))


@functools.cache
def _protocols(handshake_timeout: float, close_timeout: float) -> tuple[dict[type[Any], type[Any]], type[Any]]:
    """uvicorn's HTTP protocols (h11, and httptools when installed: uvicorn's default then), as
    a map from each to its bounded version, and its websockets-sansio protocol, with the bounds
    uvicorn lacks (built on first use: the last needs websockets):

    * HTTP: between requests (from connect, then from the end of each response), a connection
      that has not started being served within ``handshake_timeout`` seconds is closed: uvicorn
      has no header timeout, and its keep-alive timer stops at the first byte of the next
      request, so half-open handshakes (a first request or a later one on a kept-alive
      connection, or a body sent on after its response) would hold every slot. A request being
      served is never cut.
    * Upgrade: the WebSocket protocol takes over the socket's slots and what is left of its
      ``handshake_timeout``: a handshake the application has neither accepted nor refused by
      then is dropped, and the slots are freed only once the socket is gone. Before that, the
      request gets :func:`~dara_ws_core.upgrade.check_upgrade_request`'s refusal, as on every
      transport, and is closed. One that websockets' parser refuses all the same is answered
      (400, or the 414 or 431 websockets makes) and closed: uvicorn did neither.
    * WebSocket: no compression is negotiated, whatever ``ws_per_message_deflate`` says: an
      inflated message would hold up to ``ws_max_size`` while ``max_receiving_total_bytes``
      counts its compressed bytes. Reading pauses while the write buffer is over ``_PAUSE_READING_ABOVE``;
      uvicorn answers each ping without flow control, so a peer that floods pings and reads
      nothing would grow the buffer without bound. A connection lost without a close frame
      is reported as 1006 (RFC 6455 7.1.5), as on every other transport; uvicorn says 1005
      once the handshake is complete. A data frame handled is emptied (:func:`_release`), so
      that an idle connection keeps no copy of the last large message it received. A close
      between the fragments of a message (RFC 6455 5.4 lets control frames come there) is
      answered with its code, as on every transport: websockets failed it with 1002.
    * Reads, both protocols': into one buffer for each thread
      (:class:`~dara_ws_core.transport.SharedBufferReads`), not a 256 KiB object each.
    * Logs: uvicorn's warning for each request it cannot parse or upgrade is rate-limited
      (:data:`_INVALID_REQUESTS`, filtered once on ``uvicorn.error``); a text message that is
      not UTF-8 closes the connection with 1007 without uvicorn's ERROR and traceback.
    * Close: when the server closes (a frame it refuses: 1002, 1007, 1009; the application's
      close: 1001, 1008, 1011, 1013...; a ping timeout), uvicorn closed the socket with the
      client's input still arriving (the rest of an oversized frame, its close frame), which
      the kernel answers with a reset: the client saw an unclean close, or, the reset first,
      no close frame at all (1006). Now the close is a lingering one (RFC 6455 7.1.1, as
      websockets does it): the close frame, then the end of our stream, then every byte read
      is discarded until the client ends its own (the socket then closes) or ``close_timeout``
      (it is aborted). Over TLS, which has no half-close, uvicorn's own close is kept.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.frames import Frame, Opcode
    from websockets.server import ServerProtocol

    class _ClosingProtocol(ServerProtocol):
        def recv_frame(self, frame: Frame) -> None:
            if frame.opcode is Opcode.CLOSE:  # between fragments: the message is abandoned
                self.current_size = None
            super().recv_frame(frame)

    RepeatedRecords.install(logging.getLogger("uvicorn.error"), _INVALID_REQUESTS)
    bases: list[type[Any]] = [H11Protocol]
    with contextlib.suppress(ImportError):  # httptools is optional (uvicorn[standard])
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        bases.append(HttpToolsProtocol)
    http = {base: _bounded_http(base, handshake_timeout) for base in bases}

    class WebSocketProtocol(_CountedWebSocket, WebSocketsSansIOProtocol, SharedBufferReads):
        #: The client's frame headers, followed once the connection is open: websockets takes
        #: payload lengths in any form, which RFC 6455 5.2 does not (1002 on every transport).
        dara_frames: ClientFrameHeaders | None = None
        #: Until then, where the request ends, and what the client sent behind it.
        dara_head: RequestHead | None = None
        #: Closes the socket if the handshake is not complete by the HTTP protocol's deadline.
        _dara_deadline: asyncio.TimerHandle | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # No permessage-deflate, whatever uvicorn's ws_per_message_deflate (True unless
            # told): websockets inflates a message as its frames arrive, up to ws_max_size, where
            # the frame headers (so max_receiving_total_bytes) count only its compressed bytes.
            # A 15 KB fragment, never finished, made the server hold 16 MiB. Off, as on every
            # transport: RSV1 is then a protocol error (1002).
            self.conn.available_extensions = []
            if type(self.conn) is ServerProtocol:
                self.conn.__class__ = _ClosingProtocol

        #: Whether the close is a lingering one (see _dara_linger): every read is discarded.
        _dara_lingering = False

        def data_received(self, data: bytes) -> None:
            if self._dara_lingering:  # discarded: nothing parsed, nothing kept
                return
            frames = self.dara_frames
            held = frames is not None and frames.more  # the next share is already on its way
            data = frames.feed_failing(data) if frames is not None else self._dara_before_open(data)
            super().data_received(data)
            if not self.handshake_initiated and self.conn.handshake_exc is not None:
                self._dara_refuse()
            if not self.read_paused and self.transport.get_write_buffer_size() > _PAUSE_READING_ABOVE:
                self.read_paused = True
                self.transport.pause_reading()
            if frames is not None and frames.more and not held:  # frames past a feed's share: the next turn
                feed_held_later(self)

        def eof_received(self) -> bool | None:  # type: ignore[override]  # uvicorn's never keeps the transport
            if self._dara_lingering:  # the client's end after our close: the socket closes, cleanly
                return None
            # The end of stream waits for the frames still held (see end_after_held): the
            # transport would close at once, and they would be lost.
            return True if end_after_held(self) else None

        def _dara_linger(self) -> bool:
            """Close after our close frame (written) as RFC 6455 7.1.1 has it: end our stream,
            then discard the client's input until it ends its own (``eof_received``: the socket
            closes, nothing unread, so no reset) or ``close_timeout`` (aborted), reading on
            whatever paused it. ``False`` where that cannot be (TLS has no half-close, or the
            socket is already closing): the caller closes as uvicorn does."""
            transport = self.transport
            if self._dara_lingering:
                return True
            if transport.is_closing() or not transport.can_write_eof():
                return False
            self._dara_lingering = self.close_sent = True
            frames, self.dara_frames = self.dara_frames, None  # a share still held is dropped too
            if frames is not None:
                frames.release()
            self.frames = []
            if self.close_timer is not None:  # uvicorn's own (10 s, then a close, not an abort)
                self.close_timer.cancel()
            # Kept in uvicorn's slot: the application's end does not close the socket while it
            # is set, and connection_lost cancels it.
            self.close_timer = self.loop.call_later(close_timeout, transport.abort)
            transport.write_eof()
            self.read_paused = False
            transport.resume_reading()
            return True

        def handle_parser_exception(self) -> None:
            # A frame websockets refused (1002, 1007, 1009): its close frame and end of stream
            # are queued (websockets' fail). uvicorn's own, with a lingering close.
            if self.transport.is_closing() or not self.transport.can_write_eof():
                super().handle_parser_exception()
                return
            close = self.conn.close_sent
            assert close is not None
            self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason})
            self.transport.write(b"".join(self.conn.data_to_send()))
            self._dara_linger()

        def keepalive_timeout(self) -> None:
            # No pong in time: uvicorn fails with 1011 and closes; the close lingers here too.
            if self.close_sent or self.transport.is_closing() or not self.transport.can_write_eof():
                super().keepalive_timeout()
                return
            self.pong_timer = None
            self.pending_ping_payload = None
            self.conn.fail(1011, "keepalive ping timeout")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self._dara_linger()

        _dara_close_timer: asyncio.TimerHandle | None = None

        @property  # uvicorn's attribute, as a property
        def close_timer(self) -> asyncio.TimerHandle | None:
            return self._dara_close_timer

        @close_timer.setter
        def close_timer(self, timer: asyncio.TimerHandle | None) -> None:
            # uvicorn arms a timer only right after the application's close frame: it would
            # then parse every frame up to the client's close, and close 10 s later at most.
            # Lingering instead (not a call more for each frame sent, as send() would be).
            self._dara_close_timer = timer
            if timer is not None and not self._dara_lingering:
                self._dara_linger()

        def shutdown(self) -> None:
            # uvicorn's server shutdown closes each connection at once: a close of ours still
            # lingering (1001, sent by the endpoint's shutdown first) would then meet the
            # client's echo with a reset. It goes as every lingering close goes: at the client's
            # end of stream, or aborted at close_timeout (uvicorn waits for its connections).
            if self._dara_lingering and not self.transport.is_closing():
                self.stop_keepalive()
                return
            super().shutdown()

        def dara_ended(self) -> None:
            super().eof_received()
            self.transport.close()

        def dara_resumable(self) -> bool:
            # Once the held frames are handed on (feed_held_later): unless uvicorn paused reading
            # too (a message queued for the application, a full write buffer: it resumes).
            return not self.read_paused

        def _dara_before_open(self, data: bytes) -> bytes:
            # As in dara_ws_websockets: websockets gets the request alone (uvicorn's copy of
            # it); frames sent behind it, before the answer, wait with reading stopped until
            # the application accepts, then are read as if they came after the 101.
            head = self.dara_head
            if head is None:
                self.dara_head = head = RequestHead()
            return hold_behind_request(head, data, self.transport)

        def start_keepalive(self) -> None:
            # Called once, right after uvicorn wrote the 101: the connection is open. What
            # was held is read on the next loop iteration, as a read would come.
            super().start_keepalive()
            self.loop.call_soon(self._dara_opened)

        def _dara_opened(self) -> None:
            held = held_behind_request(self.dara_head, self.transport)
            self.dara_head, self.dara_frames = None, ClientFrameHeaders(self._dara_charge())
            read_behind_request(self, held)

        def _dara_refuse(self) -> None:
            # websockets' parser refused the request uvicorn handed over (one that declares a
            # body, a request line over its limit...): it queued a response (414, 431) or only
            # an EOF (then 400, as picows answers), and uvicorn writes neither nor closes, so the
            # socket would be held, unanswered, past every timeout.
            if self.transport.is_closing():
                return
            self.handshake_complete = self.close_sent = True
            self.transport.write(b"".join(self.conn.data_to_send()) or _BAD_REQUEST)
            self.transport.close()

        def dara_adopt(self, slots: _SocketSlots | None, deadline: float) -> None:
            self.dara_slots = slots
            scope = getattr(self, "scope", None)  # None: the request was refused (see above)
            if slots is not None and scope is not None:  # and ASGIApp takes no slot of its own
                scope.setdefault("extensions", {})[COUNTED] = slots.endpoints
            if not self.handshake_complete and not self.transport.is_closing():
                self._dara_deadline = self.loop.call_at(deadline, self._dara_handshake_expired)

        def dara_refuse_with(self, refusal: Refusal) -> bool:
            """Refuse the upgrade with ``refusal``'s status (404, or 400 for a target that
            names no path; 503 for one the shutdown overtook), as uvicorn refuses one with 403
            (a close before accept); False once too late for an answer. Called by the
            application, not through ``send``: every frame goes through that."""
            if self.disconnected or self.handshake_complete or self.initial_response is not None:
                return False
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
            self.close_sent = self.handshake_complete = True
            response = self.conn.reject(HTTPStatus(refusal.status), refusal.text)
            for name, value in refusal.headers:
                response.headers[name] = value
            self.conn.send_response(response)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
            return True

        def _dara_handshake_expired(self) -> None:
            # The application has not accepted nor refused in time (the endpoint's own bound
            # is half of it): dropped, as websockets and picows drop an unfinished handshake.
            self._dara_deadline = None
            if not self.handshake_complete:
                self.transport.abort()

        def _dara_charge(self) -> ReceivingCharge | None:
            # Set by the app that accepted (dara_ws_asgi.ASGIApp); another app's: not counted.
            charge = (getattr(self, "scope", None) or {}).get("extensions", {}).get(RECEIVING)
            return charge if isinstance(charge, ReceivingCharge) else None

        def connection_lost(self, exc: Exception | None) -> None:
            if self._dara_deadline is not None:
                self._dara_deadline.cancel()
                self._dara_deadline = None
            if self.dara_frames is not None:
                self.dara_frames.release()  # the message in progress is not coming
            slots, self.dara_slots = self.dara_slots, None
            if slots is not None:
                slots.free()
            if self.conn.close_rcvd is None:
                # The application reads the first disconnect queued: this one, unless one came
                # before (our own close, a frame error); uvicorn's own follows, unread. A ping
                # timeout queues none: 1006 too (uvicorn sent 1011, the peer never answered).
                self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
            super().connection_lost(exc)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.read_paused and self.queue.empty():  # uvicorn's own rule for resuming
                self.read_paused = False
                self.transport.resume_reading()

        def handle_text(self, event: Any) -> None:
            super().handle_text(event)
            _release(event)

        def handle_bytes(self, event: Any) -> None:
            super().handle_bytes(event)
            _release(event)

        def handle_cont(self, event: Any) -> None:
            # A fragmented message's fragments go into one buffer: uvicorn keeps an object per
            # fragment (~40 bytes however small, an empty one too), so a peer sending tiny ones
            # would make the server hold many times max_size.
            frames: list[Any] = self.frames
            if len(frames) != 1 or type(frames[0]) is not bytearray:
                frames[:] = [bytearray(b"".join(frames))]
            frames[0] += event.data
            _release(event)
            if event.fin:
                if self.curr_msg_data_type != "text":
                    frames[0] = bytes(frames[0])
                self.send_receive_event_to_app()

        def send_receive_event_to_app(self) -> None:
            if self.curr_msg_data_type != "text" or self.close_sent:
                super().send_receive_event_to_app()
                return
            # A text message is decoded here, once, as uvicorn would: on invalid UTF-8 uvicorn
            # logs an ERROR with a traceback, which any peer could repeat by the connection.
            # The outcome is uvicorn's (1007), without the record, as on every other transport.
            frames, self.frames = self.frames, []
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            headers = self.dara_frames
            if headers is not None and headers.charge is not None:  # ours: decoded when handled
                event: Any = LateText(type="websocket.receive")
                event[TEXT_BYTES] = data
                self.queue.put_nowait(event)
            else:
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    self.conn.send_close(1007)
                    self.handle_parser_exception()
                    return
                self.queue.put_nowait({"type": "websocket.receive", "text": text})
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()

    return http, WebSocketProtocol


#: The largest payload websockets' parser may keep once its frame is handled (see _release).
_HELD_FRAME_LIMIT = 4096


def _release(frame: Any) -> None:
    """Empty the payload of a data frame uvicorn has handled (its bytes are in ``frames``, or
    in the message queued for the application, if still needed). websockets' parser keeps the
    last frame it parsed until the next one arrives: an idle connection would hold a copy of
    the last message it received, up to ``max_message_size``, for as long as it stays idle."""
    if len(frame.data) > _HELD_FRAME_LIMIT:
        frame.data = b""


_hooked: weakref.WeakKeyDictionary[uvicorn.Server, list[Endpoint]] = weakref.WeakKeyDictionary()
#: The same lists by the server's ``ServerState``, which its HTTP protocols hold.
_served: weakref.WeakKeyDictionary[Any, list[Endpoint]] = weakref.WeakKeyDictionary()


def hook_uvicorn(endpoint: Endpoint, server: uvicorn.Server | None = None) -> bool:
    """Make a uvicorn server (by default the one running this process, found through the
    signal handler it installs) shut ``endpoint`` down *before* it closes connections itself
    with 1012, and use the bounded protocols of :func:`_uvicorn_protocols` if it uses uvicorn's
    own (h11 or httptools, and websockets-sansio), and count its TLS sockets from their accept,
    their TLS handshakes bounded by the endpoint's ``handshake_timeout``
    (:func:`_count_tls_sockets`), when called in the loop it will serve in. Returns whether a
    server was found. Call it before the server accepts."""
    if server is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            owner = getattr(signal.getsignal(sig), "__self__", None)
            if isinstance(owner, uvicorn.Server):
                server = owner
                break
        else:
            return False
    endpoints = _hooked.get(server)
    if endpoints is None:
        endpoints = _hooked[server] = _served[server.server_state] = []
        original = server.shutdown

        async def shutdown(sockets: list[socket.socket] | None = None) -> None:
            for listener in server.servers:  # stop accepting first; uvicorn does it again
                listener.close()
            await asyncio.gather(*(e.shutdown() for e in endpoints))
            await original(sockets)

        setattr(server, "shutdown", shutdown)  # noqa: B010 (an instance attribute on purpose)
    if endpoint not in endpoints:
        endpoints.append(endpoint)
    config, (http, ws) = server.config, _uvicorn_protocols(
        endpoint.config.handshake_timeout, endpoint.config.close_timeout)
    if (bounded := http.get(getattr(config, "http_protocol_class", None))) is not None:  # type: ignore[arg-type]
        config.http_protocol_class = bounded
    # uvicorn's websockets-sansio, the second base of the bounded one (its first, the slots
    # mixin, and its last, the reads, are no uvicorn class: compared with either, no server
    # was ever given the bounded protocol).
    if getattr(config, "ws_protocol_class", None) is ws.__bases__[1]:
        config.ws_protocol_class = ws
    context = getattr(config, "ssl", None)  # made by Config.load(), before the lifespan runs
    if isinstance(context, _ssl.SSLContext):
        _TLS_SERVED[context] = endpoints
        with contextlib.suppress(RuntimeError):  # no loop running yet: uvicorn's own ssl= listener
            _count_tls_sockets(asyncio.get_running_loop())
    return True


#: The endpoints hooked on each uvicorn server serving TLS, by its context, read by the loop's
#: ``create_server`` as :func:`_count_tls_sockets` leaves it.
_TLS_SERVED: weakref.WeakKeyDictionary[_ssl.SSLContext, list[Endpoint]] = weakref.WeakKeyDictionary()


def _count_tls_sockets(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop.create_server`` serve the TLS of a context in :data:`_TLS_SERVED` through
    :class:`~dara_ws_core.tls.CountedTLS` (once per loop; other calls are left as they are):
    each socket counted from its accept against the hooked endpoints' ``max_connections``, its
    TLS handshake bounded by their ``handshake_timeout``. uvicorn makes its listeners itself,
    with ``ssl=``, which hands its protocol a socket only once its TLS handshake is done (and
    bounds that by asyncio's 60 s, with no setting for it)."""
    if getattr(loop, "_dara_tls_counted", False):
        return
    create_server = loop.create_server

    async def counted(factory: Any, *args: Any, **kwargs: Any) -> asyncio.Server:
        context = kwargs.get("ssl")
        endpoints = _TLS_SERVED.get(context) if isinstance(context, _ssl.SSLContext) else None
        if endpoints and (tls := CountedTLS.take_from(kwargs, endpoints)) is not None:
            factory = tls.factory(factory)
        return await create_server(factory, *args, **kwargs)

    setattr(loop, "create_server", counted)  # noqa: B010 (an instance attribute on purpose)
    setattr(loop, "_dara_tls_counted", True)  # noqa: B010


class _Uvicorn(uvicorn.Server):
    """Tells when it listens: uvicorn.Server has only a ``started`` flag to poll."""

    ready: asyncio.Event

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextlib.asynccontextmanager
async def serve(
    endpoint: Endpoint, host: str = "127.0.0.1", port: int = 8000, *, reuse_port: bool = False,
    ssl: _ssl.SSLContext | None = None,
) -> AsyncIterator[Server[uvicorn.Server]]:
    """Run ``endpoint`` under uvicorn on ``host:port`` for the ``async with`` block; yields a
    :class:`~dara_ws_core.Server` whose ``native`` is the ``uvicorn.Server``. ``reuse_port``
    binds with ``SO_REUSEPORT``, so that several processes share the port (``--workers``).

    ``ssl``, a server ``ssl.SSLContext``, serves TLS (``wss://``, the ``url`` says so): the same
    argument as on the other transports, where uvicorn's own command line takes files. From
    those files: ``ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)`` then
    ``ctx.load_cert_chain(certfile, keyfile)`` (a password, client certificates, ciphers: the
    context's own methods).

    On exit listening stops, the endpoint shuts down (connections close with 1001), then uvicorn
    stops. Raises
    ``OSError`` if the address cannot be bound, ``RuntimeError`` if uvicorn stops during startup.
    """
    from . import asgi_app  # the package imports this module first

    endpoint.open()  # served again after a shutdown
    config = endpoint.config
    # Bind ourselves so that port 0 works and the real port is known.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # uvicorn listens on the socket given: the option must be set before bind
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    from uvicorn.protocols.http.h11_impl import H11Protocol

    http, ws = _uvicorn_protocols(config.handshake_timeout, config.close_timeout)
    settings = uvicorn.Config(
        asgi_app(endpoint),
        http=http[H11Protocol],
        ws=ws,
        ws_max_size=config.max_message_size,
        ws_ping_interval=config.ping_interval,
        ws_ping_timeout=config.ping_timeout,
        ws_per_message_deflate=False,
        # X-Forwarded-For is the endpoint's to read (ServerConfig.forwarded_allow_ips):
        # uvicorn's own default trusts it from 127.0.0.1, rewriting the client's address.
        proxy_headers=False,
        lifespan="off",
        log_config=None,  # leave the process's logging configuration alone
        log_level="warning",
        timeout_graceful_shutdown=math.ceil(config.shutdown_grace),
    )
    if ssl is not None:
        # uvicorn's Config takes files (ssl_certfile...) and makes its context in load(), which
        # its server runs only on a config not loaded yet: loaded here, the context is ours.
        settings.load()
        settings.ssl = ssl
    server = _Uvicorn(settings)
    server.ready = asyncio.Event()
    hook_uvicorn(endpoint, server)  # SIGTERM: the endpoint shuts down first (1001, not 1012)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    ready = asyncio.create_task(server.ready.wait())
    try:
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not server.ready.is_set():
            await task  # re-raises uvicorn's error, if any
            raise RuntimeError("uvicorn stopped during startup")
        port = sock.getsockname()[1]
        yield Server.build(host, port, endpoint.path, server, secure=ssl is not None)
    finally:
        ready.cancel()
        for listener in server.servers:  # no newcomer while the connections close
            listener.close()
        await endpoint.shutdown()
        server.should_exit = True
        await task
        sock.close()
