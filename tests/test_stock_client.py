"""The stock Dara frontend client against every socket transport.

The client is the real one: ``WebSocketClient`` of the dara-core 1.30 wheel's built bundle, run
by node (tests/stock_client.py, tests/frontend/). The rest of the suite plays it in Python
(``DaraClient``, the contract suite); here the bundle's own code connects the way the frontend
does (``setupWebsocket``: ``ws://{page host}/api/core/ws``, the session cookie), reads ``init``,
pings every 5 s (run 10x faster), answers the server's requests with ``sendMessage`` /
``sendVariable`` as its components do, sends custom requests with ``sendCustomMessage``, routes
typed messages to its observables, and reconnects when the server goes away.

Every test also checks that the page's console stayed clean: no error or warning logged by the
client, no uncaught exception (a frame it cannot parse would be one), no protocol violation seen
by its browser-like socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dara_ws_core import (
    ActionMessage,
    BackendStoreMessage,
    BackendStorePatchMessage,
    ConnectionClosed,
    Endpoint,
    ServerConfig,
    ServerErrorMessage,
    ServerVariableMessage,
    TaskNotificationMessage,
    VariableRequestMessage,
    WebsocketManager,
    token_authenticator,
)

from .helpers import eventually
from .stacks import OWN_UVICORNS, TRANSPORTS, Stack, running_stack, served_port, verify_token
from .stock_client import INTERVAL_SCALE, StockClient

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
ADAPTERS = {"websockets": "dara_ws_websockets", "aiohttp": "dara_ws_aiohttp",
            "asgi": "dara_ws_asgi", "picows": "dara_ws_picows"}

pytestmark = pytest.mark.timeout(120)
every_transport = pytest.mark.parametrize("transport", SOCKETS)


@contextlib.asynccontextmanager
async def page(port: int, token: str | None = "alice:s1",
               interval_scale: int = INTERVAL_SCALE) -> AsyncIterator[StockClient]:
    """A stock client connected to ``port``; its console must be clean when the test ends."""
    async with StockClient.open(port, token, interval_scale=interval_scale) as client:
        await client.command("connect")
        yield client
        assert client.complaints() == []


async def channel_of(client: StockClient) -> str:
    """``getChannel()``: the channel of the client's current connection, once it has one."""
    return str((await client.command("get_channel"))["channel"])


def port_of(stack: Stack) -> int:
    assert stack.port is not None
    return stack.port


# ---------------------------------------------------------------------------- connecting


@every_transport
async def test_the_stock_client_connects_with_its_cookie_and_pings(transport: str) -> None:
    async with running_stack(transport) as stack, page(port_of(stack)) as client:
        channel = await channel_of(client)
        assert stack.manager.registry.user_of(channel) == "alice"
        assert [h["status"] for h in client.seen("ws_handshake")] == [101]
        opened = client.seen("ws_open")
        assert [o["url"] for o in opened] == [f"ws://127.0.0.1:{stack.port}/api/core/ws"]
        assert opened[0]["extensions"] == ""  # permessage-deflate is offered and declined
        # init first; channel$ tells the app (the client feeds init to messages$ twice: from its
        # message listener and from getChannel's, so channel$ says it twice).
        assert client.seen("frame")[0]["msg"] == {"type": "init", "message": {"channel": channel}}
        assert {e["channel"] for e in client.seen("channel")} == {channel}
        # The heartbeat: a ping every 5 s (the one interval it sets), each answered with a pong.
        assert [t["delay"] for t in client.seen("timer")] == [5000]
        mark = client.mark()
        await client.wait_count("frame", 3, lambda e: e["msg"] == {"type": "pong", "message": None},
                                since=mark)
        assert not client.seen("ws_close")


@pytest.mark.parametrize("transport", sorted(OWN_UVICORNS))
async def test_the_stock_client_under_an_applications_own_uvicorn(transport: str) -> None:
    # uvicorn as an application sets it up (httptools; all defaults, ws_per_message_deflate on),
    # hooked by the ASGI adapter: the browser's permessage-deflate offer is declined there too.
    async with served_port(transport, ServerConfig()) as port, page(port) as client:
        await channel_of(client)
        assert [h["status"] for h in client.seen("ws_handshake")] == [101]
        assert client.seen("ws_open")[0]["extensions"] == ""
        await client.wait_count("frame", 2, lambda e: e["msg"] == {"type": "pong", "message": None})
        assert not client.seen("ws_close")


