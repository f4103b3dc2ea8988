"""One manager behind three listeners at once: websockets, aiohttp and ASGI (uvicorn) in one
process. Application code (handlers, manager calls, authenticator) is the same for all."""

from __future__ import annotations

import contextlib
import functools

from dara_ws_aiohttp import serve as aiohttp_serve
from dara_ws_asgi import serve as asgi_serve
from dara_ws_core import DaraClient, DaraServerMessage, Endpoint, WebsocketManager, token_authenticator
from dara_ws_websockets import connect
from dara_ws_websockets import serve as websockets_serve

from .stacks import verify_token


async def test_one_manager_serves_clients_of_every_transport() -> None:
    manager = WebsocketManager()
    manager.add_ws_handler("who", lambda channel, data: manager.registry.user_of(channel))
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    async with contextlib.AsyncExitStack() as stack:
        ws_server = await stack.enter_async_context(websockets_serve(endpoint, "127.0.0.1", 0))
        aio_server = await stack.enter_async_context(aiohttp_serve(endpoint, "127.0.0.1", 0))
        asgi_server = await stack.enter_async_context(asgi_serve(endpoint, "127.0.0.1", 0))
        ports = [ws_server.port, aio_server.port, asgi_server.port]
        clients = []
        for i, port in enumerate(ports):
            for user in ("dana", f"solo{i}"):
                url = f"ws://127.0.0.1:{port}/api/core/ws?token={user}:s{i}"
                client = DaraClient(functools.partial(connect, url), ping_interval=None)
                await stack.enter_async_context(client)
                clients.append((user, client))
        assert len(manager.handlers) == 6
        dana = {c.channel for u, c in clients if u == "dana"}
        assert manager.get_user_channels("dana") == dana
        for user, client in clients:
            assert await client.request("who", None) == user

        await manager.broadcast({"all": 1})
        await manager.send_message_to_user("dana", {"dana": 1}, ignore_channel=clients[0][1].channel)
        for index, (user, client) in enumerate(clients):
            expected = [{"all": 1}] + ([{"dana": 1}] if user == "dana" and index else [])
            got = []
            for _ in expected:
                message = await client.receive(timeout=5)
                assert isinstance(message, DaraServerMessage)
                got.append(message.message.model_extra)
            assert got == expected
            assert client.received_nowait() == []
    assert manager.handlers == {} and manager.registry.counts() == (0, 0, 0)
