"""What the spool counts while a round trip to Redis is in flight, on a real ``redis-server``
(review 15 #1, #2, #3).

* The kept messages and revocations of the batch in flight count against ``max_spool`` until the
  bus answers or the round trip fails: the spool never goes past its bound when it fails.
* A stop during a round trip waits up to ``stop_drain`` for its answer; a round trip it must cut
  short is counted in ``stats.spool_dropped`` and logged at ERROR, never lost silently.
* While the bus is down a sender at its share of the spool's *bytes* is answered "not kept"
  (``False``, delivered live only), as at its share of the count: never ``BackplaneError``.

Redis slowed down or cut off through :mod:`tests.chaos_proxy`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import BackplaneError, ServerConfig, WebsocketManager
from dara_ws_redis import RedisBackplane

from .chaos_proxy import ChaosProxy
from .helpers import eventually
from .stacks import running_stack
from .test_durable_redis import numbers_bob_gets
from .test_kept_delivery import SERVED

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def app_through(proxy: ChaosProxy, namespace: str,
                      **options: Any) -> AsyncIterator[tuple[WebsocketManager, RedisBackplane]]:
    """A process whose Redis link goes through ``proxy`` (its heartbeat slow enough that a
    delayed round trip is not taken for a dead bus)."""
    backplane = RedisBackplane(proxy.url, namespace=namespace, heartbeat_interval=5.0,
                               backoff_initial=0.02, backoff_max=0.05, **options)
    app = WebsocketManager(ServerConfig(), backplane=backplane)
    await backplane.start(app)
    try:
        yield app, backplane
    finally:
        await backplane.stop()


async def test_the_batch_in_flight_counts_against_the_spools_bound_until_answered(
    redis_server: RedisServer,
) -> None:
    namespace = f"flying-{uuid.uuid4().hex[:6]}"
    async with (ChaosProxy(redis_server.port) as proxy,
                app_through(proxy, namespace, max_spool=3) as (app, backplane)):
        async with proxy.fault("delay", 0.0, delay=2.0):  # each way: the round trip waits
            for target in ("u0", "u1", "u2"):
                app.disconnect_user(target)  # revocations in flight: no room for kept ones
            await app.send_message_to_user("bob", {"n": 0})
            await eventually(lambda: not backplane._outbox, "the batch is in flight")
            for n in (1, 2):
                await app.send_message_to_user("bob", {"n": n})
            with pytest.raises(BackplaneError, match="spool is full"):
                await app.send_message_to_user("bob", {"n": 3})
        async with proxy.fault("drop", 0.2):  # the round trip fails: all of it spooled
            await eventually(lambda: not backplane.connected, "the app is cut off from Redis")
            await eventually(lambda: not backplane._outbox, "spooled")
            assert sum(p.keep is not None for p, _, _ in backplane._spool) == 3
        async with asyncio.timeout(10):
            await backplane.flush()
        assert backplane.stats.spool_dropped == 0
        assert not backplane._senders and not backplane._revoking


@pytest.mark.parametrize("transport", SERVED)
async def test_a_stop_waits_stop_drain_for_the_round_trip_in_flight(
    redis_server: RedisServer, transport: str,
) -> None:
    namespace = f"stopfly-{uuid.uuid4().hex[:6]}"
    async with ChaosProxy(redis_server.port) as proxy:
        async with app_through(proxy, namespace, stop_drain=10.0) as (app, backplane):
            async with proxy.fault("delay", 0.0, delay=1.5):  # a round trip of 3 s
                await app.send_message_to_user("bob", {"n": 0})  # told: kept
                await eventually(lambda: not backplane._outbox, "the batch is in flight")
                answered = backplane.stats.published + backplane.stats.kept
                began = time.monotonic()
                await backplane.stop()
            # Its answer was waited for (not cut short after 1 s, as with nothing kept).
            assert backplane.stats.published + backplane.stats.kept == answered + 1
            assert time.monotonic() - began > 2.0
            assert backplane.stats.spool_dropped == 0
        assert await numbers_bob_gets(redis_server.url, namespace, transport) == [0]


async def test_a_round_trip_a_stop_cuts_short_is_counted_and_logged_at_error(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="dara_ws_core.backplane")
    namespace = f"cut-{uuid.uuid4().hex[:6]}"
    async with (ChaosProxy(redis_server.port) as proxy,
                app_through(proxy, namespace, stop_drain=0.3) as (app, backplane)):
        async with proxy.fault("delay", 0.0, delay=3.0):
            app.disconnect_user("mallory")
            for n in range(2):
                await app.send_message_to_user(f"u{n}", {"n": n})
            await eventually(lambda: not backplane._outbox, "the batch is in flight")
            async with asyncio.timeout(10):
                await backplane.stop()
        assert backplane.stats.spool_dropped == 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "2 kept message(s) for 2 user(s) and 1 revocation(s) (user:mallory)" in errors[0]
    assert "3 of them in a round trip cut short" in errors[0]


@pytest.mark.parametrize("transport", SERVED)
async def test_a_sender_at_its_share_of_the_spools_bytes_is_answered_not_kept(
    redis_server: RedisServer, transport: str,
) -> None:
    namespace = f"bytes-{uuid.uuid4().hex[:6]}"
    share = 1000  # bytes: a 16th of max_spool_bytes; the count's share (4) is not reached
    async with (ChaosProxy(redis_server.port) as proxy,
                app_through(proxy, namespace, max_spool=64,
                            max_spool_bytes=16 * share) as (app, backplane),
                running_stack(transport, manager=app) as stack):

        async def tell(channel_id: str, data: Any) -> bool:
            return await app.send_message_to_user(data["user"], {"x": "y" * 300})

        app.add_ws_handler("tell", tell)
        hostile = await stack.client("mallet:h1")
        async with proxy.fault("drop", 0.1):
            await eventually(lambda: not backplane.connected, "the app is cut off from Redis")
            answers = [await hostile.request("tell", {"user": f"nobody{n}"}, timeout=5)
                       for n in range(4)]
            kept = answers.count(True)
            assert 1 <= kept < 4 and answers == [True] * kept + [False] * (4 - kept)
            assert backplane._senders["mallet"][1] <= share
            assert backplane.stats.spool_dropped == 0
