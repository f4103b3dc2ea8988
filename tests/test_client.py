"""``DaraClient`` against hostile servers: what one server can make the client hold, and how long
a dead one goes unnoticed.

The servers are built with the real websockets library on 127.0.0.1 and misbehave on purpose: a
flood of requests, pushes nobody takes, a server that stops reading or answering. The client
reaches them with each client adapter (websockets and aiohttp), since noticing a dead
connection relies on the adapter's ``abort()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from dara_ws_core import ConnectionClosed, CustomServerMessage, DaraClient, PushedMessage, Request, Transport
from dara_ws_core.client import _charge

from .helpers import eventually

Handler = Callable[[ServerConnection], Awaitable[None]]
INIT = json.dumps({"type": "init", "message": {"channel": "c"}})


@pytest.fixture(params=["websockets", "aiohttp"])
def client_adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def hostile(handler: Handler, adapter: str) -> AsyncIterator[Callable[[], Awaitable[Transport]]]:
    """Serve ``handler`` on a free port; yield a connector for ``DaraClient``."""
    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        url = f"ws://127.0.0.1:{port}/"
        if adapter == "websockets":
            from dara_ws_websockets import connect as ws_connect

            yield lambda: ws_connect(url, close_timeout=1)
        else:
            import aiohttp

            from dara_ws_aiohttp import connect as aiohttp_connect

            yield lambda: aiohttp_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=1))
        server.close(close_connections=False)
        for connection in list(server.connections):
            connection.transport.abort()


async def _answer_pings(ws: ServerConnection) -> None:
    async for frame in ws:
        if json.loads(frame).get("type") == "ping":
            await ws.send('{"type":"pong","message":null}')


def _sends_then_pongs(frames: list[str]) -> Handler:
    """A server that sends ``init`` and ``frames`` at once, then only answers pings."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(INIT)
        for frame in frames:
            await ws.send(frame)
        await _answer_pings(ws)

    return handler


def _requests(count: int) -> list[str]:
    return [json.dumps({"type": "message", "message": {"__rchan": f"r{i}"}}) for i in range(count)]


# ------------------------------------------------------------------ responders


async def test_a_request_flood_runs_at_most_max_responders_and_every_request_is_answered(
    client_adapter: str,
) -> None:
    requests, cap = 300, 8
    answers: list[Any] = []

    async def flood(ws: ServerConnection) -> None:
        await ws.send(INIT)
        for i in range(requests):
            await ws.send(json.dumps({"type": "message", "message": {"__rchan": f"r{i}", "i": i}}))
        async for frame in ws:
            answers.append(json.loads(frame))

    release = asyncio.Event()
    running = peak = 0

    async def slow(request: Request) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            return request.payload["i"]
        finally:
            running -= 1

    async with hostile(flood, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_responders=cap)
        client.on_request(slow)
        await client.connect()
        try:
            await eventually(lambda: running == cap, "the client runs its responders")
            await asyncio.sleep(0.2)  # the client, blocked at the cap, reads nothing more
            assert peak == cap and len(client._tasks) == cap
            release.set()
            await eventually(lambda: len(answers) == requests, "every request answered")
        finally:
            await client.close()
    assert peak == cap
    assert sorted(a["message"] for a in answers) == list(range(requests))
    assert {a["channel"] for a in answers} == {f"r{i}" for i in range(requests)}


async def test_close_is_prompt_while_every_responder_slot_is_busy(client_adapter: str) -> None:
    never = asyncio.Event()

    async def stuck(request: Request) -> Any:
        await never.wait()

    async with hostile(_sends_then_pongs(_requests(50)), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_responders=4)
        client.on_request(stuck)
        await client.connect()
        await eventually(lambda: client._responding == 4, "the client is at its cap")
        async with asyncio.timeout(3):
            await client.close()
        assert not client._tasks and client._responding == 0
        await client.wait_closed(1)


async def test_time_spent_at_the_responder_cap_does_not_count_as_a_dead_server(
    client_adapter: str,
) -> None:
    """The client, not the server, stops reading at the cap: the pongs wait in the socket."""

    async def slower_than_the_idle_timeout(request: Request) -> Any:
        await asyncio.sleep(0.6)  # the scenario: twice idle_timeout (0.3 s)
        return 1

    async with hostile(_sends_then_pongs(_requests(2)), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=0.1, idle_timeout=0.3, max_responders=1)
        client.on_request(slower_than_the_idle_timeout)
        await client.connect()
        try:
            await eventually(lambda: not client._tasks and client.pongs >= 3, "answered, pings on")
            assert client.idle_closes == 0 and client.connections == 1 and client.connected
        finally:
            await client.close()


# ------------------------------------------------------------------ inbox


def _push(i: int, size: int) -> str:
    return json.dumps({"type": "custom", "message": {"kind": "k", "data": [i, "p" * size]}})