@every_transport
async def test_pings_both_ways_keep_the_stock_client_connected_past_the_idle_timeout(
    transport: str,
) -> None:
    # The server's protocol pings (every 0.4 s: they only go when nothing came in for that long)
    # get the browser's pongs, and the client's own pings (every 1 s here) keep it from being
    # idle: no close while the server pings 3 times and the client twice (2 s, past 1.2 s).
    config = ServerConfig(ping_interval=0.4, ping_timeout=2.0, idle_timeout=1.2)
    async with running_stack(transport, config) as stack, page(port_of(stack), interval_scale=5) as client:
        channel = await channel_of(client)
        await client.wait_count("ws_ping", 3)
        await client.wait_count("frame", 2, lambda e: e["msg"]["type"] == "pong")
        assert not client.seen("ws_close")
        assert list(stack.manager.handlers) == [channel]


@every_transport
async def test_closing_the_stock_client_removes_its_channel(transport: str) -> None:
    async with running_stack(transport) as stack, page(port_of(stack)) as client:
        channel = await channel_of(client)
        await client.command("close")
        closed = await client.wait("ws_close")
        # close() sends a close frame without a status code. websockets and uvicorn answer with
        # none (the page sees 1005), aiohttp and picows with 1000: both clean, both allowed
        # (RFC 6455 5.5.1), and the client has stopped listening by then.
        assert closed["code"] in (1000, 1005) and closed["wasClean"], str(closed)
        await eventually(lambda: channel not in stack.manager.handlers)
        assert stack.manager.registry.counts() == (0, 0, 0)
        assert len(client.seen("ws_open")) == 1  # close() is final: no reconnect


# ---------------------------------------------------------------------------- client -> server


@every_transport
async def test_custom_requests_settle_with_replies_and_errors(transport: str) -> None:
    seen: list[tuple[str, Any]] = []

    def broken(channel: str, data: Any) -> Any:
        raise RuntimeError("secret internal detail")

    async with running_stack(transport) as stack:
        stack.manager.add_ws_handler("echo", lambda channel, data: {"echo": data})
        stack.manager.add_ws_handler("note", lambda channel, data: seen.append((channel, data)))
        stack.manager.add_ws_handler("broken", broken)
        async with page(port_of(stack)) as client:
            channel = await channel_of(client)
            reply = (await client.command("custom", kind="echo", data=[1, "x"], **{"await": True}))["reply"]
            assert reply["type"] == "custom"
            assert reply["message"]["kind"] == "echo" and reply["message"]["data"] == {"echo": [1, "x"]}
            assert len(reply["message"]["__response_for"]) == 21  # the client's nanoid
            # Fire and forget: the promise is null at once; the handler gets it on its channel.
            assert (await client.command("custom", kind="note", data={"n": 1}))["reply"] is None
            await eventually(lambda: seen == [(channel, {"n": 1})])
            # A handler returning None still answers an awaited request (data null): it settles.
            reply = (await client.command("custom", kind="note", data=2, **{"await": True}))["reply"]
            assert reply["message"]["data"] is None
            # [ext] error replies settle the caller's promise; the client takes them as replies.
            for kind, code in (("missing", "unknown_kind"), ("broken", "handler_error")):
                reply = (await client.command("custom", kind=kind, data=1, **{"await": True}))["reply"]
                assert reply["message"]["kind"] == kind and reply["message"]["data"] is None
                assert reply["message"]["__error"]["code"] == code
                assert "secret" not in str(reply)
            reply = (await client.command("custom", kind="echo", data=3, **{"await": True}))["reply"]
            assert reply["message"]["data"] == {"echo": 3}  # the connection is as good as before
            assert list(stack.manager.handlers) == [channel]


# ---------------------------------------------------------------------------- server -> client


