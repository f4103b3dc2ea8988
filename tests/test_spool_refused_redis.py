"""The spool while Redis stays connected but refuses every write, on a real ``redis-server``
made a replica of a master that never answers (``READONLY``, as after a failover; Redis at
``maxmemory`` or loading its data answers the same way): review 18 #3 to #6.

* The spool's bounds hold whatever the link's state: one sender holds at most a 16th of it while
  anything waits in it (its further kept sends answer "not kept", other users' are still
  kept, none raises), and a sender past its 16th never takes the spool's last 16th.
* Revocations Redis refuses keep one per target in the spool (the newest) and their room of
  their own; one beyond it raises ``RevocationNotKept``; once Redis takes writes, the one kept
  closes the user's connections on the other processes.
* A stop tries the spool again within ``stop_drain`` (Redis may take writes again meanwhile)
  rather than dropping what Redis refused a moment before.
* Senders waiting for room in the outbox go on at once when every publication taken from it
  was held back in the spool (behind a message Redis refused), not at the next heartbeat.

Real servers on 127.0.0.1, on every served transport where a client is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from dara_ws_core import (
    BackplaneError,
    DaraClient,
    RevocationNotKept,
    ServerConfig,
    WebsocketManager,
)
from dara_ws_redis import RedisBackplane

from .helpers import eventually
from .stacks import running_stack
from .test_durable_redis import _history_numbers, started
from .test_kept_delivery import SERVED

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

SPOOL = 64  # a sender's share: 4; the spool's last 16th: 4


async def refuse_writes(admin: Redis) -> None:
    """Make the server a replica of a master that never answers: it refuses every write
    (``READONLY``) and keeps every connection, subscriptions included."""
    from .redis_server import free_port  # the plugin's module, imported once pytest loaded it

    await admin.replicaof("127.0.0.1", str(free_port()))


async def histories(admin: Redis, namespace: str, users: list[str]) -> int:
    """How many messages the histories of ``users`` hold on Redis."""
    return sum([len(await _history_numbers(admin, namespace, user)) for user in users])


def teller(manager: WebsocketManager) -> None:
    """Handlers sending kept messages for the connection's user: ``tell`` one, ``burst`` many
    without yielding in between (all queued before the publishing runs)."""

    async def tell(channel_id: str, data: Any) -> bool:
        return await manager.send_message_to_user(data["user"], {"n": data["n"]})

    async def burst(channel_id: str, data: Any) -> list[bool]:
        return [await manager.send_message_to_user(f"nobody{n % 8}", {"n": n})
                for n in range(data)]

    manager.add_ws_handler("tell", tell)
    manager.add_ws_handler("burst", burst)


NOBODIES = [f"nobody{n}" for n in range(8)]


@dataclass
class Refusing:
    """An app process on a Redis that refuses every write, with mallory and alice connected."""

    backplane: RedisBackplane
    admin: Redis
    namespace: str
    mallory: DaraClient
    alice: DaraClient

    async def take_writes(self) -> None:
        """Redis takes writes again: wait until the spool drained (at a heartbeat)."""
        await self.admin.replicaof("NO", "ONE")
        await eventually(lambda: not self.backplane._spool and not self.backplane._senders,
                         "the spool drained at a heartbeat once Redis took writes")


@contextlib.asynccontextmanager
async def refusing(server: RedisServer, transport: str) -> AsyncIterator[Refusing]:
    namespace = f"refused-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(server.url)
    try:
        async with (started(server.url, namespace, max_spool=SPOOL) as (app, backplane),
                    running_stack(transport, manager=app) as stack):
            teller(app)
            scene = Refusing(backplane, admin, namespace, await stack.client("mallory:m1"),
                             await stack.client("alice:a1"))
            await refuse_writes(admin)
            yield scene
    finally:
        await admin.aclose()


@pytest.mark.parametrize("transport", SERVED)
async def test_while_redis_refuses_every_write_one_sender_holds_its_share_of_the_spool(
    redis_factory: Callable[[], RedisServer], transport: str
) -> None:
    async with refusing(redis_factory(), transport) as scene:
        backplane, mallory, alice = scene.backplane, scene.mallory, scene.alice
        assert await alice.request("tell", {"user": "bob", "n": 0}, timeout=5) is True
        await eventually(lambda: len(backplane._spool) == 1, "Redis refused it: spooled")
        answers = [await mallory.request("tell", {"user": f"nobody{n % 8}", "n": n}, timeout=5)
                   for n in range(SPOOL)]
        assert answers == [True] * (SPOOL // 16) + [False] * (SPOOL - SPOOL // 16)
        # Another user's kept send is still kept (it neither raises nor answers False).
        assert await alice.request("tell", {"user": "bob", "n": 1}, timeout=5) is True
        await scene.take_writes()
        assert await _history_numbers(scene.admin, scene.namespace, "bob") == [0, 1]
        assert await histories(scene.admin, scene.namespace, NOBODIES) == SPOOL // 16
        assert backplane.stats.spool_dropped == 0
        # Redis took everything: the share no longer applies, mallory's sends are kept again.
        assert await mallory.request("tell", {"user": "nobody0", "n": SPOOL}, timeout=5) is True


@pytest.mark.parametrize("transport", SERVED)
async def test_a_sender_past_its_share_never_takes_the_spools_last_16th(
    redis_factory: Callable[[], RedisServer], transport: str
) -> None:
    """A burst queued before Redis's first refusal comes back (nothing waits in the spool yet)
    stops short of the spool's last 16th, which stays for the senders within their share."""
    async with refusing(redis_factory(), transport) as scene:
        near = SPOOL - SPOOL // 16
        assert await scene.mallory.request("burst", SPOOL, timeout=5) == (
            [True] * near + [False] * (SPOOL - near))
        assert await scene.alice.request("tell", {"user": "bob", "n": 0}, timeout=5) is True
        await scene.take_writes()
        assert await _history_numbers(scene.admin, scene.namespace, "bob") == [0]
        assert await histories(scene.admin, scene.namespace, NOBODIES) == near


