"""``WebsocketManager.on_connect`` / ``on_disconnect`` (:mod:`dara_ws_core.lifecycle`), on every
transport of the contract suite (real sockets on 127.0.0.1, and the in-memory pair)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from dara_ws_core import (
    ConnectionClosed,
    Identity,
    ServerConfig,
    Transport,
    UnknownChannel,
    WebsocketManager,
    build_frame,
    current_channel,
    current_identity,
)
from dara_ws_core.backplane import MemoryBackplane, MemoryBroker
from dara_ws_core.exceptions import CloseCode

from .helpers import eventually
from .stacks import HandshakeRejected, Stack, running_stack

TIMEOUT = 5.0


async def recv_json(transport: Transport) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        frame = await transport.receive()
    data = json.loads(frame)
    assert isinstance(data, dict)
    return data


def payload(frame: dict[str, Any]) -> dict[str, Any]:
    """The application keys of a pushed ``message`` frame."""
    assert frame["type"] == "message", frame
    return {k: v for k, v in frame["message"].items() if k != "__type"}


async def settled(stack: Stack) -> None:
    """Every connection of the stack is over, and every on_disconnect hook has run."""
    hooks = stack.manager.hooks
    await eventually(lambda: not stack.manager.handlers and not stack.endpoint._connections
                     and (hooks is None or not hooks.tasks), "every connection over", timeout=TIMEOUT)


@contextlib.asynccontextmanager
async def echo_stack(make_stack: Callable[..., Any], **config: Any) -> AsyncIterator[Stack]:
    async with make_stack(config=ServerConfig(**config)) as stack:
        stack.manager.add_ws_handler("echo", lambda channel_id, data: data)
        yield stack


# ---------------------------------------------------------------------------- on_connect


async def test_a_welcome_pushed_by_on_connect_follows_init_and_the_kept_messages(
        make_stack: Callable[..., Any]) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager

        @manager.on_connect
        def hello(channel_id: str, identity: Identity) -> None:  # sync: delivered there and then
            assert manager.deliver_to_channel(channel_id, build_frame({"hello": identity.user_id}))

        @manager.on_connect
        async def welcome(channel_id: str, identity: Identity) -> None:
            await manager.send_message(channel_id, {"welcome": identity.user_id})

        # Kept for alice while she is away (the per-user outbox, on by default).
        await manager.send_message_to_user("alice", {"kept": 1})
        transport = await stack.connect("alice:s1")
        try:
            init = await recv_json(transport)
            assert init["type"] == "init"
            assert payload(await recv_json(transport)) == {"kept": 1}
            assert payload(await recv_json(transport)) == {"hello": "alice"}
            assert payload(await recv_json(transport)) == {"welcome": "alice"}
        finally:
            await transport.close()
        assert manager.stats().hooks["connect_ok"] == 2


async def test_hooks_run_in_order_in_the_connections_context(make_stack: Callable[..., Any]) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        seen: list[tuple[str, str, str, str]] = []

        def record(name: str, channel_id: str, identity: Identity) -> None:
            seen.append((name, channel_id, current_channel.get(), current_identity.get().user_id))
            assert identity.user_id == current_identity.get().user_id

        @manager.on_connect
        def first(channel_id: str, identity: Identity) -> None:
            record("first", channel_id, identity)

        @manager.on_connect
        async def second(channel_id: str, identity: Identity) -> None:
            await asyncio.sleep(0)
            record("second", channel_id, identity)

        manager.on_connect(lambda channel_id, identity: record("third", channel_id, identity))

        @manager.on_disconnect
        def gone(channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
            record("gone", channel_id, identity)

        client = await stack.client("bob:s1")
        channel = client.channel
        await eventually(lambda: len(seen) == 3, "three on_connect hooks ran")
        await client.close()
        await settled(stack)
        assert seen == [(name, channel, channel, "bob") for name in ("first", "second", "third", "gone")]
        assert second is manager.on_connect(second)  # the decorator gives the function back


async def test_what_a_sync_hook_returns_to_await_is_awaited(make_stack: Callable[..., Any]) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        # A lambda calling an async function: its coroutine is run, not dropped.
        manager.on_connect(lambda channel_id, identity: manager.send_message(channel_id, {"via": "lambda"}))
        transport = await stack.connect()
        try:
            assert (await recv_json(transport))["type"] == "init"
            assert payload(await recv_json(transport)) == {"via": "lambda"}
        finally:
            await transport.close()
        assert manager.stats().hooks["connect_ok"] == 1


async def test_a_hook_that_closes_its_connection_ends_the_run_and_leaves_nothing_unawaited(
        make_stack: Callable[..., Any], recwarn: pytest.WarningsRecorder) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        later: list[str] = []
        ended = Ended(manager)

        def refuse(channel_id: str, identity: Identity) -> Any:
            manager.close_channel(channel_id, 4004, "not today")
            return manager.send_message(channel_id, {"never": "sent"})

        manager.on_connect(refuse)
        manager.on_connect(lambda channel_id, identity: later.append(channel_id))
        manager.on_disconnect(ended)
        transport = await stack.connect()
        channel = (await recv_json(transport))["message"]["channel"]
        with pytest.raises(ConnectionClosed) as closed:
            await recv_json(transport)
        assert closed.value.code == 4004
        await settled(stack)
        assert later == [] and ended.calls == [(channel, "alice", 4004)]
        gc.collect()
        assert not [w for w in recwarn.list if "never awaited" in str(w.message)]


async def test_a_failing_on_connect_is_logged_and_the_connection_stays_open(
        make_stack: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager

        @manager.on_connect
        def broken(channel_id: str, identity: Identity) -> None:
            raise ValueError("presence store down")

        @manager.on_connect
        async def broken_too(channel_id: str, identity: Identity) -> None:
            raise KeyError("async")

        with caplog.at_level(logging.ERROR, logger="dara_ws_core"):
            client = await stack.client()
            await eventually(lambda: manager.stats().hooks["connect_error"] == 2, "both counted")
            assert await client.request("echo", {"still": "open"}, timeout=TIMEOUT) == {"still": "open"}
        failures = [r for r in caplog.records if r.getMessage().startswith("on_connect hook failed")]
        assert [r.exc_info[1].__class__ for r in failures if r.exc_info] == [ValueError, KeyError]
        assert all(r.channel == client.channel for r in failures)  # type: ignore[attr-defined]
        assert "broken" in failures[0].getMessage()


@pytest.mark.parametrize("event", ["connect", "disconnect"])
async def test_a_sync_hook_raising_cancelled_error_of_its_own_is_a_failure_like_any_other(
        make_stack: Callable[..., Any], event: str) -> None:
    """A sync hook that raises ``CancelledError`` (it read a cancelled future's result): nothing
    cancelled the connection or the hook's task, so it is logged and counted as a failure, as a
    sync custom handler's is. Raised on from on_connect, it ended the connection's task before
    its serving began: the channel stayed registered, reachable, for ever, and on_disconnect
    never ran; from on_disconnect, the next hooks were skipped."""
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        ran: list[str] = []

        def cancelled_result(*args: Any) -> None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.cancel()
            future.result()

        manager.on_connect(cancelled_result if event == "connect" else lambda c, i: None)
        manager.on_disconnect(cancelled_result if event == "disconnect" else lambda c, i, e: None)
        manager.on_disconnect(lambda channel_id, identity, closed: ran.append(channel_id))
        client = await stack.client()
        assert await client.request("echo", "still served", timeout=TIMEOUT) == "still served"
        await client.close()
        await settled(stack)
        assert ran == [client.channel]
        assert manager.stats().hooks[f"{event}_error"] == 1


async def test_an_on_connect_past_handler_timeout_is_logged_as_timed_out(
        make_stack: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    async with echo_stack(make_stack, handler_timeout=0.2) as stack:
        manager = stack.manager
        after: list[str] = []

        @manager.on_connect
        async def stuck(channel_id: str, identity: Identity) -> None:
            await asyncio.Event().wait()

        manager.on_connect(lambda channel_id, identity: after.append(channel_id))
        with caplog.at_level(logging.WARNING, logger="dara_ws_core"):
            client = await stack.client()
            await eventually(lambda: after == [client.channel], "the next hook ran after the timeout")
        assert manager.stats().hooks["connect_timeout"] == 1
        assert any("on_connect hook timed out" in r.getMessage() for r in caplog.records)


async def test_a_slow_on_connect_holds_up_no_frame_and_is_cancelled_at_close(
        make_stack: Callable[..., Any]) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        cancelled: list[str] = []
        disconnected: list[str] = []

        @manager.on_connect
        async def slow(channel_id: str, identity: Identity) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(channel_id)
                raise

        manager.on_disconnect(lambda channel_id, identity, closed: disconnected.append(channel_id))
        client = await stack.client()
        # The hook is still waiting: the request is answered all the same.
        assert await client.request("echo", [1, 2], timeout=TIMEOUT) == [1, 2]
        assert cancelled == []
        channel = client.channel
        await client.close()
        await settled(stack)
        assert cancelled == [channel] and disconnected == [channel]
        assert manager.stats().hooks["connect_error"] == 0


# ---------------------------------------------------------------------------- on_disconnect


class Ended:
    """An on_disconnect hook that records each call, and checks the channel is gone by then."""

    def __init__(self, manager: WebsocketManager) -> None:
        self.manager = manager
        self.calls: list[tuple[str, str, int]] = []

    async def __call__(self, channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
        assert channel_id not in self.manager.handlers
        with pytest.raises(UnknownChannel):
            await self.manager.send_message(channel_id, {"too": "late"})
        self.calls.append((channel_id, identity.user_id, closed.code))


@pytest.mark.parametrize("ending", ["client close", "server close", "revocation", "abort"])
async def test_on_disconnect_runs_once_whatever_ended_the_connection(
        make_stack: Callable[..., Any], ending: str) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        ended = Ended(manager)
        manager.on_disconnect(ended)
        other = await stack.client("carol:s9")  # another user's connection: untouched
        transport = await stack.connect("dave:s1")
        channel = (await recv_json(transport))["message"]["channel"]
        await eventually(lambda: channel in manager.handlers, "registered")
        if ending == "client close":
            await transport.close(4001, "bye")
            code = 4001
        elif ending == "server close":
            manager.close_channel(channel, 4002, "kicked")
            code = 4002
        elif ending == "revocation":
            assert manager.disconnect_user("dave") == 1
            code = CloseCode.POLICY_VIOLATION
        else:
            transport.abort()
            code = CloseCode.ABNORMAL
        if ending != "abort":
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await recv_json(transport)
        await eventually(lambda: channel not in manager.handlers and not stack.endpoint._connections.keys()
                         - {other.channel} and manager.hooks is not None and not manager.hooks.tasks,
                         "the connection over", timeout=TIMEOUT)
        assert ended.calls == [(channel, "dave", code)]
        assert await other.request("echo", 1, timeout=TIMEOUT) == 1
        await other.close()
        await settled(stack)
        assert [call[:2] for call in ended.calls[1:]] == [(other.channel, "carol")]
        assert manager.stats().hooks["disconnect_ok"] == 2


async def test_on_disconnect_runs_in_the_ended_channels_context_not_the_closers(
        make_stack: Callable[..., Any]) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        seen: list[tuple[str, str, str]] = []

        @manager.custom_handlers.on("kick")
        def kick(channel_id: str, target: str) -> bool:
            return manager.close_channel(target, 4003, "kicked")

        @manager.on_disconnect
        def gone(channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
            seen.append((channel_id, current_channel.get(), current_identity.get().user_id))

        admin = await stack.client("admin:s1")
        victim = await stack.client("frank:s1")
        assert await admin.request("kick", victim.channel, timeout=TIMEOUT) is True
        await eventually(lambda: len(seen) == 1, "the kicked connection's hook ran")
        assert seen == [(victim.channel, victim.channel, "frank")]


async def test_on_disconnect_runs_after_the_cancelled_on_connect_has_unwound(make_stack: Callable[..., Any]) -> None:
    """A connection that ends while its on_connect still runs: the hook is cancelled, and its
    clean-up (what it awaits as it unwinds, a shielded write) ends before on_disconnect
    starts, so that on_disconnect sees what on_connect left (presence added, then removed).
    on_disconnect ran alongside it, and a presence entry written last stayed for ever."""
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        started = asyncio.Event()
        order: list[str] = []
        present: set[str] = set()

        @manager.on_connect
        async def join(channel_id: str, identity: Identity) -> None:
            started.set()
            try:
                await asyncio.Event().wait()  # a slow presence store
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)  # its write lands as it unwinds
                present.add(channel_id)
                order.append("connect unwound")
                raise

        @manager.on_disconnect
        async def leave(channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
            present.discard(channel_id)
            order.append("disconnect")

        client = await stack.client()
        async with asyncio.timeout(TIMEOUT):
            await started.wait()
        await client.close()
        await settled(stack)
        await eventually(lambda: len(order) == 2, "both ran", timeout=TIMEOUT)
        assert order == ["connect unwound", "disconnect"]
        assert present == set()


async def test_shutdown_returns_once_every_on_disconnect_ran(make_stack: Callable[..., Any]) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        done: list[str] = []

        @manager.on_disconnect
        async def slow_cleanup(channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
            await asyncio.sleep(0.1)
            done.append(channel_id)

        clients = [await stack.client(f"u{i}:s") for i in range(3)]
        await stack.endpoint.shutdown(grace=2.0)
        assert sorted(done) == sorted(c.channel for c in clients)
        assert manager.hooks is not None and not manager.hooks.tasks and not manager.hooks.open


async def test_an_endpoints_shutdown_leaves_the_on_disconnect_hooks_of_another_endpoint_alone() -> None:
    """Two endpoints over one manager (one application on two transports or paths): stopping
    one waits for, and cancels past its grace, its own connections' on_disconnect hooks only.
    It cancelled the other's hooks still running (their clean-up cut short), and waited for them."""
    from dara_ws_core import DaraClient, Endpoint
    from dara_ws_websockets import connect, serve

    manager = WebsocketManager(ServerConfig(shutdown_grace=0.1))
    manager.add_ws_handler("echo", lambda channel_id, data: data)
    cleaning, finish = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    @manager.on_disconnect
    async def cleanup(channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
        cleaning.set()
        try:
            await finish.wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("done")

    def identify(request: Any) -> Identity:
        return Identity(user_id="alice", session_id="s1")

    first, second = Endpoint(manager, identify), Endpoint(manager, identify)
    async with serve(second, "127.0.0.1", 0) as other:
        async with serve(first, "127.0.0.1", 0):
            async with asyncio.timeout(TIMEOUT):
                async with DaraClient(lambda: connect(other.url), ping_interval=None) as client:
                    assert await client.request("echo", 1, timeout=TIMEOUT) == 1
                await cleaning.wait()  # the other endpoint's client is gone, its hook running
        assert outcome == []  # the first endpoint is shut down: the other's hook still runs
        finish.set()
        await eventually(lambda: outcome == ["done"], "the hook finished", timeout=TIMEOUT)


async def test_a_failing_on_disconnect_is_logged_and_the_next_one_runs(
        make_stack: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    async with echo_stack(make_stack) as stack:
        manager = stack.manager
        after: list[str] = []

        @manager.on_disconnect
        def broken(channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
            raise RuntimeError("cleanup failed")

        manager.on_disconnect(lambda channel_id, identity, closed: after.append(current_channel.get()))
        with caplog.at_level(logging.ERROR, logger="dara_ws_core"):
            client = await stack.client()
            channel = client.channel
            await client.close()
            await settled(stack)
        assert after == [channel]
        assert manager.stats().hooks["disconnect_error"] == 1
        assert any(r.getMessage().startswith("on_disconnect hook failed") and r.exc_info
                   for r in caplog.records)


async def test_a_refused_connection_gets_neither_hook(make_stack: Callable[..., Any]) -> None:
    async with echo_stack(make_stack, max_connections_per_user=1) as stack:
        manager = stack.manager
        calls: list[str] = []
        manager.on_connect(lambda channel_id, identity: calls.append("connect"))
        manager.on_disconnect(lambda channel_id, identity, closed: calls.append("disconnect"))
        with pytest.raises(HandshakeRejected):
            await stack.connect("bad")
        client = await stack.client("erin:s1")
        with pytest.raises(HandshakeRejected):
            await stack.connect("erin:s2")  # over her limit
        await client.close()
        await settled(stack)
        assert calls == ["connect", "disconnect"]


@pytest.mark.parametrize("when", ["while the authenticator runs", "as the authenticator returns"])
async def test_a_handshake_the_shutdown_overtakes_is_not_served_after_it(
        make_stack: Callable[..., Any], when: str) -> None:
    """A shutdown that begins while a handshake is being authenticated, or between its
    authentication and its connection's start, leaves no connection served after it: the
    handshake is refused (503) or its connection closed (1001) before any hook, or, registered
    before the shutdown began, closed by it with both hooks run. It was served after the
    shutdown returned, its on_connect run, its on_disconnect left for no shutdown to wait for."""
    entered, release = asyncio.Event(), asyncio.Event()
    shutdowns: list[asyncio.Task[None]] = []
    stacks: list[Stack] = []

    async def authenticator(request: Any) -> Identity:
        entered.set()
        if when == "while the authenticator runs":
            await release.wait()
        else:  # the shutdown's first step comes after this handshake's authentication
            shutdowns.append(asyncio.create_task(stacks[0].endpoint.shutdown(grace=0)))
        return Identity(user_id="late", session_id="s1")

    async with make_stack(authenticator=authenticator) as stack:
        stacks.append(stack)
        calls: list[str] = []
        stack.manager.on_connect(lambda channel_id, identity: calls.append("connect"))
        stack.manager.on_disconnect(lambda channel_id, identity, closed: calls.append("disconnect"))
        connecting = asyncio.create_task(stack.connect("late:s1"))
        async with asyncio.timeout(TIMEOUT):
            await entered.wait()
            if not shutdowns:
                await stack.endpoint.shutdown(grace=0)
                release.set()
            else:
                await shutdowns[0]
            try:
                transport = await connecting
            except HandshakeRejected as exc:
                assert exc.status == 503  # going away, not refusing the client (it was 403)
            else:  # upgraded before the shutdown's first step: closed since
                with pytest.raises(ConnectionClosed):
                    for _ in range(8):
                        await transport.receive()
        await eventually(lambda: not stack.endpoint._connections and not stack.manager.handlers,
                         "no connection served after the shutdown", timeout=TIMEOUT)
        hooks = stack.manager.hooks
        assert hooks is not None and not hooks.open and not hooks.tasks
        assert calls in ([], ["connect", "disconnect"])


async def test_with_a_backplane_the_hooks_of_the_process_holding_the_connection_run() -> None:
    broker = MemoryBroker()
    calls: list[tuple[str, str, str]] = []
    async with contextlib.AsyncExitStack() as exits:
        managers = []
        for node in ("n0", "n1"):
            backplane = MemoryBackplane(broker, node_id=node, heartbeat_interval=0.2)
            manager = WebsocketManager(backplane=backplane)
            manager.on_connect(lambda channel, identity, node=node: calls.append((node, "connect", channel)))
            manager.on_disconnect(lambda channel, identity, closed, node=node: calls.append(
                (node, f"disconnect {closed.code}", channel)))
            exits.push_async_callback(backplane.stop)
            stack = await exits.enter_async_context(running_stack("memory", manager=manager))
            await backplane.start(manager)
            managers.append((manager, stack))
        (first, _), (_, second_stack) = managers
        client = await second_stack.client("gina:s1")
        channel = client.channel
        # Revoked from the other process: the holder closes it, and its hooks run.
        assert await first.disconnect_user_everywhere("gina") == 0
        await eventually(lambda: len(calls) == 2, "the holder's on_disconnect ran")
        assert calls == [("n1", "connect", channel), ("n1", "disconnect 1008", channel)]


# ---------------------------------------------------------------------------- registration


def test_what_cannot_be_a_hook_is_refused_at_registration() -> None:
    manager = WebsocketManager()

    def generator(channel_id: str, identity: Identity) -> Any:
        yield None

    async def agen(channel_id: str, identity: Identity) -> Any:
        yield None

    def one(channel_id: str) -> None: ...

    def two(a: str, b: Identity) -> None: ...

    def four(a: str, b: Identity, c: ConnectionClosed, d: int) -> None: ...

    for register in (manager.on_connect, manager.on_disconnect):
        for wrong in ("not callable", generator, agen, one, four):
            with pytest.raises(TypeError):
                register(cast(Any, wrong))
    with pytest.raises(TypeError, match=r"on_connect hook takes \(channel_id, identity\)"):
        manager.on_connect(cast(Any, lambda a, b, c: None))
    with pytest.raises(TypeError, match=r"on_disconnect hook takes \(channel_id, identity, closed\)"):
        manager.on_disconnect(cast(Any, two))
    hooks = manager.hooks
    assert hooks is not None and not hooks.connect and not hooks.disconnect
    assert manager.on_connect(two) is two and manager.on_disconnect(print) is print  # (no signature)
    assert len(hooks.connect) == len(hooks.disconnect) == 1


@pytest.mark.parametrize("bound", ["address", "total"])
async def test_on_disconnect_tasks_are_bounded_and_those_not_run_are_counted_and_logged(
    bound: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A slow ``on_disconnect`` (a database under load) and a client connecting and closing in a
    loop piled up one task per ended connection, each holding its connection, for up to
    ``handler_timeout``. At most ``max_disconnect_hooks`` run at once, a quarter of them for the
    connections of one client address; beyond, the hooks are not run, counted and logged. A
    bystander on another address still has its hooks run while one address holds its share."""
    from dara_ws_core import DaraClient, Endpoint
    from dara_ws_websockets import connect, serve

    manager = WebsocketManager(ServerConfig(max_disconnect_hooks=8 if bound == "address" else 4))
    manager.add_ws_handler("echo", lambda channel_id, data: data)
    finish = asyncio.Event()
    running: list[str] = []
    done: list[str] = []

    @manager.on_disconnect
    async def slow_cleanup(channel_id: str, identity: Identity, closed: ConnectionClosed) -> None:
        running.append(identity.user_id)
        await finish.wait()
        done.append(identity.user_id)

    def identify(request: Any) -> Identity:
        user = request.query.get("user", "anonymous")
        return Identity(user_id=user, session_id=user)

    async def connect_and_close(url: str, user: str, host: str) -> None:
        async with DaraClient(lambda: connect(f"{url}?user={user}", local_addr=(host, 0)),
                              ping_interval=None, reconnect=False) as client:
            assert await client.request("echo", 1, timeout=TIMEOUT) == 1

    endpoint = Endpoint(manager, identify)
    async with serve(endpoint, "127.0.0.1", 0) as server:
        # One address (or, for the total, one connection from each of five addresses: a
        # quarter of 4 is one each), each hook held by `finish`.
        plan = ([(f"storm{i}", "127.0.0.1") for i in range(5)] if bound == "address"
                else [(f"host{i}", f"127.0.0.{i + 1}") for i in range(5)])
        for user, host in plan:
            await connect_and_close(server.url, user, host)
        hooks = manager.hooks
        assert hooks is not None
        expected_running = 2 if bound == "address" else 4
        await eventually(lambda: not endpoint._connections, "every connection over", timeout=TIMEOUT)
        await eventually(lambda: len(running) == expected_running, "the hooks running", timeout=TIMEOUT)
        assert len(hooks.tasks) == expected_running
        assert manager.stats().hooks["disconnect_dropped"] == 5 - expected_running
        warned = [r for r in caplog.records if "on_disconnect hooks not run" in r.getMessage()]
        assert warned and warned[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]
        assert "max_disconnect_hooks" in warned[0].getMessage() and "slow_cleanup" in warned[0].getMessage()
        if bound == "address":
            # Another client address: its own share, its hook runs.
            await connect_and_close(server.url, "bystander", "127.0.0.2")
            await eventually(lambda: "bystander" in running, "the bystander's hook running", timeout=TIMEOUT)
        finish.set()
        await eventually(lambda: not hooks.tasks, "every hook done", timeout=TIMEOUT)
        assert not hooks.by_address
        # Room again: the next connection's hook runs.
        await connect_and_close(server.url, "later", "127.0.0.1")
        await eventually(lambda: "later" in done, "a later hook ran", timeout=TIMEOUT)
    assert manager.stats().hooks["disconnect_dropped"] == 5 - expected_running
