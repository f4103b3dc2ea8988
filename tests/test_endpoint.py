"""The endpoint and its connection driver over the in-memory transport: the lifecycle of
protocol.md section 5, with no socket. The same behaviours run on real sockets in
``test_contract.py``; here each is pinned down deterministically, driven by events."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from dara_ws_core import (
    ConnectionClosed,
    Endpoint,
    Identity,
    MemoryServer,
    MemoryTransport,
    ServerConfig,
    WebsocketManager,
    memory_pair,
    token_authenticator,
)
from dara_ws_core.driver import ConnectionDriver
from dara_ws_core.exceptions import CloseCode
from dara_ws_core.transport import HandshakeRequest

from .helpers import eventually
from .stacks import TRANSPORTS, Stack, verify_token

ALICE = Identity(user_id="alice", session_id="s1")


async def read_until_closed(client: MemoryTransport, limit: int = 100) -> tuple[list[Any], int]:
    frames: list[Any] = []
    for _ in range(limit):
        try:
            frames.append(json.loads(await client.receive()))
        except ConnectionClosed as closed:
            return frames, closed.code
    raise AssertionError(f"not closed after {limit} frames")


async def test_the_first_frame_is_init_with_the_channel_id() -> None:
    manager = WebsocketManager()
    server = MemoryServer(Endpoint(manager, lambda request: ALICE))
    client = await server.connect()
    init = json.loads(await client.receive())
    assert init["type"] == "init"
    assert manager.get_user_channels("alice") == {init["message"]["channel"]}
    await client.close()
    await server.close()
    assert manager.handlers == {}


async def test_the_driver_owns_the_handler_it_creates() -> None:
    manager = WebsocketManager()
    server_end, client = memory_pair()
    driver = ConnectionDriver(manager, server_end, ALICE, "c1")
    assert manager.handlers["c1"] is driver.handler
    task = asyncio.create_task(driver.run())
    assert json.loads(await client.receive())["message"] == {"channel": "c1"}
    await client.close()
    await task
    assert "c1" not in manager.handlers


async def test_replies_queued_before_a_policy_close_go_out_before_the_close_frame() -> None:
    # Ten pings within the limit, the eleventh over it: ten pongs, then 1008.
    manager = WebsocketManager(ServerConfig(rate_limit=10, rate_window=60.0))
    server = MemoryServer(Endpoint(manager, lambda request: ALICE))
    client = await server.connect()
    for _ in range(11):
        await client.send_text('{"type":"ping","message":null}')
    frames, code = await read_until_closed(client)
    assert [f["type"] for f in frames] == ["init"] + ["pong"] * 10
    assert code == CloseCode.POLICY_VIOLATION
    await server.close()


async def test_a_peer_that_never_reads_is_aborted_after_close_timeout() -> None:
    manager = WebsocketManager(ServerConfig(close_timeout=0.2, max_queue_messages=8))
    server_end, client = memory_pair(max_queue=2)  # the client's inbox holds two frames
    driver = ConnectionDriver(manager, server_end, ALICE, "c1")
    task = asyncio.create_task(driver.run())
    # Fills the client's inbox, then queues behind it (not up to the queue's bound: a slow
    # consumer's close drops its backlog, and the close frame would get through).
    for i in range(4):
        driver.handler.push(json.dumps({"type": "message", "message": {"i": i}}).encode())
    manager.close_channel("c1", CloseCode.TRY_AGAIN_LATER, "slow consumer")
    started = time.monotonic()
    await asyncio.wait_for(task, timeout=5)  # ends only because the transport is aborted
    assert server_end.closed and client.close_code == CloseCode.ABNORMAL
    # Not before close_timeout (less a few ms: uvloop's clock is libuv's, in milliseconds).
    assert time.monotonic() - started >= 0.19
    assert "c1" not in manager.handlers


async def test_the_sweeper_closes_an_idle_connection_with_1001() -> None:
    manager = WebsocketManager(ServerConfig(idle_timeout=0.2))
    server = MemoryServer(Endpoint(manager, lambda request: ALICE))
    client = await server.connect()
    frames, code = await read_until_closed(client)
    assert code == CloseCode.GOING_AWAY and [f["type"] for f in frames] == ["init"]
    await server.close()


async def test_an_expired_identity_is_closed_with_1008() -> None:
    soon = Identity(user_id="bob", session_id="s2", expires_at=time.time() + 0.3)
    manager = WebsocketManager()
    server = MemoryServer(Endpoint(manager, lambda request: soon))
    client = await server.connect()
    _, code = await read_until_closed(client)
    assert code == CloseCode.POLICY_VIOLATION
    await server.close()


async def test_shutdown_closes_idle_connections_at_once_and_busy_ones_after_their_reply() -> None:
    release = asyncio.Event()

    async def slow(channel: str, data: Any) -> Any:
        await release.wait()
        return "done"

    manager = WebsocketManager(ServerConfig(shutdown_grace=30.0))
    manager.add_ws_handler("slow", slow)
    endpoint = Endpoint(manager, lambda request: ALICE)
    server = MemoryServer(endpoint)
    idle, busy = await server.connect(), await server.connect()
    await busy.send_text('{"type":"custom","message":{"kind":"slow","__rchan":"r1"}}')
    await eventually(lambda: any(h.task_count for h in manager.handlers.values()), "slow runs")
    shutdown = asyncio.create_task(endpoint.shutdown())
    _, idle_code = await read_until_closed(idle)  # closed while the slow reply is pending
    assert idle_code == CloseCode.GOING_AWAY and not shutdown.done()
    release.set()
    frames, busy_code = await read_until_closed(busy)
    assert frames[-1]["message"] == {"kind": "slow", "data": "done", "__response_for": "r1"}
    assert busy_code == CloseCode.GOING_AWAY
    await shutdown
    assert manager.handlers == {} and endpoint.connection_count == 0
    await server.close()


async def test_concurrent_handshakes_of_one_user_respect_the_connection_limit() -> None:
    manager = WebsocketManager(ServerConfig(max_connections_per_user=2))
    endpoint = Endpoint(manager, lambda request: ALICE)
    request = HandshakeRequest.build("/api/core/ws", [], None)
    # Five handshakes pass authenticate() before any connection registers.
    identities = await asyncio.gather(*(endpoint.authenticate(request) for _ in range(5)))
    pairs = [memory_pair() for _ in identities]
    tasks = [asyncio.create_task(endpoint.serve(s, i)) for (s, _), i in zip(pairs, identities, strict=True)]
    await eventually(lambda: sum(t.done() for t in tasks) == 3, "three refused")
    assert len(manager.get_user_channels("alice")) == 2
    refused = [c for (_, c), t in zip(pairs, tasks, strict=True) if t.done()]
    assert all(c.close_code == CloseCode.POLICY_VIOLATION for c in refused)
    for _, client in pairs:
        await client.close()
    await asyncio.gather(*tasks)


async def test_a_client_with_a_full_buffer_does_not_hold_the_loop() -> None:
    # A receive with frames already buffered returns without suspending: without a yield the
    # driver would handle all of them before any other connection's task ran.
    manager = WebsocketManager()
    server_end, client = memory_pair(max_queue=5000)
    for _ in range(1000):
        await client.send_text('{"type":"ping","message":null}')
    driver = ConnectionDriver(manager, server_end, ALICE, "c1")
    seen: list[int] = []

    async def neighbour() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
            seen.append(manager.counters.frames_in)

    task = asyncio.create_task(driver.run())
    await neighbour()
    assert seen[-1] < 100, f"the neighbour ran only after {seen[-1]} frames"
    await client.close()
    await task


@pytest.mark.parametrize("transport", sorted(t for t in TRANSPORTS if t != "memory"))
async def test_an_endpoint_served_again_after_its_shutdown_takes_clients(transport: str) -> None:
    # Leaving serve() shuts the endpoint down; serving it again (the next test of a module-level
    # endpoint, a second TestClient(app)) used to refuse every handshake with 403, silently
    # (review19 #1). Each adapter's serve() opens it again.
    manager = WebsocketManager(ServerConfig())
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    manager.add_ws_handler("echo", lambda channel_id, data: data)
    for attempt in range(2):
        async with TRANSPORTS[transport](endpoint) as connect:
            stack = Stack(transport, manager, endpoint, connect)
            client = await stack.client(f"u{attempt}:s")
            assert await client.request("echo", attempt, timeout=5) == attempt
            await client.close()
        assert endpoint.connection_count == 0
