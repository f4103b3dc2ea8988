"""Refuse the client frames that aiohttp's server accepts against RFC 6455 section 5.2, and
echo the close code of a peer's close, as the other transports do.

aiohttp's frame reader (the C one by default) reads the mask bit but never checks it, does not
expose it, and takes payload lengths in any of their forms: an unmasked frame, a length not in
its shortest form, and a 64-bit length with its top bit set (which it answered 1009, as too
big) must close with 1002 (section 5.1: "a server MUST close the connection upon receiving a
frame that is not masked"). :class:`MaskedFramesOnly` wraps that reader: it follows the frame
headers of the byte stream (:class:`~dara_ws_core.transport.ClientFrameHeaders`) and feeds the
reader everything before the first refused frame, then fails the connection the way the reader
fails it on its own protocol errors, so aiohttp closes with 1002 and acts on nothing after it.

aiohttp answers a peer's close with 1000 whatever its code; RFC 6455 section 5.5.1 has the
endpoint "typically echo" the code it received, which the other libraries do:
:class:`MaskedOnlyResponse` does too, and fails with 1002 a close whose code no close frame may
carry (section 7.4), which aiohttp's reader lets through in part. A close without a code is
answered with 1000, as picows answers it (websockets and uvicorn answer with no code: a
browser reports 1005 then, and the stock client has stopped listening by that time).

When the server closes (a frame refused: 1002, 1009; the core's close: 1001, 1007, 1008,
1011, 1013...), aiohttp closed the socket right after its close frame (or after parsing every
frame up to the client's close), with the client's input still arriving: the kernel answers
that with a reset, which a browser reports as an unclean close, and which on a real network can
overtake the close frame (1006). :class:`MaskedOnlyResponse` closes as RFC 6455 7.1.1 has it,
as websockets does: the close frame, our end of stream, then the client's input is discarded
(nothing parsed or kept) until it ends its own, for at most ``close_timeout``
(:meth:`MaskedOnlyResponse.dara_lingered`). Over TLS, which has no half-close, aiohttp's own.
"""

from __future__ import annotations

__all__ = ["ENDED_BEHIND_REQUEST", "LINGERING", "CorkedFirst", "MaskedFramesOnly", "MaskedOnlyResponse", "lingered"]

import asyncio
from typing import Any, Protocol

from aiohttp import WebSocketError, WSCloseCode, web
from aiohttp.http_websocket import WebSocketWriter

from dara_ws_core.transport import (
    ClientFrameHeaders,
    ReceivingCharge,
    end_after_held,
    feed_held_later,
    sendable_close_code,
)

#: aiohttp's protocols (``RequestHandler``) whose peer ended its stream behind an upgrade request
#: being answered: the reader gets that end once it has what came with the request.
ENDED_BEHIND_REQUEST: set[Any] = set()
#: aiohttp's protocols whose close lingers (:meth:`MaskedOnlyResponse.dara_lingered`), each with
#: what is done once the socket is gone and the timer that aborts it at ``close_timeout``: their
#: ``eof_received`` lets the transport close, their ``connection_lost`` calls :func:`lingered`.
LINGERING: dict[Any, tuple[asyncio.Future[None], asyncio.TimerHandle]] = {}


def lingered(handler: Any) -> None:
    """``handler``'s socket is gone: its lingering close (if any) is over."""
    entry = LINGERING.pop(handler, None)
    if entry is not None:
        done, timer = entry
        timer.cancel()
        if not done.done():
            done.set_result(None)


def _expired(handler: Any, transport: Any) -> None:
    # close_timeout passed: the socket goes (a no-op if gone already), and the wait ends even
    # under a protocol class whose connection_lost does not call lingered.
    transport.abort()
    lingered(handler)


