"""A kept per-user message reaches the user once, and is never passed over unwritten, when two
processes send to one user at once, on a real ``redis-server``.

A process hands its own per-user send to the user's connections here at once, before Redis
numbers it. Two cases follow from that:

- another process's send, numbered *before* it, may reach this process (and its connection)
  after it, or never if the connection closes first: the written mark must not move past the
  other send because the connection wrote the newer one (review 17 #1, a loss);
- a send made while a connection of the user is being admitted here may be in the history the
  admission leases: the connection must not get it a second time from what was sent meanwhile
  (review 17 #3, a duplicate).

Real servers on 127.0.0.1 on every served transport; the order of what Redis runs and answers is
forced with a delaying proxy (:mod:`tests.chaos_proxy`) or by holding the backplane's own calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import DaraClient, DaraServerMessage, ServerConfig, WebsocketManager
from dara_ws_core.backplane.broker import Kept
from dara_ws_core.backplane.node import Publication, Routed
from dara_ws_core.outbox import OutboxLimits
from dara_ws_redis import RedisBackplane

from .chaos_proxy import ChaosProxy
from .helpers import eventually
from .stacks import running_stack
from .test_kept_delivery import SERVED

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

#: Each way, on the delayed process's link to Redis: its own send is numbered after the other's.
DELAY = 0.4


async def texts_until_fence(client: DaraClient) -> list[str]:
    """The ``text`` of every message the client gets until the ``fence`` broadcast."""
    got: list[str] = []
    for _ in range(20):
        message = await client.receive(10.0)
        assert isinstance(message, DaraServerMessage)
        data: Any = message.message.model_dump()
        if "fence" in data:
            return got
        got.append(data["text"])
    raise AssertionError(f"no fence after {got}")


async def settled(backplane: RedisBackplane) -> None:
    """Everything the backplane queued is answered, and what that acknowledges is too."""
    async with asyncio.timeout(10):
        await backplane.flush()
    await eventually(lambda: not backplane._acks_in_flight and not backplane._acks_next,
                     "acknowledged")
    async with asyncio.timeout(10):
        await backplane.flush()


@pytest.mark.parametrize("transport", SERVED)
@pytest.mark.parametrize("end", ["closes", "stays"])
async def test_the_written_mark_never_passes_another_process_send_the_connection_did_not_write(
    redis_server: RedisServer, transport: str, end: str,
) -> None:
    """User V is connected on B, whose link to Redis is slow. B tells V "b": V's connection
    writes it at once. A tells V "a", which Redis numbers first (B's own send is still on its
    way), so "a" reaches B after "b". If V's connection closes before "a" arrives, it wrote
    "b" but never "a": acknowledging "b" would move V's written mark past "a", and V's next
    connection would never get it. If it stays, it gets "a" live, then acknowledges both."""
    namespace = f"once-{uuid.uuid4().hex[:6]}"
    async with ChaosProxy(redis_server.port) as proxy, contextlib.AsyncExitStack() as exits:
        a_backplane = RedisBackplane(redis_server.url, namespace=namespace)
        # A long heartbeat: the delayed link is slow, not dead.
        b_backplane = RedisBackplane(proxy.url, heartbeat_interval=5.0, namespace=namespace)
        a = WebsocketManager(ServerConfig(), backplane=a_backplane)
        b = WebsocketManager(ServerConfig(), backplane=b_backplane)
        for backplane, manager in ((a_backplane, a), (b_backplane, b)):
            exits.push_async_callback(backplane.stop)
            await backplane.start(manager)
        stack = await exits.enter_async_context(running_stack(transport, manager=b))
        user = f"v-{uuid.uuid4().hex[:6]}"
        first = await stack.client(f"{user}:s1")  # admitted before the link slows down
        async with proxy.fault("delay", 0.0, delay=DELAY):
            kept = b_backplane.stats.kept
            assert await b.send_message_to_user(user, {"text": "b"})
            assert await a.send_message_to_user(user, {"text": "a"})
            async with asyncio.timeout(10):
                await a_backplane.flush()  # "a" is numbered (1) before "b" reaches Redis
            message = await first.receive(10.0)
            assert isinstance(message, DaraServerMessage)
            assert message.message.model_dump() == {"text": "b"}
            if end == "closes":
                await first.close()
                await eventually(lambda: not b.handlers and not b._writing, "settled")
                assert b_backplane.stats.kept == kept  # the case: closed before "b" was numbered
            else:
                message = await first.receive(10.0)
                assert isinstance(message, DaraServerMessage)
                assert message.message.model_dump() == {"text": "a"}  # live, after "b"
        await settled(b_backplane)
        if end == "stays":  # everything written is acknowledged: no gap holds it back
            await eventually(lambda: not len(b._writes), "acknowledged")
            await settled(b_backplane)
            await first.close()
            await eventually(lambda: not b.handlers and not b._writing, "settled")
            await settled(b_backplane)
        second = await stack.client(f"{user}:s2")
        await b.broadcast({"fence": True})
        got = await texts_until_fence(second)
    if end == "closes":
        # "a" is not lost; "b", written before the gap, comes again (a duplicate, never a loss).
        assert got == ["a", "b"]
    else:
        assert got == []  # the first connection wrote both: nothing again


class _HeldAdmission(RedisBackplane):
    """A real Redis backplane whose admissions wait for ``gate``, and whose answer for the batch
    that carries a per-user send waits for ``answer`` once Redis ran it (``ran``): the order in
    which Redis runs, and this process learns, a send and an admission is the test's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.ran = asyncio.Event()
        self.answer = asyncio.Event()

    async def _attach(self, channel_id: str, user_id: str, limit: int | None,
                      keep: OutboxLimits | None) -> tuple[bool, list[Kept], Kept | None]:
        await self.gate.wait()
        return await super()._attach(channel_id, user_id, limit, keep)

    async def _publish_batch(self, batch: Sequence[Publication]) -> list[Routed]:
        routed = await super()._publish_batch(batch)
        if any(publication.stamped is not None for publication in batch):
            self.ran.set()
            await self.answer.wait()
        return routed


