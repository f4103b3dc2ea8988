"""The Redis backplane with real processes: a real ``redis-server`` on a free loopback port, server
processes (``tests.backplane_node``, each its own manager and port) and clients on each of them.

Every call below goes from the test to one node over a client's custom request (``bp.*``, see
``backplane_node``), so each scenario is "from process A, reach a client of process B".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from dara_ws_core import (
    Chunked,
    ConnectionClosed,
    CustomServerMessage,
    DaraClient,
    DaraServerMessage,
    Request,
    ServerConfig,
    WebsocketManager,
)
from dara_ws_core.backplane import decode_bus_message
from dara_ws_redis import RedisBackplane
from dara_ws_websockets import connect

from .backplane_node import NodeProcess

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

TIMEOUT = 10.0
HEARTBEAT = 0.3  # nodes refresh their entries this often; they expire after 3 x


class OpFailed(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        self.name = reply["error"]
        self.code = reply.get("code")
        super().__init__(f"{reply['error']}: {reply.get('message')}")


class Node:
    """A node process and the clients the test opened on it."""

    def __init__(self, process: NodeProcess) -> None:
        self.process = process
        self.clients: list[DaraClient] = []
        self._control: DaraClient | None = None

    async def client(self, token: str | None = None, **options: Any) -> DaraClient:
        """A connected client, registered in Redis when this returns."""
        token = token or f"u-{uuid.uuid4().hex[:8]}:s"
        options.setdefault("ping_interval", None)
        url = self.process.url(token)
        client = DaraClient(lambda: connect(url), **options)
        await client.connect()
        self.clients.append(client)
        await call(client, "flush")
        return client

    async def call(self, op: str, **data: Any) -> Any:
        """Run ``op`` on this node (through a control client of its own)."""
        if self._control is None or not self._control.connected:
            self._control = await self.client(f"ctl-{uuid.uuid4().hex[:6]}:ctl")
        return await call(self._control, op, **data)

    async def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        self.clients.clear()
        self._control = None


async def call(client: DaraClient, op: str, *, wait: float = TIMEOUT, **data: Any) -> Any:
    reply = await client.request(f"bp.{op}", data, timeout=wait)
    if "error" in reply:
        raise OpFailed(reply)
    return reply["ok"]


async def payload(client: DaraClient, timeout: float = TIMEOUT) -> dict[str, Any]:
    message = await client.receive(timeout)
    assert isinstance(message, DaraServerMessage | CustomServerMessage)
    return message.message.model_dump(by_alias=True, exclude_none=True)


async def eventually(check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Await ``check()`` until it returns a true value: for state in another process that
    exposes no event (a reconnection, a TTL); bounded."""
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.05)
    return result


def never_answer(asked: asyncio.Event) -> Callable[[Request], Any]:
    def respond(request: Request) -> Any:
        asked.set()
        return asyncio.get_running_loop().create_future()

    return respond


def spawn(redis_url: str, logs: Path, n: int, heartbeat: float = HEARTBEAT,
          urls: list[str] | None = None) -> list[NodeProcess]:
    """``n`` node processes on ``redis_url`` (or one per URL of ``urls``), ready."""
    urls = urls or [redis_url] * n
    processes = [NodeProcess(url, logs / f"node{i}.log", heartbeat=heartbeat)
                 for i, url in enumerate(urls)]
    try:
        for process in processes:
            process.spawn()
        for process in processes:
            process.wait_ready()
    except BaseException:
        for process in processes:
            process.kill()
        raise
    return processes


