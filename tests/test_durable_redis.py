"""What the bus fails is not lost on a real ``redis-server``: kept messages and revocations.

* A kept ``send_message_to_user`` that returned reaches the user exactly once, live or on their
  next connection, while Redis drops the sender's connections mid-batch (``CLIENT KILL``): the
  failed batch waits in the sender's spool, is sent again once Redis answers, and Redis appends
  each message once (a pipeline that partly ran is sent again whole).
* A process restarted with the same ``node_id`` never has its kept messages taken for those of
  its previous life (each life numbers them in its own scope).
* A kept message Redis keeps refusing (an error reply) fails alone: the rest of its batch runs,
  it is tried once per heartbeat (not with every batch), the user's later kept messages wait
  behind it (in order), ``flush()`` does not wait for it, and after a bounded number of tries it
  is given up, counted; unless Redis refuses every write for now (a replica): then it waits.
* A revocation (``disconnect_user``, ``disconnect_session``, ``close_channel``) made while a
  process's subscription is down still closes that process's connections once it is back (at
  its next heartbeat), and only those opened before the revocation; one made while the asking
  process is cut off from Redis (published late, from its spool) too: it keeps the time it was
  asked for. The records are read only after a subscription was lost, not at every heartbeat.

Real servers on 127.0.0.1, raw-socket clients (:mod:`tests.hostile`), every served transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from dara_ws_core import BackplaneError, ServerConfig, WebsocketManager
from dara_ws_core.backplane import (
    Control,
    Publication,
    UserDelivery,
    decode_bus_message,
    encode_bus_message,
)
from dara_ws_core.backplane.broker import _wall_ms
from dara_ws_core.backplane.node import _SPOOL_TRIES
from dara_ws_redis import RedisBackplane

from .chaos_proxy import ChaosProxy
from .helpers import eventually
from .stacks import running_stack
from .test_kept_delivery import SERVED, connect, read_numbers

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

HEARTBEAT = 0.3


@contextlib.asynccontextmanager
async def started(url: str, namespace: str, config: ServerConfig | None = None,
                  **options: Any) -> AsyncIterator[tuple[WebsocketManager, RedisBackplane]]:
    backplane = RedisBackplane(url, namespace=namespace, heartbeat_interval=HEARTBEAT,
                               **options)
    manager = WebsocketManager(config or ServerConfig(), backplane=backplane)
    await backplane.start(manager)
    try:
        yield manager, backplane
    finally:
        await backplane.stop()


@pytest.mark.parametrize("transport", SERVED)
async def test_every_kept_send_that_returned_reaches_the_user_once_while_redis_drops_links(
    redis_server: RedisServer, transport: str
) -> None:
    namespace = f"spool-{uuid.uuid4().hex[:6]}"
    config = ServerConfig(outbox_messages=10_000)
    admin = Redis.from_url(redis_server.url)
    acked: list[int] = []
    async with (started(redis_server.url, namespace, config, backoff_initial=0.05,
                        backoff_max=0.2) as (sender, sender_bp),
                started(redis_server.url, namespace, config, backoff_initial=0.05,
                        backoff_max=0.2) as (owner, _),
                running_stack(transport, manager=owner) as stack):
        victim = await connect(stack.port)  # user bob, on the other process

        async def kill() -> None:
            # Drops the links of both processes to Redis (batches in flight included), mostly
            # the command links (the subscriptions stay up: the senders believe the bus is).
            await asyncio.sleep(0.1)
            for i in range(25):
                await admin.client_kill_filter(_type="pubsub" if i % 6 == 5 else "normal")
                await asyncio.sleep(0.03)

        killer = asyncio.create_task(kill())
        for n in range(20_000):  # while the links drop, and a little after
            if killer.done():
                break
            await asyncio.sleep(0.001)
            try:
                await sender.send_message_to_user("bob", {"n": n})
            except BackplaneError:
                continue  # refused (the spool full): the caller knows; not counted as sent
            acked.append(n)
        await killer
        async with asyncio.timeout(20):
            await sender_bp.flush()  # the spool is empty: every kept send was answered
        seen: list[int] = []
        await read_numbers(victim, seen, 2.0)
        victim.abort()
        assert seen == sorted(seen)  # in order, what came from the spool included
        if set(seen) != set(acked):  # the rest on the next connection
            again = await connect(stack.port)
            await read_numbers(again, seen, 2.0)
            again.abort()
    await admin.aclose()
    assert acked  # the test sent something
    counts = Counter(seen)
    assert [n for n in acked if counts[n] == 0] == []  # none lost
    assert [n for n, c in counts.items() if c > 1] == []  # none twice
    assert set(seen) <= set(acked)


async def _subscriber_killed(admin: Redis, backplane: RedisBackplane) -> None:
    """Drop every subscription, and wait until ``backplane`` noticed."""
    await admin.client_kill_filter(_type="pubsub")
    await eventually(lambda: not backplane.connected, "the subscription is down")


@contextlib.asynccontextmanager
async def _revoked_while_off_the_bus(
    url: str, transport: str
) -> AsyncIterator[tuple[WebsocketManager, RedisBackplane, WebsocketManager, RedisBackplane, Any, Any]]:
    """A node serving bob (user bob, session s1) on ``transport``, and an app process on the
    same bus; once entered, the node's subscription is down and the app's is up: what the app
    revokes now, the node cannot hear. Yields the node and its backplane, the app and its
    backplane, the stack and bob's raw client. The node comes back slowly (0.5 to 1 s), the app at once."""
    namespace = f"revoke-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(url)
    try:
        async with (started(url, namespace, backoff_initial=1.0, backoff_max=1.0) as (node, node_bp),
                    started(url, namespace, backoff_initial=0.02, backoff_max=0.05) as (app, app_bp),
                    running_stack(transport, manager=node) as stack):
            client = await connect(stack.port)
            await _subscriber_killed(admin, node_bp)
            async with asyncio.timeout(5):
                await app_bp.wait_connected()
            assert not node_bp.connected  # the case under test: it cannot hear the revocation
            yield node, node_bp, app, app_bp, stack, client
    finally:
        await admin.aclose()


