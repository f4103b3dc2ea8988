"""A hostile-client kit: a raw-socket WebSocket client that does what well-behaved clients never do.

Everything here talks to ``127.0.0.1`` only, over a plain asyncio ``Protocol`` so that the test
controls every byte and every read:

* :meth:`HostileClient.open`: connect, optionally with a small ``SO_RCVBUF`` (``rcvbuf=``) so
  that a client that never reads fills the server's buffers quickly.
* :meth:`~HostileClient.send_partial_handshake`: write an HTTP upgrade that never completes.
* :meth:`~HostileClient.handshake`: a full upgrade with any extra headers (huge, repeated, ...);
  returns the server's :class:`HttpResponse` (101 or an error status).
* :func:`encode_frame` / :meth:`~HostileClient.send_frame`: masked or unmasked frames of any
  opcode, fragmented (``fin=False`` then :data:`CONTINUATION`), with any RSV bits or payload.
* :meth:`~HostileClient.flood`: write one frame many times, bounded in count and time.
* :meth:`~HostileClient.stop_reading`: never read again (the kernel buffer fills, then the
  server's write buffer grows, which is what the server must bound).
* :meth:`~HostileClient.read_frame`, :meth:`~HostileClient.read_close`,
  :meth:`~HostileClient.wait_disconnected`: observe what the server did.
* :func:`server_holds_socket`: whether the server process still holds its end of a connection
  (Linux ``/proc/net/tcp``), to prove that a socket was released rather than merely closed.

Every wait takes a timeout; nothing here loops without a bound.
"""

from __future__ import annotations

__all__ = [
    "BINARY",
    "CLOSE",
    "CONTINUATION",
    "PING",
    "PONG",
    "TEXT",
    "Frame",
    "HostileClient",
    "HttpResponse",
    "close_payload",
    "encode_frame",
    "handshake_request",
    "open_channel",
    "server_holds_socket",
]

import asyncio
import base64
import json
import os
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- encoding


def encode_frame(
    opcode: int,
    payload: bytes | str = b"",
    *,
    mask: bool = True,
    fin: bool = True,
    rsv: int = 0,
    mask_key: bytes | None = None,
) -> bytes:
    """One WebSocket frame. Clients must mask (RFC 6455 5.3): ``mask=False`` breaks that rule.

    ``rsv`` sets the three RSV bits (0-7); ``opcode`` may be any 4-bit value, reserved ones too.
    """
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)])
    length = len(data)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head.append(mask_bit | length)
    elif length < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", length)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", length)
    if not mask:
        return bytes(head) + data
    key = mask_key if mask_key is not None else os.urandom(4)
    return bytes(head) + key + _apply_mask(data, key)