@every_transport
async def test_every_server_frame_reaches_its_observable(transport: str) -> None:
    async with running_stack(transport) as stack, page(port_of(stack)) as client:
        channel = await channel_of(client)
        send = stack.manager.send_message

        await send(channel, {"plain": 1, "nested": {"a": [1, 2]}})
        assert await client.frame(lambda m: m.get("message") == {"plain": 1, "nested": {"a": [1, 2]}}) == {
            "type": "message", "message": {"plain": 1, "nested": {"a": [1, 2]}}}
        await send(channel, {"kind": "k", "data": [1, 2]}, custom=True)
        pushed = await client.wait("custom", lambda e: e["msg"]["message"]["kind"] == "k")
        assert pushed["msg"] == {"type": "custom", "message": {"kind": "k", "data": [1, 2]}}

        await send(channel, ServerErrorMessage(error="boom", time="2026-01-02T03:04:05+00:00"))
        error = await client.wait("server_error")
        assert error["msg"]["message"] == {"error": "boom", "time": "2026-01-02T03:04:05+00:00"}

        await send(channel, BackendStoreMessage(store_uid="s", value={"a": 1}, sequence_number=1))
        store = await client.wait("backend_store")
        assert store["msg"] == {"store_uid": "s", "value": {"a": 1}, "sequence_number": 1}
        patch = [{"op": "replace", "path": "/a", "value": 2}]
        await send(channel, BackendStorePatchMessage(store_uid="s", patches=patch, sequence_number=2))
        patched = await client.wait("backend_store_patch")
        assert patched["msg"] == {"store_uid": "s", "patches": patch, "sequence_number": 2}
        await send(channel, ServerVariableMessage(uid="sv1", sequence_number=3))
        variable = await client.wait("server_variable")
        assert variable["msg"] == {"__type": "ServerVariable", "uid": "sv1", "sequence_number": 3}

        # An action stream: implementations, then null (the end executeAction waits for).
        await client.command("watch_action", uid="exec1")
        await send(channel, ActionMessage(action={"__typename": "UpdateVariable", "v": 1}, uid="exec1"))
        await send(channel, ActionMessage(action={"__typename": "Other"}, uid="exec2"))
        await send(channel, ActionMessage(action=None, uid="exec1"))
        await client.wait("action_done", lambda e: e["uid"] == "exec1")
        assert [a["action"] for a in client.seen("action")] == [{"__typename": "UpdateVariable", "v": 1}]

        # Tasks: progress updates, then waitForTask settles on COMPLETE / ERROR / CANCELED.
        for task in ("t1", "t2", "t3"):
            await client.command("wait_task", task_id=task)
        await send(channel, TaskNotificationMessage(status="PROGRESS", task_id="t1", progress=50, message="half"))
        progress = await client.wait("task_progress")
        assert progress["msg"]["message"] == {"status": "PROGRESS", "task_id": "t1", "progress": 50, "message": "half"}
        await send(channel, TaskNotificationMessage(status="COMPLETE", task_id="t1", result={"x": 1}))
        await send(channel, TaskNotificationMessage(status="ERROR", task_id="t2", error="failed"))
        await send(channel, TaskNotificationMessage(status="CANCELED", task_id="t3"))
        done = await client.wait("task_done", lambda e: e["task_id"] == "t1")
        assert done["msg"]["message"] == {"status": "COMPLETE", "task_id": "t1"}  # no result on the wire
        failed = await client.wait("task_failed", lambda e: e["task_id"] == "t2")
        assert (failed["error"], failed["message"], failed["err_task_id"]) == ("TaskError", "failed", "t2")
        cancelled = await client.wait("task_failed", lambda e: e["task_id"] == "t3")
        assert cancelled["error"] == "TaskCancelledError"
        statuses = [e["status"] for e in client.seen("task_status", lambda e: e["task_id"] == "t1")]
        assert statuses == ["PROGRESS", "COMPLETE"]


@every_transport
async def test_server_requests_are_answered_by_the_stock_client(transport: str) -> None:
    async with running_stack(transport) as stack, page(port_of(stack)) as client:
        channel = await channel_of(client)
        manager = stack.manager
        # VariableStateProvider answers VariableRequestMessage with sendVariable.
        await client.command("variables", values={"v1": {"value": [1, 2, 3]}})
        answer = await manager.send_and_wait(channel, VariableRequestMessage(variable={"uid": "v1"}))
        assert answer == {"value": [1, 2, 3]}
        answer = await manager.send_and_wait(channel, VariableRequestMessage(variable={"uid": "v9"}))
        assert answer == "__NOT_REGISTERED__"

        async def answered(payload: dict[str, Any], custom: bool, *answer: Any) -> Any:
            """A request the app answers with ``sendMessage(part, __rchan, len(answer))``
            for each part (one part: ``sendMessage(value, __rchan)``, chunk_count null)."""
            mark = client.mark()
            task = asyncio.ensure_future(manager.send_and_wait(channel, payload, custom=custom))
            ev = "custom" if custom else "frame"
            # This request's frame, by its payload: the frame of the request before it may be
            # logged after the mark (the page answers before its log line is read here).
            request = await client.wait(ev, lambda e: "__rchan" in e["msg"]["message"] and all(
                e["msg"]["message"].get(key) == value for key, value in payload.items()), since=mark)
            rchan = request["msg"]["message"]["__rchan"]
            for part in answer:
                await client.command("send_message", value=part, channel=rchan,
                                     chunk_count=len(answer) if len(answer) > 1 else None)
            return await task

        assert await answered({"question": 1}, False, {"answer": 2}) == {"answer": 2}
        assert await answered({"kind": "ask", "data": 1}, True, "yes") == "yes"
        parts = ["part0", "part1", {"p": 2}]
        assert await answered({"question": 2}, False, *parts) == parts
        big = "x" * (2 * 1024 * 1024)  # the stock client sends a big answer in one frame
        assert await answered({"question": 3}, False, big) == big
        assert manager.handlers[channel].pending_count == 0


