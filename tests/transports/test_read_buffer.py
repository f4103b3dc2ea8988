"""A read of the websockets adapter allocates what arrived, not asyncio's 256 KiB.

asyncio's own socket reads allocate a ``max_size`` (256 KiB) object each time, which glibc may
take from the top of the heap and give back to the system after every read: a pair of system
calls and fresh page faults per read, from one start of the process to the next (11.5k against
17.5k replies a second, same code, closed loop). The adapter's connection is a
``BufferedProtocol`` reading into one buffer for each thread (``_READ_BUFFER_SIZE``); these tests
look at what a read allocates, on real sockets."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

import dara_ws_websockets
from tests.helpers import eventually
from tests.hostile import TEXT, TOKEN_PATH, HostileClient, encode_frame, open_channel
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
    assert dara_ws_websockets._READ_BUFFER_SIZE < 3 * ASYNCIO_READ
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


#: Messages each client of :func:`test_servers_in_two_threads_each_read_their_own_bytes` sends.
THREADED_MESSAGES = 40


def test_servers_in_two_threads_each_read_their_own_bytes() -> None:
    # Two servers, each on an event loop of its own thread (a test suite's, an application's
    # embedded one): a read of one and a read of the other may run at once (recv_into lets the
    # GIL go), and they must not share the buffer they read into: one read into it while the
    # other copied its bytes out, and a client's frames reached the other server's connections
    # (1002 "invalid opcode", or another client's data handed to a handler).
    outcomes: dict[str, Any] = {}

    async def serve_and_send(letter: str, local: str) -> None:
        data = letter * 60_000
        seen: list[bool] = []
        async with running_stack("websockets") as stack:
            stack.manager.add_ws_handler("check", lambda channel, got: seen.append(got == data))
            assert stack.port is not None
            frame = encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "check", "data": data}}))
            clients = []
            for _ in range(3):
                client = await HostileClient.open(stack.port, local=local)
                assert (await client.handshake(TOKEN_PATH)).status == 101
                assert json.loads((await client.read_frame()).text)["type"] == "init"
                clients.append(client)
            for _ in range(THREADED_MESSAGES):
                for client in clients:
                    client.write(frame)
            # Every message handled, or a connection the server closed: it read bytes not its own.
            await eventually(lambda: len(seen) == 3 * THREADED_MESSAGES or any(c.ended_by_server for c in clients),
                             "every message handled, or a connection closed", 30)
            closes = [await c.read_close(1) if c.ended_by_server else None for c in clients]
            for client in clients:
                await client.close()
        outcomes[letter] = (seen.count(True), seen.count(False), closes)

    threads = [threading.Thread(target=asyncio.run, args=(serve_and_send(letter, local),))
               for letter, local in (("a", "127.0.0.2"), ("b", "127.0.0.3"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    expected = (3 * THREADED_MESSAGES, 0, [None, None, None])
    assert outcomes == {"a": expected, "b": expected}
