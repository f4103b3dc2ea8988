"""An ASGI middleware around our app, under the uvicorn hook, reads text messages as the ASGI
spec has them.

Under the hook a text waiting in uvicorn's queue is kept as its UTF-8 bytes, which our app
decodes as it handles the message (PEP 393: decoded, a text can take four times its bytes).
A middleware between uvicorn and our app is another reader of the same messages: for it the
message holds ``text``, exactly one of ``text`` and ``bytes`` being set, as the spec says.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("uvicorn")


from dara_ws_asgi import asgi_app
from dara_ws_core import Endpoint, ServerConfig, WebsocketManager, token_authenticator
from tests.hostile import TEXT, encode_frame, open_channel
from tests.stacks import hooked_uvicorn, verify_token


class Reader:
    """A middleware that reads every ``websocket.receive`` message its app receives, the ways
    middlewares do: ``message["text"]``, ``message.get("text")``, ``"text" in message``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[tuple[Any, Any, bool, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def reading() -> Any:
            message = await receive()
            if message["type"] == "websocket.receive":
                self.seen.append((message.get("text"), message["text"], "text" in message,
                                  message.get("bytes")))
            return message

        await self.app(scope, reading if scope["type"] == "websocket" else receive, send)


@pytest.fixture
async def reader() -> AsyncIterator[tuple[Reader, int]]:
    manager = WebsocketManager(ServerConfig(ping_interval=None, idle_timeout=None))
    manager.custom_handlers.register("echo", lambda channel_id, data: data)
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    middleware = Reader(asgi_app(endpoint))
    async with hooked_uvicorn(middleware, endpoint) as port:
        yield middleware, port


async def test_a_middleware_reads_each_text_as_text_and_the_app_still_answers(
    reader: tuple[Reader, int],
) -> None:
    middleware, port = reader
    client, _ = await open_channel(port)
    texts = [
        json.dumps({"type": "ping", "message": None}),
        json.dumps({"type": "custom", "message": {"kind": "echo", "data": "h\u00e9llo \U0001f600",
                                                  "__rchan": "r1"}}, ensure_ascii=False),
    ]
    client.write(b"".join(encode_frame(TEXT, text.encode()) for text in texts))
    pong = json.loads((await client.read_frame()).text)
    reply = json.loads((await client.read_frame()).text)
    assert pong["type"] == "pong"
    assert reply["message"] == {"kind": "echo", "data": "h\u00e9llo \U0001f600", "__response_for": "r1"}
    assert middleware.seen == [(text, text, True, None) for text in texts]
    client.abort()


async def test_a_text_that_is_not_utf8_still_closes_with_1007_after_a_middleware_read_it(
    reader: tuple[Reader, int],
) -> None:
    middleware, port = reader
    client, _ = await open_channel(port)
    client.write(encode_frame(TEXT, b'{"type":"ping","message":"\xff"}'))
    assert await client.read_close() == 1007
    assert middleware.seen == [('{"type":"ping","message":"\ufffd"}',) * 2 + (True, None)]
    client.abort()