def _number(message: PushedMessage) -> int:
    assert isinstance(message, CustomServerMessage)
    return int(message.message.data[0])


async def test_a_full_inbox_drops_the_oldest_pushes_to_stay_within_its_bytes(
    client_adapter: str, caplog: pytest.LogCaptureFixture
) -> None:
    pushes, size = 40, 100_000
    frame_size = _charge(_push(0, size), 0)  # its text and its values, as the inbox counts it

    pushes_nobody_takes = _sends_then_pongs([_push(i, size) for i in range(pushes)])
    async with hostile(pushes_nobody_takes, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue_bytes=3 * frame_size + 10)
        await client.connect()
        try:
            await eventually(lambda: client.dropped == pushes - 3, "the oldest pushes dropped")
            kept = client.received_nowait()
        finally:
            await client.close()
    assert [_number(m) for m in kept] == [pushes - 3, pushes - 2, pushes - 1]
    assert client._inbox_bytes == 0
    dropped_logs = [r for r in caplog.records if "dropped the oldest push" in r.getMessage()]
    assert 1 <= len(dropped_logs) <= 11  # the first ten, then powers of ten


async def test_a_full_inbox_drops_the_oldest_pushes_to_stay_within_its_count(
    client_adapter: str,
) -> None:
    async with hostile(_sends_then_pongs([_push(i, 1) for i in range(30)]), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue=5)
        await client.connect()
        try:
            await eventually(lambda: client.dropped == 25, "the oldest pushes dropped")
            assert [_number(await client.receive(1)) for _ in range(5)] == list(range(25, 30))
            assert client._inbox_bytes == 0
        finally:
            await client.close()


async def test_a_push_larger_than_the_byte_bound_is_kept_alone(client_adapter: str) -> None:
    one_big_after_small = _sends_then_pongs([_push(0, 10), _push(1, 50_000)])
    async with hostile(one_big_after_small, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue_bytes=10_000)
        await client.connect()
        try:
            assert _number(await client.receive(5)) == 1 and client.dropped == 1
        finally:
            await client.close()


# ------------------------------------------------------------------ a dead server


async def _goes_silent(ws: ServerConnection, reads: bool) -> None:
    await ws.send(INIT)
    if reads:  # reads every frame and answers none
        async for _ in ws:
            pass
    else:  # reads nothing more: the client's pings pile up unanswered
        ws.transport.pause_reading()
        await ws.wait_closed()


@pytest.mark.parametrize("reads", [True, False], ids=["never-answers", "never-reads"])
async def test_a_silent_server_is_given_up_and_the_client_reconnects(
    client_adapter: str, reads: bool
) -> None:
    accepted = 0

    async def silent_first(ws: ServerConnection) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 1:
            await _goes_silent(ws, reads)
        else:
            await ws.send(INIT)
            await _answer_pings(ws)

    async with hostile(silent_first, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=0.1, reconnect=True, backoff_initial=0.01)
        assert client.idle_timeout == pytest.approx(0.2)
        await client.connect()
        try:
            with pytest.raises(ConnectionClosed) as lost:
                await client.request("echo", 1, timeout=5)  # fails with the connection, not later
            assert lost.value.code == 1006 and "no frame from the server" in lost.value.reason
            await client.wait_connected(5)
            assert client.connections == 2 and client.idle_closes == 1
            await eventually(lambda: client.pongs >= 3, "the new connection is alive")
            assert client.idle_closes == 1  # a live server is never given up
        finally:
            await client.close()


async def test_a_silent_server_without_reconnect_stops_the_client(client_adapter: str) -> None:
    async with hostile(lambda ws: _goes_silent(ws, False), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=0.1)
        await client.connect()
        closed = await client.wait_closed(5)
        assert closed is not None and closed.code == 1006 and not client.connected
        with pytest.raises(ConnectionClosed):
            await client.receive(1)
        await client.close()


async def test_without_pings_a_quiet_server_is_never_given_up(client_adapter: str) -> None:
    async with hostile(lambda ws: _goes_silent(ws, True), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None)
        assert client.idle_timeout is None
        await client.connect()
        try:
            with pytest.raises(TimeoutError):
                await client.receive(0.5)
            assert client.connected and client.idle_closes == 0
        finally:
            await client.close()


def test_an_idle_timeout_within_one_ping_interval_is_refused() -> None:
    async def never() -> Transport:
        raise AssertionError("not connected")

    with pytest.raises(ValueError, match="idle_timeout"):
        DaraClient(never, ping_interval=1.0, idle_timeout=1.0)
    with pytest.raises(ValueError, match="max_responders"):
        DaraClient(never, max_responders=0)


@pytest.fixture(autouse=True)
def _client_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dara_ws_core.client")