# ---------------------------------------------------------------------------- close codes


@contextlib.asynccontextmanager
async def serving(transport: str, manager: WebsocketManager, port: int = 0) -> AsyncIterator[int]:
    """``manager`` served by ``transport``'s own ``serve()`` on ``port``; yields the port. Leaving
    it shuts the endpoint down as the adapter does when its server stops (1001)."""
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    serve = importlib.import_module(ADAPTERS[transport]).serve
    async with serve(endpoint, "127.0.0.1", port) as server:
        yield int(server.port)


@every_transport
async def test_after_a_shutdown_the_stock_client_reconnects_with_a_new_channel(transport: str) -> None:
    # A restart: the server shuts down (1001), another one comes up on the same port.
    first, second = WebsocketManager(ServerConfig()), WebsocketManager(ServerConfig())
    second.add_ws_handler("echo", lambda channel, data: {"echo": data})
    served = serving(transport, first)
    port = await served.__aenter__()
    running = True
    try:
        async with page(port) as client:
            old = await channel_of(client)
            pending = asyncio.ensure_future(first.send_and_wait(old, {"question": 1}, timeout=60))
            await client.frame(lambda m: "__rchan" in m.get("message", {}))
            mark = client.mark()
            running = False
            await served.__aexit__(None, None, None)
            closed = await client.wait("ws_close", since=mark)
            assert (closed["code"], closed["wasClean"]) == (1001, True), closed
            with pytest.raises(ConnectionClosed):
                await pending
            async with serving(transport, second, port):
                new = await client.wait("channel", lambda e: e["channel"] != old, since=mark)
                assert list(second.handlers) == [new["channel"]]
                assert await channel_of(client) == new["channel"]
                reply = await client.command("custom", kind="echo", data=1, **{"await": True})
                assert reply["reply"]["message"]["data"] == {"echo": 1}
    finally:
        if running:
            await served.__aexit__(None, None, None)


# A frame over the limit is answered with 1009, then the server reads on (discarding) until the
# client's end: closed with the rest of that frame unread, the kernel answered with a reset, which
# Chrome reports as unclean (aiohttp and uvicorn did; tests/transports/test_lingering_close.py).
@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_too_big_answer_closes_with_1009_and_the_client_comes_back(transport: str) -> None:
    config = ServerConfig(max_message_size=64 * 1024)
    async with running_stack(transport, config) as stack, page(port_of(stack)) as client:
        channel = await channel_of(client)
        task = asyncio.ensure_future(stack.manager.send_and_wait(channel, {"question": 1}))
        request = await client.frame(lambda m: "__rchan" in m.get("message", {}))
        mark = client.mark()
        await client.command("send_message", value="x" * (65 * 1024),
                             channel=request["message"]["__rchan"])
        closed = await client.wait("ws_close", since=mark)
        with pytest.raises(ConnectionClosed):
            await task
        new = await client.wait("channel", lambda e: e["channel"] != channel, since=mark)
        assert list(stack.manager.handlers) == [new["channel"]]
        assert closed["code"] == 1009, str(closed)
        assert closed["wasClean"], str(closed)


@every_transport
async def test_a_refused_cookie_is_403_and_a_new_login_gets_a_channel(transport: str) -> None:
    async with running_stack(transport) as stack, StockClient.open(port_of(stack), "bad") as client:
        await client.command("connect")
        refused = await client.wait("ws_close")
        assert (refused["code"], refused["wasOpen"]) == (1006, False)
        assert {h["status"] for h in client.seen("ws_handshake")} == {403}  # it retries every 500 ms
        # A connection that never got init makes the client check its session over HTTP.
        fetched = await client.wait("fetch")
        assert (fetched["url"], fetched["method"]) == ("/api/auth/verify-session", "POST")
        assert stack.manager.handlers == {}
        # The user logs in again (a new cookie); the client's next retry (every 500 ms) gets in.
        await client.command("page", origin=f"http://127.0.0.1:{stack.port}",
                             cookie="dara_session_token=alice:s2", interval_scale=10)
        channel = (await client.wait("channel"))["channel"]
        assert stack.manager.registry.user_of(channel) == "alice"
        assert client.complaints() == []
