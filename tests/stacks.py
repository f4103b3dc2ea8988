"""Running servers on every transport, for the contract suite.

A *stack* is a manager + endpoint served on one transport, with a way to open client transports
to it. Adding a transport to the contract suite means adding one entry to ``TRANSPORTS``: an async
context manager that serves an endpoint and yields a ``connect(target, headers)`` function.
Every socket is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dara_ws_core import (
    DEFAULT_PATH,
    Authenticator,
    DaraClient,
    Endpoint,
    Identity,
    MemoryServer,
    ServerConfig,
    Transport,
    WebsocketManager,
    token_authenticator,
)
from dara_ws_core.exceptions import AuthenticationFailed, EndpointClosed

Connect = Callable[[str, Iterable[tuple[str, str]]], Awaitable[Transport]]
Served = Callable[[Endpoint], contextlib.AbstractAsyncContextManager[Connect]]


class HandshakeRejected(Exception):
    """The server answered the handshake with an HTTP error status (normalised over libraries)."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"handshake rejected with HTTP {status}")


@contextlib.asynccontextmanager
async def _memory(endpoint: Endpoint) -> AsyncIterator[Connect]:
    server = MemoryServer(endpoint)

    async def connect(target: str, headers: Iterable[tuple[str, str]]) -> Transport:
        try:
            return await server.connect(target, headers)
        except EndpointClosed:  # as the socket adapters answer it
            raise HandshakeRejected(503) from None
        except AuthenticationFailed:
            raise HandshakeRejected(403) from None

    try:
        yield connect
    finally:
        await endpoint.shutdown(grace=0)
        await server.close()


async def _websockets_client(url: str, headers: Iterable[tuple[str, str]]) -> Transport:
    import websockets

    from dara_ws_websockets import connect

    try:
        return await connect(url, headers=dict(headers), close_timeout=1)
    except AuthenticationFailed as exc:  # the adapter's 401/403; websockets' error is the cause
        assert isinstance(exc.__cause__, websockets.InvalidStatus)
        raise HandshakeRejected(exc.__cause__.response.status_code) from None
    except websockets.InvalidStatus as exc:
        raise HandshakeRejected(exc.response.status_code) from None


async def _aiohttp_client(url: str, headers: Iterable[tuple[str, str]]) -> Transport:
    import aiohttp

    from dara_ws_aiohttp import connect

    try:
        timeout = aiohttp.ClientWSTimeout(ws_close=1)
        return await connect(url, headers=dict(headers), timeout=timeout)
    except AuthenticationFailed as exc:  # the adapter's 401/403; aiohttp's error is the cause
        raise HandshakeRejected(getattr(exc.__cause__, "status", 403)) from None
    except aiohttp.WSServerHandshakeError as exc:  # another status (503)
        raise HandshakeRejected(exc.status) from None


class _UrlConnect:
    """A ``Connect`` to ``ws://127.0.0.1:{port}``; ``port`` is there for raw-socket clients."""

    def __init__(self, port: int, client: Connect) -> None:
        self.port = port
        self._client = client

    def __call__(self, target: str, headers: Iterable[tuple[str, str]]) -> Awaitable[Transport]:
        return self._client(f"ws://127.0.0.1:{self.port}{target}", headers)


def _served_by(adapter: str, client: Connect) -> Served:
    """A socket adapter (every one's ``serve(endpoint, host, port)`` yields a ``Server`` with the
    bound ``port``), reached by ``client`` (here a URL-taking ``Connect``): aiohttp and ASGI by
    another library's client, so both sides meet a stranger."""

    @contextlib.asynccontextmanager
    async def served(endpoint: Endpoint) -> AsyncIterator[Connect]:
        serve = importlib.import_module(adapter).serve
        async with serve(endpoint, "127.0.0.1", 0) as server:
            yield _UrlConnect(server.port, client)

    return served


TRANSPORTS: dict[str, Served] = {
    "memory": _memory,
    "websockets": _served_by("dara_ws_websockets", _websockets_client),
    "aiohttp": _served_by("dara_ws_aiohttp", _websockets_client),
    "asgi": _served_by("dara_ws_asgi", _aiohttp_client),
    "picows": _served_by("dara_ws_picows", _websockets_client),
}


def verify_token(token: str) -> Identity:
    """Test tokens look like ``user:session``; ``bad`` is rejected."""
    if token == "bad" or ":" not in token:
        raise AuthenticationFailed("bad token")
    user, session = token.split(":", 1)
    return Identity(user_id=user, session_id=session, token=token)


