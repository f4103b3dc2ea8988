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
:class:`MaskedOnlyResponse` does too.
"""

from __future__ import annotations

__all__ = ["MaskedFramesOnly", "MaskedOnlyResponse"]

from typing import Any

from aiohttp import WebSocketError, WSCloseCode, web

from dara_ws_core.transport import ClientFrameHeaders, ReceivingCharge


class MaskedFramesOnly:
    """A ``WebSocketReader`` that refuses the frames :class:`ClientFrameHeaders` refuses;
    ``queue`` is the reader's queue."""

    __slots__ = ("_headers", "_queue", "_reader")

    def __init__(self, reader: Any, queue: Any, charge: ReceivingCharge | None = None) -> None:
        self._reader = reader
        self._queue = queue
        self._headers = ClientFrameHeaders(charge)  # messages in progress count in ``charge``

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        headers = self._headers
        if headers.refused is not None:  # already refused: nothing more is parsed
            return True, b""
        good = headers.feed(data)
        if headers.refused is None:
            if not good:  # a header cut short, held until the rest comes
                return False, b""
            return self._reader.feed_data(good)  # type: ignore[no-any-return]
        if good:
            self._reader.feed_data(good)
        self._queue.set_exception(WebSocketError(headers.refused_code, headers.refused))  # 1002, or 1009
        return True, b""


def _sendable(code: int) -> bool:
    """Whether a close frame may carry ``code`` (RFC 6455 7.4: not 1004-1006 nor 1015, which
    only report; aiohttp also calls ``_set_closing`` with 1006 when the socket is lost)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class MaskedOnlyResponse(web.WebSocketResponse):
    """A ``WebSocketResponse`` whose reader is wrapped in :class:`MaskedFramesOnly` before it
    sees a byte (aiohttp feeds it what came with the request as soon as it is set), and whose
    answer to a peer's close carries the peer's code."""

    _peer_code = 0  # the code of the peer's close frame (0: none came, or it had no code)
    #: Where the bytes of the messages in progress count (set before prepare), or None.
    dara_charge: ReceivingCharge | None = None

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        handler: Any = request.protocol
        tail, handler._message_tail = handler._message_tail, b""
        super()._post_start(request, protocol, writer)
        handler._payload_parser = checked = MaskedFramesOnly(handler._payload_parser, self._reader, self.dara_charge)
        if tail and checked.feed_data(tail)[0]:
            handler.close()

    def _set_closing(self, code: WSCloseCode) -> None:
        # receive() calls it with the code of the peer's close frame (already checked by the
        # reader: an invalid one fails the connection with 1002), then answers with close().
        if not self._closed and not self._peer_code and _sendable(code):
            self._peer_code = int(code)
        super()._set_closing(code)

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if self._peer_code and not self._closed:  # the answer to the peer's close: its code
            code = self._peer_code
        return await super().close(code=code, message=message, drain=drain)
