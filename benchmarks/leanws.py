"""A deliberately minimal RFC 6455 client (asyncio ``BufferedProtocol``) for load generation.

Why not the ``websockets`` client: on a 2-core machine the client processes share one core, and a
full client costs ~15-20 us per received frame, which made the *clients* the bottleneck of the
fan-out scenarios (the ratio ours/raw then says nothing about the server). This client parses
frames straight from the buffer it reads into (one for the process) and hands each text
payload, as ``bytes``, to a callback: no task switch, no queue, no UTF-8 decoding, no memory
mapped per read, no system call per mask key. It is identical for every server measured.

It supports what a benchmark client needs and no more: the upgrade handshake, unmasked server
frames of any length (fragmented text is reassembled), masked text frames out, answering pings
with pongs (so server keepalive does not close idle connections) and noticing close frames.
It never offers compression. Only for 127.0.0.1 benchmark servers; not a general client.
"""

from __future__ import annotations

__all__ = ["LeanWS", "open_lean"]

import asyncio
import base64
import os
from collections.abc import Callable

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


#: Masking keys, drawn from ``os.urandom`` a thousand at a time: one ``getrandom`` system call
#: per frame sent was about a tenth of this client's system time in a round trip.
_KEYS = bytearray()
_KEY_DRAW = 4 * 1024


def _key() -> bytes:
    keys = _KEYS
    if not keys:
        keys += os.urandom(_KEY_DRAW)
    key = bytes(keys[-4:])
    del keys[-4:]
    return key


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = _key()
    return header + key + _mask(payload, key)


#: Where every connection of the process reads (``LeanWS.get_buffer``): what a read brings is
#: parsed, or its incomplete end copied to the connection's own buffer, before the loop reads
#: again. asyncio's plain ``Protocol`` reads into a new 256 KiB ``bytes`` per read, which glibc
#: maps and unmaps with a system call each (``mmap``, ``mremap``, ``munmap``, and page faults):
#: three more system calls per frame received than a server's, half this client's system time.
_READ_BUFFER = bytearray(256 * 1024)
_READ_VIEW = memoryview(_READ_BUFFER)


class LeanWS(asyncio.BufferedProtocol):
    """One client connection; ``on_text(payload_bytes)`` is called for every text message.

    Messages that arrive before a callback is set (the first frame often comes in the same
    segment as the 101 response) are kept and handed to the callback once it is set.
    """

    def __init__(self, host: str, port: int, target: str,
                 on_text: Callable[[bytes], None] | None = None) -> None:
        self.host, self.port, self.target = host, port, target
        self._on_text = on_text
        self._early: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self._buf = bytearray()
        self._fragments: list[bytes] | None = None
        self._handshaking = True
        self._closing = False  # our close frame is sent: the server's is not echoed
        self._key = base64.b64encode(os.urandom(16)).decode()

    @property
    def on_text(self) -> Callable[[bytes], None] | None:
        return self._on_text

    @on_text.setter
    def on_text(self, callback: Callable[[bytes], None]) -> None:
        self._on_text = callback
        early, self._early = self._early, []
        for payload in early:
            callback(payload)

    def _deliver(self, payload: bytes) -> None:
        if self._on_text is None:
            self._early.append(payload)
        else:
            self._on_text(payload)

    # ---------------------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write((
            f"GET {self.target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"connection lost: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        if self._buf or self._handshaking:  # behind an incomplete frame, or the 101 response
            self._buf += _READ_VIEW[:nbytes]
            self._parse()
            return
        pos = self._frames(_READ_VIEW, nbytes)  # parsed where it was read, no copy
        if pos < nbytes:
            self._buf += _READ_VIEW[pos:nbytes]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        if self._handshaking:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:buf.find(b"\r\n")])
            if b" 101 " not in status + b" ":
                self.upgraded.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                assert self.transport is not None
                self.transport.abort()
                return
            del buf[:end + 4]
            self._handshaking = False
            self.upgraded.set_result(None)
        pos = self._frames(buf, len(buf))
        if pos:
            del buf[:pos]

    def _frames(self, buf: bytearray | memoryview, size: int) -> int:
        """Handle the whole frames in ``buf[:size]``; how many bytes they took."""
        pos = 0
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            end = pos + head + length
            if end > size:
                break
            payload = bytes(buf[pos + head:end])
            pos = end
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
        return pos

    # ----------------------------------------------------------------------------- frames

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self._deliver(payload)
            else:
                self._fragments = [payload]
        elif opcode == OP_CONT and self._fragments is not None:
            self._fragments.append(payload)
            if fin:
                whole, self._fragments = b"".join(self._fragments), None
                self._deliver(whole)
        elif opcode == OP_PING:
            self._write(frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self._closing:
                self._write(frame(OP_CLOSE, payload[:2]))
            if self.transport is not None:
                self.transport.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_text(self, text: str | bytes) -> None:
        self._write(frame(OP_TEXT, text.encode() if isinstance(text, str) else text))

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake; ``closed`` is done once the server ended the TCP
        connection (or the client did, on the server's close frame)."""
        if not self._closing:
            self._closing = True
            self._write(frame(OP_CLOSE, code.to_bytes(2, "big")))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() \
            and self.close_code is None


async def open_lean(port: int, target: str, on_text: Callable[[bytes], None] | None = None,
                    timeout: float = 30.0) -> LeanWS:
    """Connect to ``ws://127.0.0.1:{port}{target}`` and complete the upgrade."""
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: LeanWS("127.0.0.1", port, target, on_text),
                               "127.0.0.1", port), timeout)
    await asyncio.wait_for(proto.upgraded, timeout)
    return proto