@pytest.mark.parametrize("transport", SERVED)
async def test_a_revocation_made_while_a_process_is_off_the_bus_closes_its_connections(
    redis_server: RedisServer, transport: str
) -> None:
    async with _revoked_while_off_the_bus(redis_server.url, transport) as (node, node_bp, app, _, stack, client):
        assert await app.disconnect_user_everywhere("bob") == 0
        seen: list[int] = []
        # Back within a second, closed at the heartbeat that follows.
        assert await read_numbers(client, seen, 5.0) == 1008
        client.abort()
        await eventually(lambda: not node.handlers, "the revoked connection is gone")
        # A connection opened after the revocation (a new login) is not closed by it.
        later = await connect(stack.port)
        await eventually(lambda: len(node.handlers) == 1, "the new connection is admitted")
        for _ in range(2):
            await node_bp._check_revoked()
        assert len(node.handlers) == 1
        later.abort()


@pytest.mark.parametrize("scope", ["session", "channel"])
async def test_session_and_channel_revocations_missed_live_are_applied_too(
    redis_server: RedisServer, scope: str
) -> None:
    async with _revoked_while_off_the_bus(redis_server.url, "websockets") as (node, _, app, app_bp, _, client):
        (channel,) = node.get_user_channels("bob")
        if scope == "session":
            app.disconnect_session("s1")
        else:
            app.close_channel(channel, 4001, "moved")
        async with asyncio.timeout(5):
            await app_bp.flush()
        seen: list[int] = []
        assert await read_numbers(client, seen, 5.0) == (1008 if scope == "session" else 4001)
        client.abort()