@pytest.mark.parametrize("transport", SERVED)
@pytest.mark.parametrize("numbered", ["before_admitted", "after_admitted"])
async def test_a_message_sent_while_the_connection_is_admitted_reaches_it_once(
    redis_server: RedisServer, transport: str, numbered: str,
) -> None:
    """A send from this process that Redis runs before a new connection's admission is in the
    history the admission leases, and was handed to the arriving connection meanwhile too: it
    must reach the connection once, whether this process learns its number before the admission
    ends or after (then the admission waits for it)."""
    namespace = f"arrive-{uuid.uuid4().hex[:6]}"
    backplane = _HeldAdmission(redis_server.url, namespace=namespace)
    manager = WebsocketManager(ServerConfig(), backplane=backplane)
    await backplane.start(manager)
    try:
        async with running_stack(transport, manager=manager) as stack:
            user = f"w-{uuid.uuid4().hex[:6]}"
            connecting = asyncio.ensure_future(stack.client(f"{user}:s1"))
            await eventually(lambda: any(arriving.user_id == user
                                         for arriving in manager._arriving.values()),
                             "being admitted")
            assert await manager.send_message_to_user(user, {"text": "x"})
            async with asyncio.timeout(10):
                await backplane.ran.wait()  # appended: the admission will lease it
            if numbered == "before_admitted":
                backplane.answer.set()
                async with asyncio.timeout(10):
                    await backplane.flush()
                backplane.gate.set()
            else:
                backplane.gate.set()
                # The admission has its lease, and waits for the number of what was sent
                # meanwhile before handing anything over.
                await eventually(lambda: bool(backplane._barriers), "the admission waits")
                backplane.answer.set()
            async with asyncio.timeout(10):
                client = await connecting
            await manager.broadcast({"fence": True})
            assert await texts_until_fence(client) == ["x"]
    finally:
        backplane.gate.set()
        backplane.answer.set()
        await backplane.stop()


async def test_kept_messages_two_processes_sent_while_redis_was_paused_are_never_passed_over(
    redis_factory: Callable[[], RedisServer],
) -> None:
    """Review 17's scenario: Redis is paused (SIGSTOP) while A tells V "a" and B tells V "b"
    (V is on B, which writes "b" at once); V's connection closes; Redis resumes and numbers
    both, "a" first here. V's next connection must get "a"."""
    server = redis_factory()
    assert server.process is not None
    pid = server.process.pid
    namespace = f"paused-{uuid.uuid4().hex[:6]}"
    async with contextlib.AsyncExitStack() as exits:
        a_backplane = RedisBackplane(server.url, heartbeat_interval=5.0, namespace=namespace)
        b_backplane = RedisBackplane(server.url, heartbeat_interval=5.0, namespace=namespace)
        a = WebsocketManager(ServerConfig(), backplane=a_backplane)
        b = WebsocketManager(ServerConfig(), backplane=b_backplane)
        for backplane, manager in ((a_backplane, a), (b_backplane, b)):
            exits.push_async_callback(backplane.stop)
            await backplane.start(manager)
        stack = await exits.enter_async_context(running_stack("websockets", manager=b))
        missed = []
        for trial in range(6):
            user = f"p{trial}-{uuid.uuid4().hex[:6]}"
            first = await stack.client(f"{user}:s1")
            os.kill(pid, signal.SIGSTOP)
            try:
                assert await a.send_message_to_user(user, {"text": "a"})
                assert await b.send_message_to_user(user, {"text": "b"})
                message = await first.receive(10.0)
                assert isinstance(message, DaraServerMessage)
                assert message.message.model_dump() == {"text": "b"}
                await first.close()
                await eventually(lambda: not b.handlers and not b._writing, "settled")
            finally:
                os.kill(pid, signal.SIGCONT)
            await settled(a_backplane)
            await settled(b_backplane)
            second = await stack.client(f"{user}:s2")
            await b.broadcast({"fence": trial})
            got = await texts_until_fence(second)
            await second.close()
            await eventually(lambda: not b.handlers and not b._writing, "settled")
            if "a" not in got:
                missed.append((trial, got))
    assert missed == []
