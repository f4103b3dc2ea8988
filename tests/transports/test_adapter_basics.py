"""The aiohttp and ASGI adapters against a tiny echo endpoint, on real sockets on 127.0.0.1.

The endpoint here is a stand-in with the real ``Endpoint``'s surface (``config``, ``path``,
``authenticate``, ``serve``), so these tests pin the adapters' translation alone: handshake
rejection before accept, frame types, close codes and size limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web
from starlette.applications import Starlette
from starlette.routing import Mount

from dara_ws_aiohttp import AiohttpTransport, connect
from dara_ws_aiohttp import serve as aiohttp_serve
from dara_ws_asgi import asgi_app, lifespan, websocket_route
from dara_ws_asgi import serve as asgi_serve
from dara_ws_core.auth import Identity, holder_of
from dara_ws_core.config import ServerConfig
from dara_ws_core.endpoint import Admission, ConnectionSlots, Endpoint, Evict
from dara_ws_core.exceptions import AuthenticationFailed, ConnectionClosed
from dara_ws_core.manager import WebsocketManager
from dara_ws_core.transport import HandshakeRequest, ReceivingCharge, Transport

TIMEOUT = 5.0


@dataclass
class EchoEndpoint:
    """Echoes text; answers binary with ``bytes:<len>``; ``close:<code>`` closes with that code."""

    config: ServerConfig = field(default_factory=lambda: ServerConfig(max_message_size=1024))
    path: str = "/api/core/ws"
    served: int = 0
    handshakes: list[HandshakeRequest] = field(default_factory=list)
    ended: asyncio.Queue[int] = field(default_factory=asyncio.Queue)  # codes serve() saw
    live: set[Transport] = field(default_factory=set)
    slots: ConnectionSlots = field(default_factory=lambda: ConnectionSlots(None, None))

    def open(self) -> None:
        """Nothing to reopen: the stand-in never refuses for a shutdown."""

    def take_slot(self, address: str | None = None, evict: Evict | None = None) -> Admission:
        return self.slots.take(address, evict)

    def settled(self, evict: Evict) -> None:
        self.slots.settle(evict)

    def free_slot(self, admission: Admission, address: str | None = None, evict: Evict | None = None) -> None:
        self.slots.release(admission, address, evict)

    def receiving_charge(self, identity: Identity | None, host: str | None) -> ReceivingCharge:
        return ReceivingCharge(self.config.max_receiving_total_bytes, holder_of(identity, host))

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        self.handshakes.append(request)
        if request.query.get("token") != "good":
            raise AuthenticationFailed("bad token")
        return Identity(user_id="u", session_id="s")

    async def serve(self, transport: Transport, identity: Identity) -> None:
        self.served += 1
        self.live.add(transport)
        code = -1
        try:
            while True:
                frame = await transport.receive()
                if isinstance(frame, bytes):
                    await transport.send(b"bytes:%d" % len(frame))
                elif frame.startswith("close:"):
                    await transport.close(int(frame[6:]), "bye")
                else:
                    await transport.send(frame.encode())
        except ConnectionClosed as exc:
            code = exc.code
        finally:
            await transport.close()
            assert transport.closed
            self.live.discard(transport)
            self.ended.put_nowait(code)

    async def shutdown(self) -> None:
        """Like ``Endpoint.shutdown``: the adapters' ``serve`` calls it on exit."""
        await asyncio.gather(*(t.close(1001, "going away") for t in self.live))

    async def ended_with(self) -> int:
        return await asyncio.wait_for(self.ended.get(), TIMEOUT)


Serve = Callable[[Any, str, int], AbstractAsyncContextManager[Any]]


@pytest.fixture(params=[aiohttp_serve, asgi_serve], ids=["aiohttp", "asgi"])
def serve(request: pytest.FixtureRequest) -> Serve:
    return request.param  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def client(
    serve: Serve, endpoint: EchoEndpoint, query: str = "?token=good"
) -> AsyncIterator[AiohttpTransport]:
    async with serve(endpoint, "127.0.0.1", 0) as server:
        assert server.port != 0
        transport = await connect(server.url + query)
        try:
            yield transport
        finally:
            await transport.close()


async def receive(transport: Transport) -> str | bytes:
    return await asyncio.wait_for(transport.receive(), TIMEOUT)


async def test_rejected_handshake_is_http_403_and_serve_is_never_called(serve: Serve) -> None:
    endpoint = EchoEndpoint()
    async with serve(endpoint, "127.0.0.1", 0) as server, aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
            await session.ws_connect(server.url + "?token=bad")
        assert raised.value.status == 403
        with pytest.raises(AuthenticationFailed):
            await connect(server.url)
    assert len(endpoint.handshakes) == 2
    assert endpoint.served == 0


async def test_handshake_request_carries_path_query_headers_cookies_and_remote(
    serve: Serve,
) -> None:
    endpoint = EchoEndpoint()
    async with serve(endpoint, "127.0.0.1", 0) as server:
        headers = {"Cookie": "dara_session_token=abc; other=1", "X-Test": "yes"}
        transport = await connect(server.url + "?token=good&x=1", headers=headers)
        await transport.close()
    request = endpoint.handshakes[0]
    assert request.path == "/api/core/ws"
    assert request.query == {"token": "good", "x": "1"}
    assert request.headers["x-test"] == "yes"
    assert request.cookies == {"dara_session_token": "abc", "other": "1"}
    assert request.remote is not None and request.remote[0] == "127.0.0.1"


async def test_text_frames_echo_as_text(serve: Serve) -> None:
    endpoint = EchoEndpoint()
    async with client(serve, endpoint) as transport:
        for text in ['{"type":"ping"}', "é ü ✓", ""]:
            await transport.send(text.encode())
            assert await receive(transport) == text