async def test_redis_appends_a_kept_message_sent_twice_once_and_answers_it_alike(
    redis_server: RedisServer,
) -> None:
    """What the spool relies on: a batch that partly ran is sent again whole, and a kept message
    that Redis had appended is answered with the same entry, not appended again."""
    namespace = f"kid-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(redis_server.url)
    async with started(redis_server.url, namespace, ServerConfig()) as (manager, backplane):
        keep = manager.outbox_limits
        assert keep is not None
        data = encode_bus_message(UserDelivery("dan", None, b'{"type":"message"}', sent=1))
        first = Publication(data, user_id="dan", keep=keep, durable=1)
        again = first  # as the spool sends it again
        other = Publication(data, user_id="dan", keep=keep, durable=2)
        never = Publication(data, user_id="dan", keep=keep, durable=3)  # failed before it ran
        answers = await backplane._publish_batch([first, again, other])
        answers += await backplane._publish_batch([again, never])
        assert answers[0][0] == answers[1][0] == answers[3][0]  # the same entry, every time
        assert answers[2][0] != answers[0][0]
        assert len({answers[0][0], answers[2][0], answers[4][0]}) == 3  # appended now
        assert await admin.xlen(f"{namespace}:outbox:dan") == 3
    await admin.aclose()



async def numbers_bob_gets(url: str, namespace: str, transport: str, wait: float = 1.0) -> list[int]:
    """The kept numbers a new connection of bob, on a fresh node of ``namespace`` served over
    ``transport``, is given (read for ``wait`` seconds)."""
    async with (started(url, namespace) as (node, _),
                running_stack(transport, manager=node) as stack):
        bob = await connect(stack.port)
        seen: list[int] = []
        await read_numbers(bob, seen, wait)
        bob.abort()
    return seen


def _surely_past(backplane: RedisBackplane, when: int) -> bool:
    """Whether a connection ``backplane``'s process opens now surely opens after ``when``
    (Redis's clock, ms), as that process measured its clock against Redis's."""
    return _wall_ms() >= when - (backplane._clock_offset or 0) + backplane._clock_error


@pytest.mark.parametrize("transport", SERVED)
async def test_a_revocation_published_late_spares_the_connections_opened_since(
    redis_server: RedisServer, transport: str
) -> None:
    """The app process is cut off from Redis when it revokes bob; bob logs in again on the
    node meanwhile. Once the app is back, its revocation (from its spool) closes bob's old
    connection on the node but not the new one, live and from the record alike: it carries
    the moment it was asked for, not the moment Redis took it."""
    namespace = f"late-{uuid.uuid4().hex[:6]}"
    async with (ChaosProxy(redis_server.port) as proxy,
                started(redis_server.url, namespace) as (node, node_bp),
                started(proxy.url, namespace, backoff_initial=0.02,
                        backoff_max=0.05) as (app, app_bp),
                running_stack(transport, manager=node) as stack):
        old = await connect(stack.port)
        await eventually(lambda: len(node.handlers) == 1, "bob's first connection is admitted")
        (old_channel,) = node.handlers
        async with proxy.fault("drop", 0.1):
            await eventually(lambda: not app_bp.connected, "the app is cut off from Redis")
            assert app.disconnect_user("bob") == 0  # spooled: nobody hears it yet
            await eventually(lambda: len(app_bp._spool) == 1, "the revocation waits")
            (revocation, _, _), = app_bp._spool
            assert revocation.revoke is not None
            when = revocation.revoke[3]
            await eventually(lambda: _surely_past(node_bp, when), "the revocation is past")
            new = await connect(stack.port)  # bob logs in again, after the revocation
            await eventually(lambda: len(node.handlers) == 2, "the new login is admitted")
        async with asyncio.timeout(10):
            await app_bp.flush()  # back: the revocation is published and recorded
        seen: list[int] = []
        assert await read_numbers(old, seen, 5.0) == 1008  # opened before: closed
        old.abort()
        await eventually(lambda: old_channel not in node.handlers, "the old connection is gone")
        # The record (what a process that missed it reads) bears the same time.
        node_bp._revoke_unchecked = True
        await node_bp._check_revoked()
        assert len(node.handlers) == 1
        # The new connection is open and served.
        await node.send_message_to_user("bob", {"n": 7})
        assert await read_numbers(new, seen, 0.5) is None
        assert seen == [7]
        new.abort()


