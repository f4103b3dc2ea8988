"""``in_thread`` handlers run on the manager's own pool, of which one user (an anonymous client: its
address) holds only a share, counting threads still running after their request timed out, and
whose last eighth is kept for users holding none; a request never waits for a thread.

A handler blocks on a gate the test opens at its end, as a slow query one client's input makes
slow would: without the shares, that client's requests would take every thread and everyone
else's requests would wait behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dara_ws_core import DaraClient, RemoteError, ServerConfig, WebsocketManager, allow_anonymous
from dara_ws_core.custom import HandlerThreads
from tests.helpers import eventually
from tests.stacks import TRANSPORTS, Stack, running_stack

TIMEOUT = 10.0
#: Eight threads: a share of one, so that two requests of one client already show it.
CONFIG = ServerConfig(handler_threads=8)
MakeStack = Callable[..., contextlib.AbstractAsyncContextManager[Stack]]


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """What the slow handlers wait for; opened when the test ends, whatever happened."""
    event = threading.Event()
    yield event
    event.set()


def lookup_waiting_for(gate: threading.Event) -> Callable[[str, Any], Any]:
    def lookup(channel_id: str, data: Any) -> Any:
        if data == "slow":
            gate.wait(TIMEOUT)
        return {"ok": data}

    return lookup


def busy_count(manager: WebsocketManager) -> int:
    return manager.stats().custom_handlers["busy"]


async def outcomes(requests: list[asyncio.Task[Any]]) -> list[str]:
    """The error code of every finished request (``ok`` for an answer)."""
    codes = []
    for request in requests:
        try:
            await request
            codes.append("ok")
        except RemoteError as exc:
            codes.append(exc.code)
    return codes


async def test_one_user_holds_only_its_share_of_the_handler_threads(
    make_stack: MakeStack, gate: threading.Event
) -> None:
    async with make_stack(config=CONFIG) as stack:
        stack.manager.add_ws_handler("lookup", lookup_waiting_for(gate), in_thread=True)
        threads = stack.manager.custom_handlers.threads
        assert (threads.size, threads.share) == (8, 1)
        mallory = [await stack.client(f"mallory:s{i}") for i in range(4)]
        alice = await stack.client("alice:s1")
        slow = [asyncio.create_task(c.request("lookup", "slow", timeout=TIMEOUT)) for c in mallory]
        # Beyond its share, a request is answered busy at once: it does not wait for a thread.
        await eventually(lambda: sum(r.done() for r in slow) == 3, "three requests answered")
        running = [r for r in slow if not r.done()]
        assert await outcomes([r for r in slow if r.done()]) == ["busy"] * 3
        assert threads.held("mallory") == 1
        assert busy_count(stack.manager) == 3
        # Another user's request runs while mallory's handler still blocks.
        assert await alice.request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}
        assert not running[0].done()
        gate.set()
        assert await running[0] == {"ok": "slow"}
        await eventually(lambda: threads.held("mallory") == 0, "mallory's thread returned")
        assert await mallory[0].request("lookup", "again", timeout=TIMEOUT) == {"ok": "again"}


async def test_a_handler_that_timed_out_holds_its_share_until_its_thread_returns(
    make_stack: MakeStack, gate: threading.Event
) -> None:
    async with make_stack(config=ServerConfig(handler_threads=8, handler_timeout=0.2)) as stack:
        stack.manager.add_ws_handler("lookup", lookup_waiting_for(gate), in_thread=True)
        threads = stack.manager.custom_handlers.threads
        mallory = await stack.client("mallory:s1")
        with pytest.raises(RemoteError) as timed_out:
            await mallory.request("lookup", "slow", timeout=TIMEOUT)
        assert timed_out.value.code == "timeout"
        # The thread cannot be stopped: it still runs, and still counts against mallory.
        assert threads.held("mallory") == 1
        with pytest.raises(RemoteError) as refused:
            await mallory.request("lookup", "slow", timeout=TIMEOUT)
        assert refused.value.code == "busy"
        gate.set()
        await eventually(lambda: threads.held("mallory") == 0, "the thread returned")
        assert await mallory.request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}


@pytest.mark.parametrize("transport", sorted(set(TRANSPORTS) - {"memory"}))
async def test_anonymous_clients_share_the_threads_of_their_address(
    transport: str, gate: threading.Event
) -> None:
    """Each anonymous connection is a user of its own: their share is their address's, or a
    client would take every thread by opening connections."""
    manager = WebsocketManager(CONFIG)
    manager.add_ws_handler("lookup", lookup_waiting_for(gate), in_thread=True)
    async with running_stack(transport, manager=manager, authenticator=allow_anonymous()) as stack:
        clients = [await stack.client(None) for _ in range(3)]
        slow = [asyncio.create_task(c.request("lookup", "slow", timeout=TIMEOUT)) for c in clients]
        await eventually(lambda: sum(r.done() for r in slow) == 2, "two requests answered")
        assert await outcomes([r for r in slow if r.done()]) == ["busy", "busy"]
        assert manager.custom_handlers.threads.held(("address", "127.0.0.1")) == 1
        gate.set()
        assert sorted(await outcomes(slow)) == ["busy", "busy", "ok"]


async def test_the_pool_runs_at_most_its_size_and_no_job_waits_for_a_thread(
    gate: threading.Event,
) -> None:
    threads = HandlerThreads(2)
    running = threading.Semaphore(0)

    def blocked() -> str:
        running.release()
        gate.wait(TIMEOUT)
        return "done"

    first = threads.submit("a", blocked)
    assert first is not None
    assert threads.submit("a", blocked) is None  # a's share (one thread) is taken
    second = threads.submit("b", blocked)  # the reserve: b holds none
    assert second is not None
    assert threads.submit("c", blocked) is None  # every thread taken: refused, not queued
    for _ in range(2):
        assert await asyncio.to_thread(running.acquire, timeout=TIMEOUT)
    threads.shutdown()  # cancels nothing: both jobs run to their end
    assert threads.held("a") == threads.held("b") == 1
    gate.set()
    assert [await asyncio.wrap_future(job) for job in (first, second)] == ["done", "done"]
    await eventually(lambda: threads.held("a") + threads.held("b") == 0, "the jobs returned")
    again = threads.submit("a", lambda: "new pool")  # a pool shut down starts again
    assert again is not None and await asyncio.wrap_future(again) == "new pool"
    threads.shutdown()


async def client_from(stack: Stack, token: str, address: str) -> DaraClient:
    """A connected client whose requests a trusted proxy (127.0.0.1) says come from ``address``."""
    client = DaraClient(lambda: stack.connect(token, headers=[("X-Forwarded-For", address)]), ping_interval=None)
    await client.connect()
    stack.clients.append(client)
    return client


async def test_the_users_of_one_address_cannot_take_the_threads_others_requests_need(
    make_stack: MakeStack, gate: threading.Event
) -> None:
    """One client naming a user for every share of the threads (free where the authenticator
    lets anyone name themselves) took every thread, and another client's request was answered
    busy. Now the users of one address hold a quarter of the threads together."""
    async with make_stack(config=ServerConfig(handler_threads=16, forwarded_allow_ips="127.0.0.1")) as stack:
        stack.manager.add_ws_handler("lookup", lookup_waiting_for(gate), in_thread=True)
        threads = stack.manager.custom_handlers.threads
        assert (threads.share, threads.address_share) == (2, 4)
        names = [await stack.client(f"name{n}:s1") for n in range(20)]  # all from 127.0.0.1
        slow = [asyncio.create_task(client.request("lookup", "slow", timeout=TIMEOUT)) for client in names]
        await eventually(lambda: sum(r.done() for r in slow) + sum(threads.held(f"name{n}") for n in range(20))
                         == 20, "every name's request running or answered")
        alice = await client_from(stack, "alice:s1", "192.0.2.100")
        assert await alice.request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}
        assert await outcomes([request for request in slow if request.done()]) == ["busy"] * 16
        gate.set()
        assert sorted(await outcomes(slow)) == ["busy"] * 16 + ["ok"] * 4


async def test_sources_that_hold_threads_leave_the_last_eighth_to_those_holding_none(
    make_stack: MakeStack, gate: threading.Event
) -> None:
    """Eight users each taking their share would take every thread; the eighth gets only what is
    left beside the reserve, a bystander still finds a thread, and once none is left a request
    is answered busy at once rather than waiting for a thread until it times out."""
    # Each user from an address of its own (named by a trusted proxy): the users of one
    # address hold a quarter of the threads together.
    config = ServerConfig(handler_threads=16, forwarded_allow_ips="127.0.0.1")
    async with make_stack(config=config) as stack:
        stack.manager.add_ws_handler("lookup", lookup_waiting_for(gate), in_thread=True)
        threads = stack.manager.custom_handlers.threads
        assert (threads.share, threads.reserve) == (2, 2)
        # One in_thread request at a time per connection: two connections per user.
        users = [f"mallory{u}" for u in range(8)]
        slow_clients = [await client_from(stack, f"{user}:s{s}", f"192.0.2.{u}")
                        for u, user in enumerate(users) for s in range(2)]
        slow = []
        for client in slow_clients:  # in turn, so that the first seven users take their share
            slow.append(asyncio.create_task(client.request("lookup", "slow", timeout=TIMEOUT)))
            await eventually(lambda: slow[-1].done() or threads.held(
                users[(len(slow) - 1) // 2]) == (len(slow) - 1) % 2 + 1, "the request taken")
        assert [threads.held(user) for user in users] == [2] * 7 + [1]
        assert await outcomes([r for r in slow if r.done()]) == ["busy"]
        # The reserve: a user holding none finds a thread while the others' run.
        alice = await client_from(stack, "alice:s1", "192.0.2.100")
        assert await alice.request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}
        carol = await client_from(stack, "carol:s1", "192.0.2.101")
        held_by_carol = asyncio.create_task(carol.request("lookup", "slow", timeout=TIMEOUT))
        await eventually(lambda: threads.held("carol") == 1, "carol's request runs")
        # Every thread taken: busy at once (a timeout of 60 s would otherwise answer it).
        with pytest.raises(RemoteError) as refused:
            await alice.request("lookup", "fast", timeout=TIMEOUT)
        assert refused.value.code == "busy"
        assert not held_by_carol.done()
        gate.set()
        assert await held_by_carol == {"ok": "slow"}
        assert sorted(await outcomes(slow)) == ["busy"] + ["ok"] * 15


@pytest.mark.parametrize("transport", sorted(set(TRANSPORTS) - {"memory"}))
async def test_one_endpoints_shutdown_leaves_every_request_of_another_answered(
    transport: str, gate: threading.Event
) -> None:
    """Two endpoints serving one manager share its pool: the first one's shutdown lets go of
    the pool's threads, and the second one's requests, running or refused, all get their
    outcome, and later ones run on a new pool."""
    manager = WebsocketManager(ServerConfig(handler_threads=2))
    manager.add_ws_handler("lookup", lookup_waiting_for(gate), in_thread=True)
    async with running_stack(transport, manager=manager) as stack:
        async with running_stack("memory", manager=manager) as other:
            client = await other.client("zed:s1")
            assert await client.request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}
            clients = [await stack.client(f"user{i}:s1") for i in range(3)]
            slow = [asyncio.create_task(clients[i].request("lookup", "slow", timeout=TIMEOUT))
                    for i in range(2)]
            await eventually(lambda: threads_held(manager) == 2, "both threads taken")
            with pytest.raises(RemoteError) as refused:
                await clients[2].request("lookup", "slow", timeout=TIMEOUT)
            assert refused.value.code == "busy"
        gate.set()  # the other endpoint is shut down: these still run to their reply
        assert await outcomes(slow) == ["ok", "ok"]
        assert await clients[2].request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}


def threads_held(manager: WebsocketManager) -> int:
    threads = manager.custom_handlers.threads
    return sum(threads.held(f"user{i}") for i in range(3))


async def test_a_pool_replaced_by_a_manager_of_another_size_is_shut_down() -> None:
    first = WebsocketManager(ServerConfig(handler_threads=4))
    first.add_ws_handler("lookup", lambda channel_id, data: data, in_thread=True)
    pool = first.custom_handlers.threads
    job = pool.submit("a", lambda: "ran")
    assert job is not None and await asyncio.wrap_future(job) == "ran"
    executor = pool._executor
    assert executor is not None
    WebsocketManager(ServerConfig(handler_threads=8), custom_handlers=first.custom_handlers)
    assert first.custom_handlers.threads.size == 8
    assert pool._executor is None and executor._shutdown


def test_the_pool_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="handler_threads"):
        ServerConfig(handler_threads=0)
    assert HandlerThreads(3).share == 1 and HandlerThreads(32).share == 4
    assert HandlerThreads(3).reserve == 1 and HandlerThreads(32).reserve == 4


async def test_endpoint_shutdown_stops_the_managers_pool(gate: threading.Event) -> None:
    manager = WebsocketManager(CONFIG)
    manager.add_ws_handler("lookup", lookup_waiting_for(gate), in_thread=True)
    async with running_stack("memory", manager=manager) as stack:
        client = await stack.client("alice:s1")
        assert await client.request("lookup", "fast", timeout=TIMEOUT) == {"ok": "fast"}
        pool = manager.custom_handlers.threads._executor
        assert pool is not None
    assert manager.custom_handlers.threads._executor is None
    assert pool._shutdown


async def test_an_in_thread_handler_returning_a_coroutine_fails_naming_the_mistake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync callable wrapping an async function (a lambda, a plain decorator) registered
    ``in_thread``: its thread returns a coroutine, which no thread can run. The request gets
    ``handler_error``, the log says what went wrong, and the coroutine is closed (no
    "never awaited" warning)."""
    ran: list[str] = []

    async def lookup(channel_id: str, data: Any) -> Any:
        ran.append(data)
        return {"ok": data}

    manager = WebsocketManager(CONFIG)
    manager.add_ws_handler("lookup", lambda channel_id, data: lookup(channel_id, data),  # noqa: PLW0108
                           in_thread=True)  # a sync wrapper: what registration cannot see through
    async with running_stack("websockets", manager=manager) as stack:
        client = await stack.client("alice:s1")
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            with pytest.raises(RemoteError) as failed:
                await client.request("lookup", "x", timeout=TIMEOUT)
            gc.collect()  # a coroutine never awaited warns as it is collected
        warnings_seen = [str(w.message) for w in warned]
    assert failed.value.code == "handler_error"
    assert ran == []
    assert not [w for w in warnings_seen if "never awaited" in w], warnings_seen
    failure = next(r for r in caplog.records if "custom handler failed" in r.getMessage())
    assert failure.exc_info is not None
    assert "in_thread" in str(failure.exc_info[1]) and "coroutine" in str(failure.exc_info[1])
