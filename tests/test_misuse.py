"""A newcomer's mistakes get an error that names them, at the call that made them.

Wrong arguments to the constructors and to ``add_ws_handler`` are refused where they are given,
not later as an unrelated failure; a wrong ``timeout`` for ``send_and_wait`` raises its own
``TypeError`` (its cleanup never masks it) and leaves the connection usable; the client says it
is not connected yet, drops late replies to requests it gave up on, and ``Chunked`` refuses to be
empty. Servers are real, on every served transport, over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from dara_ws_core import (
    Chunked,
    ConnectionClosed,
    CustomServerMessage,
    DaraClient,
    Endpoint,
    MemoryServer,
    Request,
    RequestTimeout,
    WebsocketManager,
    allow_anonymous,
)
from dara_ws_core import client as client_module

from .helpers import eventually
from .stacks import Stack


async def test_a_wrong_send_and_wait_timeout_raises_its_own_type_error(make_stack: Any) -> None:
    """The request is neither sent nor left pending; the next one on the channel is answered."""
    async with make_stack() as stack:
        assert isinstance(stack, Stack)
        client = await stack.client()
        asked: list[Any] = []

        def respond(request: Request) -> Any:
            asked.append(request.payload)
            return request.payload["q"]

        client.on_request(respond)
        with pytest.raises(TypeError, match="timeout must be a number of seconds or None, not str"):
            await stack.manager.send_and_wait(client.channel, {"q": 1}, timeout="5")  # type: ignore[arg-type]
        async with asyncio.timeout(10):
            assert await stack.manager.send_and_wait(client.channel, {"q": 2}, timeout=5) == 2
        assert asked == [{"q": 2}]


# ------------------------------------------------------------------ constructors


def _rows(channel_id: str, data: Any) -> Iterator[int]:
    yield from range(3)


async def _rows_async(channel_id: str, data: Any) -> AsyncIterator[int]:
    for row in range(3):
        yield row


@pytest.mark.parametrize(("build", "error", "message"), [
    pytest.param(lambda: WebsocketManager("x"), TypeError, "config must be a ServerConfig, not str",  # type: ignore[arg-type]
                 id="manager-config"),
    pytest.param(lambda: Endpoint("x", allow_anonymous()), TypeError,  # type: ignore[arg-type]
                 "manager must be a WebsocketManager, not str", id="endpoint-manager"),
    pytest.param(lambda: Endpoint(WebsocketManager(), None), TypeError,  # type: ignore[arg-type]
                 "authenticator must be a callable", id="endpoint-authenticator"),
    pytest.param(lambda: Endpoint(WebsocketManager(), allow_anonymous(), path="ws"), ValueError,
                 "path must start with '/'", id="endpoint-path"),
    pytest.param(lambda: Endpoint(WebsocketManager(), allow_anonymous(), path="/ws?token=a"), ValueError,
                 "a query is no part of a path", id="endpoint-path-query"),
    pytest.param(lambda: Endpoint(WebsocketManager(), allow_anonymous(), path="/w%zz"), ValueError,
                 "malformed percent-encoding", id="endpoint-path-percent"),
    pytest.param(lambda: Endpoint(WebsocketManager(), allow_anonymous(), path="/api/core ws"), ValueError,
                 "visible ASCII", id="endpoint-path-space"),
    pytest.param(lambda: WebsocketManager().add_ws_handler("x", 5), TypeError,  # type: ignore[arg-type]
                 "handler for kind 'x' must be a callable", id="handler-not-callable"),
    pytest.param(lambda: WebsocketManager().add_ws_handler(5, lambda c, d: d), TypeError,  # type: ignore[arg-type]
                 "kind must be a str, not int", id="handler-kind"),
    pytest.param(lambda: WebsocketManager().add_ws_handler("x", _rows), TypeError,
                 "handler for kind 'x' is a generator function", id="handler-generator"),
    pytest.param(lambda: WebsocketManager().add_ws_handler("x", _rows_async), TypeError,
                 "handler for kind 'x' is a generator function", id="handler-async-generator"),
    pytest.param(lambda: DaraClient("ws://127.0.0.1:1/api/core/ws"), TypeError,  # type: ignore[arg-type]
                 r"DaraClient\(lambda: connect\('ws://127.0.0.1:1/api/core/ws'\)\)", id="client-url"),
    pytest.param(lambda: DaraClient(5), TypeError, "connector must be a callable, not int",  # type: ignore[arg-type]
                 id="client-connector"),
])
def test_a_wrong_argument_is_refused_where_it_is_given(build: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        build()


async def test_the_checked_arguments_still_serve(make_stack: Any) -> None:
    """What the checks let through works end to end: a handler registered, a path given."""
    async with make_stack() as stack:
        assert isinstance(stack, Stack)
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        client = await stack.client()
        async with asyncio.timeout(10):
            assert await client.request("echo", 7, timeout=5) == 7
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel, data: data)
    server = MemoryServer(Endpoint(manager, allow_anonymous(), path="/ws"))
    async with DaraClient(lambda: server.connect("/ws"), ping_interval=None) as client:
        async with asyncio.timeout(10):
            assert await client.request("echo", 8, timeout=5) == 8
    await server.close()


# ------------------------------------------------------------------ the client


def _held_replies(manager: WebsocketManager) -> tuple[asyncio.Event, list[Any]]:
    """A ``held`` handler answering only once the returned event is set; what it was asked."""
    release = asyncio.Event()
    asked: list[Any] = []

    async def held(channel: str, data: Any) -> Any:
        asked.append(data)
        await release.wait()
        return data

    manager.add_ws_handler("held", held)
    return release, asked


async def test_a_reply_after_its_request_timed_out_is_dropped_not_pushed(make_stack: Any) -> None:
    async with make_stack() as stack:
        assert isinstance(stack, Stack)
        release, asked = _held_replies(stack.manager)
        client = await stack.client()
        async with asyncio.timeout(10):
            with pytest.raises(RequestTimeout):
                await client.request("held", 1, timeout=0.05)
            await eventually(lambda: asked == [1], "the server got the request")
            release.set()
            await eventually(lambda: client.late_replies == 1, "the late reply dropped")
            await stack.manager.send_message(client.channel, {"kind": "after", "data": 2}, custom=True)
            push = await client.receive(timeout=5)
        assert isinstance(push, CustomServerMessage)
        assert (push.message.kind, push.message.response_for) == ("after", None)
        assert client.received_nowait() == []


async def test_the_given_up_requests_are_remembered_within_their_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At most ``_GIVEN_UP_MAX`` ids: the oldest forgotten, their late replies then taken for
    pushes; past ``_GIVEN_UP_AGE`` none is dropped any more."""
    monkeypatch.setattr(client_module, "_GIVEN_UP_MAX", 3)
    manager = WebsocketManager()
    release, asked = _held_replies(manager)
    server = MemoryServer(Endpoint(manager, allow_anonymous()))
    async with DaraClient(server.connect, ping_interval=None) as client, asyncio.timeout(10):
        for n in range(5):
            with pytest.raises(RequestTimeout):
                await client.request("held", n, timeout=0.01)
        assert len(client._gave_up) == 3
        await eventually(lambda: len(asked) == 5, "the server got every request")
        release.set()
        await eventually(lambda: client.late_replies == 3, "the three newest late replies dropped")
        pushed = [await client.receive(timeout=5) for _ in range(2)]
        assert sorted(m.message.data for m in pushed if isinstance(m, CustomServerMessage)) == [0, 1]
        monkeypatch.setattr(client_module, "_GIVEN_UP_AGE", 0.0)
        release.clear()
        with pytest.raises(RequestTimeout):
            await client.request("held", 9, timeout=0.01)
        release.set()
        stale = await client.receive(timeout=5)
        assert isinstance(stale, CustomServerMessage) and stale.message.data == 9
        assert client.late_replies == 3
    await server.close()


async def test_a_client_used_before_connect_says_so(make_stack: Any) -> None:
    """Before the first connection: a RuntimeError naming ``connect()``, not a close 1000; once
    connected and closed, the close it had."""
    async with make_stack() as stack:
        assert isinstance(stack, Stack)
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        client = DaraClient(stack.connect, ping_interval=None)
        for call in (lambda: client.request("echo", 1, timeout=5), lambda: client.send_custom("echo", 1),
                     lambda: client.answer("r", 1), lambda: client.send_raw("{}")):
            with pytest.raises(RuntimeError, match=r"not connected yet: await connect\(\) first"):
                await call()
        async with asyncio.timeout(10):
            await client.connect()
            assert await client.request("echo", 1, timeout=5) == 1
            await client.close()
            with pytest.raises(ConnectionClosed):
                await client.request("echo", 2, timeout=5)


def test_an_empty_chunked_answer_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        Chunked([])
    assert Chunked([None]).parts == [None]
