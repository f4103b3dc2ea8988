"""A backplane used before ``start()``: every call that publishes or asks the bus raises one
``RuntimeError`` naming the fix, on the in-process broker and on a real Redis, called directly or
through the manager. Before, the same mistake dropped a broadcast with a warning that the bus was
"unavailable", raised ``BackplaneError`` for a send to a channel, kept a message for a start that
might never come, and left ``flush()`` waiting for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import DaraServerMessage, ServerConfig, WebsocketManager
from dara_ws_core.backplane import BrokerBackplane, MemoryBackplane, MemoryBroker
from dara_ws_core.outbox import OutboxLimits

from .stacks import running_stack

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

TIMEOUT = 5.0
MESSAGE = r"not started: await backplane\.start\(manager\) first"
KEEP = OutboxLimits()

#: Each call a newcomer makes before start(), on the backplane or through its manager.
CALLS: dict[str, Callable[[BrokerBackplane, WebsocketManager], Awaitable[Any]]] = {
    "send_to_channel": lambda bp, m: bp.send_to_channel("c1", b"{}"),
    "broadcast": lambda bp, m: bp.broadcast(b"{}", None),
    "send_to_user": lambda bp, m: bp.send_to_user("alice", b"{}", None),
    "send_to_user kept": lambda bp, m: bp.send_to_user("alice", b"{}", None, KEEP),
    "request": lambda bp, m: bp.request("c1", {"x": 1}, False, 1.0),
    "user_channels": lambda bp, m: bp.user_channels("alice"),
    "flush": lambda bp, m: bp.flush(),
    "disconnect": lambda bp, m: _now(bp.disconnect("user", "alice", 4000, "revoked")),
    "manager.send_message": lambda bp, m: m.send_message("c1", {"x": 1}),
    "manager.broadcast": lambda bp, m: m.broadcast({"x": 1}),
    "manager.send_message_to_user": lambda bp, m: m.send_message_to_user("alice", {"x": 1}),
    "manager.send_and_wait": lambda bp, m: m.send_and_wait("c1", {"x": 1}, timeout=1.0),
    "manager.get_all_user_channels": lambda bp, m: m.get_all_user_channels("alice"),
}


async def _now(value: object) -> object:
    return value


@pytest.fixture(params=["memory", "redis"])
async def unstarted(request: pytest.FixtureRequest) -> AsyncIterator[tuple[BrokerBackplane, WebsocketManager]]:
    """A backplane handed to its manager, never started (the channel c1 is connected nowhere)."""
    if request.param == "memory":
        backplane: BrokerBackplane = MemoryBackplane(MemoryBroker())
    else:
        from dara_ws_redis import RedisBackplane

        server: RedisServer = request.getfixturevalue("redis_server")
        backplane = RedisBackplane(server.url)
    manager = WebsocketManager(ServerConfig(), backplane=backplane)
    yield backplane, manager
    await backplane.stop()  # nothing to stop: a no-op


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_a_call_before_start_raises_runtime_error_naming_start(
    call: str, unstarted: tuple[BrokerBackplane, WebsocketManager]
) -> None:
    backplane, manager = unstarted
    backplane.channel_added("c0", None)  # a connection accepted before start(): allowed
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(RuntimeError, match=MESSAGE):
            await CALLS[call](backplane, manager)
    assert backplane.stats.failed == 0  # refused, not counted as a bus failure


async def test_the_same_calls_work_once_started() -> None:
    broker = MemoryBroker()
    backplane = MemoryBackplane(broker)
    manager = WebsocketManager(ServerConfig(), backplane=backplane)
    async with asyncio.timeout(TIMEOUT):
        await backplane.start(manager)
        try:
            await manager.broadcast({"x": 1})
            assert await manager.get_all_user_channels("alice") == set()
            await backplane.flush()
        finally:
            await backplane.stop()


#: The manager's calls that deliver to its own connections as well as through the bus.
FAN_OUTS: dict[str, Callable[[WebsocketManager, int], Awaitable[Any]]] = {
    "broadcast": lambda m, n: m.broadcast({"n": n}),
    "send_message_to_user": lambda m, n: m.send_message_to_user("alice", {"n": n}),
}


@pytest.mark.parametrize("call", sorted(FAN_OUTS))
async def test_a_fan_out_that_raises_for_start_delivered_nothing_here(
    call: str, unstarted: tuple[BrokerBackplane, WebsocketManager]
) -> None:
    """The manager checks the backplane before its own connections get the message: a retry
    once started must not bring them a second copy (nor the raise hide a first one)."""
    backplane, manager = unstarted
    async with running_stack("memory", manager=manager) as stack:
        client = await stack.client("alice:s1")
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(RuntimeError, match=MESSAGE):
                await FAN_OUTS[call](manager, 1)
            await backplane.start(manager)
            await FAN_OUTS[call](manager, 2)
            message = await client.receive(TIMEOUT)
        assert isinstance(message, DaraServerMessage)
        assert message.message.model_dump(by_alias=True, exclude_none=True) == {"n": 2}
