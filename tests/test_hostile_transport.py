"""Hostile clients against the transports (issue 10: items 3, 4, 6, 9, 11, 12), on real sockets.

Each test runs on every socket transport (websockets, aiohttp, ASGI under uvicorn) through
``tests.stacks`` and attacks it with ``tests.hostile.HostileClient``. Time bounds here are
correctness bounds ("released within close_timeout + a generous margin"), not speed targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dara_ws_core import ServerConfig, SlowConsumerPolicy

from .hostile import HostileClient, server_holds_socket
from .stacks import TRANSPORTS, Stack, running_stack

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
TOKEN_PATH = "/api/core/ws?token=mallory:s1"
MARGIN = 4.0  # on top of the configured timeout: a loaded 2-core CI machine is slow


@pytest.fixture(params=SOCKETS)
def socket_stack(request: pytest.FixtureRequest) -> Callable[..., contextlib.AbstractAsyncContextManager[Stack]]:
    """``async with socket_stack(config=...) as stack`` on each socket transport."""
    name = str(request.param)

    @contextlib.asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[Stack]:
        async with running_stack(name, **options) as stack:
            yield stack

    return make


async def open_channel(stack: Stack, *, rcvbuf: int | None = None) -> tuple[HostileClient, str]:
    """A raw client past the handshake, with its channel id (from ``init``)."""
    assert stack.port is not None
    client = await HostileClient.open(stack.port, rcvbuf=rcvbuf)
    response = await client.handshake(TOKEN_PATH)
    assert response.status == 101, response
    init = json.loads((await client.read_frame()).text)
    return client, init["message"]["channel"]


async def released(port: int, client: HostileClient, timeout: float) -> bool:
    """Whether the server lets go of its socket within ``timeout`` seconds (polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server_holds_socket(port, client.local_port):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---------------------------------------------------------------------------- item 3


async def test_a_slow_consumer_closed_with_1013_releases_its_socket_within_close_timeout(
    socket_stack: Any,
) -> None:
    config = ServerConfig(
        slow_consumer_policy=SlowConsumerPolicy.DISCONNECT, max_queue_messages=8,
        close_timeout=1.0, ping_interval=None,
    )
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack, rcvbuf=4096)
        client.stop_reading()
        payload = {"blob": "x" * 60_000}
        async with asyncio.timeout(30):
            while channel in stack.manager.handlers:  # fill every buffer until 1013
                with contextlib.suppress(Exception):
                    await stack.manager.send_message(channel, payload)
                await asyncio.sleep(0)
        assert await released(stack.port or 0, client, config.close_timeout + MARGIN)
        client.abort()


async def test_a_rate_limited_client_that_does_not_read_is_released_within_close_timeout(
    socket_stack: Any,
) -> None:
    config = ServerConfig(rate_limit=50, close_timeout=1.0, ping_interval=None)
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack, rcvbuf=4096)
        client.stop_reading()
        # Big pings whose pongs fill the client's window, then a burst over the limit.
        ping = json.dumps({"type": "ping", "message": "p" * 30_000})
        async with asyncio.timeout(30):
            for _ in range(200):
                client.send_text(ping)
                if not await client.drain(2.0) or channel not in stack.manager.handlers:
                    break
        assert channel not in stack.manager.handlers or await _gone(stack, channel)
        assert await released(stack.port or 0, client, config.close_timeout + MARGIN)
        client.abort()


async def _gone(stack: Stack, channel: str, timeout: float = 10.0) -> bool:
    async with asyncio.timeout(timeout):
        while channel in stack.manager.handlers:
            await asyncio.sleep(0.05)
    return True
