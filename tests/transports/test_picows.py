"""What the picows adapter does itself, on real sockets: picows hands it frames, so it reassembles
fragmented messages, checks their UTF-8 and size, and bounds what a flooding client can make it
buffer. (The contract, hostile and noisy-neighbour suites run on it through ``tests.stacks``.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from dara_ws_core import (
    Endpoint,
    Identity,
    ServerConfig,
    Transport,
    WebsocketManager,
    token_authenticator,
)
from tests.helpers import eventually
from tests.hostile import CLOSE, CONTINUATION, PING, TEXT, HostileClient, encode_frame
from tests.stacks import running_stack, verify_token

pytest.importorskip("picows")

PATH = "/api/core/ws?token=mallory:s1"


async def _opened(port: int) -> HostileClient:
    client = await HostileClient.open(port)
    assert (await client.handshake(PATH)).status == 101
    await client.read_frame()  # init
    return client


async def test_a_fragmented_text_message_is_reassembled_and_control_frames_may_interleave() -> None:
    async with running_stack("picows", ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        client = await _opened(stack.port)
        request = {"kind": "echo", "data": "h\u00e9llo" * 10, "__rchan": "r1"}
        text = json.dumps({"type": "custom", "message": request}, ensure_ascii=False).encode()
        cut = text.index(b"\xc3") + 1  # inside a two-byte character: UTF-8 is checked whole
        client.write(encode_frame(TEXT, text[:cut], fin=False) + encode_frame(PING, b"hi")
                     + encode_frame(CONTINUATION, text[cut:-3], fin=False)
                     + encode_frame(CONTINUATION, text[-3:]))
        pong = await client.read_frame()
        assert (pong.opcode, pong.payload) == (0xA, b"hi")
        reply = json.loads((await client.read_frame()).text)
        assert reply["message"] == {"kind": "echo", "data": "h\u00e9llo" * 10, "__response_for": "r1"}
        client.abort()


@pytest.mark.xfail(strict=True, reason=(
    "picows checks every frame of a read before it delivers the first: a protocol error later in "
    "the same read sends its close before the frames ahead of it are answered"))
async def test_a_reply_written_before_an_unmasked_frame_in_the_same_read_is_delivered() -> None:
    async with running_stack("picows", ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        client = await _opened(stack.port)
        ping = json.dumps({"type": "ping", "message": ""})
        client.write(encode_frame(TEXT, ping) + encode_frame(TEXT, ping, mask=False))
        frames = [await client.read_frame(), await client.read_frame()]
        assert [f.opcode for f in frames] == [TEXT, CLOSE]
        assert frames[1].close_code == 1002
        client.abort()


class _Stalled(Endpoint):
    """An endpoint whose connections never read: what piles up is the transport's alone."""

    async def serve(self, transport: Transport, identity: Identity) -> None:
        await asyncio.Event().wait()


async def test_a_client_flooding_a_server_that_does_not_read_is_paused_not_buffered() -> None:
    from dara_ws_picows import serve

    endpoint = _Stalled(WebsocketManager(ServerConfig(ping_interval=None)), token_authenticator(verify_token))
    async with serve(endpoint, "127.0.0.1", 0) as server:
        client = await HostileClient.open(server.port)
        assert (await client.handshake(PATH)).status == 101
        batch, written, limit = encode_frame(TEXT, "x" * 1000) * 256, 0, 64 * 1024 * 1024
        async with asyncio.timeout(60):
            while written < limit:
                client.write(batch)
                written += len(batch)
                if not await client.drain(3.0):
                    break  # the server stopped reading
        assert written < limit, "the server read 64 MiB that nobody received"
        client.abort()


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.02)


_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_UPGRADE = [("Host", "127.0.0.1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13")]


def _request(head: list[tuple[str, str]], line: str = f"GET {PATH} HTTP/1.1") -> bytes:
    return (line + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in head) + "\r\n").encode("latin-1")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (_request([*_UPGRADE, ("Sec-WebSocket-Key", _KEY)]), 101),
    (_request([*_UPGRADE[:3], ("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Key", _KEY)]), 426),
    (_request([*_UPGRADE, ("Sec-WebSocket-Key", _KEY), ("Sec-WebSocket-Key", _KEY)]), 400),
    # A header line over 8 KiB: 431 on every transport (websockets' parser, its limit).
    (_request([*_UPGRADE, ("Sec-WebSocket-Key", "A" * 10_000)]), 431),
    (_request([*_UPGRADE, ("Sec-WebSocket-Key", "not base64 at all!!!!!!=")]), 400),
    (_request([*_UPGRADE]), 400),
    (_request([("Host", "127.0.0.1"), ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", _KEY)]), 426),
    (_request([*_UPGRADE, ("Sec-WebSocket-Key", _KEY)], f"POST {PATH} HTTP/1.1"), 405),
    (_request([*_UPGRADE, ("Sec-WebSocket-Key", _KEY)], f"GET {PATH} HTTP/1.0"), 505),
], ids=["valid", "version-8", "two-keys", "huge-key", "bad-key", "no-key", "no-upgrade", "post", "http-1.0"])
async def test_only_a_valid_opening_handshake_is_authenticated_and_upgraded(
    request_bytes: bytes, status: int
) -> None:
    # RFC 6455 section 4.2.1: anything else is refused before the authenticator runs, with the
    # statuses the websockets adapter answers (426 names the version this server speaks).
    asked: list[str] = []

    def authenticate(request: Any) -> Identity:
        asked.append(request.path)
        return Identity(user_id="mallory", session_id="s1")

    manager = WebsocketManager(ServerConfig(ping_interval=None))
    async with running_stack("picows", manager=manager, authenticator=authenticate) as stack:
        assert stack.port is not None
        client = await HostileClient.open(stack.port)
        client.write(request_bytes)
        response = await client.read_response()
        assert response.status == status
        assert asked == (["/api/core/ws"] if status == 101 else [])
        if status == 426:
            assert response.header("Sec-WebSocket-Version") == "13"
        client.abort()


async def test_an_opening_request_sent_byte_by_byte_is_still_read() -> None:
    async with running_stack("picows", ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        client = await HostileClient.open(stack.port)
        for byte in _request([*_UPGRADE, ("Sec-WebSocket-Key", _KEY)]):
            client.write(bytes([byte]))
            await client.drain()
        assert (await client.read_response()).status == 101
        client.abort()


async def test_frames_behind_one_that_closed_the_connection_are_not_read() -> None:
    # picows fails the connection on a frame over the size limit (1009), sends its close and
    # still parses what the peer sends until the peer answers it: a frame sent meanwhile must not
    # reach the core, where it would decide another close code (1007 for a frame that is not a
    # JSON object), as the fuzz test found.
    async with running_stack("picows", ServerConfig(max_message_size=4096, ping_interval=None)) as stack:
        assert stack.port is not None
        client = await _opened(stack.port)
        await eventually(lambda: len(stack.manager.handlers) == 1)
        handler = next(iter(stack.manager.handlers.values()))
        client.write(encode_frame(TEXT, json.dumps({"type": "ping", "message": "x" * 4097})))
        frame = await client.read_frame()
        assert (frame.opcode, frame.close_code) == (CLOSE, 1009)
        client.write(encode_frame(TEXT, "null"))  # before answering the close
        await eventually(lambda: handler.close_reason is not None)
        assert handler.close_reason is not None and handler.close_reason.code == 1009
        client.abort()
