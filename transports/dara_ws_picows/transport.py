"""A picows connection as a core ``Transport``: picows calls back with frames, the core awaits them.

:class:`PicowsTransport` is at once picows' ``WSListener`` (its callbacks fill a bounded inbox)
and the core's ``Transport`` (``receive()`` empties it). picows hands over *frames*: fragmented
messages are reassembled here, text is checked for UTF-8 (1007), and the message size limit counts
the whole message (1009). picows' own parser closes with 1002 on what RFC 6455 forbids (unmasked
client frames, bad opcodes, oversized control frames) before any callback runs.

Writes are corked (``SupportsCork``): picows' ``send`` copies each frame and makes its own system
call, so the frames the core queues within one loop iteration are framed here instead
(``text_frame_header``) and written to the socket's transport at once by ``flush()``. Order holds
because picows only writes around asyncio while asyncio's buffer is empty, and every frame picows
sends itself (a pong, a ping, a close, an awaited ``send``) flushes what is corked first.
"""

from __future__ import annotations

__all__ = ["PicowsTransport"]

import asyncio
from collections import deque
from collections.abc import Callable
from sys import getsizeof
from types import MethodType
from typing import NoReturn

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSProtocolError, WSTransport

from dara_ws_core.exceptions import CloseCode, ConnectionClosed
from dara_ws_core.transport import ReceivingCharge, close_frame_error, late_text, text_frame_header

#: Messages, and bytes, waiting in the inbox before reading from the socket pauses. The bytes
#: are what the messages hold (``sys.getsizeof``): a decoded text takes 1, 2 or 4 bytes a
#: character (PEP 393), up to 4 times its UTF-8 on the wire (an ASCII text with one emoji).
INBOX_MESSAGES = 16
INBOX_BYTES = 1024 * 1024
#: The socket's write buffer high-water mark: over it, asyncio pauses our writing and
#: ``send_nowait`` refuses (the core queues instead), as websockets' ``write_limit``.
WRITE_LIMIT = 32 * 1024
#: Reading pauses while this much is waiting to be written (pongs to a peer that does not read).
PAUSE_READING_ABOVE = 1024 * 1024
#: A frame over this many bytes grows picows' read buffer, which picows never shrinks: once it
#: is handled, ``release_reads`` hands what the buffer no longer uses back to the system.
RELEASE_ABOVE = 64 * 1024

#: A text message over this many bytes that arrives while the core is busy (not waiting in
#: ``receive``) waits in the inbox as its UTF-8 bytes, decoded when the core takes it: decoded,
#: it would take 1, 2 or 4 bytes a character (PEP 393), up to 4 times as much (an ASCII text
#: with one emoji), and picows hands over every frame of a read, past the inbox's bounds too.
#: A smaller one is decoded at once (cheaper, and counted as it is held).
DECODE_AT_ONCE = 4096

_TEXT, _BINARY, _CONT = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
_PING, _CLOSE = WSMsgType.PING, WSMsgType.CLOSE
_NO_STATUS = 1005  # a close frame without a code (RFC 6455 section 7.1.5)


