"""The outbox's bounds on a real ``redis-server``: a sender's quota and the namespace's bounds on
histories and bytes, kept in the script that appends (``dara_ws_redis``), so that one client
telling made-up users cannot grow Redis without bound or take the outbox from everyone else.
Real servers on 127.0.0.1, the stock client, every served transport for the flood."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import CustomServerMessage, ServerConfig, WebsocketManager
from dara_ws_redis import RedisBackplane

from .helpers import eventually
from .stacks import running_stack
from .test_kept_delivery import SERVED

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0


async def keys(redis_server: RedisServer, pattern: str) -> list[bytes]:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server.url)
    try:
        return [key async for key in client.scan_iter(match=pattern, count=1000)]
    finally:
        await client.aclose()


class _Manager:
    def __init__(self, redis_server: RedisServer, config: ServerConfig) -> None:
        self.namespace = f"bounds-{uuid.uuid4().hex[:8]}"
        self.backplane = RedisBackplane(redis_server.url, namespace=self.namespace)
        self.manager = WebsocketManager(config, backplane=self.backplane)

    async def __aenter__(self) -> WebsocketManager:
        await self.backplane.start(self.manager)
        return self.manager

    async def __aexit__(self, *exc: object) -> None:
        await self.backplane.stop()


def add_tell(manager: WebsocketManager) -> None:
    async def tell(channel_id: str, data: Any) -> bool:
        return await manager.send_message_to_user(
            data["user"], {"kind": "tell", "data": data["text"]}, custom=True)

    manager.add_ws_handler("tell", tell)


@pytest.mark.parametrize("transport", SERVED)
async def test_a_flood_of_tells_to_made_up_users_stops_at_the_senders_quota_in_redis(
    redis_server: RedisServer, transport: str,
) -> None:
    """The report's flood, scaled down: one client tells 60 made-up users. Redis keeps its first
    ``outbox_per_sender`` only; once the bus has refused one, the sender is told ``False``
    without a round trip; a friend's message to an offline user is still kept and reaches them."""
    config = ServerConfig(outbox_per_sender=10)
    bus = _Manager(redis_server, config)
    async with bus as manager, running_stack(transport, manager=manager) as stack:
        add_tell(manager)
        attacker = await stack.client("mallory:s1")
        kept = [await attacker.request("tell", {"user": f"made-up-{i}", "text": "x" * 100})
                for i in range(11)]
        assert kept == [True] * 11  # the 11th is refused by the bus, after the call
        await eventually(lambda: bus.backplane.stats.outbox_refused == 1, "the bus refused one")
        kept = [await attacker.request("tell", {"user": f"made-up-{i}", "text": "x" * 100})
                for i in range(11, 60)]
        assert kept == [False] * 49
        assert bus.backplane.stats.outbox_refused == 1  # not even offered to the bus
        assert len(await keys(redis_server, f"{bus.namespace}:outbox:*")) == 10
        friend = await stack.client("alice:s1")
        assert await friend.request("tell", {"user": "victim", "text": "for you"}) is True
        victim = await stack.client("victim:s1")
        message = await victim.receive(TIMEOUT)
        assert isinstance(message, CustomServerMessage)
        assert (message.message.kind, message.message.data) == ("tell", "for you")


async def test_redis_refuses_new_histories_beyond_the_namespaces_bound(
    redis_server: RedisServer,
) -> None:
    """Many senders, each within its quota: the namespace's bound on histories created stops
    the growth, refusing (never dropping what is kept); a user with a history still gets
    messages kept."""
    config = ServerConfig(outbox_users=12)
    bus = _Manager(redis_server, config)
    async with bus as manager, running_stack("websockets", manager=manager) as stack:
        add_tell(manager)
        for k in range(4):  # four senders, five made-up users each
            client = await stack.client(f"sender{k}:s1")
            for i in range(5):
                await client.request("tell", {"user": f"made-up-{k}-{i}", "text": "y"})
        await bus.backplane.flush()
        assert bus.backplane.stats.outbox_refused == 8
        assert len(await keys(redis_server, f"{bus.namespace}:outbox:*")) == 12
        assert await manager.send_message_to_user("made-up-0-0", {"t": "more"}) is True
        await bus.backplane.flush()
        assert bus.backplane.stats.outbox_refused == 8
        first = await stack.client("made-up-0-0:s1")
        got = [await first.receive(TIMEOUT) for _ in range(2)]
        assert [m.message.data if isinstance(m, CustomServerMessage) else m.message.model_dump()
                for m in got] == ["y", {"t": "more"}]


async def test_redis_refuses_bytes_beyond_the_namespaces_bound_then_tells_every_sender(
    redis_server: RedisServer,
) -> None:
    config = ServerConfig(outbox_total_bytes=40_000, outbox_bytes=100_000)
    async with _Manager(redis_server, config) as manager:
        big = {"t": "b" * 9_000}
        sends = [await manager.send_message_to_user("big", big) for _ in range(5)]
        assert sends == [True] * 5  # the fifth goes past 40,000 bytes: refused by the bus
        await manager.backplane.flush()  # type: ignore[union-attr]
        assert manager.backplane.stats.outbox_refused == 1  # type: ignore[union-attr]
        assert await manager.send_message_to_user("other", {"t": "small"}) is False


async def test_what_a_users_own_bounds_trim_leaves_the_namespaces_byte_count(
    redis_server: RedisServer,
) -> None:
    """The namespace's bytes are what is kept, not what was ever appended: a user at its own
    byte bound keeps getting messages kept (the oldest trimmed) far past ``outbox_total_bytes``
    sent in all."""
    config = ServerConfig(outbox_total_bytes=40_000, outbox_bytes=20_000)
    bus = _Manager(redis_server, config)
    async with bus as manager:
        for _ in range(20):
            assert await manager.send_message_to_user("busy", {"t": "b" * 9_000})
        await bus.backplane.flush()
        assert bus.backplane.stats.outbox_refused == 0
