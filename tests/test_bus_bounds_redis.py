"""The bus's own bounds on a real ``redis-server`` (review 11 items 2, 5 and 6): no message
bigger than ``max_bus_message`` is published (an over-size answer to a relayed ``send_and_wait``
reaches the asker as a ``ChunkError``, an over-size app send raises ``ValueError``); a process
never has more than ``publish_window`` bytes of its broadcasts in flight to its own subscription
(a flood does not overflow Redis's pubsub output buffer and cut it off the bus); the publish
outbox is bounded in bytes while Redis is stalled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from dara_ws_core import ChunkError, Request, ServerConfig, WebsocketManager
from dara_ws_core.backplane import MemoryBackplane, MemoryBroker, Publication
from dara_ws_core.backplane import node as bus_node
from dara_ws_redis import RedisBackplane

from .helpers import eventually
from .stacks import Stack, running_stack
from .test_backplane_redis import HEARTBEAT

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

KiB = 1024
#: The heartbeat of the tests that assert a subscription is never cut: the backplane's default.
#: Its subscriber PINGs a bus quiet for one heartbeat and drops the subscription when nothing came
#: for two; at the suite's 0.3 s that was a 0.6 s stall of this process's own loop (it runs both
#: nodes, their servers and the flooding clients) on a loaded 2-core machine, read as a dead
#: Redis. The cut these tests look for is Redis's: it closes the connection, seen at once.
QUIET_HEARTBEAT = 5.0


@contextlib.asynccontextmanager
async def two_nodes(url: str, transport: str, heartbeat: float = QUIET_HEARTBEAT,
                    **options: Any) -> AsyncIterator[list[Stack]]:
    """Two managers on one Redis, each with its own backplane (``options``, ``heartbeat`` as its
    ``heartbeat_interval``) and served on ``transport``."""
    namespace = f"bounds-{uuid.uuid4().hex[:8]}"
    async with contextlib.AsyncExitStack() as exits:
        stacks = []
        for _ in range(2):
            backplane = RedisBackplane(url, heartbeat_interval=heartbeat, namespace=namespace,
                                       **options)
            manager = WebsocketManager(ServerConfig(), backplane=backplane)
            exits.push_async_callback(backplane.stop)
            stack = await exits.enter_async_context(running_stack(transport, manager=manager))
            await backplane.start(manager)
            stacks.append(stack)
        yield stacks


def bus(stack: Stack) -> RedisBackplane:
    backplane = stack.manager.backplane
    assert isinstance(backplane, RedisBackplane)
    return backplane


async def test_an_answer_too_large_for_the_bus_reaches_the_asker_as_a_chunk_error(
    redis_server: RedisServer, transport_name: str,
) -> None:
    async with two_nodes(redis_server.url, transport_name, max_bus_message=64 * KiB) as stacks:
        asker, owner = stacks
        client = await owner.client("bob:s1")

        def respond(request: Request) -> Any:
            return {"blob": "x" * (100 * KiB)} if request.payload.get("big") else {"ok": 1}

        client.on_request(respond)
        await bus(owner).flush()
        with pytest.raises(ChunkError, match="too large for the backplane"):
            await asker.manager.send_and_wait(client.channel, {"big": True}, timeout=5)
        # The asker's subscription was never cut, and the channel still answers.
        assert await asker.manager.send_and_wait(client.channel, {"big": False},
                                                 timeout=5) == {"ok": 1}
        assert bus(asker).connected and bus(asker).stats.reconnects == 0


async def test_an_app_send_too_large_for_the_bus_raises_before_anything_is_published(
    redis_server: RedisServer, transport_name: str,
) -> None:
    async with two_nodes(redis_server.url, transport_name, max_bus_message=64 * KiB) as stacks:
        sender, other = stacks
        remote = await other.client("carol:s1")
        await bus(other).flush()
        published = bus(sender).stats.published
        big = {"blob": "x" * (100 * KiB)}
        with pytest.raises(ValueError, match="max_bus_message"):
            await sender.manager.broadcast(big)
        with pytest.raises(ValueError, match="max_bus_message"):
            await sender.manager.send_message_to_user("carol", big)
        with pytest.raises(ValueError, match="max_bus_message"):
            await sender.manager.send_message(remote.channel, big)
        assert bus(sender).stats.published == published
        await sender.manager.broadcast({"small": 1})  # what fits still goes
        message = await remote.receive(5)
        assert message.message.model_dump() == {"small": 1}


async def test_a_broadcast_flood_never_overflows_the_publishers_own_subscription(
    redis_factory: Callable[[], RedisServer],
) -> None:
    # Redis cuts a subscriber with more than 512 KiB waiting for it (scaled down from its 32 MB
    # default); the publisher keeps at most 64 KiB of its broadcasts in flight. 6 MiB published
    # in one burst: without the window, the first pipeline alone overflows the buffer.
    server = redis_factory()
    admin = Redis.from_url(server.url)
    try:
        await admin.config_set("client-output-buffer-limit", "pubsub 512kb 256kb 60")
        async with two_nodes(server.url, "memory", publish_window=64 * KiB) as stacks:
            sender, other = stacks
            received = bus(other).stats.received
            frame = {"blob": "x" * (32 * KiB)}
            for _ in range(200):
                await sender.manager.broadcast(frame)
            await eventually(lambda: bus(other).stats.received - received >= 200,
                             "every broadcast heard by the other process", timeout=20)
            await bus(sender).flush()
            for stack in stacks:
                assert bus(stack).connected and bus(stack).stats.reconnects == 0
                assert bus(stack).stats.failed == 0
            assert bus(sender)._unechoed == 0  # every broadcast came back
        stats = await admin.info("stats")
        assert stats.get("client_output_buffer_limit_disconnections", 0) == 0
    finally:
        await admin.aclose()


async def test_the_publish_outbox_is_bounded_in_bytes_while_redis_is_stalled(
    redis_factory: Callable[[], RedisServer],
) -> None:
    server = redis_factory()
    bound = 256 * KiB
    async with two_nodes(server.url, "memory", HEARTBEAT, max_outbox_bytes=bound,
                         max_bus_message=64 * KiB, publish_window=64 * KiB) as stacks:
        sender = stacks[0]
        backplane = bus(sender)
        process = server.process
        assert process is not None
        frame = {"blob": "x" * (16 * KiB)}
        os.kill(process.pid, signal.SIGSTOP)
        try:
            senders = [asyncio.create_task(sender.manager.broadcast(frame)) for _ in range(100)]
            await eventually(lambda: sum(not t.done() for t in senders) > 50,
                             "senders waiting for room")
            assert backplane._outbox_bytes <= bound
            # What cannot wait (here: replies) may take it to twice the bound, the queued
            # broadcasts dropped (counted) to make room; beyond, it fails, counted.
            failed = backplane.stats.failed
            topic = backplane.topic_of("nobody")
            accepted = sum(backplane._post_nowait(Publication(b"r" * (60 * KiB), topic=topic),
                                                  "reply") for _ in range(20))
            assert backplane._outbox_bytes <= 2 * bound
            assert 0 < accepted < 20
            assert backplane.stats.failed > failed
        finally:
            os.kill(process.pid, signal.SIGCONT)
        await asyncio.wait(senders, timeout=30)
        assert all(t.done() for t in senders)
        assert backplane._outbox_bytes >= 0


async def test_a_clients_chat_flood_never_knocks_its_process_off_the_bus(
    redis_factory: Callable[[], RedisServer], transport_name: str,
) -> None:
    # The review's case, scaled down: four clients' handler broadcasts every frame they send, as
    # fast as they write; Redis cuts a subscriber past 128 KiB waiting for it (without the
    # window, every transport's process is cut off again and again).
    server = redis_factory()
    admin = Redis.from_url(server.url)
    try:
        await admin.config_set("client-output-buffer-limit", "pubsub 128kb 64kb 60")
        async with two_nodes(server.url, transport_name, publish_window=16 * KiB) as stacks:
            sender, other = stacks
            manager = sender.manager

            async def chat(channel_id: str, data: Any) -> None:
                await manager.broadcast({"chat": data}, ignore_channel=channel_id)

            manager.add_ws_handler("chat", chat)
            flooders = [await sender.client(f"mallory:s{i}") for i in range(4)]
            received, published = bus(other).stats.received, bus(sender).stats.published
            text = "x" * (32 * KiB)

            async def flood(flooder: Any) -> None:
                for _ in range(100):
                    await flooder.send_custom("chat", text)

            await asyncio.gather(*(flood(f) for f in flooders))
            await eventually(lambda: manager.stats().handlers_running == 0
                             and bus(other).stats.received - received >= 100,
                             "the flood handled and heard by the other process", timeout=30)
            await bus(sender).flush()
            published = bus(sender).stats.published - published
            assert published >= 100
            await eventually(lambda: bus(other).stats.received - received == published,
                             "every broadcast heard by the other process", timeout=20)
            for stack in stacks:
                assert bus(stack).connected and bus(stack).stats.reconnects == 0
        stats = await admin.info("stats")
        assert stats.get("client_output_buffer_limit_disconnections", 0) == 0
    finally:
        await admin.aclose()


async def test_a_lost_echo_never_wedges_publishing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Broadcasts that never come back (their echo lost) hold publishing back for at most the
    # echo timeout, and a new subscription forgets them at once.
    monkeypatch.setattr(bus_node, "_ECHO_TIMEOUT", 0.2)
    broker = MemoryBroker()
    backplane = MemoryBackplane(broker, publish_window=4 * KiB)
    manager = WebsocketManager(ServerConfig(), backplane=backplane)
    await backplane.start(manager)
    try:
        published = backplane.stats.published
        backplane._unechoed = backplane.publish_window  # as if 4 KiB were never heard back
        await manager.broadcast({"n": 1})
        async with asyncio.timeout(5):
            await backplane.flush()
        assert backplane.stats.published == published + 1
        backplane._unechoed = backplane.publish_window
        broker.cut(backplane.node_id)  # the subscription ends: what was in flight is forgotten
        await eventually(lambda: not backplane.connected, "the subscription ended")
        assert backplane._unechoed == 0
        broker.mend(backplane.node_id)
    finally:
        await backplane.stop()
