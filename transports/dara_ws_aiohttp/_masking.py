"""Refuse unmasked client frames, which aiohttp's server accepts (RFC 6455 section 5.1: "a
server MUST close the connection upon receiving a frame that is not masked", with 1002).

aiohttp's frame reader (the C one by default) reads the mask bit but never checks it, and does
not expose it. :class:`MaskedFramesOnly` wraps that reader: it follows the frame headers of the
byte stream (a few operations per frame; payloads are skipped, not read) and feeds the reader
everything before the first unmasked frame, then fails the connection the way the reader fails
it on its own protocol errors, so aiohttp closes with 1002 and acts on nothing after it.
"""

from __future__ import annotations

__all__ = ["MaskedFramesOnly", "MaskedOnlyResponse"]

from typing import Any

from aiohttp import WebSocketError, WSCloseCode, web


class MaskedFramesOnly:
    """A ``WebSocketReader`` that refuses unmasked frames; ``queue`` is the reader's queue."""

    __slots__ = ("_head", "_queue", "_reader", "_skip")

    def __init__(self, reader: Any, queue: Any) -> None:
        self._reader = reader
        self._queue = queue
        self._head = b""  # the start of a frame header split across reads
        self._skip = 0  # payload bytes (and mask key) of the current frame still to come

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._skip < 0:  # already refused: nothing more is parsed
            return True, b""
        bad = self._first_unmasked(data)
        if bad < 0:
            return self._reader.feed_data(data)  # type: ignore[no-any-return]
        self._skip = -1
        if bad:
            self._reader.feed_data(data[:bad])
        self._queue.set_exception(WebSocketError(WSCloseCode.PROTOCOL_ERROR, "unmasked frame"))
        return True, b""

    def _first_unmasked(self, data: bytes) -> int:
        """Where in ``data`` the first unmasked frame starts (0 if it started in an earlier
        read), or -1; remembers where the next frame header is."""
        held = len(self._head)
        buf = self._head + data if held else data
        pos, end = self._skip, len(buf)
        while pos + 2 <= end:
            second = buf[pos + 1]
            if not second & 0x80:
                return max(0, pos - held)
            length = second & 0x7F
            size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            if pos + size > end:
                break
            if length >= 126:
                length = int.from_bytes(buf[pos + 2 : pos + size], "big")
            pos += size + 4 + length  # header, mask key, payload
        self._head = buf[pos:] if pos < end else b""
        self._skip = max(0, pos - end)
        return -1


class MaskedOnlyResponse(web.WebSocketResponse):
    """A ``WebSocketResponse`` whose reader is wrapped in :class:`MaskedFramesOnly` before it
    sees a byte (aiohttp feeds it what came with the request as soon as it is set)."""

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        handler: Any = request.protocol
        tail, handler._message_tail = handler._message_tail, b""
        super()._post_start(request, protocol, writer)
        handler._payload_parser = checked = MaskedFramesOnly(handler._payload_parser, self._reader)
        if tail and checked.feed_data(tail)[0]:
            handler.close()
