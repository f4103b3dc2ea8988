"""Many processes as one (issue 12) on a real ``redis-server`` with real server processes: a
revocation made on one process closes the connections on every other, the connection limit holds
across processes under concurrent handshakes, the per-user outbox survives the sending process's
``kill -9`` (a stuck local client never delaying another process: ``test_cluster_stall_redis.py``;
the in-process bus version of each is in ``test_cluster.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import (
    CloseCode,
    ConnectionClosed,
    DaraClient,
    DaraServerMessage,
    Identity,
    ServerConfig,
    WebSocketHandler,
    WebsocketManager,
    build_frame,
)
from dara_ws_core.backplane import BrokerBackplane, MemoryBackplane, MemoryBroker
from dara_ws_core.backplane.node import cancel_task
from dara_ws_core.backplane.wire import UserDelivery, encode_bus_message
from dara_ws_core.outbox import OutboxLimits
from dara_ws_redis import RedisBackplane
from dara_ws_websockets import connect

from .backplane_node import NodeProcess
from .helpers import eventually
from .stacks import running_stack
from .test_backplane_redis import HEARTBEAT, TIMEOUT, Node, nodes_of, payload, spawn

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

def who() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


async def closed_with(client: DaraClient) -> int:
    with pytest.raises(ConnectionClosed) as caught:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await client.receive(TIMEOUT)
    return caught.value.code


@pytest.fixture(scope="module")
def limited(redis_server: RedisServer,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    """Three node processes with ``max_connections_per_user=2``."""
    logs = tmp_path_factory.mktemp("limited")
    processes = [NodeProcess(redis_server.url, logs / f"node{i}.log", heartbeat=HEARTBEAT,
                             max_per_user=2) for i in range(3)]
    for process in processes:
        process.spawn()
    try:
        for process in processes:
            process.wait_ready()
        yield processes
    finally:
        for process in processes:
            process.stop()


@pytest.fixture
async def cluster(limited: list[NodeProcess]) -> AsyncIterator[list[Node]]:
    async with nodes_of(limited) as nodes:
        yield nodes


async def test_disconnect_user_on_one_process_closes_the_user_on_every_process(
    cluster: list[Node],
) -> None:
    user = who()
    a = await cluster[1].client(f"{user}:s1")
    b = await cluster[2].client(f"{user}:s2")
    other = await cluster[2].client(f"{who()}:s")
    assert await cluster[0].call("revoke", scope="user", target=user) == 0  # none were local
    assert await closed_with(a) == CloseCode.POLICY_VIOLATION
    assert await closed_with(b) == CloseCode.POLICY_VIOLATION
    await cluster[0].call("broadcast", message={"still": "open"})
    assert await payload(other) == {"still": "open"}


async def test_disconnect_session_and_close_channel_reach_other_processes(
    cluster: list[Node],
) -> None:
    user = who()
    old = await cluster[1].client(f"{user}:old")
    new = await cluster[2].client(f"{user}:new")
    await cluster[0].call("revoke", scope="session", target="old")
    assert await closed_with(old) == CloseCode.POLICY_VIOLATION
    assert new.channel is not None
    await cluster[0].call("revoke", scope="channel", target=new.channel)
    assert await closed_with(new) == 4000


async def test_the_connection_limit_holds_across_processes_under_concurrent_handshakes(
    cluster: list[Node],
) -> None:
    user = who()
    urls = [node.process.url(f"{user}:s{i}") for i in range(4) for node in cluster]

    async def attempt(url: str) -> Any:
        with contextlib.suppress(Exception):
            return await connect(url)
        return None

    transports = await asyncio.gather(*(attempt(u) for u in urls))
    try:
        for node in cluster:
            await node.call("flush")
        channels = await cluster[0].call("channels", user=user)
        assert len(channels) == 2  # 12 concurrent handshakes on 3 processes, limit 2
    finally:
        for transport in transports:
            if transport is not None:
                with contextlib.suppress(Exception):
                    await transport.close()


async def test_the_outbox_survives_the_sending_process_being_killed(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    processes = spawn(redis_server.url, tmp_path_factory.mktemp("outbox"), 2)
    try:
        async with nodes_of(processes) as (sender, receiver):
            user = who()
            for i in range(20):
                await sender.call("user", user=user, message={"i": i})
            await sender.call("flush")
            stats = await sender.call("stats")
            assert stats["kept"] == 20
            await sender.close()
            processes[0].kill()  # kill -9: what Redis acknowledged is not lost
            client = await receiver.client(f"{user}:back")
            got = [(await payload(client))["i"] for _ in range(20)]
            assert got == list(range(20))  # in order, all of them
            again = await receiver.client(f"{user}:again")
            await receiver.call("broadcast", message={"fence": True})
            assert await payload(again) == {"fence": True}  # nothing replayed twice
    finally:
        for process in processes:
            process.kill()


async def two_processes(exits: contextlib.AsyncExitStack, urls: tuple[str, str], namespace: str,
                        config: ServerConfig, heartbeat: float = HEARTBEAT,
                        ) -> tuple[list[Any], list[RedisBackplane]]:
    """Two server stacks (the memory transport) sharing one Redis namespace, each through its
    own URL, closed by ``exits``."""
    stacks: list[Any] = []
    backplanes: list[RedisBackplane] = []
    for url in urls:
        backplane = RedisBackplane(url, heartbeat_interval=heartbeat, namespace=namespace)
        manager = WebsocketManager(config, backplane=backplane)
        exits.push_async_callback(backplane.stop)
        stack = await exits.enter_async_context(running_stack("memory", manager=manager))
        await backplane.start(manager)
        stacks.append(stack)
        backplanes.append(backplane)
    return stacks, backplanes


async def kept_for_someone(manager: WebsocketManager, backplane: RedisBackplane,
                           count: int) -> tuple[str, Identity]:
    """A new user, sent ``count`` messages (``{"i": 0}``...) while connected nowhere: kept."""
    user = who()
    for i in range(count):
        await manager.send_message_to_user(user, {"i": i})
    await backplane.flush()
    return user, Identity(user_id=user, session_id="s")


async def test_a_lease_on_the_outbox_holds_while_its_channel_lives_and_dies_with_its_node(
    redis_server: RedisServer,
) -> None:
    """Read, then acknowledge, on Redis: a channel that leased the user's outbox but never wrote
    it keeps others from duplicating it while it lives; once it closes unwritten, or its process
    stops listening (a crash), the next connection gets everything, once."""
    config = ServerConfig()
    namespace = f"lease-{uuid.uuid4().hex[:6]}"
    async with contextlib.AsyncExitStack() as exits:
        stacks, backplanes = await two_processes(exits, (redis_server.url,) * 2, namespace,
                                                 config)
        x, y = stacks
        user, identity = await kept_for_someone(x.manager, backplanes[0], 3)
        for attempt, end in enumerate(("close", "crash")):
            channel = f"silent-{attempt}"
            assert await y.manager.admit(channel, identity)
            silent = y.manager.create_handler(channel, identity)  # no sink: never written
            assert len(silent.queue) == 4
            other = await x.client(f"{user}:other")  # the lease is held: nothing for it
            await x.manager.broadcast({"fence": attempt})
            assert await stack_payload(other) == {"fence": attempt}
            await other.close()
            if end == "close":
                y.manager.remove_handler(channel)  # closed unwritten: the lease ends
                await eventually(lambda: not y.manager._settling, "the lease released")
            else:  # its process stops listening, its channel still registered: lease void
                await cancel_task(backplanes[1]._bus_task)
        back = await x.client(f"{user}:back")
        assert [(await stack_payload(back))["i"] for _ in range(3)] == [0, 1, 2]
        await x.manager.broadcast({"fence": "end"})
        assert await stack_payload(back) == {"fence": "end"}  # nothing twice


async def test_a_connection_writing_newer_messages_never_acknowledges_a_lease_on_redis(
    redis_server: RedisServer,
) -> None:
    """A second connection of the user (on another process) gets nothing from the history
    while a live channel holds the lease, only newer messages live: its acknowledgement says
    nothing of the leased entries, so the written mark stays before them, and what the holder
    never wrote reaches the next connection."""
    config = ServerConfig()
    namespace = f"capped-{uuid.uuid4().hex[:6]}"
    async with contextlib.AsyncExitStack() as exits:
        stacks, backplanes = await two_processes(exits, (redis_server.url,) * 2, namespace,
                                                 config)
        x, y = stacks
        user, identity = await kept_for_someone(x.manager, backplanes[0], 3)
        assert await y.manager.admit("silent", identity)
        silent = y.manager.create_handler("silent", identity)  # no sink: never written
        assert len(silent.queue) == 4
        reader = await x.client(f"{user}:reader")  # the lease is held: nothing for it
        await x.manager.send_message_to_user(user, {"i": 3})
        assert await stack_payload(reader) == {"i": 3}
        # Written, then acknowledged: wait until the acknowledgement has left for Redis.
        await eventually(lambda: bool(x.manager._cursors._own.get(user)), "numbered")
        await eventually(lambda: not len(x.manager._writes) and x.manager._ack_timer is None
                         and not backplanes[0]._acks_in_flight, "acknowledged")
        await backplanes[0].flush()
        y.manager.remove_handler("silent")  # closed without writing what it leased
        await eventually(lambda: not y.manager._settling, "the lease released")
        after = await x.client(f"{user}:after")
        assert [(await stack_payload(after))["i"] for _ in range(4)] == [0, 1, 2, 3]


async def test_a_connection_admitted_without_the_history_never_acknowledges_past_it(
    redis_server: RedisServer,
) -> None:
    """Process A's link to Redis is slow: the admission of a new connection gives up waiting
    (the channel is admitted on the local count, without the user's history), but Redis still
    runs it. What the connection then writes live is newer than history it never got: it is
    not acknowledged, the late lease is released, and the next connection gets everything."""
    from .chaos_proxy import ChaosProxy

    config = ServerConfig(handshake_timeout=2.0)  # the bus gets 1 s to admit a channel
    namespace = f"blind-{uuid.uuid4().hex[:6]}"
    async with ChaosProxy(redis_server.port) as proxy, contextlib.AsyncExitStack() as exits:
        # A long heartbeat: the subscription stays up through the slow link (probes would
        # take it for a dead one), so the admission times out rather than failing.
        stacks, backplanes = await two_processes(exits, (proxy.url, redis_server.url), namespace,
                                                 config, heartbeat=5.0)
        a, b = stacks
        user, _ = await kept_for_someone(b.manager, backplanes[1], 3)
        async with proxy.fault("delay", 3.0, delay=0.8):
            client = await a.client(f"{user}:slow")  # admitted after 1 s, history unread
        async with asyncio.timeout(TIMEOUT):
            await backplanes[0].flush()  # registered in the directory
        await b.manager.send_message_to_user(user, {"i": 3})
        assert await stack_payload(client) == {"i": 3}  # written live
        await eventually(lambda: not len(a.manager._writes) and a.manager._ack_timer is None
                         and not backplanes[0]._acks_in_flight, "acknowledged, if ever")
        async with asyncio.timeout(TIMEOUT):
            await backplanes[0].flush()
        await client.close()
        await eventually(lambda: not a.manager.handlers and not a.manager._settling, "closed")
        async with asyncio.timeout(TIMEOUT):
            await backplanes[0].flush()
        after = await b.client(f"{user}:after")
        assert [(await stack_payload(after))["i"] for _ in range(4)] == [0, 1, 2, 3]


async def test_a_message_to_a_user_from_a_process_cut_off_from_redis_is_kept_once_it_is_back(
    redis_server: RedisServer,
) -> None:
    """Cut off from Redis, a process can neither publish nor keep a message to a user at once:
    the message waits in the process's spool (the call returns: it is not lost), and is kept,
    before anything sent later, once the link is back. A full spool raises instead (see
    ``test_backplane``)."""
    from .chaos_proxy import ChaosProxy

    async with ChaosProxy(redis_server.port) as proxy, contextlib.AsyncExitStack() as exits:
        (cut, other), backplanes = await two_processes(
            exits, (proxy.url, redis_server.url), f"cut-{uuid.uuid4().hex[:6]}", ServerConfig())
        user = who()
        async with proxy.fault("drop", 1.0):
            await eventually(lambda: not backplanes[0].connected, "cut off")
            await cut.manager.send_message_to_user(user, {"i": 0})
        async with asyncio.timeout(TIMEOUT):
            await backplanes[0].wait_connected()
        await cut.manager.send_message_to_user(user, {"i": 1})
        async with asyncio.timeout(TIMEOUT):
            await backplanes[0].flush()
        client = await other.client(f"{user}:next")
        assert await stack_payload(client) == {"i": 0}
        assert await stack_payload(client) == {"i": 1}


@pytest.mark.parametrize("bus", ["redis", "memory"])
async def test_a_send_racing_the_admission_of_its_user_on_the_same_process_reaches_it(
    redis_server: RedisServer, bus: str,
) -> None:
    """A process sends to a user whose new channel it is admitting: the bus leases the history
    to the channel before appending the message, and never publishes a message back to the
    process that sent it. The process hands the entry to the new channel itself once the bus
    has numbered it, after what the channel leased. Redis and the in-process bus alike."""
    backplane: BrokerBackplane = MemoryBackplane(MemoryBroker(), node_id="a") if bus == "memory" else (
        RedisBackplane(redis_server.url, heartbeat_interval=HEARTBEAT,
                       namespace=f"race-{uuid.uuid4().hex[:6]}"))
    manager = WebsocketManager(ServerConfig(), backplane=backplane)
    await backplane.start(manager)
    try:
        user = who()
        identity = Identity(user_id=user, session_id="s")
        await manager.send_message_to_user(user, {"i": 0})
        await backplane.flush()

        async def connect() -> WebSocketHandler:
            assert await manager.admit("new", identity)  # its script reaches Redis first
            return manager.create_handler("new", identity)

        _, handler = await asyncio.gather(manager.send_message_to_user(user, {"i": 1}),
                                          connect())
        await backplane.flush()
        await eventually(lambda: len(handler.queue) >= 3, "init and both messages")
        frames = [handler.queue.get_nowait() for _ in range(len(handler.queue))][1:]
        assert [json.loads(frame)["message"]["i"] for frame in frames] == [0, 1]  # type: ignore[arg-type]
    finally:
        await backplane.stop()


async def stack_payload(client: DaraClient) -> dict[str, Any]:
    message = await client.receive(TIMEOUT)
    assert isinstance(message, DaraServerMessage)
    return message.message.model_dump()



async def test_messages_are_published_and_kept_after_redis_forgot_its_scripts(
    redis_server: RedisServer,
) -> None:
    """The publishing scripts are called by their SHA1; a server that lost them (restarted,
    ``SCRIPT FLUSH``) answers NOSCRIPT without running them: they are sent again with their
    text, so nothing is lost, duplicated or left out of the user's history."""
    from redis.asyncio import Redis

    namespace = f"noscript-{uuid.uuid4().hex[:8]}"
    config = ServerConfig(outbox_messages=100)
    managers = [WebsocketManager(config, backplane=RedisBackplane(redis_server.url,
                                                                  namespace=namespace))
                for _ in range(2)]
    redis = Redis.from_url(redis_server.url)
    try:
        for manager in managers:
            assert manager.backplane is not None
            await manager.backplane.start(manager)
        sender, receiver = managers
        handler = receiver.create_handler("far", Identity(user_id="bob", session_id="s"))
        await receiver.backplane.flush()  # type: ignore[union-attr]
        await sender.send_message_to_user("bob", {"i": 1})
        await redis.script_flush()
        await sender.send_message_to_user("bob", {"i": 2})
        await sender.send_message_to_user("bob", {"i": 3})
        await sender.backplane.flush()  # type: ignore[union-attr]
        await eventually(lambda: len(handler.queue) == 4)  # init, then the three messages
        frames = [handler.queue.get_nowait() for _ in range(4)][1:]
        assert [json.loads(frame)["message"]["i"] for frame in frames] == [1, 2, 3]  # type: ignore[arg-type]
        assert await redis.xlen(f"{namespace}:outbox:bob") == 3
    finally:
        await redis.aclose()
        for manager in managers:
            if manager.backplane is not None:
                await manager.backplane.stop()


async def test_the_history_on_redis_keeps_the_newest_within_the_count_and_byte_bounds(
    redis_server: RedisServer,
) -> None:
    """The publishing script trims the user's Stream as it appends: the oldest go first, as many
    as the count bound drops, then as long as the bytes exceed their bound; the byte total it
    keeps matches what is left."""
    from redis.asyncio import Redis

    namespace = f"bounds-{uuid.uuid4().hex[:8]}"
    # What is kept is the bus message (header, then the frame): its size, the clock's digits
    # and all (13 until 2286).
    size = len(encode_bus_message(UserDelivery("carol", None, build_frame({"i": 10}),
                                               sent=time.time_ns() // 1_000_000)))
    config = ServerConfig(outbox_messages=3, outbox_bytes=2 * size + 5)
    backplane = RedisBackplane(redis_server.url, namespace=namespace)
    manager = WebsocketManager(config, backplane=backplane)
    redis: Any = Redis.from_url(redis_server.url)
    stream, meta = f"{namespace}:outbox:carol", f"{namespace}:outbox-meta:carol"
    try:
        await backplane.start(manager)
        for i in range(10, 16):  # same-sized frames: only two fit in the bytes
            await manager.send_message_to_user("carol", {"i": i})
        await backplane.flush()
        entries = await redis.xrange(stream)
        assert [json.loads(e[b"d"].partition(b"\n")[2])["message"]["i"] for _, e in entries] == [
            14, 15]
        assert int(await redis.hget(meta, "b")) == sum(len(e[b"d"]) for _, e in entries)
        big = ServerConfig(outbox_messages=3, outbox_bytes=1 << 20)
        manager.outbox_limits = OutboxLimits(big.outbox_messages, big.outbox_bytes,
                                             big.outbox_age)
        for i in range(16, 21):  # the count bound now: the newest three
            await manager.send_message_to_user("carol", {"i": i})
        await backplane.flush()
        entries = await redis.xrange(stream)
        assert [json.loads(e[b"d"].partition(b"\n")[2])["message"]["i"] for _, e in entries] == [
            18, 19, 20]
        assert int(await redis.hget(meta, "b")) == sum(len(e[b"d"]) for _, e in entries)
    finally:
        await redis.aclose()
        await backplane.stop()