async def test_binary_frame_reaches_the_endpoint_as_bytes(serve: Serve) -> None:
    endpoint = EchoEndpoint()
    async with serve(endpoint, "127.0.0.1", 0) as server, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url + "?token=good")
        await ws.send_bytes(b"\x00\x01\x02")
        assert await ws.receive_str(timeout=TIMEOUT) == "bytes:3"
        await ws.close()


async def test_server_close_reaches_client_with_its_code(serve: Serve) -> None:
    endpoint = EchoEndpoint()
    async with client(serve, endpoint) as transport:
        await transport.send(b"close:4001")
        with pytest.raises(ConnectionClosed) as raised:
            await receive(transport)
        assert raised.value.code == 4001
        assert transport.closed
        with pytest.raises(ConnectionClosed):  # and again: the close is remembered
            await receive(transport)
        with pytest.raises(ConnectionClosed):
            await transport.send(b"late")
        assert await endpoint.ended_with() == 4001


async def test_client_close_reaches_endpoint_with_its_code(serve: Serve) -> None:
    endpoint = EchoEndpoint()
    async with client(serve, endpoint) as transport:
        await transport.send(b"hello")
        assert await receive(transport) == "hello"
        await transport.close(4002, "client done")
        await transport.close(4003)  # idempotent
        assert transport.closed
        assert await endpoint.ended_with() == 4002


async def test_oversized_frame_closes_with_1009(serve: Serve) -> None:
    endpoint = EchoEndpoint()
    async with client(serve, endpoint) as transport:
        await transport.send(b"x" * 2048)
        with pytest.raises(ConnectionClosed) as raised:
            await receive(transport)
        assert raised.value.code == 1009
        assert await endpoint.ended_with() == 1009


async def test_leaving_serve_closes_open_connections_with_1001(serve: Serve) -> None:
    endpoint = EchoEndpoint()
    async with serve(endpoint, "127.0.0.1", 0) as server:
        transport = await connect(server.url + "?token=good")
    with pytest.raises(ConnectionClosed) as raised:
        await receive(transport)
    assert raised.value.code == 1001
    assert await endpoint.ended_with() == 1001


async def test_aiohttp_client_returns_binary_frames_as_bytes() -> None:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\xff\x00")
        await ws.receive()
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        transport = await connect(f"ws://127.0.0.1:{runner.addresses[0][1]}/")
        assert await receive(transport) == b"\xff\x00"
        await transport.close()
    finally:
        await runner.cleanup()


async def test_asgi_route_serves_the_real_endpoint_mounted_in_starlette() -> None:
    seen: list[HandshakeRequest] = []

    def authenticate(request: HandshakeRequest) -> Identity:
        seen.append(request)
        if request.query.get("token") != "good":
            raise AuthenticationFailed("bad token")
        return Identity(user_id="u", session_id="s")

    endpoint = Endpoint(WebsocketManager(ServerConfig()), authenticate, path="/ws")
    app = Starlette(routes=[Mount("/prefix", routes=[websocket_route(endpoint)])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/prefix/ws"
        with pytest.raises(AuthenticationFailed):
            await connect(url)
        transport = await connect(url + "?token=good")
        assert json.loads(await receive(transport))["type"] == "init"
        await transport.send(b'{"type":"ping","message":null}')
        assert json.loads(await receive(transport)) == {"type": "pong", "message": None}
        await transport.close()
        assert [r.path for r in seen] == ["/prefix/ws", "/prefix/ws"]
    finally:
        await endpoint.shutdown()
        server.should_exit = True
        await task
        sock.close()


@pytest.mark.parametrize("hooked", [True, False], ids=["lifespan", "plain-uvicorn"])
async def test_asgi_app_mounted_under_a_prefix_matches_below_root_path(hooked: bool) -> None:
    # Review 19 (11): app.mount("/realtime", asgi_app(endpoint)) compared the whole path with
    # the endpoint's, so it refused every URL. A path that is not the endpoint's gets 404 where
    # the adapter hooks uvicorn (its lifespan); a plain ASGI server can only answer it 403.
    endpoint = Endpoint(WebsocketManager(ServerConfig()), lambda request: Identity(user_id="u", session_id="s"))
    app = Starlette(routes=[Mount("/realtime", app=asgi_app(endpoint))],
                    lifespan=lifespan(endpoint) if hooked else None)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on" if hooked else "off", log_config=None, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    base = f"ws://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with asyncio.timeout(20):
            while not server.started:
                await asyncio.sleep(0.01)
        transport = await connect(base + "/realtime/api/core/ws")
        assert json.loads(await receive(transport))["type"] == "init"
        await transport.close()
        async with aiohttp.ClientSession() as session:
            for wrong in ("/realtime/wrong", "/realtime/", "/realtime/api/core/wsx"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
                    await session.ws_connect(base + wrong)
                assert raised.value.status == (404 if hooked else 403), wrong
    finally:
        if not hooked:
            await endpoint.shutdown()
        server.should_exit = True
        await asyncio.wait_for(task, 20)
        sock.close()


def test_asgi_answers_a_wrong_path_404_on_uvloop_too() -> None:
    # uvloop's transports are no asyncio.Transport: the 404 must not depend on finding one.
    uvloop = pytest.importorskip("uvloop")

    async def status_of_a_wrong_path() -> int:
        endpoint: Any = EchoEndpoint()  # the stand-in, as the serve fixture passes it
        async with asgi_serve(endpoint, "127.0.0.1", 0) as server, aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
                await session.ws_connect(f"ws://127.0.0.1:{server.port}/wrong/path?token=good")
            return raised.value.status

    assert uvloop.run(status_of_a_wrong_path()) == 404