@pytest.fixture(scope="module")
def processes(redis_server: RedisServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    """Three node processes sharing the module's Redis."""
    started = spawn(redis_server.url, tmp_path_factory.mktemp("nodes"), 3)
    try:
        yield started
    finally:
        for process in started:
            process.stop()


@contextlib.asynccontextmanager
async def nodes_of(processes: list[NodeProcess]) -> AsyncIterator[list[Node]]:
    nodes = [Node(p) for p in processes]
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.close()


@pytest.fixture
async def cluster(processes: list[NodeProcess]) -> AsyncIterator[list[Node]]:
    async with nodes_of(processes) as nodes:
        yield nodes


# --------------------------------------------------------------------------- routing


async def test_send_message_reaches_a_channel_on_another_process(cluster: list[Node]) -> None:
    a, b, _ = cluster
    client = await b.client()
    await a.call("send", channel=client.channel, message={"text": "hello"})
    assert await payload(client) == {"text": "hello"}
    await a.call("send", channel=client.channel, message={"kind": "k", "data": 1}, custom=True)
    assert await payload(client) == {"kind": "k", "data": 1}
    with pytest.raises(OpFailed, match="UnknownChannel"):
        await a.call("send", channel="no-such-channel", message={})


async def test_a_process_receives_only_messages_for_its_own_clients(cluster: list[Node]) -> None:
    a, b, c = cluster
    client = await b.client()
    before_b, before_c = await b.call("stats"), await c.call("stats")
    for i in range(10):
        await a.call("send", channel=client.channel, message={"i": i})
    for i in range(10):
        assert await payload(client) == {"i": i}
    after_b, after_c = await b.call("stats"), await c.call("stats")
    assert after_b["received"] - before_b["received"] == 10
    assert after_c["received"] == before_c["received"]


async def test_broadcast_reaches_every_client_on_every_process_exactly_once(
    cluster: list[Node],
) -> None:
    clients = [await node.client() for node in cluster for _ in range(3)]
    ignored = clients[4]
    a = cluster[0]
    published = (await a.call("stats"))["published"]
    await a.call("broadcast", message={"n": 1}, ignore=ignored.channel)
    await a.call("flush")
    assert (await a.call("stats"))["published"] == published + 1  # encoded and published once
    await cluster[1].call("broadcast", message={"n": 2})
    for client in clients:
        expected = [{"n": 2}] if client is ignored else [{"n": 1}, {"n": 2}]
        got = [await payload(client) for _ in expected]
        assert sorted(got, key=lambda p: p["n"]) == expected
    await cluster[2].call("broadcast", message={"n": "end"})
    for client in clients:  # no duplicate arrived in between
        assert await payload(client) == {"n": "end"}


async def test_user_messages_and_user_channels_span_every_process(cluster: list[Node]) -> None:
    a, b, c = cluster
    uid = f"u-{uuid.uuid4().hex[:8]}"
    mine = [await a.client(f"{uid}:s1"), await b.client(f"{uid}:s2"),
            await b.client(f"{uid}:s3"), await c.client(f"{uid}:s4")]
    channels = sorted(str(client.channel) for client in mine)
    for node in cluster:
        assert await node.call("channels", user=uid) == channels
    await c.call("user", user=uid, message={"to": uid}, ignore=mine[2].channel)
    for client in (mine[0], mine[1], mine[3]):
        assert await payload(client) == {"to": uid}
    await c.call("broadcast", message={"to": "all"})
    for client in mine:  # the ignored channel got only the broadcast, the others nothing more
        assert await payload(client) == {"to": "all"}
    await mine[1].close()
    await b.call("flush")
    expected = sorted(str(client.channel) for client in mine if client is not mine[1])
    assert await a.call("channels", user=uid) == expected


# --------------------------------------------------------------------------- requests


async def test_send_and_wait_to_another_process_returns_the_answer(cluster: list[Node]) -> None:
    a, b, _ = cluster
    client = await b.client()

    def respond(request: Request) -> Any:
        if request.payload.get("chunked"):
            return Chunked([{"part": i} for i in range(5)], indexed=True, shuffle=True)
        return {"echo": request.payload}

    client.on_request(respond)
    assert await a.call("ask", channel=client.channel, message={"q": 1}, timeout=5) == {
        "echo": {"q": 1}
    }
    assert await a.call("ask", channel=client.channel, message={"chunked": True}, timeout=5) == [
        {"part": i} for i in range(5)
    ]
    assert await a.call(
        "ask", channel=client.channel, message={"kind": "k", "data": 2}, custom=True, timeout=5
    ) == {"echo": {"kind": "k", "data": 2}}


async def test_send_and_wait_to_another_process_times_out(cluster: list[Node]) -> None:
    a, b, _ = cluster
    client = await b.client()
    asked = asyncio.Event()
    client.on_request(never_answer(asked))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OpFailed, match="RequestTimeout"):
        await a.call("ask", channel=client.channel, message={"q": 1}, timeout=0.5)
    assert 0.45 <= loop.time() - started < 3.0
    assert asked.is_set()


