"""The websockets adapter inside a server of the caller's: its own ``process_request`` and its
own handler for other paths, next to the endpoint, on real sockets.

``serve()`` passed its extra keyword arguments to websockets as they came, so a
``process_request=`` replaced the adapter's: no path check, no authentication, and every
connection failed with 1011 and a traceback (the identity was never set)."""

from __future__ import annotations

import asyncio
import http

import pytest
import websockets
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from dara_ws_core import AuthenticationFailed, DaraClient, Endpoint, Identity, WebsocketManager, token_authenticator
from dara_ws_websockets import connect, serve


def _endpoint() -> Endpoint:
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel_id, data: data)

    def verify(token: str) -> Identity:
        if token != "secret":
            raise AuthenticationFailed("bad token")
        return Identity(user_id="alice", session_id="s1")

    return Endpoint(manager, token_authenticator(verify))


@pytest.mark.parametrize("is_async", [False, True], ids=["function", "coroutine"])
async def test_the_callers_process_request_runs_first_and_the_endpoint_still_authenticates(is_async: bool) -> None:
    seen: list[str] = []

    def health(connection: ServerConnection, request: Request) -> Response | None:
        seen.append(request.path)
        return connection.respond(http.HTTPStatus.OK, "ok\n") if request.path == "/health" else None

    async def async_health(connection: ServerConnection, request: Request) -> Response | None:
        await asyncio.sleep(0)
        return health(connection, request)

    async with serve(_endpoint(), "127.0.0.1", 0, process_request=async_health if is_async else health) as server:
        with pytest.raises(AuthenticationFailed):  # no token: 403, not an upgrade
            await connect(server.url)
        async with DaraClient(lambda: connect(server.url + "?token=secret"), ping_interval=None) as client:
            assert await client.request("echo", [1], timeout=5) == [1]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
        with pytest.raises(websockets.InvalidStatus) as refused:  # no handler of the caller's: 404
            await websockets.connect(f"ws://127.0.0.1:{server.port}/other")
        assert refused.value.response.status_code == 404
    assert seen == ["/api/core/ws", "/api/core/ws?token=secret", "/health", "/other"]


async def test_the_callers_handler_serves_the_other_paths() -> None:
    async def mine(connection: ServerConnection) -> None:
        assert connection.request is not None
        async for message in connection:
            await connection.send(f"{connection.request.path}: {message!s}")

    async with serve(_endpoint(), "127.0.0.1", 0, handler=mine) as server:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/chat") as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 5) == "/chat: hi"
        # The endpoint's path is still the endpoint's, authenticated.
        with pytest.raises(AuthenticationFailed):
            await connect(server.url)
        async with DaraClient(lambda: connect(server.url + "?token=secret"), ping_interval=None) as client:
            assert await client.request("echo", "x", timeout=5) == "x"


async def test_create_connection_is_refused_with_a_reason() -> None:
    with pytest.raises(TypeError, match="create_connection"):
        async with serve(_endpoint(), "127.0.0.1", 0, create_connection=ServerConnection):
            pass


@pytest.mark.parametrize("target", ["/api/core/ws%zz", "/api/%2e%2e/core/ws%"])
async def test_a_target_naming_no_path_is_refused_with_400_not_handed_to_the_callers_handler(target: str) -> None:
    """Only a target naming another path is the caller's handler's: one naming none (a
    malformed percent-encoding) gets the 400 every adapter answers it. It was upgraded, and
    served by the caller's handler, unauthenticated."""
    from tests.hostile import HostileClient

    served: list[str] = []

    async def mine(connection: ServerConnection) -> None:
        assert connection.request is not None
        served.append(connection.request.path)

    async with serve(_endpoint(), "127.0.0.1", 0, handler=mine) as server:
        async with await HostileClient.open(server.port) as client:
            response = await client.handshake(path=target)
        assert response.status == 400
    assert served == []


@pytest.mark.parametrize("returned", ["tuple", "str"])
@pytest.mark.parametrize("is_async", [False, True], ids=["function", "coroutine"])
async def test_a_process_request_returning_no_response_is_a_type_error_and_a_500_for_that_client(
    returned: str, is_async: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    """A legacy websockets ``(status, headers, body)`` tuple, or a str: the client got no HTTP
    answer it could read, and nothing named the mistake."""
    wrong: object = (http.HTTPStatus.OK, [], b"ok\n") if returned == "tuple" else "ok\n"

    def health(connection: ServerConnection, request: Request) -> object:
        return wrong if request.path == "/health" else None

    async def async_health(connection: ServerConnection, request: Request) -> object:
        return health(connection, request)

    async with serve(_endpoint(), "127.0.0.1", 0,
                     process_request=async_health if is_async else health) as server:  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 500")
        writer.close()
        # Another client, on the endpoint's path, is served as before.
        async with DaraClient(lambda: connect(server.url + "?token=secret"), ping_interval=None) as client:
            assert await client.request("echo", [1], timeout=5) == [1]
    failures = [r for r in caplog.records if r.exc_info is not None and isinstance(r.exc_info[1], TypeError)]
    assert failures, [r.getMessage() for r in caplog.records]
    text = str(failures[0].exc_info[1])  # type: ignore[index]
    assert "process_request" in text and type(wrong).__name__ in text and "Response" in text
