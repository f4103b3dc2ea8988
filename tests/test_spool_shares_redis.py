"""The spool while Redis is unreachable, on a real ``redis-server`` (review 13 #1, #2).

* One sender's kept sends take at most a 16th of the process's spool: its further kept sends are
  answered "not kept", and other users' are still kept.
* A revocation is never crowded out by kept messages: it has room of its own in the spool, and
  once the bus is back it closes the user's connections on the other processes.
* Anonymous clients behind a trusted proxy (``forwarded_allow_ips``) are each a sender of
  their own, by the address the proxy names, not one sender for all.
* A backplane stopped while kept messages wait in its spool lets them drain for ``stop_drain``
  seconds if the bus answers meanwhile; what it must drop is counted
  (``stats.spool_dropped``) and logged at ERROR, never silently.

Real servers on 127.0.0.1 on every served transport; Redis cut off through :mod:`tests.chaos_proxy`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import BackplaneError, RevocationNotKept, ServerConfig, WebsocketManager, allow_anonymous
from dara_ws_redis import RedisBackplane

from .chaos_proxy import ChaosProxy
from .helpers import eventually
from .stacks import running_stack
from .test_durable_redis import numbers_bob_gets, started
from .test_forwarded import ALICE, MALLORY, behind_proxy
from .test_kept_delivery import SERVED

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

SPOOL = 64  # a sender's share: 4


@pytest.mark.parametrize("transport", SERVED)
async def test_one_senders_flood_takes_its_share_of_the_spool_and_a_revocation_still_goes(
    redis_server: RedisServer, transport: str
) -> None:
    namespace = f"share-{uuid.uuid4().hex[:6]}"
    async with (ChaosProxy(redis_server.port) as proxy,
                started(redis_server.url, namespace) as (node, _),
                started(proxy.url, namespace, max_spool=SPOOL, backoff_initial=0.02,
                        backoff_max=0.05) as (app, app_bp),
                running_stack(transport, manager=node) as node_stack,
                running_stack(transport, manager=app) as app_stack):

        async def tell(channel_id: str, data: Any) -> bool:
            return await app.send_message_to_user(data["user"], {"n": data["n"]})

        app.add_ws_handler("tell", tell)
        await node_stack.client("mallory:m1")
        await eventually(lambda: len(node.handlers) == 1, "mallory is connected on the node")
        hostile = await app_stack.client("mallet:h1")
        alice = await app_stack.client("alice:a1")
        async with proxy.fault("drop", 0.1):
            await eventually(lambda: not app_bp.connected, "the app is cut off from Redis")
            answers = [await hostile.request("tell", {"user": f"nobody{n % 8}", "n": n},
                                             timeout=5) for n in range(SPOOL)]
            # Its share of the spool: the rest delivered live only ("not kept").
            assert answers.count(True) == SPOOL // 16
            assert answers[:SPOOL // 16] == [True] * (SPOOL // 16)
            # Another user's kept send is still kept.
            assert await alice.request("tell", {"user": "bob", "n": 1}, timeout=5) is True
            # The revocation waits in the spool (a plain BackplaneError says so), not dropped.
            with pytest.raises(BackplaneError, match="waits in the spool") as info:
                await app.disconnect_user_everywhere("mallory")
            assert not isinstance(info.value, RevocationNotKept)
        async with asyncio.timeout(10):
            await app_bp.flush()
        await eventually(lambda: not node.handlers, "mallory's connection on the node closed")
        assert app_bp.stats.spool_dropped == 0


async def test_revocations_have_a_room_of_their_own_one_per_target(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Kept messages filling the spool leave the revocations' room alone; a newer revocation of
    a target replaces the spooled one; beyond the room, RevocationNotKept and an ERROR line
    naming the target."""
    from dara_ws_core.backplane import node as bus_node

    monkeypatch.setattr(bus_node, "_SPOOL_REVOCATIONS", 2)
    caplog.set_level(logging.ERROR, logger="dara_ws_core.backplane")
    namespace = f"room-{uuid.uuid4().hex[:6]}"
    async with (ChaosProxy(redis_server.port) as proxy,
                started(proxy.url, namespace, max_spool=4, backoff_initial=0.02,
                        backoff_max=0.05) as (app, app_bp)):
        async with proxy.fault("drop", 0.1):
            await eventually(lambda: not app_bp.connected, "the app is cut off from Redis")
            for n in range(4):  # server code: the whole spool
                await app.send_message_to_user("carol", {"n": n})
            with pytest.raises(BackplaneError, match="spool is full"):
                await app.send_message_to_user("carol", {"n": 4})
            for target in ("u0", "u1", "u0"):  # u0 twice: one spooled (the newest)
                with pytest.raises(BackplaneError, match="waits in the spool"):
                    await app.disconnect_user_everywhere(target)
                await eventually(lambda: not app_bp._outbox, "spooled")
            revocations = [p.revoke for p, _, _ in app_bp._spool if p.revoke is not None]
            assert [r[0] for r in revocations] == ["user:u1", "user:u0"]
            with pytest.raises(RevocationNotKept, match="user:u2"):
                await app.disconnect_user_everywhere("u2")
            assert [r.levelno for r in caplog.records if "user:u2" in r.getMessage()] == [
                logging.ERROR]
        async with asyncio.timeout(10):
            await app_bp.flush()
        assert not app_bp._revoking and not app_bp._senders  # every share given back
        records, _ = await app_bp._revocations(["user:u0", "user:u1", "user:u2"])
        assert [r is not None for r in records] == [True, True, False]