async def test_send_and_wait_to_another_process_fails_at_once_when_the_client_disconnects(
    cluster: list[Node],
) -> None:
    a, b, _ = cluster
    client = await b.client()
    asked = asyncio.Event()
    client.on_request(never_answer(asked))
    control = await a.client()
    waiting = asyncio.create_task(
        call(control, "ask", channel=client.channel, message={"q": 1}, timeout=30)
    )
    async with asyncio.timeout(TIMEOUT):
        await asked.wait()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.close()
    with pytest.raises(OpFailed, match="ConnectionClosed") as failed:
        await asyncio.wait_for(waiting, TIMEOUT)
    assert loop.time() - started < 3.0
    assert failed.value.code == 1000


# --------------------------------------------------------------------------- in-process API


async def test_redis_backplane_in_process_reaches_a_node_process(
    redis_server: RedisServer, processes: list[NodeProcess],
) -> None:
    """The API as an application uses it: its own manager + RedisBackplane, talking to a node."""
    backplane = RedisBackplane(redis_server.url, heartbeat_interval=HEARTBEAT)
    manager = WebsocketManager(ServerConfig())
    await backplane.start(manager)
    try:
        async with nodes_of(processes[:1]) as (node,):
            uid = f"u-{uuid.uuid4().hex[:8]}"
            client = await node.client(f"{uid}:s")
            client.on_request(lambda request: {"pong": request.payload["ping"]})
            assert client.channel is not None
            await manager.send_message(client.channel, {"from": "app"})
            assert await payload(client) == {"from": "app"}
            assert await manager.get_all_user_channels(uid) == {client.channel}
            assert manager.get_user_channels(uid) == set()  # the sync call stays local
            assert await manager.send_and_wait(client.channel, {"ping": 7}, timeout=5) == {
                "pong": 7
            }
            await manager.send_message_to_user(uid, {"to": "user"})
            assert await payload(client) == {"to": "user"}
    finally:
        await backplane.stop()


async def test_a_request_without_timeout_fails_once_the_process_holding_the_channel_dies(
    redis_factory: Callable[[], RedisServer], tmp_path: Path,
) -> None:
    """Review 7 item 7: ``send_and_wait(timeout=None)`` to a channel of a process killed while
    the request was pending waited for ever (no reply can come)."""
    server = redis_factory()
    (process,) = spawn(server.url, tmp_path, 1)
    backplane = RedisBackplane(server.url, heartbeat_interval=HEARTBEAT)
    manager = WebsocketManager(ServerConfig())
    await backplane.start(manager)
    try:
        async with nodes_of([process]) as (node,):
            client = await node.client()
            asked = asyncio.Event()
            client.on_request(never_answer(asked))
            assert client.channel is not None
            waiting = asyncio.create_task(
                manager.send_and_wait(client.channel, {"q": 1}, timeout=None))
            async with asyncio.timeout(TIMEOUT):
                await asked.wait()
            process.kill()  # no goodbye: its channel key outlives it until the expiry
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(waiting, TIMEOUT)  # about two heartbeats
            assert backplane._waiting == {}
    finally:
        await backplane.stop()
        process.kill()


async def test_the_bus_carries_the_frame_exactly_as_encoded(redis_server: RedisServer) -> None:
    backplane = RedisBackplane(redis_server.url, heartbeat_interval=HEARTBEAT)
    manager = WebsocketManager()
    await backplane.start(manager)
    redis = Redis.from_url(redis_server.url)
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(backplane.broadcast_topic)
        async with asyncio.timeout(TIMEOUT):
            while (await pubsub.get_message(timeout=TIMEOUT) or {}).get("type") != "subscribe":
                pass
            await manager.broadcast({"x": "é\n"})
            while (message := await pubsub.get_message(timeout=TIMEOUT)) is None:
                pass
        bus = decode_bus_message(message["data"])
        assert bus.frame == b'{"type":"message","message":{"x":"\xc3\xa9\\n"}}'  # type: ignore[union-attr]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()
        await backplane.stop()


# --------------------------------------------------------------------------- faults