async def test_a_slow_bus_later_never_makes_a_login_since_a_revocation_doubtful(
    redis_server: RedisServer,
) -> None:
    """Whether a connection surely opened after a revocation is decided with the clock measured
    when it opened: a later check over a slow round trip (a loaded Redis, here a 1 s delay on
    the node's link), which measures the clock less closely, closes only what opened before."""
    namespace = f"slow-{uuid.uuid4().hex[:6]}"
    async with (ChaosProxy(redis_server.port) as proxy,
                started(proxy.url, namespace) as (node, node_bp),
                started(redis_server.url, namespace) as (app, _),
                running_stack("websockets", manager=node) as stack):
        await eventually(lambda: node_bp._clock_offset is not None, "the node measured the bus's clock")
        old = await connect(stack.port)
        await eventually(lambda: len(node.handlers) == 1, "bob's first connection is admitted")
        assert await app.disconnect_user_everywhere("bob") == 0
        seen: list[int] = []
        assert await read_numbers(old, seen, 5.0) == 1008  # heard live: closed
        await eventually(lambda: not node.handlers, "the old connection is gone")
        (recorded,), _ = await node_bp._revocations(["user:bob"])
        assert recorded is not None
        when = recorded[0]
        await eventually(lambda: _surely_past(node_bp, when), "the revocation is past")
        new = await connect(stack.port)  # bob logs in again, after the revocation
        await eventually(lambda: len(node.handlers) == 1, "the new login is admitted")
        async with proxy.fault("delay", 1.5, delay=1.0):
            node_bp._revoke_unchecked = True
            await node_bp._check_revoked()  # as after a lost subscription, over a slow link
        assert len(node.handlers) == 1
        await node.send_message_to_user("bob", {"n": 7})
        assert await read_numbers(new, seen, 0.5) is None
        assert seen == [7]
        new.abort()


async def test_the_record_keeps_a_revocations_time_and_the_latest_of_a_target(
    redis_server: RedisServer,
) -> None:
    """Sent again (from the spool), a revocation keeps the time it was asked for; an older one
    published late does not replace a newer one; the record expires ``revoke_ttl`` after the
    time it was asked for."""
    namespace = f"rec-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(redis_server.url)
    async with started(redis_server.url, namespace) as (_, backplane):
        now = await backplane._bus_clock()
        key = f"{namespace}:revoked:user:eve"

        def revoked(when: int, reason: str) -> Publication:
            data = encode_bus_message(Control("app", "user", "eve", 1008, reason, when))
            return Publication(data, topic=backplane.broadcast_topic,
                               durable=("user:eve", 1008, reason, when))

        first = revoked(now - 60_000, "first")
        await backplane._publish_batch([first])
        await backplane._publish_batch([first])  # sent again a minute later: the same time
        assert await admin.get(key) == f"{now - 60_000} 1008 first".encode()
        ttl = await admin.pttl(key)
        assert backplane.revoke_ttl * 1000 - 70_000 < ttl <= backplane.revoke_ttl * 1000 - 60_000
        await backplane._publish_batch([revoked(now - 30_000, "newer")])
        await backplane._publish_batch([revoked(now - 45_000, "older, late")])
        assert await admin.get(key) == f"{now - 30_000} 1008 newer".encode()
        # Older than revoke_ttl: published, not recorded (it would expire at once).
        await backplane._publish_batch([
            revoked(now - int(backplane.revoke_ttl * 1000) - 1, "stale")])
        await admin.delete(key)
        await backplane._publish_batch([
            revoked(now - int(backplane.revoke_ttl * 1000) - 1, "stale")])
        assert await admin.get(key) is None
    await admin.aclose()