class MaskedFramesOnly:
    """A ``WebSocketReader`` that refuses the frames :class:`ClientFrameHeaders` refuses;
    ``queue`` is the reader's queue. The frames past a feed's share are handed on a share a turn
    of the loop (:func:`~dara_ws_core.transport.feed_held_later`: it is the connection there)."""

    __slots__ = ("_handler", "_headers", "_queue", "_reader", "peer_ended")

    def __init__(self, reader: Any, queue: Any, charge: ReceivingCharge | None = None, handler: Any = None) -> None:
        self._reader = reader
        self._queue = queue
        self._headers = ClientFrameHeaders(charge)  # messages in progress count in ``charge``
        #: aiohttp's ``RequestHandler`` of the connection: its transport is paused while frames
        #: past a feed's share wait for the next turn of the loop (``None``: all fed at once).
        self._handler = handler
        #: Whether the peer ended its stream (its FIN came; the reader may not have it yet).
        self.peer_ended = False

    def feed_eof(self) -> None:
        # aiohttp's connection_lost: nothing can be answered any more, what is held goes.
        self._reader.feed_eof()

    def end_of_stream(self) -> None:
        """The peer ended its stream, the socket still open for the answers
        (``_UpgradeHandler.eof_received``): the reader's end comes after every frame held."""
        self.peer_ended = True
        if not end_after_held(self):
            self.dara_ended()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        headers = self._headers
        if headers.refused is not None:  # already refused: nothing more is parsed
            return True, b""
        held = headers.more  # the next share is already on its way
        good = headers.feed(data)
        if headers.refused is None:
            # Nothing to parse: a header cut short (held until the rest comes), or its
            # address's share of this turn already used (held for the next turn).
            fed: tuple[bool, bytes] = self._reader.feed_data(good) if good else (False, b"")
            if headers.more and not held and self._handler is not None and not fed[0]:
                feed_held_later(self)  # frames past a feed's share: the next turn
            return fed
        if good:
            self._reader.feed_data(good)
        self._queue.set_exception(WebSocketError(headers.refused_code, headers.refused))  # 1002, or 1009
        return True, b""

    # What feed_held_later needs of the connection (HoldsFrames).

    @property
    def dara_frames(self) -> ClientFrameHeaders:
        return self._headers

    @property
    def transport(self) -> Any:
        return None if self._handler is None else self._handler.transport

    def data_received(self, data: bytes) -> None:
        if self.feed_data(data)[0]:
            self._handler.close()

    def dara_resumable(self) -> bool:
        # Unless aiohttp paused reading too (its queue is full: it resumes once the queue drains).
        return not self._handler._reading_paused

    def dara_ended(self) -> None:
        # Not once a frame was refused: the reader's queue holds that error (1002, 1009), which
        # an end of stream fed after it would clear (the client would get 1000).
        if self._headers.refused is None:
            self._reader.feed_eof()


class _Cork(Protocol):
    def flush_before(self, writer: Any) -> None: ...


class CorkedFirst(WebSocketWriter):
    """aiohttp's frame writer, writing a connection's corked frames (``AiohttpTransport``'s
    cork) before every frame aiohttp writes itself: a pong, a keepalive ping, and its close,
    its own on a peer's protocol error among them. They were accepted before that frame; left
    for the end of the loop iteration, they came after the close frame, and were dropped."""

    #: The connection's transport, once it has one (set by ``AiohttpTransport``).
    dara_cork: _Cork | None = None

    async def send_frame(self, message: bytes, opcode: int, compress: int | None = None) -> None:
        if (cork := self.dara_cork) is not None:
            cork.flush_before(self)
        await super().send_frame(message, opcode, compress)