async def test_redis_restart_mid_test(
    redis_factory: Callable[[], RedisServer], tmp_path: Path,
) -> None:
    redis = redis_factory()
    processes = spawn(redis.url, tmp_path, 2)
    try:
        async with nodes_of(processes) as (a, b):
            uid = f"u-{uuid.uuid4().hex[:8]}"
            on_a, on_b = await a.client(), await b.client(f"{uid}:s")
            await a.call("send", channel=on_b.channel, message={"phase": "before"})
            assert await payload(on_b) == {"phase": "before"}

            redis.kill()  # a crash: every connection drops, the data is gone
            await eventually(lambda: _disconnected(a))
            await a.call("broadcast", message={"phase": "during"})
            assert await payload(on_a) == {"phase": "during"}  # local delivery keeps working
            with pytest.raises(OpFailed, match="BackplaneError"):
                await a.call("send", channel=on_b.channel, message={"phase": "lost"})
            stats = await a.call("stats")
            assert stats["failed"] >= 2
            assert "backplane disconnected" in processes[0].log()
            assert "backplane unavailable" in processes[0].log()

            redis.start()  # same port, empty
            for node in (a, b):
                await eventually(functools.partial(_reconnected, node))
                await node.call("flush")  # every channel registered again
            assert "could not be published meanwhile" in processes[0].log()
            await a.call("send", channel=on_b.channel, message={"phase": "after"})
            await b.call("send", channel=on_a.channel, message={"phase": "after"})
            # What was published during the outage was reported, not delivered late.
            assert await payload(on_b) == {"phase": "after"}
            assert await payload(on_a) == {"phase": "after"}
            assert await a.call("channels", user=uid) == [on_b.channel]
    finally:
        for process in processes:
            process.stop()


async def test_a_process_that_dies_leaves_nothing_registered_beyond_the_expiry(
    redis_factory: Callable[[], RedisServer], tmp_path: Path,
) -> None:
    server = redis_factory()
    processes = spawn(server.url, tmp_path, 2)
    redis = Redis.from_url(server.url)
    try:
        async with nodes_of(processes) as (a, b):
            uid = f"u-{uuid.uuid4().hex[:8]}"
            on_a = await a.client(f"{uid}:s1")
            other = f"u-{uuid.uuid4().hex[:8]}"
            on_b = [await b.client(f"{uid}:s2"), await b.client(f"{other}:s")]
            b_keys = [f"dara-ws:ch:{c.channel}" for c in on_b] + [f"dara-ws:user:{other}"]
            assert await redis.exists(*b_keys) == 3
            assert await redis.pttl(b_keys[0]) <= 3 * HEARTBEAT * 1000

            processes[1].kill()  # no goodbye
            # Within the expiry nobody listens for b's channels any more.
            with pytest.raises(OpFailed, match="UnknownChannel"):
                await a.call("send", channel=on_b[0].channel, message={})
            # A message to the user is in the user's history, for a node nobody listens for
            # (it may only be cut off), whose fields stay until its channel keys expire.
            await a.call("user", user=uid, message={"x": 1})
            await a.call("flush")
            assert await payload(on_a) == {"x": 1}
            b_node = processes[1].node_id
            assert await redis.xlen(f"dara-ws:outbox:{uid}") == 1
            assert await redis.hgetall(f"dara-ws:missed:{b_node}") == {}

            async def expired() -> bool:
                return await redis.exists(*b_keys) == 0

            loop = asyncio.get_running_loop()
            started = loop.time()
            await eventually(expired, timeout=3 * HEARTBEAT + 2.0)
            assert loop.time() - started <= 3 * HEARTBEAT + 1.0
            assert await a.call("channels", user=uid) == [on_a.channel]
            # Past the expiry, a message to the user drops the dead node's fields.
            await a.call("user", user=uid, message={"x": 2})
            await a.call("flush")
            assert await payload(on_a) == {"x": 2}
            assert await redis.hkeys(f"dara-ws:user:{uid}") == [on_a.channel.encode()]
    finally:
        await redis.aclose()
        for process in processes:
            process.stop()


async def _disconnected(node: Node) -> bool:
    return not (await node.call("stats"))["connected"]


async def _reconnected(node: Node) -> bool:
    stats = await node.call("stats")
    return bool(stats["connected"] and stats["reconnects"] >= 1)