@pytest.mark.parametrize("transport", SERVED)
async def test_revocations_redis_refuses_keep_one_per_target_and_their_room(
    redis_factory: Callable[[], RedisServer], monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    from dara_ws_core.backplane import node as bus_node

    monkeypatch.setattr(bus_node, "_SPOOL_REVOCATIONS", 4)
    server = redis_factory()
    namespace = f"revoked-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(server.url)
    async with (started(server.url, namespace) as (node, _),
                started(server.url, namespace) as (app, app_bp),
                running_stack(transport, manager=node) as node_stack):
        await node_stack.client("mallory:m1")
        await eventually(lambda: len(node.handlers) == 1, "mallory is connected on the node")
        await refuse_writes(admin)
        targets = ["mallory"] * 300 + [f"u{n}" for n in range(8)]
        answers = await asyncio.gather(*(app.disconnect_user_everywhere(t) for t in targets),
                                       return_exceptions=True)
        assert all(isinstance(a, BackplaneError) for a in answers)
        lost = {t for t, a in zip(targets, answers, strict=True) if isinstance(a, RevocationNotKept)}
        assert lost == {f"u{n}" for n in range(3, 8)}  # the room: mallory, u0, u1, u2
        for _ in range(100):  # more of the same target, one at a time: each replaces the last
            with pytest.raises(BackplaneError) as info:
                await app.disconnect_user_everywhere("mallory")
            assert not isinstance(info.value, RevocationNotKept)
        spooled = sorted(p.revoke[0] for p, _, _ in app_bp._spool if p.revoke is not None)
        assert spooled == ["user:mallory", "user:u0", "user:u1", "user:u2"]
        assert app_bp._revokes == 4 and len(app_bp._revoking) == 4
        assert app_bp._revokes_bytes == app_bp._spool_bytes <= app_bp.max_spool_bytes // 16
        assert app_bp.connected and len(node.handlers) == 1
        await admin.replicaof("NO", "ONE")
        await eventually(lambda: not node.handlers, "mallory's connection on the node closed")
        await eventually(lambda: not app_bp._spool and not app_bp._revoking,
                         "the spool drained, answered")
        assert app_bp._revokes == app_bp._revokes_bytes == 0
    await admin.aclose()


async def test_a_stop_tries_what_redis_refused_again_within_stop_drain(
    redis_factory: Callable[[], RedisServer],
) -> None:
    """Redis refused a kept message a moment ago; a stop begins, and Redis takes writes again:
    the stop tries the spool again (the heartbeats that would have are over) and Redis keeps it."""
    server = redis_factory()
    namespace = f"stopheld-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(server.url)
    backplane = RedisBackplane(server.url, namespace=namespace, heartbeat_interval=30.0,
                               stop_drain=20.0)
    app = WebsocketManager(ServerConfig(), backplane=backplane)
    await backplane.start(app)
    await refuse_writes(admin)
    await app.send_message_to_user("bob", {"n": 0})
    await eventually(lambda: backplane._spool_held, "Redis refused it: it waits in the spool")
    stopping = asyncio.create_task(backplane.stop())
    await eventually(lambda: backplane._bus_stopped, "the stop reached the spool")
    await admin.replicaof("NO", "ONE")
    async with asyncio.timeout(20):
        await stopping
    assert backplane.stats.spool_dropped == 0
    assert await _history_numbers(admin, namespace, "bob") == [0]
    await admin.aclose()


async def test_a_sender_waiting_for_outbox_room_goes_on_when_a_round_is_all_held_back(
    redis_factory: Callable[[], RedisServer],
) -> None:
    """Redis refused a kept message for carol (WRONGTYPE: that message alone); the outbox fills
    with carol's next ones, which all wait behind it in the spool. A broadcast waiting for room
    in the outbox goes at once, not at the next heartbeat (30 s away)."""
    server = redis_factory()
    namespace = f"room-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(server.url)
    await admin.set(f"{namespace}:outbox:carol", "not a stream")
    backplane = RedisBackplane(server.url, namespace=namespace, heartbeat_interval=30.0,
                               max_outbox=4, stop_drain=0.5)
    app = WebsocketManager(ServerConfig(), backplane=backplane)
    await backplane.start(app)
    try:
        await app.send_message_to_user("carol", {"n": 0})
        await eventually(lambda: backplane._spool_held, "Redis refused it: spooled")
        published = backplane.stats.published
        # Four fill the outbox; the broadcast waits for room (each is queued in this order).
        async with asyncio.timeout(5):
            await asyncio.gather(*(app.send_message_to_user("carol", {"n": n})
                                   for n in range(1, 5)),
                                 app.broadcast({"hello": "everyone"}))
        await eventually(lambda: backplane.stats.published == published + 1,
                         "the broadcast published")
        assert [p.user_id for p, _, _ in backplane._spool] == ["carol"] * 5  # in order
    finally:
        await backplane.stop()
    await admin.aclose()
