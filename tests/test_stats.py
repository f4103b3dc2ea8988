"""``WebsocketManager.stats()``: the snapshot counts what real connections did, on the in-memory
transport and on a real socket (websockets), and costs one pass over the live connections."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import pytest

from dara_ws_core import (
    ChunkError,
    ConnectionClosed,
    RemoteError,
    RequestTimeout,
    ServerConfig,
    ServerStats,
    SlowConsumerPolicy,
    WebsocketManager,
)
from dara_ws_core.exceptions import CloseCode
from dara_ws_core.stats import transport_label

from .helpers import eventually
from .stacks import HandshakeRejected, running_stack


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_stats_count_a_connection_its_traffic_requests_and_close(transport: str) -> None:
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel, data: data)
    async with running_stack(transport, manager=manager) as stack:
        before = manager.stats()
        assert before.connections == 0 and before.frames_in == 0
        client = await stack.client()
        client.on_request(lambda request: 42)
        assert await client.request("echo", {"x": 1}) == {"x": 1}
        assert await manager.send_and_wait(client.channel, {"q": 1}) == 42
        stats = manager.stats()
        assert stats.connections == 1
        assert dict(stats.connections_by_transport) == {transport: 1}
        assert stats.connections_opened == 1 and stats.handshakes_accepted == 1
        # in: the echo request and the answer; out: init, the echo reply and the request
        assert stats.frames_in == 2 and stats.frames_out == 3
        assert stats.bytes_in > 0 and stats.bytes_out > stats.frames_out * 10
        assert stats.requests["answered"] == 1 and stats.pending_requests == 0
        assert stats.custom_handlers["ok"] == 1
        await client.close()
        await eventually(lambda: manager.stats().connections == 0, "the channel removed")
    assert manager.stats().close_codes == {CloseCode.NORMAL: 1}


async def test_rejected_handshakes_are_counted_by_reason() -> None:
    async with running_stack("memory", ServerConfig(max_connections_per_user=1)) as stack:
        with pytest.raises(HandshakeRejected):
            await stack.connect("bad")
        await stack.client("alice:s1")
        with pytest.raises(HandshakeRejected):
            await stack.connect("alice:s2")
        stats = stack.manager.stats()
        assert dict(stats.handshakes_rejected) == {"auth": 1, "limit": 1}
        assert stats.handshakes_accepted == 1


async def test_custom_handler_outcomes_ok_error_timeout_and_busy_are_counted() -> None:
    manager = WebsocketManager(ServerConfig(handler_timeout=0.05, max_handler_tasks=1))
    release = asyncio.Event()

    def fail(channel: str, data: Any) -> Any:
        raise ValueError("boom")

    async def hang(channel: str, data: Any) -> Any:
        await asyncio.sleep(10)

    async def hold(channel: str, data: Any) -> Any:
        await release.wait()
        return "held"

    manager.add_ws_handler("fail", fail)
    manager.add_ws_handler("hang", hang)
    manager.add_ws_handler("hold", hold)
    async with running_stack("memory", manager=manager) as stack:
        client = await stack.client()
        with pytest.raises(RemoteError):
            await client.request("fail")
        with pytest.raises(RemoteError):
            await client.request("hang")
        held = asyncio.create_task(client.request("hold"))
        await eventually(lambda: manager.stats().handlers_running == 1, "hold running")
        with pytest.raises(RemoteError):
            await client.request("hold")  # one handler at a time: busy
        release.set()
        assert await held == "held"
        stats = manager.stats()
        assert dict(stats.custom_handlers) == {"ok": 1, "error": 1, "timeout": 1, "busy": 1}
        await client.close()
        await eventually(lambda: not manager.handlers, "the channel removed")
        # busy answers of a connection that is gone are kept
        assert manager.stats().custom_handlers["busy"] == 1


async def test_request_outcomes_timeout_closed_and_chunk_error_are_counted() -> None:
    manager = WebsocketManager()
    async with running_stack("memory", manager=manager) as stack:
        client = await stack.connect()
        channel = json.loads(await client.receive())["message"]["channel"]
        with pytest.raises(RequestTimeout):
            await manager.send_and_wait(channel, {"q": 1}, timeout=0.01)
        asking = asyncio.create_task(manager.send_and_wait(channel, {"q": 2}))
        await client.receive()  # the timed-out request
        rchan = json.loads(await client.receive())["message"]["__rchan"]
        assert manager.stats().pending_requests == 1
        plain = {"type": "message", "channel": rchan, "chunk_count": 2, "message": "a"}
        await client.send(json.dumps(plain).encode())
        await client.send(json.dumps({**plain, "chunk_count": None}).encode())
        with pytest.raises(ChunkError):
            await asking
        closing = asyncio.create_task(manager.send_and_wait(channel, {"q": 3}))
        await client.receive()
        await client.close()
        with pytest.raises(ConnectionClosed):
            await closing
    requests = manager.stats().requests
    assert dict(requests) == {"answered": 0, "timeout": 1, "closed": 1, "chunk_error": 1}


async def test_a_reader_that_stops_shows_in_queue_depth_and_drop_oldest_events() -> None:
    config = ServerConfig(max_queue_messages=8, slow_consumer_policy=SlowConsumerPolicy.DROP_OLDEST)
    manager = WebsocketManager(config)
    async with running_stack("memory", manager=manager) as stack:
        client = await stack.connect()  # never reads: its inbound buffer (64) then our queue fill
        await eventually(lambda: bool(manager.handlers), "connected")
        for i in range(200):
            await manager.broadcast({"i": i})
        stats = manager.stats()
        assert stats.max_queue_depth == stats.queued_frames == 8
        assert stats.queued_bytes > 0
        assert stats.slow_consumer["drop_oldest"] == stats.frames_dropped > 0
        assert stats.frames_out == 201  # init and every broadcast were accepted
        await client.close()


async def test_the_snapshot_is_immutable_and_serialisable() -> None:
    manager = WebsocketManager()
    manager.counters.count(manager.counters.close_codes, 1000)
    stats = manager.stats()
    assert isinstance(stats, ServerStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.connections = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        stats.close_codes[1000] = 2  # type: ignore[index]
    manager.counters.count(manager.counters.close_codes, 1000)
    assert stats.close_codes[1000] == 1  # a copy, not a view
    data = json.loads(json.dumps(stats.as_dict()))
    assert data["close_codes"] == {"1000": 1} and data["backplane"] is None


def test_transport_labels_name_the_adapter() -> None:
    from dara_ws_core import MemoryTransport

    class Named:
        transport_name = "custom"

    assert transport_label(MemoryTransport()) == "memory"
    assert transport_label(Named()) == "custom"


def test_dara_ws_serve_prints_its_stats_as_json_lines() -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", str(port), "--clock", "0",
         "--stats-interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert server.stdout is not None
        while "dara-ws demo" not in (line := server.stdout.readline()):
            assert line, "the demo server exited before it was ready"
        probe = subprocess.run(
            [sys.executable, "-m", "dara_ws_cli", "probe", f"ws://127.0.0.1:{port}/api/core/ws?token=p"],
            check=False, capture_output=True, text=True, timeout=30,
        )
        assert probe.returncode == 0, probe.stderr
        for _ in range(100):  # 0.1 s apart: the probe's connection shows within a few lines
            line = server.stdout.readline()
            assert line, "the demo server exited"
            stats = json.loads(line)
            if stats["close_codes"]:
                break
        else:
            raise AssertionError("the probe's connection never showed in the stats")
        assert stats["handshakes_accepted"] == 1
        assert stats["custom_handlers"]["ok"] == 2  # echo and ask
        assert stats["requests"]["answered"] == 1  # ask's question to the client
        assert stats["connections"] == 0
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.mark.parametrize("transport", ["memory", "websockets", "aiohttp", "asgi", "picows"])
async def test_every_transport_is_named_in_stats_and_log_records(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator reads the transport's name off the connections gauge and the log records
    (the aiohttp adapter's was ``transport``, its module's name)."""
    manager = WebsocketManager()
    caplog.set_level(logging.INFO, "dara_ws_core")
    async with running_stack(transport, manager=manager) as stack:
        client = await stack.client()
        with pytest.raises(RemoteError):
            await client.request("no such kind", None, timeout=5)
        assert dict(manager.stats().connections_by_transport) == {transport: 1}
    [record] = [r for r in caplog.records if "unknown kind" in r.getMessage()]
    assert record.__dict__["transport"] == transport