async def test_no_revocation_is_read_at_a_heartbeat_unless_the_subscription_was_lost(
    redis_factory: Callable[[], RedisServer],
) -> None:
    """Checking the connections against the records costs a read per thousand connections: it
    is done after the subscription came back (what a subscribed process can miss), not at
    every heartbeat."""
    server = redis_factory()
    admin = Redis.from_url(server.url)

    async def calls(command: str) -> int:
        stats = await admin.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    async def heartbeats(count: int) -> None:  # each measures Redis's clock (TIME) once
        start = await calls("time")
        async with asyncio.timeout(10):
            while await calls("time") < start + count:
                await asyncio.sleep(HEARTBEAT / 4)

    async with (started(server.url, "beat") as (node, node_bp),
                running_stack("websockets", manager=node) as stack):
        clients = [await connect(stack.port) for _ in range(3)]
        await eventually(lambda: len(node.handlers) == 3, "bob's connections are admitted")
        await admin.config_resetstat()
        await heartbeats(4)
        assert await calls("mget") == 0  # nothing missed: nothing read
        await _subscriber_killed(admin, node_bp)
        async with asyncio.timeout(5):
            await node_bp.wait_connected()
        await heartbeats(2)
        assert await calls("mget") == 1  # once back: one read for the three
        await heartbeats(4)
        assert await calls("mget") == 1
        assert len(node.handlers) == 3  # nothing was revoked
        for client in clients:
            client.abort()

@pytest.mark.parametrize("transport", SERVED)
async def test_a_process_restarted_with_the_same_node_id_keeps_every_new_message(
    redis_server: RedisServer, transport: str
) -> None:
    """Two lives of node "pod-a" number their kept messages alike (as if the clock had stepped
    back between them): the second life's are kept and delivered all the same, none taken for
    the first life's."""
    namespace = f"life-{uuid.uuid4().hex[:6]}"
    for life in range(2):
        async with started(redis_server.url, namespace, node_id="pod-a") as (manager, backplane):
            backplane._kids = itertools.count(1)  # the same numbers in both lives
            for n in (2 * life, 2 * life + 1):
                await manager.send_message_to_user("bob", {"n": n})
            async with asyncio.timeout(5):
                await backplane.flush()
            assert backplane.stats.kept == 2
    async with (started(redis_server.url, namespace, node_id="pod-a") as (manager, _),
                running_stack(transport, manager=manager) as stack):
        client = await connect(stack.port)  # bob's history comes first
        seen: list[int] = []
        await read_numbers(client, seen, 1.0)
        client.abort()
    assert seen == [0, 1, 2, 3]


async def test_redis_answers_a_number_sent_again_only_with_the_same_message(
    redis_server: RedisServer,
) -> None:
    """The search for a message sent again matches its number and its bytes: another message
    under a number already used is appended, never answered as the earlier one."""
    namespace = f"kid-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(redis_server.url)
    async with started(redis_server.url, namespace, ServerConfig()) as (manager, backplane):
        keep = manager.outbox_limits
        assert keep is not None
        first, other = (encode_bus_message(UserDelivery("dan", None, b'{"x":%d}' % i, sent=1))
                        for i in range(2))
        answers = await backplane._publish_batch([
            Publication(first, user_id="dan", keep=keep, durable=7),
            Publication(other, user_id="dan", keep=keep, durable=7)])
        assert answers[0][0] != answers[1][0]
        assert await admin.xlen(f"{namespace}:outbox:dan") == 2
    await admin.aclose()


async def _errors(admin: Redis, kind: str) -> int:
    """How many error replies of ``kind`` Redis gave since its statistics were reset."""
    stats = await admin.info("errorstats")
    return int(stats.get(f"errorstat_{kind}", {}).get("count", 0))


@pytest.mark.parametrize("transport", SERVED)
async def test_a_kept_message_redis_keeps_refusing_fails_alone_and_only_at_heartbeats(
    redis_server: RedisServer, transport: str
) -> None:
    """One kept message Redis refuses (WRONGTYPE: a string where the user's history belongs,
    standing in for any error reply) waits in the spool; the messages published after it go
    through, counted as published; a revocation does not fail; flush() returns; it is tried at
    each heartbeat only, and given up after a bounded number of tries (counted)."""
    namespace = f"refused-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(redis_server.url)
    await admin.set(f"{namespace}:outbox:mallory", "not a stream")
    async with (started(redis_server.url, namespace) as (manager, backplane),
                running_stack(transport, manager=manager) as stack):
        client = await connect(stack.port)
        await admin.config_resetstat()
        await manager.send_message_to_user("mallory", {"n": -1})
        await eventually(lambda: len(backplane._spool) == 1, "the refused message spooled")
        for n in range(20):  # each its own batch, while the refused one waits
            await manager.send_message_to_user("bob", {"n": n})
            await manager.broadcast({"n": 1000 + n})
            async with asyncio.timeout(HEARTBEAT):
                await backplane.flush()  # does not wait for the refused one's next try
        assert await manager.disconnect_user_everywhere("eve") == 0
        assert backplane.stats.failed == 0
        assert backplane.stats.published >= 20  # the broadcasts, through Redis
        seen: list[int] = []
        await read_numbers(client, seen, 0.5)
        assert [n for n in seen if n < 1000] == list(range(20))  # kept for bob, in order
        assert sorted(n for n in seen if n >= 1000) == list(range(1000, 1020))
        await eventually(lambda: backplane.stats.failed == 1, "given up, counted")
        assert not backplane._spool
        assert await _errors(admin, "WRONGTYPE") == _SPOOL_TRIES  # one try per heartbeat
        client.abort()
    await admin.aclose()