def _apply_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    # XOR as one big integer: fast enough for multi-megabyte payloads.
    repeated = (key * (len(data) // 4 + 1))[: len(data)]
    big = int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")
    return big.to_bytes(len(data), "big")


def close_payload(code: int | None = 1000, reason: str = "") -> bytes:
    """The payload of a close frame (empty when ``code`` is ``None``)."""
    return b"" if code is None else struct.pack("!H", code) + reason.encode()


def handshake_request(
    path: str = "/api/core/ws",
    headers: Iterable[tuple[str, str]] = (),
    *,
    host: str = HOST,
    key: str | None = None,
    complete: bool = True,
) -> bytes:
    """The bytes of an HTTP/1.1 upgrade request. ``complete=False`` leaves off the blank line
    that ends the headers, so a server waits for more forever (a half-open handshake)."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    text = "\r\n".join(lines) + "\r\n"
    return (text + "\r\n" if complete else text).encode("latin-1")


# ---------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """The status line and headers the server answered a handshake with."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame received from the server."""

    opcode: int
    payload: bytes
    fin: bool = True
    masked: bool = False

    @property
    def close_code(self) -> int | None:
        """For a close frame: its code (``None`` if it has none)."""
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def text(self) -> str:
        return self.payload.decode()


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.data_event = asyncio.Event()
        self.lost = asyncio.get_running_loop().create_future()
        self.eof = False
        #: Whether the connection stays open for writing after the server's end of stream.
        self.half_open = False
        self._can_write = asyncio.Event()
        self._can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.data_event.set()

    def eof_received(self) -> bool:
        self.eof = True
        self.data_event.set()
        return self.half_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.data_event.set()
        self._can_write.set()
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def writable(self) -> None:
        await self._can_write.wait()


class HostileClient:
    """A raw TCP client speaking (or abusing) the WebSocket protocol. Use :meth:`open`."""

    def __init__(self, proto: _Protocol, sock: socket.socket) -> None:
        self._proto = proto
        self.sock = sock
        assert proto.transport is not None
        self.transport: asyncio.Transport = proto.transport
        self.local_port: int = sock.getsockname()[1]
        self.server_port: int = sock.getpeername()[1]

    @classmethod
    async def open(cls, port: int, *, rcvbuf: int | None = None, timeout: float = 5.0,
                   local: str | None = None) -> HostileClient:
        """Connect to ``127.0.0.1:port`` (from the loopback address ``local``, e.g. another host
        of 127/8). ``rcvbuf`` (bytes) shrinks the kernel receive buffer, set before connecting
        so that the TCP window is small from the start."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            if local is not None:
                sock.bind((local, 0))
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, (HOST, port))
                _, proto = await loop.create_connection(_Protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        return cls(proto, sock)

    # -- writing

    def write(self, data: bytes) -> None:
        """Write raw bytes (no-op once the connection is lost)."""
        if not self.transport.is_closing():
            self.transport.write(data)

    def write_eof(self) -> None:
        """End the client's stream (a half-close): the server's answers are still read."""
        if not self.transport.is_closing():
            self.transport.write_eof()

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until the write buffer is below asyncio's high-water mark; ``False`` on timeout
        (the server stopped reading) or when the connection is lost."""
        try:
            async with asyncio.timeout(timeout):
                await self._proto.writable()
        except TimeoutError:
            return False
        return not self.transport.is_closing()

    def send_partial_handshake(self, path: str = "/api/core/ws") -> None:
        """Write an upgrade request without its final blank line, and nothing more."""
        self.write(handshake_request(path, complete=False))

    def send_frame(self, opcode: int, payload: bytes | str = b"", **options: object) -> None:
        """Write one frame (options as :func:`encode_frame`: ``mask``, ``fin``, ``rsv``)."""
        self.write(encode_frame(opcode, payload, **options))  # type: ignore[arg-type]

    def send_text(self, text: str, *, mask: bool = True) -> None:
        self.send_frame(TEXT, text, mask=mask)

    def send_close(self, code: int | None = 1000, reason: str = "", *, mask: bool = True) -> None:
        self.send_frame(CLOSE, close_payload(code, reason), mask=mask)

    async def flood(self, frame: bytes, *, count: int, duration: float = 10.0) -> int:
        """Write ``frame`` up to ``count`` times within ``duration`` seconds, waiting for the
        write buffer to drain in between (so that the flood goes at the server's read speed).
        Returns how many were written; stops early if the connection is lost or the server
        stops reading for the rest of ``duration``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        batch = max(1, 65536 // max(1, len(frame)))
        sent = 0
        while sent < count and not self.transport.is_closing():
            n = min(batch, count - sent)
            self.transport.write(frame * n)
            sent += n
            left = deadline - loop.time()
            if left <= 0 or not await self.drain(left):
                break
        return sent

    # -- reading

    def discard_input(self) -> None:
        """Read on, dropping what arrives unparsed (a reader that costs this process nothing)."""
        self._proto.data_received = lambda data: None  # type: ignore[method-assign]

    def stop_reading(self) -> None:
        """Never read again (until :meth:`resume_reading`): the kernel buffer fills up, then the
        server's own write buffer."""
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    @property
    def lost(self) -> bool:
        """Whether the connection is gone (closed, reset or aborted)."""
        return self._proto.lost.done()

    async def _wait_bytes(self, n: int, timeout: float) -> bytes:
        proto = self._proto
        async with asyncio.timeout(timeout):
            while len(proto.buffer) < n:
                if proto.eof or proto.lost.done():
                    raise EOFError(f"connection closed with {len(proto.buffer)} of {n} bytes")
                proto.data_event.clear()
                await proto.data_event.wait()
        data = bytes(proto.buffer[:n])
        del proto.buffer[:n]
        return data

    async def read_response(self, timeout: float = 5.0) -> HttpResponse:
        """Read the server's HTTP response head (raises ``EOFError`` if it closes first)."""
        proto = self._proto
        async with asyncio.timeout(timeout):
            while (end := proto.buffer.find(b"\r\n\r\n")) < 0:
                if proto.eof or proto.lost.done():
                    raise EOFError("connection closed before an HTTP response")
                proto.data_event.clear()
                await proto.data_event.wait()
        head = bytes(proto.buffer[:end]).decode("latin-1")
        del proto.buffer[: end + 4]
        status_line, *lines = head.split("\r\n")
        _, status, *reason = status_line.split(" ", 2)
        headers = tuple(
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in lines)
        )
        return HttpResponse(int(status), reason[0] if reason else "", headers)

    async def handshake(
        self,
        path: str = "/api/core/ws",
        headers: Iterable[tuple[str, str]] = (),
        *,
        timeout: float = 5.0,
    ) -> HttpResponse:
        """Send a complete upgrade request with ``headers`` and read the response head."""
        self.write(handshake_request(path, headers))
        return await self.read_response(timeout)

    async def read_frame(self, timeout: float = 5.0) -> Frame:
        """Read the next frame (raises ``EOFError`` when the connection ends first)."""
        b0, b1 = await self._wait_bytes(2, timeout)
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self._wait_bytes(2, timeout))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self._wait_bytes(8, timeout))
        masked = bool(b1 & 0x80)
        key = await self._wait_bytes(4, timeout) if masked else b""
        payload = await self._wait_bytes(length, timeout)
        if masked:
            payload = _apply_mask(payload, key)
        return Frame(b0 & 0x0F, payload, bool(b0 & 0x80), masked)

    async def read_close(self, timeout: float = 5.0, *, max_frames: int = 100_000) -> int | None:
        """Read (and discard) frames until a close frame; return its code, or ``None`` if the
        connection ended without one."""
        async with asyncio.timeout(timeout):
            for _ in range(max_frames):
                try:
                    frame = await self.read_frame(timeout)
                except EOFError:
                    return None
                if frame.opcode == CLOSE:
                    return frame.close_code
        raise AssertionError(f"no close frame within {max_frames} frames")

    async def wait_disconnected(self, timeout: float = 5.0) -> bool:
        """Whether the server ended the TCP connection (EOF, reset) within ``timeout``. Reads
        (and drops) whatever arrives meanwhile."""
        proto = self._proto
        try:
            async with asyncio.timeout(timeout):
                while not (proto.eof or proto.lost.done()):
                    proto.buffer.clear()
                    proto.data_event.clear()
                    await proto.data_event.wait()
        except TimeoutError:
            return False
        return True

    def keep_half_open(self) -> None:
        """Keep writing after the server ends its stream (by default the connection then closes)."""
        self._proto.half_open = True

    @property
    def ended_by_server(self) -> bool:
        """Whether the server ended its stream (a FIN) so far."""
        return self._proto.eof

    async def read_end(self, timeout: float = 5.0) -> BaseException | None:
        """Read (and drop) whatever arrives until the connection is gone; return how it ended:
        ``None`` for a clean end (the server's FIN, then our close), else the error (a reset:
        ``ConnectionResetError``, or ``BrokenPipeError`` writing into one). ``TimeoutError``
        if it is not gone within ``timeout``."""
        proto = self._proto
        async with asyncio.timeout(timeout):
            while not proto.lost.done():
                proto.buffer.clear()
                proto.data_event.clear()
                await proto.data_event.wait()
        return cast("BaseException | None", proto.lost.result())

    # -- ending

    def abort(self) -> None:
        """Drop the connection at once (RST-like; nothing more is sent)."""
        self.transport.abort()

    async def close(self) -> None:
        """Close the TCP connection and wait until it is gone (bounded)."""
        self.transport.close()
        if not self.lost:
            try:
                async with asyncio.timeout(2.0):
                    await self._proto.lost
            except TimeoutError:
                self.transport.abort()

    async def __aenter__(self) -> HostileClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.abort()


# ---------------------------------------------------------------------------- server side


def server_holds_socket(server_port: int, client_port: int) -> bool:
    """Whether some process still holds the server end of the 127.0.0.1 connection between
    ``server_port`` and ``client_port`` (an open file descriptor, not an orphan the kernel is
    still flushing: those have inode 0). Linux only."""
    if not sys.platform.startswith("linux"):
        raise NotImplementedError("server_holds_socket reads /proc/net/tcp")
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
                and inode != "0"
            ):
                return True
    return False


#: The handshake path of a raw client: the demo authenticator's token (user ``mallory``).
TOKEN_PATH = "/api/core/ws?token=mallory:s1"


async def open_channel(port: int, *, rcvbuf: int | None = None,
                       path: str = TOKEN_PATH) -> tuple[HostileClient, str]:
    """A raw client on ``127.0.0.1:port`` past the handshake (of ``path``: mallory's token by
    default), with its channel id (from ``init``)."""
    client = await HostileClient.open(port, rcvbuf=rcvbuf)
    response = await client.handshake(path)
    assert response.status == 101, response
    init = json.loads((await client.read_frame()).text)
    return client, init["message"]["channel"]
