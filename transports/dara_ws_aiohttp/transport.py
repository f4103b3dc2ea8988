"""The aiohttp WebSocket, either side, as a core ``Transport``: frames and closes translated."""

from __future__ import annotations

__all__ = ["AiohttpTransport"]

import inspect
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from dara_ws_core.exceptions import CloseCode, ConnectionClosed
from dara_ws_core.transport import NOT_UTF8, text_frame_header

from ._masking import CorkedFirst

#: For a server's ``WebSocketResponse``: text messages queued as their UTF-8 bytes, decoded by
#: :meth:`AiohttpTransport.receive` as they are handled (an aiohttp with ``decode_text``, as 3.14;
#: an older one decodes them as they arrive, as before). Decoded, a
#: text takes 1, 2 or 4 bytes a character (PEP 393): up to 4 times the bytes aiohttp's queue
#: counts for it (an ASCII text with one emoji); as bytes, what it holds is what it counts.
DECODE_TEXT_LATER: dict[str, Any] = (
    {"decode_text": False} if "decode_text" in inspect.signature(web.WebSocketResponse).parameters else {})

_WRITE_LIMIT = 32 * 1024  # buffered output (corked included) above which frames are queued
_NO_STATUS = 1005  # RFC 6455 7.1.5: a close frame without a code (aiohttp says 0)


class AiohttpTransport:
    """An aiohttp WebSocket (server or client side) as a :class:`Transport`.

    Built by :func:`add_route` and :func:`connect`; you do not create it yourself. ``session`` is
    a client session owned by the transport, closed with it.
    """

    #: Its name in log records and metrics (its module's, ``transport``, says nothing).
    transport_name = "aiohttp"

    def __init__(
        self,
        ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._ws = ws
        self._session = session
        self._local_code: int | None = None  # what we closed with, until the peer echoes it
        self._gone: ConnectionClosed | None = None
        self._corked: list[bytes] = []  # frames (headers included) waiting for flush()
        self._corked_bytes = 0
        writer = getattr(ws, "_writer", None)
        if isinstance(writer, CorkedFirst):  # aiohttp's own frames come after the corked ones
            writer.dara_cork = self

    @property
    def closed(self) -> bool:
        return self._gone is not None or self._ws.closed

    def _error(self, code: int | None = None, reason: str = "") -> ConnectionClosed:
        # After our own close, aiohttp reports 1000 whatever code we sent: ours wins.
        code = code or self._local_code or self._ws.close_code or CloseCode.ABNORMAL
        return ConnectionClosed(code, reason)

    async def send(self, frame: bytes) -> None:
        """Send one text frame; raises ``ConnectionClosed`` once the connection is closing."""
        await self._send(frame, WSMsgType.TEXT)

    def _open_writer(self) -> Any:
        """aiohttp's frame writer and its socket transport if a frame can be written now (server
        side: no mask, no compression; not closing), else ``None``. aiohttp has no synchronous
        send, so corked frames are framed here and written to the writer's transport."""
        writer: Any = getattr(self._ws, "_writer", None)
        if (writer is None or writer.use_mask or writer.compress or writer._closing
                or self.closed or writer.transport.is_closing()):
            return None
        return writer

    def send_corked(self, frame: bytes) -> bool:
        """Add ``frame`` to the output flushed by :meth:`flush` (``SupportsCork``)."""
        writer = self._open_writer()
        if writer is None:
            return False
        if writer.transport.get_write_buffer_size() + self._corked_bytes > _WRITE_LIMIT:
            return False
        self._corked.append(text_frame_header(len(frame)))
        self._corked.append(frame)
        self._corked_bytes += len(frame)
        return True

    def flush(self) -> bool:
        """Write the corked frames in one write; dropped (``False``) if the connection closed
        meanwhile."""
        corked, self._corked, self._corked_bytes = self._corked, [], 0
        if not corked:
            return True
        writer = self._open_writer()
        if writer is None:
            return False
        writer.transport.write(b"".join(corked))
        return True

    def flush_before(self, writer: Any) -> None:
        """Write the corked frames ahead of a frame aiohttp writes itself (``CorkedFirst``),
        even once aiohttp decided to close: they were accepted before its close frame. Left
        corked if its close frame went already (for :meth:`flush` to report them dropped)."""
        if self._corked and not writer._closing and not writer.transport.is_closing():
            corked, self._corked, self._corked_bytes = self._corked, [], 0
            writer.transport.write(b"".join(corked))

    async def send_binary(self, data: bytes) -> None:
        """Send one binary frame (the protocol has none: to test how a server refuses them)."""
        await self._send(data, WSMsgType.BINARY)

    async def _send(self, data: bytes, opcode: WSMsgType) -> None:
        if self.closed:
            raise self._gone or self._error()
        if self._corked:
            self.flush()  # nothing overtakes a corked frame
        try:
            # send_frame skips send_str's decode/encode round trip: frame is UTF-8 already.
            await self._ws.send_frame(data, opcode)
        except ConnectionError as exc:  # aiohttp's ClientConnectionResetError
            raise self._error() from exc

    async def receive(self) -> str | bytes:
        """Return the next text (``str``) or binary (``bytes``) frame.

        aiohttp reports closes as messages; they become ``ConnectionClosed`` with the close code
        (1009 for a frame over ``max_msg_size``).
        """
        if self._gone is not None:
            raise self._gone  # aiohttp raises RuntimeError after a few reads past the close
        msg = await self._ws.receive()
        if msg.type is WSMsgType.TEXT:
            data = msg.data
            if type(data) is str:
                return data
            try:  # its bytes (DECODE_TEXT_LATER), decoded now (late_text, without a call more)
                return str(data, "utf-8")
            except UnicodeDecodeError:
                return NOT_UTF8
        if msg.type is WSMsgType.BINARY:
            return msg.data  # type: ignore[no-any-return]
        # CLOSE carries (code, reason), ERROR the error (1009: too big, whatever close_code says
        # after aiohttp's own close); CLOSING and CLOSED leave the code on the socket.
        if msg.type is WSMsgType.CLOSING:
            # Our own close(), from another task: aiohttp wakes this reader first, then writes
            # the close frame. Released here, the session would end the socket before that
            # frame (the peer saw 1006); close() releases it once the frame is out.
            self._gone = self._error()
            raise self._gone
        if msg.type is WSMsgType.CLOSE:
            if getattr(self._ws, "peer_close_refused", False):  # failed with 1002 (see _masking)
                self._gone = ConnectionClosed(CloseCode.PROTOCOL_ERROR, "invalid close code")
            else:
                self._gone = self._error(msg.data or self._local_code or _NO_STATUS, msg.extra or "")
        elif isinstance(msg.data, aiohttp.WebSocketError):
            self._gone = self._error(msg.data.code, str(msg.data))
        else:
            self._gone = self._error()
        await self._release()
        raise self._gone

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close with ``code`` (waits for the peer's echo up to aiohttp's timeout); idempotent."""
        if self._local_code is None:
            self._local_code = code
        if self._corked:
            self.flush()
        try:
            await self._ws.close(code=code, message=reason.encode())
        finally:
            await self._release()

    def abort(self) -> None:
        # aiohttp has no public abort on a WebSocket; its writer holds the socket's transport.
        transport = getattr(getattr(self._ws, "_writer", None), "transport", None)
        if transport is not None:
            transport.abort()

    async def _release(self) -> None:
        if self._session is not None:
            await self._session.close()
