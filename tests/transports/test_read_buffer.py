"""A read of every asyncio-protocol server allocates what arrived, not asyncio's 256 KiB.

asyncio's own socket reads allocate a ``max_size`` (256 KiB) object each time, which glibc may
take from the top of the heap and give back to the system after every read: a pair of system
calls and fresh page faults per read, from one start of the process to the next (11.5k against
17.5k replies a second, same code, closed loop). The protocols of the websockets adapter, of
aiohttp (under ``serve`` and behind ``add_route`` in an application's own server) and of a hooked
uvicorn are ``SharedBufferReads``: ``BufferedProtocol``s reading into one buffer for each thread
(of ``READ_BUFFER_SIZE``). These tests look at what the server read, and how, on real sockets. picows
reads into a buffer of its own, and so does uvloop (one per loop), which calls a protocol's
``data_received`` whenever it has one: there, the shared buffer is never read into."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from dara_ws_core import DaraClient, Endpoint, ServerConfig, WebsocketManager, token_authenticator
from dara_ws_core.transport import READ_BUFFER_SIZE, SharedBufferReads
from tests.helpers import eventually
from tests.hostile import TEXT, TOKEN_PATH, HostileClient, encode_frame, open_channel
from tests.stacks import hooked_uvicorn, verify_token
from tests.transports.test_tls import _endpoint, _tls_round_trip, _tls_server, certificate

__all__ = ["certificate"]  # a fixture of test_tls, used here

#: What asyncio's socket transport reads at most at once, and allocates for each read.
ASYNCIO_READ = 256 * 1024


def on_uvloop() -> bool:
    """Whether the test runs on uvloop, which reads into a buffer of its own whatever the
    protocol offers (``DARA_TEST_LOOP=uvloop``)."""
    return "uvloop" in type(asyncio.get_running_loop()).__module__


#: Every server whose protocol reads through the shared buffer: the adapters' serve(), an
#: aiohttp application of the caller's (``add_route``), a uvicorn the application runs, hooked.
SERVERS = ("dara_ws_websockets", "dara_ws_aiohttp", "dara_ws_asgi", "aiohttp-application", "hooked-uvicorn")


@contextlib.asynccontextmanager
async def served(name: str, manager: WebsocketManager) -> AsyncIterator[int]:
    """The port of ``manager``'s endpoint served by ``name`` (one of :data:`SERVERS`)."""
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    if name == "aiohttp-application":
        from dara_ws_aiohttp import add_route

        app = web.Application()
        add_route(app, endpoint)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield runner.addresses[0][1]
        finally:
            await runner.cleanup()
    elif name == "hooked-uvicorn":
        from dara_ws_asgi import asgi_app

        async with hooked_uvicorn(asgi_app(endpoint), endpoint) as port:
            yield port
    else:
        import importlib

        async with importlib.import_module(name).serve(endpoint, "127.0.0.1", 0) as server:
            yield server.port


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each read into the shared buffer, as it happens."""
    found: list[int] = []
    buffered = SharedBufferReads.buffer_updated

    def counted(self: Any, nbytes: int) -> None:
        found.append(nbytes)
        buffered(self, nbytes)

    monkeypatch.setattr(SharedBufferReads, "buffer_updated", counted)
    return found


@pytest.mark.parametrize("name", SERVERS)
async def test_every_read_goes_through_the_shared_buffer(name: str, reads: list[int]) -> None:
    # asyncio reads a BufferedProtocol with recv_into its buffer (get_buffer, buffer_updated),
    # and never allocates a read of its own for it: every frame the server read came that way.
    manager = WebsocketManager(ServerConfig())
    manager.add_ws_handler("echo", lambda channel, data: data)
    async with served(name, manager) as port:
        client, _ = await open_channel(port)
        frame = encode_frame(TEXT, json.dumps({"type": "custom", "message": {
            "kind": "echo", "data": 1, "__rchan": "r"}}))
        before = sum(reads)
        for _ in range(20):
            client.write(frame)
            reply = json.loads((await client.read_frame()).text)
            assert reply["message"]["__response_for"] == "r", reply
        await client.close()
        if on_uvloop():
            assert reads == []
        else:
            assert sum(reads) - before == 20 * len(frame)  # each request read into the buffer, whole


@pytest.mark.parametrize("name", SERVERS)
async def test_a_large_message_arrives_whole_through_the_shared_buffer(name: str) -> None:
    # A message bigger than the buffer takes several reads into the same buffer, each copied out
    # before the next, while other connections read into it too: what the handler gets is the
    # message sent, byte for byte, and the others are answered.
    assert READ_BUFFER_SIZE < 3 * ASYNCIO_READ
    text = "".join(chr(0x41 + i % 26) for i in range(3 * ASYNCIO_READ))
    manager = WebsocketManager(ServerConfig())
    got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    manager.add_ws_handler("big", lambda channel, data: got.set_result(data))
    async with served(name, manager) as port:
        others = [await open_channel(port) for _ in range(3)]
        client, _ = await open_channel(port)
        for other, _ in others:
            other.write(encode_frame(TEXT, json.dumps({"type": "ping", "message": None})))
        client.write(encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "big", "data": text}})))
        assert await asyncio.wait_for(got, 10) == text
        for other, _ in others:
            assert json.loads((await other.read_frame()).text)["type"] == "pong"
            await other.close()
        await client.close()


@pytest.mark.parametrize("name", ["dara_ws_websockets", "dara_ws_aiohttp", "uvicorn-of-the-application"])
async def test_tls_reads_go_through_the_shared_buffer(
        name: str, certificate: tuple[Path, Path], reads: list[int]) -> None:
    # Over TLS, asyncio decrypts into the application protocol's buffer the same way.
    endpoint = _endpoint()
    async with _tls_server(name, endpoint, certificate) as port:
        await _tls_round_trip(port, certificate, endpoint)
        assert not reads if on_uvloop() else reads



#: Messages each client of :func:`test_servers_in_two_threads_each_read_their_own_bytes` sends.
THREADED_MESSAGES = 40


@pytest.mark.parametrize("name", SERVERS)
def test_servers_in_two_threads_each_read_their_own_bytes(name: str) -> None:
    # Two servers, each on an event loop of its own thread (a test suite's, an application's
    # embedded one): a read of one and a read of the other may run at once (recv_into lets the
    # GIL go), and they must not share the buffer they read into: with one for the process, one
    # read into it while the other copied its bytes out, and a client's frames reached the other
    # server's connections (1002 "invalid opcode", or another client's data handed to a handler).
    outcomes: dict[str, Any] = {}

    async def serve_and_send(letter: str, local: str) -> None:
        data = letter * 60_000
        seen: list[bool] = []
        manager = WebsocketManager(ServerConfig())
        manager.add_ws_handler("check", lambda channel, got: seen.append(got == data))
        async with served(name, manager) as port:
            frame = encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "check", "data": data}}))
            clients = []
            for _ in range(3):
                client = await HostileClient.open(port, local=local)
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


async def test_the_websockets_client_reads_through_the_shared_buffer(reads: list[int]) -> None:
    # dara_ws_websockets.connect's connection reads the same way (served here by picows, whose
    # reads do not go through this buffer: every read counted is the client's).
    import dara_ws_picows
    from dara_ws_websockets import connect

    manager = WebsocketManager(ServerConfig())
    manager.add_ws_handler("echo", lambda channel, data: data)
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    async with (dara_ws_picows.serve(endpoint, "127.0.0.1", 0) as server, asyncio.timeout(10),
                DaraClient(lambda: connect(f"{server.url}?token=alice:s1"), ping_interval=None) as client):
        assert await client.request("echo", "x" * 10_000) == "x" * 10_000
    assert not reads if on_uvloop() else sum(reads) > 10_000
