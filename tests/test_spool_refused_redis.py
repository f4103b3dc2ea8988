"""The spool while Redis stays connected but refuses every write, on a real ``redis-server``
made a replica of a master that never answers (``READONLY``, as after a failover; Redis at
``maxmemory`` or loading its data answers the same way): review 18 #5, #6.

* A stop tries the spool again within ``stop_drain`` (Redis may take writes again meanwhile)
  rather than dropping what Redis refused a moment before.
* Senders waiting for room in the outbox go on at once when every publication taken from it
  was held back in the spool (behind a message Redis refused), not at the next heartbeat.

Real servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from dara_ws_core import ServerConfig, WebsocketManager
from dara_ws_redis import RedisBackplane

from .helpers import eventually
from .test_durable_redis import _history_numbers

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)


async def refuse_writes(admin: Redis) -> None:
    """Make the server a replica of a master that never answers: it refuses every write
    (``READONLY``) and keeps every connection, subscriptions included."""
    from .redis_server import free_port  # the plugin's module, imported once pytest loaded it

    await admin.replicaof("127.0.0.1", str(free_port()))


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