class PicowsTransport(WSListener):
    """One picows WebSocket (server side) as a :class:`~dara_ws_core.Transport`.

    Built by :func:`dara_ws_picows.serve`; you do not create it yourself.
    """

    __slots__ = ("_buffered", "_charge", "_close_timeout", "_corked", "_corked_bytes", "_drained", "_gone", "_inbox",
                 "_inbox_bytes", "_is_closing", "_local_code", "_max_size", "_parts", "_parts_size", "_parts_text",
                 "_paused", "_push_left", "_pusher", "_send_text", "_waiter", "_write_paused", "_ws", "release_reads",
                 "writer", "writer_lost")

    transport_name = "picows"

    def __init__(self, max_size: int, close_timeout: float, charge: ReceivingCharge | None = None) -> None:
        self._ws: WSTransport | None = None
        # Where the fragments of the message being reassembled count (the process's budget).
        self._charge = charge
        self._max_size = max_size
        self._close_timeout = close_timeout
        self._inbox: deque[str | bytes] = deque()
        self._inbox_bytes = 0
        # Set when receive() waits (result True: receive_pushed's push stopped taking messages).
        self._waiter: asyncio.Future[bool] | None = None
        # While receive_pushed() waits with the inbox empty: who takes each message, how many more.
        self._pusher: Callable[[str | bytes], bool] | None = None
        self._push_left = 0
        self._drained: asyncio.Future[None] | None = None
        # A fragmented message being reassembled, in one buffer: an object per fragment would
        # let a peer make the server hold ~40 bytes per (empty or tiny) fragment, past max_size.
        self._parts: bytearray | None = None
        self._parts_text = False
        self._parts_size = 0
        self._paused = False  # reading, for a full inbox
        self._write_paused = False
        self._gone: ConnectionClosed | None = None
        self._local_code: int | None = None
        self._buffered: Callable[[], int] = _nothing  # the socket's write buffer size, once connected
        self._is_closing: Callable[[], bool] = _closing  # the socket's, once connected
        # What waits for flush(): one frame as it is, or frames with their headers (a burst).
        self._corked: bytes | list[bytes] | None = None
        self._corked_bytes = 0
        # SupportsWriter: picows' send of a text frame, all in C, offered while send_nowait would
        # write (connected, writing not paused, no close sent or received, not disconnected).
        # picows also sends a close frame by itself (a protocol error, a ping left unanswered)
        # and tells us only at the disconnect, 10 ms later: a frame written in between is dropped
        # yet counted as written. So the core never writes a frame the per-user history keeps
        # through it (manager._deliver_kept); checking here would cost every recipient a call.
        self._send_text: Callable[[bytes], object] | None = None
        self.writer: Callable[[bytes], object] | None = None
        self.writer_lost: Callable[[], object] | None = None  # (the core's, SupportsWriter)
        #: Called after a frame over RELEASE_ABOVE (set by serve: it knows the socket's protocol).
        self.release_reads: Callable[[], object] | None = None

    @property
    def accepted(self) -> bool:
        """Whether picows completed the upgrade (it answers 400 to a malformed one itself)."""
        return self._ws is not None

    # ------------------------------------------------------------------ picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        # picows' bound send with TEXT bound before the frame: the interpreter unpacks the outer
        # method at the call and the inner one puts the connection in front without a copy. A
        # functools.partial cost about 45 more instructions and 2.6 more L1 read misses per frame
        # (callgrind, docs/performance.md): its call copies the arguments, and reads its tuple.
        self._send_text = self.writer = MethodType(transport.send, _TEXT)
        self._buffered = transport.underlying_transport.get_write_buffer_size
        self._is_closing = transport.underlying_transport.is_closing
        # pause_writing() then says "over the limit": send_nowait checks a flag, not the buffer.
        transport.underlying_transport.set_write_buffer_limits(high=WRITE_LIMIT)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if transport.is_close_frame_sent and kind is not _CLOSE:
            # Closing (picows failed the connection, e.g. a frame over the size limit, or the
            # server closed): what the peer sent after is not read, as on the other transports.
            # Else a frame behind the one that closed could reach the core and decide the code.
            return
        if frame.payload_size > RELEASE_ABOVE and self.release_reads is not None:
            self.release_reads()  # later in this iteration, once picows is done with its buffer
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is negotiated (picows leaves it to us)
            raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "reserved bit set")
        if kind is _TEXT or kind is _BINARY:
            if self._parts is not None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
            if frame.payload_size > self._max_size:
                raise WSProtocolError(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            if not frame.fin:
                if self._charge is not None and not self._charge.take(frame.payload_size):
                    self._over_budget()
                self._parts, self._parts_text = bytearray(frame.get_payload_as_memoryview()), kind is _TEXT
                self._parts_size = frame.payload_size
                return
            if kind is _TEXT:
                pusher = self._pusher
                if pusher is None and frame.payload_size > DECODE_AT_ONCE:
                    # The core is busy: kept as its bytes until it takes it (see _Utf8).
                    self._push(_Utf8(frame.get_payload_as_memoryview()))
                    return
                try:  # decoded straight from picows' buffer: no intermediate bytes
                    text = frame.get_payload_as_utf8_text()
                except UnicodeDecodeError:
                    raise WSProtocolError(WSCloseCode.INVALID_TEXT, "invalid UTF-8") from None
                if pusher is None:
                    self._push(text)
                else:  # _push's first case, inline: the core waits (for an answer, mostly)
                    self._push_left -= 1
                    if not pusher(text) or not self._push_left:
                        self._pusher = None
                        self._wake(True)
            else:
                self._push(frame.get_payload_as_bytes())
        elif kind is _CONT:
            parts = self._parts
            if parts is None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "continuation without a message")
            self._parts_size += frame.payload_size
            if self._parts_size > self._max_size:
                raise WSProtocolError(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            charge = self._charge
            if charge is not None and not charge.take(frame.payload_size):
                self._over_budget()
            parts += frame.get_payload_as_memoryview()
            if frame.fin:
                self._parts = None
                if charge is not None:
                    charge.release()
                if not self._parts_text:
                    self._push(bytes(parts))
                elif self._pusher is None and len(parts) > DECODE_AT_ONCE:
                    self._push(_Utf8(parts))  # the core is busy: decoded when it takes it
                else:
                    self._push(_utf8(parts))
        elif kind is _PING:
            if self._corked is not None:
                self.flush()  # the pong must not overtake corked frames
            transport.send_pong(frame.get_payload_as_bytes())
            if not self._paused and self._buffered() > PAUSE_READING_ABOVE:
                self._pause()  # pongs to a peer that floods pings and never reads
        elif kind is _CLOSE:
            self._closing_received(transport, frame)

    def _over_budget(self) -> NoReturn:
        """Fail the connection with 1009: its message would take its holder or the process past
        ``max_receiving_total_bytes``. What it held is given back now, not at the disconnect."""
        self._parts = None
        if self._charge is not None:
            self._charge.release()
        raise WSProtocolError(WSCloseCode.MESSAGE_TOO_BIG, "messages being received exceed their budget")

    def _closing_received(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.payload_size:
            self._check_close(frame)
        self._lose_writer()
        code = int(frame.get_close_code().value) if frame.payload_size else _NO_STATUS
        if self._gone is None:
            self._gone = ConnectionClosed(self._local_code or code, frame.get_close_reason())
        if self._corked is not None:
            self.flush()  # what was corked before the peer's close still goes, before the echo
        if not transport.is_close_frame_sent:  # echo the peer's close (RFC 6455 section 5.5.1)
            transport.send_close(frame.get_close_code() if frame.payload_size else WSCloseCode.OK)
        transport.disconnect()  # the server closes TCP first (section 7.1.1)
        self._wake()

    def _check_close(self, frame: WSFrame) -> None:
        # picows refuses only some of the codes a close frame may not carry (0-2999 outside its
        # list): 1006, 1015 or 5000 and above came through, and were echoed, onto the wire,
        # where RFC 6455 7.4 forbids them. Failed with 1002 as on every other transport; the
        # core is told 1002 too, not the peer's code that picows recorded.
        error = close_frame_error(frame.get_payload_as_bytes())
        if error is not None:
            self._gone = ConnectionClosed(error, "invalid close frame")
            self._wake()
            raise WSProtocolError(WSCloseCode(error), "invalid close frame")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._gone is None:
            handshake = transport.close_handshake
            info = (handshake.recv or handshake.sent) if handshake is not None else None
            if self._local_code is None and info is not None and info is handshake.sent and (
                info.code == WSCloseCode.GOING_AWAY
            ):
                # picows closes with 1001 by itself only for a ping left unanswered (then aborts):
                # the connection was found dead and no close frame came, so 1006 (RFC 6455
                # 7.1.5), as on every other transport.
                info = None
            self._gone = (ConnectionClosed(self._local_code or int(info.code.value), info.reason)
                          if info is not None else ConnectionClosed(CloseCode.ABNORMAL, "connection lost"))
        self._parts, self._corked, self._corked_bytes = None, None, 0  # nothing left to write to
        if self._charge is not None:
            self._charge.release()  # the message in progress is not coming
        self._lose_writer()
        self._send_text = self.release_reads = None  # the latter holds picows' protocol, which holds us
        self._wake()
        self._resume_writers()

    def send_user_specific_ping(self, transport: WSTransport) -> None:
        # picows' keepalive ping: after what is corked, as every frame picows sends itself.
        if self._corked is not None:
            self.flush()
        transport.send_ping()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._lose_writer()

    def _lose_writer(self) -> None:
        self.writer = None
        lost = self.writer_lost
        if lost is not None:
            lost()

    def resume_writing(self) -> None:
        self._write_paused = False
        ws = self._ws
        if ws is not None and not ws.is_close_frame_sent and not ws.is_disconnected:
            self.writer = self._send_text
        self._resume_writers()
        if self._paused and len(self._inbox) < INBOX_MESSAGES and self._inbox_bytes < INBOX_BYTES:
            self._resume()

    # ------------------------------------------------------------------ inbox

    def _push(self, message: str | bytes) -> None:
        pusher = self._pusher
        if pusher is not None:  # the core waits with nothing buffered: handed over, in order
            self._push_left -= 1
            if not pusher(message) or not self._push_left:
                self._pusher = None
                self._wake(True)
            return
        self._inbox.append(message)
        self._inbox_bytes += getsizeof(message)  # what it holds, not its UTF-8
        self._wake()
        if not self._paused and (len(self._inbox) >= INBOX_MESSAGES or self._inbox_bytes >= INBOX_BYTES):
            self._pause()

    def _pause(self) -> None:
        if self._ws is not None:
            self._paused = True
            self._ws.underlying_transport.pause_reading()

    def _resume(self) -> None:
        if self._ws is not None and not self._ws.is_disconnected:
            self._paused = False
            self._ws.underlying_transport.resume_reading()

    def _wake(self, stopped: bool = False) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(stopped)

    def _resume_writers(self) -> None:
        drained = self._drained
        if drained is not None:
            self._drained = None
            if not drained.done():
                drained.set_result(None)

    # ------------------------------------------------------------------ Transport

    async def receive(self) -> str | bytes:
        while not self._inbox:
            if self._gone is not None:
                raise self._gone
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            await waiter
        message = self._inbox.popleft()
        if self._inbox:
            self._inbox_bytes -= getsizeof(message)
        else:
            self._inbox_bytes = 0  # exact again whenever the inbox is empty
            if self._paused and not self._write_paused:
                self._resume()
        return late_text(message) if type(message) is _Utf8 else message

    async def receive_pushed(self, push: Callable[[str | bytes], bool], limit: int) -> str | bytes | None:
        """``receive()``, handing what arrives while it waits to ``push`` from picows' callback
        (``SupportsPush``): an answer resolves its request without waking the receive loop."""
        if not self._inbox and self._gone is None:
            self._pusher, self._push_left = push, limit
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                if await waiter:
                    return None
            finally:
                self._pusher = None
        return await self.receive()

    def send_nowait(self, frame: bytes) -> bool:
        ws = self._ws
        if self._write_paused or ws is None or ws.is_close_frame_sent or ws.is_disconnected:
            return False
        if self._corked is not None:
            self.flush()
        ws.send(_TEXT, frame)
        return True

    def send_corked(self, frame: bytes) -> bool:
        """Add ``frame`` to the output written by :meth:`flush`: refused (``False``) when
        ``send_nowait`` would refuse it, or when the socket's buffer plus what is corked is over
        the write limit (the core queues it instead)."""
        ws = self._ws
        if self._write_paused or ws is None or ws.is_close_frame_sent or ws.is_disconnected:
            return False
        corked = self._corked
        if corked is None:
            # The first frame of this iteration is kept as it is: alone (one broadcast per
            # iteration, a reply), picows frames and writes it in C at the flush. No buffer check:
            # asyncio's buffer is within the limit while writing is not paused.
            self._corked = frame
            self._corked_bytes = len(frame)
            return True
        if self._buffered() + self._corked_bytes > WRITE_LIMIT:
            return False
        if isinstance(corked, bytes):  # a second frame: from now on a burst, framed here
            self._corked = corked = [text_frame_header(len(corked)), corked]
        corked.append(text_frame_header(len(frame)))
        corked.append(frame)
        self._corked_bytes += len(frame)
        return True

    def flush(self) -> bool:
        """Write the corked frames in one write; dropped (``False``) once the connection is
        closing, picows' own close frame included."""
        corked, self._corked, self._corked_bytes = self._corked, None, 0
        if corked is None:
            return True
        ws = self._ws
        if ws is None or self._is_closing() or ws.is_close_frame_sent or ws.is_disconnected:
            return False
        if isinstance(corked, bytes):  # one frame: picows frames and writes it in C
            ws.send(_TEXT, corked)
        else:
            ws.underlying_transport.write(b"".join(corked))
        return True

    async def send(self, frame: bytes) -> None:
        ws = self._ws
        if ws is None or self._gone is not None or ws.is_close_frame_sent or ws.is_disconnected:
            raise self._gone or ConnectionClosed(self._local_code or CloseCode.ABNORMAL, "closed")
        if self._corked is not None:
            self.flush()  # nothing overtakes a corked frame
        ws.send(_TEXT, frame)
        if self._write_paused:  # backpressure: wait until asyncio's buffer drains
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        ws = self._ws
        if ws is None or ws.is_disconnected:
            return
        if self._local_code is None and self._gone is None:
            self._local_code = code
        self._lose_writer()
        if self._corked is not None:
            self.flush()  # the close frame goes after what is corked
        if not ws.is_close_frame_sent:
            ws.send_close(WSCloseCode(code), reason.encode()[:123])  # any code: a flexible enum
        try:  # wait for the peer's echo (its close frame disconnects), bounded
            async with asyncio.timeout(self._close_timeout):
                await ws.wait_disconnected()
        except TimeoutError:
            ws.disconnect(graceful=False)

    def abort(self) -> None:
        if self._ws is not None and not self._ws.is_disconnected:
            self._ws.disconnect(graceful=False)

    @property
    def closed(self) -> bool:
        ws = self._ws
        return self._gone is not None or ws is None or ws.is_close_frame_sent or ws.is_disconnected

    @property
    def disconnected(self) -> bool:
        ws = self._ws
        return ws is None or ws.is_disconnected


def _nothing() -> int:
    return 0


def _closing() -> bool:
    return True


class _Utf8(bytes):
    """A text message's UTF-8 bytes in the inbox, not yet decoded (see ``DECODE_AT_ONCE``)."""

    __slots__ = ()


def _utf8(data: bytes | bytearray) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise WSProtocolError(WSCloseCode.INVALID_TEXT, "invalid UTF-8") from None