@pytest.mark.parametrize("transport", SERVED)
async def test_a_stop_during_an_outage_lets_the_spool_drain_if_the_bus_comes_back(
    redis_server: RedisServer, transport: str
) -> None:
    namespace = f"drain-{uuid.uuid4().hex[:6]}"
    async with ChaosProxy(redis_server.port) as proxy:
        backplane = RedisBackplane(proxy.url, namespace=namespace, heartbeat_interval=0.3,
                                   backoff_initial=0.02, backoff_max=0.05, stop_drain=20.0)
        app = WebsocketManager(ServerConfig(), backplane=backplane)
        await backplane.start(app)
        async with proxy.fault("drop", 0.1):
            await eventually(lambda: not backplane.connected, "the app is cut off from Redis")
            for n in range(5):
                await app.send_message_to_user("bob", {"n": n})  # kept (in the spool)
            stopping = asyncio.create_task(backplane.stop())
            await eventually(lambda: backplane._bus_stopped, "the stop reached the spool")
        async with asyncio.timeout(20):
            await stopping  # the bus answered again meanwhile: the spool drained
        assert backplane.stats.spool_dropped == 0
        assert await numbers_bob_gets(redis_server.url, namespace, transport) == [0, 1, 2, 3, 4]


async def test_what_a_stop_must_drop_is_counted_and_logged_at_error(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="dara_ws_core.backplane")
    namespace = f"dropped-{uuid.uuid4().hex[:6]}"
    async with ChaosProxy(redis_server.port) as proxy:
        backplane = RedisBackplane(proxy.url, namespace=namespace, heartbeat_interval=0.3,
                                   backoff_initial=0.02, backoff_max=0.05, stop_drain=0.5)
        app = WebsocketManager(ServerConfig(), backplane=backplane)
        await backplane.start(app)
        async with proxy.fault("drop", 5.0):
            await eventually(lambda: not backplane.connected, "the app is cut off from Redis")
            for n in range(3):
                await app.send_message_to_user(f"u{n % 2}", {"n": n})
            app.disconnect_user("mallory")
            await eventually(lambda: len(backplane._spool) == 4, "all four spooled")
            async with asyncio.timeout(10):
                await backplane.stop()  # within stop_drain (and the bounded unregistering)
        assert backplane.stats.spool_dropped == 4
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "3 kept message(s) for 2 user(s) and 1 revocation(s) (user:mallory)" in errors[0]
        assert "until it reconnects" not in caplog.text.split(errors[0])[-1]


@pytest.mark.parametrize("transport", SERVED)
async def test_anonymous_clients_behind_a_trusted_proxy_each_have_a_share_of_the_spool(
    redis_server: RedisServer, transport: str
) -> None:
    # Review 18 #2: keyed by the socket's peer, every anonymous client behind the proxy was one
    # sender, and one of them filling its share left the others' kept sends "not kept".
    namespace = f"proxied-{uuid.uuid4().hex[:6]}"
    config = ServerConfig(forwarded_allow_ips="127.0.0.1")
    async with (ChaosProxy(redis_server.port) as proxy,
                started(proxy.url, namespace, config, max_spool=SPOOL, backoff_initial=0.02,
                        backoff_max=0.05) as (app, app_bp),
                running_stack(transport, manager=app, authenticator=allow_anonymous()) as stack):

        async def tell(channel_id: str, data: Any) -> bool:
            return await app.send_message_to_user(data["user"], {"n": data["n"]})

        app.add_ws_handler("tell", tell)
        mallory, alice = await behind_proxy(stack, MALLORY), await behind_proxy(stack, ALICE)
        async with proxy.fault("drop", 0.1):
            await eventually(lambda: not app_bp.connected, "the app is cut off from Redis")
            answers = [await mallory.request("tell", {"user": f"nobody{n}", "n": n}, timeout=5)
                       for n in range(SPOOL // 16 + 2)]
            assert answers == [True] * (SPOOL // 16) + [False] * 2  # mallory's address's share
            assert await alice.request("tell", {"user": "bob", "n": 1}, timeout=5) is True
        async with asyncio.timeout(10):
            await app_bp.flush()
        assert app_bp.stats.spool_dropped == 0
