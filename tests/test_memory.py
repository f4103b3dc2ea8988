"""The in-memory transport's bounded queue: every waiter is eventually woken, nothing is lost.

``MemoryTransport`` is what ``DaraClient`` runs over in users' tests, and the client sends from
several tasks at once (its pinger, ``request()``, one task per responder): a sender that waits for
room must be woken when room comes, whichever other senders wait with it.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from dara_ws_core import ConnectionClosed, DaraClient, Endpoint, WebsocketManager, allow_anonymous
from dara_ws_core.memory import MemoryServer, MemoryTransport, memory_pair
from dara_ws_websockets import serve


async def _fill(sender_end: MemoryTransport, count: int) -> None:
    for i in range(count):
        await sender_end.send(json.dumps({"fill": i}).encode())


@pytest.mark.parametrize("max_queue", [1, 2, 5])
async def test_concurrent_senders_all_complete_and_each_keeps_its_order(max_queue: int) -> None:
    server, client = memory_pair(max_queue=max_queue)
    senders, frames_each = 8, 40

    async def sender(who: int) -> None:
        for n in range(frames_each):
            await client.send(json.dumps({"who": who, "n": n}).encode())

    tasks = [asyncio.create_task(sender(who)) for who in range(senders)]
    received: list[dict[str, int]] = []
    async with asyncio.timeout(10):
        for _ in range(senders * frames_each):
            received.append(json.loads(await server.receive()))
            await asyncio.sleep(0)  # let the woken senders run between reads, in any order
        await asyncio.gather(*tasks)
    for who in range(senders):
        assert [m["n"] for m in received if m["who"] == who] == list(range(frames_each))
    assert not server._frames and not server._writers


async def test_two_senders_waiting_for_room_are_both_delivered() -> None:
    """The reviewer's case: a full queue, two sends waiting; reading everything frees both."""
    server, client = memory_pair(max_queue=2)
    await _fill(client, 2)
    first = asyncio.create_task(client.send(b'{"n":"A"}'))
    await asyncio.sleep(0)
    second = asyncio.create_task(client.send(b'{"n":"B"}'))
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        got = [json.loads(await server.receive()) for _ in range(4)]
        await asyncio.gather(first, second)
    assert got[2:] == [{"n": "A"}, {"n": "B"}]


async def test_a_sender_cancelled_after_its_wake_up_passes_it_on() -> None:
    server, client = memory_pair(max_queue=1)
    await _fill(client, 1)
    waiting = [asyncio.create_task(client.send(json.dumps({"n": n}).encode())) for n in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)  # all three queue up for room
    assert len(server._writers) == 3
    await server.receive()  # room for one: the first waiter is woken ...
    waiting[0].cancel()  # ... and cancelled before it runs
    async with asyncio.timeout(5):
        await waiting[1]  # the wake-up went on to the next one
        assert not waiting[2].done()
        assert json.loads(await server.receive()) == {"n": 1}
        await waiting[2]
        assert json.loads(await server.receive()) == {"n": 2}
    assert waiting[0].cancelled()


async def test_concurrent_receivers_each_get_a_different_frame() -> None:
    server, client = memory_pair(max_queue=4)
    receivers = [asyncio.create_task(server.receive()) for _ in range(3)]
    await asyncio.sleep(0)
    await _fill(client, 3)
    async with asyncio.timeout(5):
        got = sorted(json.loads(frame)["fill"] for frame in await asyncio.gather(*receivers))
    assert got == [0, 1, 2]


@pytest.mark.parametrize("how", ["close", "peer close", "abort"])
async def test_closing_wakes_every_waiting_sender_and_receiver(how: str) -> None:
    server, client = memory_pair(max_queue=1)
    await _fill(client, 1)
    senders = [asyncio.create_task(client.send(b'{"late":1}')) for _ in range(3)]
    receivers = [asyncio.create_task(client.receive()) for _ in range(2)]
    await asyncio.sleep(0)
    if how == "close":
        await client.close()
    elif how == "peer close":
        await server.close()
    else:
        client.abort()
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(*senders, *receivers, return_exceptions=True)
    assert all(isinstance(outcome, ConnectionClosed) for outcome in outcomes), outcomes


async def test_a_memory_server_serves_an_endpoint_an_earlier_server_shut_down() -> None:
    # A module's endpoint, served on a real socket by one test and then in memory by the next:
    # the socket's serve() shut it down on exit, and every in-memory handshake was refused with
    # AuthenticationFailed("server is shutting down"), which said nothing of why.
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel_id, data: data)
    endpoint = Endpoint(manager, allow_anonymous())
    async with serve(endpoint, "127.0.0.1", 0):
        pass
    server = MemoryServer(endpoint)
    async with DaraClient(server.connect, ping_interval=None) as client:
        assert await client.request("echo", 1, timeout=5) == 1


async def test_a_memory_server_refuses_connections_once_its_endpoint_is_shut_down() -> None:
    # As a closed server refuses a socket: it used to raise AuthenticationFailed, which a test
    # read as a 403 rejection by a server still there.
    endpoint = Endpoint(WebsocketManager(), allow_anonymous())
    server = MemoryServer(endpoint)
    await endpoint.shutdown(grace=0)
    with pytest.raises(ConnectionRefusedError, match="endpoint is shut down"):
        await server.connect()


async def test_a_closed_memory_server_refuses_connections() -> None:
    endpoint = Endpoint(WebsocketManager(), allow_anonymous())
    server = MemoryServer(endpoint)
    await server.close()
    with pytest.raises(ConnectionRefusedError, match="it is closed"):
        await server.connect()
    await endpoint.shutdown(grace=0)


async def test_a_memory_server_cannot_reopen_an_endpoint_in_the_middle_of_its_shutdown() -> None:
    # The shutdown waits for a request in flight (its grace): a MemoryServer built meanwhile
    # silently took newcomers again beside the connections being closed.
    manager = WebsocketManager()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(channel_id: str, data: object) -> object:
        started.set()
        await release.wait()
        return data

    manager.add_ws_handler("slow", slow)
    endpoint = Endpoint(manager, allow_anonymous())
    server = MemoryServer(endpoint)
    async with DaraClient(server.connect, ping_interval=None, reconnect=False) as client:
        request = asyncio.create_task(client.request("slow", 1, timeout=5))
        async with asyncio.timeout(5):
            await started.wait()
        shutdown = asyncio.create_task(endpoint.shutdown(grace=5))
        await asyncio.sleep(0)  # the shutdown begins, and waits for the request
        assert "shutting down" in repr(endpoint)
        with pytest.raises(RuntimeError, match="while its shutdown"):
            MemoryServer(endpoint)
        release.set()
        async with asyncio.timeout(5):
            assert await request == 1
            await shutdown
    await server.close()
    assert endpoint.closed
