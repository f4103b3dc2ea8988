"""picows: the buffer size its writes consult, asked of asyncio's socket transport from C.

picows writes a frame straight to the socket only while nothing waits in asyncio's write buffer,
and asks the transport's ``get_write_buffer_size`` before every frame. The adapter hands it the
buffer's own ``__len__`` for asyncio's socket transport (``dara_ws_picows._write_buffer_size``):
the same number, without a Python call per frame. Real picows servers on 127.0.0.1, raw clients.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import json
import socket
import sys
from types import FrameType
from typing import Any

import pytest
from picows import WSMsgType

import dara_ws_picows
from dara_ws_core import ServerConfig
from dara_ws_picows import PicowsTransport, _write_buffer_size

from .hostile import open_channel
from .stacks import running_stack

_SOCKET_TRANSPORT: Any = getattr(asyncio.selector_events, "_SelectorSocketTransport")  # noqa: B009
STOCK_SIZE = _SOCKET_TRANSPORT.get_write_buffer_size
CONFIG = ServerConfig(ping_interval=None)
#: Whether asyncio's socket transport keeps its write buffer as one bytearray (Python 3.11), whose
#: ``__len__`` is the size: elsewhere (3.12 keeps a deque of chunks) there is no shortcut, and
#: picows asks asyncio's own method, as it would without the adapter.
SHORTCUT = dara_ws_picows._STOCK_SIZE is not None


def _underlying(stack: Any) -> asyncio.Transport:
    (handler,) = stack.manager.handlers.values()
    transport = handler._sink.transport  # the connection's driver
    assert isinstance(transport, PicowsTransport) and transport._ws is not None
    underlying: asyncio.Transport = transport._ws.underlying_transport
    return underlying


@pytest.mark.skipif(not isinstance(asyncio.get_event_loop_policy(), asyncio.DefaultEventLoopPolicy),
                    reason="asyncio's own loop only")
@pytest.mark.skipif(not SHORTCUT, reason="asyncio's write buffer is not one bytearray on this Python")
async def test_frames_are_written_without_a_python_call_for_asyncios_buffer_size() -> None:
    # picows asked asyncio's method before every frame: a Python call, more than half of what
    # picows spends on a small frame, once per recipient of a broadcast.
    calls = [0]
    code = STOCK_SIZE.__code__

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code is code:
            calls[0] += 1

    async with running_stack("picows", CONFIG) as stack:
        assert stack.port is not None
        client, _ = await open_channel(stack.port)
        assert type(_underlying(stack)) is _SOCKET_TRANSPORT  # the case this is about
        sys.setprofile(profile)
        try:
            for n in range(5):
                await stack.manager.broadcast({"n": n})
                await asyncio.sleep(0)  # one per iteration: each written at once
        finally:
            sys.setprofile(None)
        got = [json.loads((await client.read_frame()).text)["message"]["n"] for _ in range(5)]
        client.transport.abort()
    assert got == [0, 1, 2, 3, 4]
    assert calls[0] == 0


async def test_the_size_is_asyncios_own_and_the_transport_is_left_as_it_was() -> None:
    async with running_stack("picows", CONFIG) as stack:
        assert stack.port is not None
        client, _ = await open_channel(stack.port)
        underlying = _underlying(stack)
        # Only for the handover: the transport's own method is back.
        assert "get_write_buffer_size" not in vars(underlying)
        assert type(underlying).get_write_buffer_size is STOCK_SIZE
        size = _write_buffer_size(underlying)
        assert (size is not None) is SHORTCUT
        client.transport.pause_reading()  # the client stops reading: asyncio buffers
        frame = json.dumps({"pad": "x" * 65536})
        for _ in range(200):
            if underlying.get_write_buffer_size():
                break
            await stack.manager.broadcast({"pad": frame})
            await asyncio.sleep(0.01)
        assert underlying.get_write_buffer_size() > 0
        assert size is None or size() == underlying.get_write_buffer_size()
        client.transport.abort()


async def test_only_asyncios_own_socket_transport_gets_the_shortcut() -> None:
    class Subclass(_SOCKET_TRANSPORT):  # type: ignore[misc]  # may keep its buffer otherwise
        pass

    class Other:
        _buffer = bytearray()

        def get_write_buffer_size(self) -> int:
            return len(self._buffer)

    loop = asyncio.get_running_loop()
    for cls in (Subclass, _SOCKET_TRANSPORT):
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        transport = cls(loop, ours, asyncio.Protocol())
        try:
            size = _write_buffer_size(transport)
            if cls is Subclass or not SHORTCUT:
                assert size is None
                continue
            assert size is not None and size() == 0
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for _ in range(1000):  # the peer does not read: asyncio buffers what is left
                transport.write(b"x" * 65536)
                if transport.get_write_buffer_size():
                    break
            assert size() == transport.get_write_buffer_size() > 0
        finally:
            transport.abort()
            peer.close()
    assert _write_buffer_size(Other()) is None  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the aborts' callbacks


def _text_frames(data: bytes) -> list[str]:
    """The text payloads of unmasked server frames (the whole of ``data``)."""
    texts, at = [], 0
    while at < len(data):
        length, at = data[at + 1] & 0x7F, at + 2
        if length == 126:
            length, at = int.from_bytes(data[at:at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at:at + 8], "big"), at + 8
        texts.append(data[at:at + length].decode())
        at += length
    return texts


async def test_a_frame_written_while_asyncio_holds_bytes_goes_after_them() -> None:
    # picows writes to the socket directly only while asyncio's buffer is empty: a size that
    # said 0 while asyncio held bytes would put the frame ahead of them, or inside one, as soon
    # as the socket has room again (the peer read) before asyncio's write callback has run.
    async with running_stack("picows", CONFIG) as stack:
        assert stack.port is not None
        client, _ = await open_channel(stack.port)
        client.transport.pause_reading()
        underlying = _underlying(stack)
        sent = 0
        for _ in range(400):  # until asyncio holds bytes: the socket is full
            if underlying.get_write_buffer_size():
                break
            await stack.manager.broadcast({"n": sent, "pad": "z" * 30000})
            sent += 1
            await asyncio.sleep(0.005)
        assert underlying.get_write_buffer_size() > 0
        received = bytearray()
        client.sock.setblocking(False)
        for _ in range(10_000):  # the peer reads what the kernel holds: the socket has room
            try:
                chunk = client.sock.recv(1 << 20)
            except BlockingIOError:
                break
            received += chunk
        assert received
        # In the same iteration (asyncio's write callback has not run): a frame through picows.
        (handler,) = stack.manager.handlers.values()
        transport = handler._sink.transport  # type: ignore[union-attr]  # the connection's driver
        assert isinstance(transport, PicowsTransport) and transport._ws is not None
        transport._ws.send(WSMsgType.TEXT, b'{"last":true}')
        for _ in range(2000):  # then read everything, the loop running
            await asyncio.sleep(0.001)
            try:
                received += client.sock.recv(1 << 20)
            except BlockingIOError:
                if not underlying.get_write_buffer_size() and received.endswith(b'{"last":true}'):
                    break
        client.transport.abort()
    texts = _text_frames(bytes(received))
    assert texts[-1] == '{"last":true}'
    numbers = [json.loads(t)["message"]["n"] for t in texts[:-1]]
    assert numbers == list(range(sent))




async def test_frames_over_8_kib_to_a_reader_that_stops_are_flow_controlled_and_whole() -> None:
    # picows writes a server frame over 8 KiB with the transport's writelines([header, payload]),
    # the header a view of its own reused write buffer. Python 3.12's selector transport keeps
    # those views until sent and never pauses the protocol from writelines: for a reader that
    # stopped, asyncio's buffer grew by every broadcast (24 MiB for 50 of 512 KiB) and the queue
    # bound never applied. The adapter gives such a transport asyncio's base writelines (joined,
    # copied, one write()), as Python 3.11's is.
    blob = 512 * 1024
    async with running_stack("picows", CONFIG) as stack:
        assert stack.port is not None
        client, _ = await open_channel(stack.port, rcvbuf=4096)
        underlying = _underlying(stack)
        client.transport.pause_reading()
        most = 0
        for n in range(24):
            await stack.manager.broadcast({"n": n, "pad": "x" * blob})
            await asyncio.sleep(0)
            most = max(most, underlying.get_write_buffer_size())
        # Writing paused at the transport's limit: what is past it waits in the core's queue.
        assert most < 4 * blob, most
        client.transport.resume_reading()
        got = [json.loads((await client.read_frame(10)).text)["message"]["n"] for _ in range(24)]
        assert got == list(range(24))  # every frame whole, its header its own
        client.transport.abort()