@dataclass
class Stack:
    """A running server on one transport, and ways to reach it."""

    transport: str
    manager: WebsocketManager
    endpoint: Endpoint
    connect_raw: Connect
    clients: list[DaraClient] = field(default_factory=list)

    @property
    def port(self) -> int | None:
        """The TCP port of a socket-based stack (for ``tests.hostile``); ``None`` for memory."""
        port = getattr(self.connect_raw, "port", None)
        return int(port) if port is not None else None

    async def connect(
        self, token: str | None = "alice:s1", *, cookie: bool = False,
        headers: Iterable[tuple[str, str]] = (), path: str = DEFAULT_PATH,
    ) -> Transport:
        """A raw client transport; the token goes in the query, or in Dara 1.30's cookie."""
        hdrs = list(headers)
        target = path
        if token is not None:
            if cookie:
                hdrs.append(("Cookie", f"dara_session_token={token}"))
            else:
                target = f"{path}?token={token}"
        return await self.connect_raw(target, hdrs)

    async def client(self, token: str | None = "alice:s1", **options: Any) -> DaraClient:
        """A connected ``DaraClient``, closed when the test ends."""
        options.setdefault("ping_interval", None)
        client = DaraClient(lambda: self.connect(token), **options)
        await client.connect()
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def running_stack(
    transport: str,
    config: ServerConfig | None = None,
    authenticator: Authenticator | None = None,
    manager: WebsocketManager | None = None,
) -> AsyncIterator[Stack]:
    manager = manager or WebsocketManager(config or ServerConfig())
    endpoint = Endpoint(manager, authenticator or token_authenticator(verify_token))
    async with TRANSPORTS[transport](endpoint) as connect:
        stack = Stack(transport, manager, endpoint, connect)
        try:
            yield stack
        finally:
            for client in stack.clients:
                await client.close()


#: uvicorn servers set up the way an application sets one up (these ``uvicorn.Config`` options
#: over uvicorn's own defaults), hooked as the ASGI adapter's lifespan hooks them, by name:
#: beside the adapters' own ``serve()`` of ``TRANSPORTS``. ``asgi-httptools``: httptools, which
#: uvicorn uses when installed (the adapter's ``serve`` uses h11); ``uvicorn-defaults``: all of
#: uvicorn's defaults (``ws_per_message_deflate`` on, say).
OWN_UVICORNS: dict[str, dict[str, Any]] = {
    "asgi-httptools": {"http": "httptools", "ws": "websockets-sansio"},
    "uvicorn-defaults": {},
}


@contextlib.asynccontextmanager
async def served_port(name: str, config: ServerConfig) -> AsyncIterator[int]:
    """The port on 127.0.0.1 of a server named ``name`` (a socket transport of ``TRANSPORTS``,
    or one of ``OWN_UVICORNS``) serving an endpoint with ``config`` and test tokens."""
    options = OWN_UVICORNS.get(name)
    if options is None:
        async with running_stack(name, config) as stack:
            assert stack.port is not None
            yield stack.port
        return
    if options.get("http") == "httptools":
        import pytest

        pytest.importorskip("httptools")
    from dara_ws_asgi import asgi_app

    endpoint = Endpoint(WebsocketManager(config), token_authenticator(verify_token))
    async with hooked_uvicorn(asgi_app(endpoint), endpoint, **options) as port:
        yield port


@contextlib.asynccontextmanager
async def hooked_uvicorn(app: Any, endpoint: Endpoint, **options: Any) -> AsyncIterator[int]:
    """The port on 127.0.0.1 of a uvicorn server (these ``uvicorn.Config`` options over
    uvicorn's defaults) running the ASGI ``app``, in which ``endpoint``'s app is, hooked as the
    ASGI adapter's lifespan hooks it."""
    import uvicorn

    from dara_ws_asgi.uvicorn import hook_uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None,
                                           log_level="warning", **options))
    server.config.load()  # the protocol classes, which the hook replaces by its bounded ones
    assert hook_uvicorn(endpoint, server)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:  # uvicorn has only this flag to tell
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        for listener in server.servers:  # as the hook's shutdown does (SIGTERM), with no grace
            listener.close()
        await endpoint.shutdown(grace=0)
        server.should_exit = True
        await task
        sock.close()
