"""The main objects say what they are and their state in ``repr`` (as asyncio's and websockets'
do), and never a secret: no token, cookie or password, whatever the connection carried. Real
connections on the in-memory transport and on websockets over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import importlib
import re

import pytest

from dara_ws_core import DaraClient, Endpoint, ServerConfig, WebsocketManager, allow_anonymous
from dara_ws_core.backplane import MemoryBackplane, MemoryBroker

from .helpers import eventually
from .stacks import running_stack

TIMEOUT = 10.0
SECRET = "alice:s3cr3t-t0ken"


async def test_a_manager_says_its_connections_users_and_backplane() -> None:
    manager = WebsocketManager(ServerConfig(ping_interval=None))
    assert repr(manager) == "<WebsocketManager 0 connections, 0 users, backplane=none>"
    async with running_stack("memory", manager=manager) as stack:
        await stack.client(SECRET)
        await stack.client("alice:s2")
        await stack.client("bob:s1")
        assert repr(manager) == "<WebsocketManager 3 connections, 2 users, backplane=none>"
    backplane = MemoryBackplane(MemoryBroker())
    with_bus = WebsocketManager(backplane=backplane)
    assert repr(with_bus) == "<WebsocketManager 0 connections, 0 users, backplane=memory>"


async def test_an_endpoint_says_its_path_state_and_connections() -> None:
    async with running_stack("memory") as stack:
        assert repr(stack.endpoint) == "<Endpoint /api/core/ws open, 0 connections>"
        await stack.client(SECRET)
        assert repr(stack.endpoint) == "<Endpoint /api/core/ws open, 1 connection>"
        await stack.endpoint.shutdown(grace=0)
        assert repr(stack.endpoint) == "<Endpoint /api/core/ws shut down, 0 connections>"


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_a_handler_and_a_client_say_their_channel_and_state_never_the_token(transport: str) -> None:
    async with running_stack(transport) as stack:
        client = DaraClient(lambda: stack.connect(SECRET, cookie=True), ping_interval=None)
        assert repr(client) == "<DaraClient not connected>"
        async with asyncio.timeout(TIMEOUT):
            channel = await client.connect()
        try:
            assert repr(client) == f"<DaraClient channel={channel} connected>"
            handler = stack.manager.handlers[channel]
            assert repr(handler) == f"<WebSocketHandler {channel} user=alice open queued=0>"
        finally:
            await client.close()
        assert repr(client) == f"<DaraClient channel={channel} closed (1000)>"
        await eventually(lambda: handler.closed, "the server side closed")
        assert re.fullmatch(rf"<WebSocketHandler {channel} user=alice closed \(\d+\) queued=0>", repr(handler))
        for text in (repr(client), repr(handler), repr(stack.manager), repr(stack.endpoint)):
            assert "s3cr3t" not in text


async def test_an_anonymous_handler_says_so() -> None:
    manager = WebsocketManager()
    handler = manager.create_handler("c1", None, transport="memory")
    assert repr(handler) == "<WebSocketHandler c1 anonymous open queued=1>"  # its init frame


@pytest.mark.parametrize("adapter", ["dara_ws_websockets", "dara_ws_aiohttp", "dara_ws_asgi", "dara_ws_picows"])
async def test_a_served_endpoint_says_its_url_and_library(adapter: str) -> None:
    serve = importlib.import_module(adapter).serve
    endpoint = Endpoint(WebsocketManager(), allow_anonymous())
    async with serve(endpoint, "127.0.0.1", 0) as server:
        native = type(server.native)
        assert repr(server) == (f"<Server ws://127.0.0.1:{server.port}/api/core/ws "
                                f"({native.__module__}.{native.__qualname__})>")


async def test_a_memory_backplane_says_its_node_and_state() -> None:
    backplane = MemoryBackplane(MemoryBroker(), node_id="n1")
    assert repr(backplane) == "<MemoryBackplane node=n1 not started>"
    async with asyncio.timeout(TIMEOUT):
        await backplane.start(WebsocketManager())
        try:
            assert repr(backplane) == "<MemoryBackplane node=n1 connected>"
        finally:
            await backplane.stop()
    assert repr(backplane) == "<MemoryBackplane node=n1 stopped>"


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:hunter2@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("rediss://app:hunter2@127.0.0.1:6380/1?password=hunter2", "rediss://***@127.0.0.1:6380/1"),
])
def test_a_redis_backplane_says_its_url_without_the_password(url: str, shown: str) -> None:
    from dara_ws_redis import RedisBackplane

    backplane = RedisBackplane(url, node_id="n1")
    assert repr(backplane) == f"<RedisBackplane {shown} node=n1 not started>"
    assert "hunter2" not in repr(backplane)
