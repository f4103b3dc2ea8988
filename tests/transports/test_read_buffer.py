"""A read of the websockets adapter allocates what arrived, not asyncio's 256 KiB.

asyncio's own socket reads allocate a ``max_size`` (256 KiB) object each time, which glibc may
take from the top of the heap and give back to the system after every read: a pair of system
calls and fresh page faults per read, from one start of the process to the next (11.5k against
17.5k replies a second, same code, closed loop). The adapter's connection is a
``BufferedProtocol`` reading into one buffer for the process (``_READ_BUFFER``); these tests
look at what a read allocates, on real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import dara_ws_websockets
from tests.hostile import TEXT, encode_frame, open_channel
from tests.stacks import running_stack

#: What asyncio's socket transport reads at most at once, and allocates for each read.
ASYNCIO_READ = 256 * 1024


async def test_every_read_goes_through_the_shared_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio reads a BufferedProtocol with recv_into its buffer (get_buffer, buffer_updated),
    # and never allocates a read of its own for it: every frame the server read came that way.
    reads: list[int] = []
    connection = dara_ws_websockets._ServerConnection
    buffered = connection.buffer_updated

    def counted(self: Any, nbytes: int) -> None:
        reads.append(nbytes)
        buffered(self, nbytes)

    monkeypatch.setattr(connection, "buffer_updated", counted)
    async with running_stack("websockets") as stack:
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        assert stack.port is not None
        client, _ = await open_channel(stack.port)
        frame = encode_frame(TEXT, json.dumps({"type": "custom", "message": {
            "kind": "echo", "data": 1, "__rchan": "r"}}))
        before = sum(reads)
        for _ in range(20):
            client.write(frame)
            reply = json.loads((await client.read_frame()).text)
            assert reply["message"]["__response_for"] == "r", reply
        await client.close()
    assert sum(reads) - before == 20 * len(frame)  # each request read into the buffer, whole
    assert issubclass(connection, asyncio.BufferedProtocol)


async def test_a_large_message_arrives_whole_through_the_shared_buffer() -> None:
    # A message bigger than the buffer takes several reads into the same buffer, each copied out
    # before the next: what the handler gets is the message sent, byte for byte.
    assert len(dara_ws_websockets._READ_BUFFER) < 3 * ASYNCIO_READ
    text = "".join(chr(0x41 + i % 26) for i in range(3 * ASYNCIO_READ))
    async with running_stack("websockets") as stack:
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        stack.manager.add_ws_handler("big", lambda channel, data: got.set_result(data))
        assert stack.port is not None
        others = [await open_channel(stack.port) for _ in range(3)]  # reading at the same time
        client, _ = await open_channel(stack.port)
        for other, _ in others:
            other.write(encode_frame(TEXT, json.dumps({"type": "ping", "message": None})))
        client.write(encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "big", "data": text}})))
        assert await asyncio.wait_for(got, 10) == text
        for other, _ in others:
            assert json.loads((await other.read_frame()).text)["type"] == "pong"
            await other.close()
        await client.close()
