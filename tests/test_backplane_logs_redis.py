"""What the backplane logs while Redis is connected but refuses writes, on a real ``redis-server``.

At ``maxmemory`` (``noeviction``) Redis keeps every connection, subscriptions included, and
answers every write with ``OOM``. Each message a user's connection wrote then had its
acknowledgement refused, and each refusal was one WARNING line: an operator's log grew with the
message rate (172 lines in one second for 20 users in the operator's trial), hiding the lines that
say what happened. The refusals are all counted (``stats.failed``); the log says the first ten,
then every power of ten, with the count so far.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING

import pytest
from redis.asyncio import Redis

from dara_ws_core import ServerConfig

from .helpers import eventually
from .hostile import HostileClient
from .stacks import running_stack
from .test_durable_redis import started
from .test_kept_delivery import read_numbers

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

SENDS = 20
USERS = 40


async def open_user(port: int | None, user: str) -> HostileClient:
    """A raw client of ``user`` past its handshake and ``init``, reading nothing yet."""
    assert port is not None
    client = await HostileClient.open(port, rcvbuf=4096)
    assert (await client.handshake(f"/api/core/ws?token={user}:s1")).status == 101
    assert json.loads((await client.read_frame()).text)["type"] == "init"
    return client


async def test_writes_redis_refuses_with_the_link_up_are_counted_each_and_logged_a_few_times(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    namespace = f"logs-{uuid.uuid4().hex[:6]}"
    admin = Redis.from_url(redis_server.url)
    caplog.set_level(logging.WARNING, logger="dara_ws_core.backplane")
    try:
        async with (started(redis_server.url, namespace, ServerConfig(outbox_messages=10_000))
                    as (manager, backplane),
                    running_stack("websockets", manager=manager) as stack):
            # The users read nothing yet: what is sent to them waits in their connections'
            # queues, kept (appended by Redis) but not written, so not acknowledged.
            clients = [await open_user(stack.port, f"user{u}") for u in range(USERS)]
            text = "x" * 4096
            for n in range(SENDS):
                for u in range(USERS):
                    assert await manager.send_message_to_user(f"user{u}", {"n": n, "text": text})
            await backplane.flush()
            assert backplane.stats.kept >= SENDS * USERS
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", 1)  # every write refused: OOM
            failed_before = backplane.stats.failed
            caplog.clear()
            seen: list[list[int]] = [[] for _ in clients]
            # Written now: acknowledged (one in flight per user), each refused.
            await asyncio.gather(*(read_numbers(client, numbers, quiet=0.5)
                                   for client, numbers in zip(clients, seen, strict=True)))
            assert seen == [list(range(SENDS))] * USERS
            await eventually(lambda: backplane.stats.failed - failed_before >= 10,
                             "acknowledgements refused", timeout=5)
            refused = backplane.stats.failed - failed_before
            lines = [r for r in caplog.records if "not published" in r.getMessage()]
            assert lines, "the refusals are logged"
            assert len(lines) <= 10 + len(str(refused)), (refused, len(lines))
            for client in clients:
                await client.close()
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