class MaskedOnlyResponse(web.WebSocketResponse):
    """A ``WebSocketResponse`` whose reader is wrapped in :class:`MaskedFramesOnly` before it
    sees a byte (aiohttp feeds it what came with the request as soon as it is set), and whose
    answer to a peer's close carries the peer's code."""

    _peer_code = 0  # the code of the peer's close frame (0: none came, or it had no code)
    #: Whether the peer's close frame carried a code no close frame may carry (RFC 6455 7.4):
    #: the connection is failed with 1002, and the transport reports 1002, not that code.
    peer_close_refused = False
    #: Where the bytes of the messages in progress count (set before prepare), or None.
    dara_charge: ReceivingCharge | None = None

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        handler: Any = request.protocol
        tail, handler._message_tail = handler._message_tail, b""
        if type(writer) is WebSocketWriter:
            writer.__class__ = CorkedFirst
        super()._post_start(request, protocol, writer)
        handler._payload_parser = checked = MaskedFramesOnly(handler._payload_parser, self._reader, self.dara_charge,
                                                             handler)
        if tail and checked.feed_data(tail)[0]:
            handler.close()
        elif handler in ENDED_BEHIND_REQUEST:
            ENDED_BEHIND_REQUEST.discard(handler)
            checked.end_of_stream()

    def _set_closing(self, code: WSCloseCode) -> None:
        # receive() calls it with the code of the peer's close frame (the plain int the reader
        # read: 0 when there was none), then answers with close(); aiohttp's own calls (a lost
        # socket: 1006, closing: 1000) pass a WSCloseCode. The reader fails a code under 3000
        # outside its list with 1002, but lets 1006 and 5000-65535 through, which may not be
        # sent (sendable_close_code): failed with 1002 here, as on every other transport.
        if not self._closed and not self._peer_code and not isinstance(code, WSCloseCode) and code:
            if sendable_close_code(code):
                self._peer_code = code
            else:
                self._peer_code, self.peer_close_refused = WSCloseCode.PROTOCOL_ERROR, True
        super()._set_closing(code)

    #: Whether our close lingers (see _close_transport): a close we started, over plain TCP.
    _dara_lingers = False
    #: How long a lingering close waits for the client's end before the socket is aborted
    #: (set before prepare: the configuration's ``close_timeout``).
    dara_close_timeout = 5.0

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if self._peer_code and not self._closed:  # the answer to the peer's close: its code
            code = self._peer_code
        if not self._closed and not self._closing and self._dara_may_linger():
            # Ours: aiohttp would now parse the client's frames (each up to max_msg_size) until
            # its close frame, or close the socket at once after a frame it refused. Taken for
            # closing (no frame is waited for), the transport is "closed" after the close
            # frame: that is where the close lingers.
            self._dara_lingers = self._closing = True
        return await super().close(code=code, message=message, drain=drain)

    def _dara_may_linger(self) -> bool:
        request, reader = self._req, self._reader
        transport = request.transport if request is not None else None
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            return False  # gone, or TLS (no half-close)
        # The client ended its stream already (its end may still wait behind held frames, or
        # not be fed at all after a refused one): nothing more comes, the socket closes cleanly.
        parser = getattr(getattr(request, "protocol", None), "_payload_parser", None)
        if isinstance(parser, MaskedFramesOnly) and parser.peer_ended:
            return False
        return reader is None or not reader.is_eof() or reader.exception() is not None

    def _close_transport(self) -> None:
        request = self._req
        transport = request.transport if request is not None else None
        if (request is None or transport is None or not self._dara_lingers or transport.is_closing()
                or self._exception is not None):  # the close frame could not be written
            super()._close_transport()
            return
        # Our end of stream after the close frame; the client's input is dropped from now on
        # (aiohttp's protocol reads nothing once closing), and its end closes the socket.
        self._dara_lingers = False
        handler: Any = request.protocol
        if handler in LINGERING:
            return
        handler.close()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.dara_close_timeout, _expired, handler, transport)
        LINGERING[handler] = (loop.create_future(), timer)
        transport.write_eof()
        transport.resume_reading()

    async def dara_lingered(self) -> None:
        """Once the connection is served: wait until the socket of our lingering close is gone,
        the client's end come (the socket closes, nothing unread: no reset) or
        :attr:`dara_close_timeout` passed (aborted); aiohttp would close it once the handler
        returns. At once if none lingers."""
        request = self._req
        entry = LINGERING.get(request.protocol) if request is not None else None
        if entry is not None:
            await asyncio.shield(entry[0])