async def _history_numbers(admin: Redis, namespace: str, user: str) -> list[int]:
    """The numbers of the messages in ``user``'s history on Redis, oldest first."""
    numbers = []
    entries: list[tuple[bytes, dict[bytes, bytes]]] = await admin.xrange(  # type: ignore[assignment]
        f"{namespace}:outbox:{user}")
    for _, fields in entries:
        message = decode_bus_message(fields[b"d"])
        assert isinstance(message, UserDelivery)
        numbers.append(json.loads(message.frame)["message"]["n"])
    return numbers


async def test_a_users_kept_messages_wait_behind_one_redis_refused_and_keep_their_order(
    redis_server: RedisServer,
) -> None:
    """Later kept messages to the user whose message Redis refused wait behind it in the spool
    (their history stays in order); another user's go at once."""
    namespace = f"order-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(redis_server.url)
    await admin.set(f"{namespace}:outbox:mallory", "not a stream")
    async with started(redis_server.url, namespace) as (manager, backplane):
        await manager.send_message_to_user("mallory", {"n": 0})
        await eventually(lambda: len(backplane._spool) == 1, "the refused message spooled")
        await admin.delete(f"{namespace}:outbox:mallory")  # Redis would take it now
        for n in (1, 2):
            await manager.send_message_to_user("mallory", {"n": n})
        await manager.send_message_to_user("bob", {"n": 9})
        async with asyncio.timeout(HEARTBEAT):
            await backplane.flush()
        assert await _history_numbers(admin, namespace, "bob") == [9]  # at once
        await eventually(lambda: backplane.stats.kept == 4, "the spool tried at a heartbeat")
        assert await _history_numbers(admin, namespace, "mallory") == [0, 1, 2]
        assert backplane.stats.failed == 0
    await admin.aclose()


async def test_a_replica_that_refuses_writes_costs_kept_messages_no_try(
    redis_factory: Callable[[], RedisServer],
) -> None:
    """READONLY (Redis became a replica, as in a failover) says Redis serves nobody's writes
    for now, not that the message is bad: the kept message waits in the spool past the tries a
    refused one gets, and is kept once Redis takes writes again."""
    from .redis_server import free_port  # the plugin's module, imported once pytest loaded it

    server = redis_factory()
    namespace = f"replica-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(server.url)
    async with started(server.url, namespace) as (manager, backplane):
        await admin.replicaof("127.0.0.1", str(free_port()))  # a master that never answers
        await manager.send_message_to_user("bob", {"n": 0})
        await eventually(lambda: len(backplane._spool) == 1, "the refused message spooled")
        # More tries than a refused message gets (one per heartbeat), none counted against it.
        async with asyncio.timeout(10 * _SPOOL_TRIES * HEARTBEAT):
            while await _errors(admin, "READONLY") <= _SPOOL_TRIES + 1:
                await asyncio.sleep(HEARTBEAT / 4)  # polling Redis's count of error replies
        assert backplane.stats.failed == backplane.stats.kept == 0
        await admin.replicaof("NO", "ONE")
        await eventually(lambda: backplane.stats.kept == 1, "kept once Redis takes writes")
        assert await _history_numbers(admin, namespace, "bob") == [0]
    await admin.aclose()
