"""Frames a client sends behind its upgrade request, without waiting for the 101 (review18 #7).

websockets and uvicorn started following the client's frame headers only once the connection
was open: frames in the request's TCP segment went to websockets unchecked (uvicorn dropped
them), and the checker then started in the middle of a frame, so a valid stream stalled with
no reply and no close. On every socket transport (and uvicorn with either HTTP parser) such
frames are now read as if they had come after the answer: valid ones get their replies, in
order, wherever the writes cut the stream; a header RFC 6455 forbids closes with 1002.
Real sockets on 127.0.0.1, real libraries; each wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest

from dara_ws_core import Endpoint, ServerConfig, WebsocketManager, token_authenticator
from dara_ws_core.transport import MAX_PIPELINED, RequestHead, held_behind_request, hold_behind_request
from tests.helpers import run_on
from tests.hostile import CLOSE, PING, PONG, TEXT, HostileClient, encode_frame, handshake_request
from tests.stacks import TRANSPORTS, running_stack, served_port, verify_token

TOKEN_PATH = "/api/core/ws?token=mallory:s1"
TIMEOUT = 5.0
CONFIG = ServerConfig(ping_interval=None)


SERVED = [*sorted(t for t in TRANSPORTS if t != "memory"), "asgi-httptools"]


@pytest.fixture(params=SERVED)
def served(request: pytest.FixtureRequest) -> Callable[[], contextlib.AbstractAsyncContextManager[int]]:
    """``async with served() as port``: a server on each socket transport."""
    return functools.partial(served_port, str(request.param), CONFIG)


def custom(kind: str, size: int = 0) -> bytes:
    """A masked text frame with a custom message of ``kind``: no handler has it, so the reply is
    an error naming it (replies show which frames were read, and in which order)."""
    return encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": kind, "data": "x" * size}}))


async def replies(client: HostileClient, count: int) -> list[str]:
    """The kinds named by the next ``count`` replies, after ``init``, past the pongs that answer
    control pings."""
    kinds: list[str] = []
    started = False
    for _ in range(2 * count + 10):  # bounded: init, a reply and at most one pong per frame sent
        if len(kinds) == count:
            break
        frame = await client.read_frame(TIMEOUT)
        if frame.opcode == PONG:
            continue
        assert frame.opcode == TEXT, (frame.opcode, frame.close_code, kinds)
        message = json.loads(frame.text)
        if not started:
            assert message["type"] == "init", message
            started = True
            continue
        kinds.append(message["message"]["kind"])
    return kinds


async def send_in_pieces(port: int, stream: bytes, cuts: list[int]) -> HostileClient:
    """A raw client that writes ``stream`` cut at ``cuts``, a write (and a loop turn) a piece."""
    client = await HostileClient.open(port)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        client.write(stream[start:end])
        assert await client.drain()
        await asyncio.sleep(0)  # let the piece go out as its own segment
    return client


@pytest.mark.parametrize("cut", [None, 10, -5], ids=["one-write", "cut-in-the-first-frame", "cut-in-the-request"])
async def test_frames_sent_with_the_upgrade_request_get_their_replies(served: Any, cut: int | None) -> None:
    request = handshake_request(TOKEN_PATH)
    frames = [custom("k0", 300), custom("k1"), custom("k2", 70_000)]
    stream = request + b"".join(frames)
    async with served() as port:
        if cut is not None and cut > 0:
            # The review's case: the request and the start of a frame, then the rest of the
            # stream once the 101 is in (the connection is open by then).
            client = await send_in_pieces(port, stream[: len(request) + cut], [])
            assert (await client.read_response(TIMEOUT)).status == 101
            client.write(stream[len(request) + cut :])
        else:
            client = await send_in_pieces(port, stream, [] if cut is None else [len(request) + cut])
            assert (await client.read_response(TIMEOUT)).status == 101
        assert await replies(client, 3) == ["k0", "k1", "k2"]
        client.send_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "after"}}))
        assert await replies_after(client) == "after", "the stream is still in step"
        client.abort()


async def replies_after(client: HostileClient) -> str:
    frame = await client.read_frame(TIMEOUT)
    assert frame.opcode == TEXT, (frame.opcode, frame.close_code)
    return str(json.loads(frame.text)["message"]["kind"])


def _ping_frame(form: int, *, declared: int | None = None) -> bytes:
    """A masked text ping whose length is written in ``form`` (16 or 64 bits), as ``declared``."""
    payload = json.dumps({"type": "ping", "message": None}).encode()
    length = len(payload) if declared is None else declared
    head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", length) if form == 16 else (
        bytes([0x81, 0x80 | 127]) + struct.pack("!Q", length))
    return head + b"\0\0\0\0" + payload


FORBIDDEN = {
    "16-bit-form-for-a-short-payload": _ping_frame(16),
    "64-bit-form-for-a-short-payload": _ping_frame(64),
    "64-bit-length-top-bit": _ping_frame(64, declared=1 << 63),
    "rsv-bits": encode_frame(TEXT, json.dumps({"type": "ping", "message": None}), rsv=2),
    "unmasked": encode_frame(TEXT, json.dumps({"type": "ping", "message": None}), mask=False),
}


@pytest.mark.parametrize("bad", sorted(FORBIDDEN))
@pytest.mark.parametrize("cut", [None, 1], ids=["one-write", "header-cut"])
async def test_a_forbidden_header_sent_with_the_upgrade_request_closes_with_1002(
    served: Any, bad: str, cut: int | None
) -> None:
    # As when it comes after the 101 (test_hostile_transport): 1002, and the refused frame and
    # what follows it are not acted on (the ping behind it gets no pong).
    request = handshake_request(TOKEN_PATH)
    stream = request + FORBIDDEN[bad] + custom("behind")
    async with served() as port:
        client = await send_in_pieces(port, stream, [] if cut is None else [len(request) + cut])
        assert (await client.read_response(TIMEOUT)).status == 101
        seen = []
        for _ in range(3):  # init at most, then the close
            frame = await client.read_frame(TIMEOUT)
            if frame.opcode == CLOSE:
                break
            seen.append(json.loads(frame.text)["type"])
        assert (frame.opcode, frame.close_code) == (CLOSE, 1002), seen
        assert seen in ([], ["init"]), "nothing sent with or behind the refused frame is answered"
        client.abort()


def random_stream(rng: random.Random) -> tuple[list[bytes], list[str]]:
    """Valid frames (payload lengths in all three forms, and a control frame between them) and
    the kinds their replies name, in order."""
    frames, kinds = [], []
    for index in range(rng.randint(1, 5)):
        if rng.random() < 0.2:
            frames.append(encode_frame(PING, b"p"))  # answered by the library, not counted
        kind = f"k{index}"
        frames.append(custom(kind, rng.choice([0, 50, 200, 1000, 66_000])))
        kinds.append(kind)
    return frames, kinds


async def test_a_valid_stream_cut_anywhere_after_the_request_start_gets_the_replies_of_one_write(
    served: Any,
) -> None:
    # The property: wherever the writes cut the request and the frames behind it (in the
    # request, in a frame header, in a payload), the replies are those of the stream in one
    # write (the first test): every frame's, in order.
    rng = random.Random(18_07)
    request = handshake_request(TOKEN_PATH)
    async with served() as port:
        for _ in range(8):  # bounded: a few connections per transport
            frames, kinds = random_stream(rng)
            stream = request + b"".join(frames)
            cuts = sorted(rng.sample(range(len(request) - 20, len(stream)), rng.randint(1, 4)))
            client = await send_in_pieces(port, stream, cuts)
            assert (await client.read_response(TIMEOUT)).status == 101
            assert await replies(client, len(kinds)) == kinds, cuts
            client.abort()


async def test_what_is_held_behind_a_request_is_bounded_on_a_real_socket() -> None:
    # Reading stops at the first byte held; should it resume before the answer (something else
    # resumed it), past MAX_PIPELINED held the socket is dropped and nothing is handed on.
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        request = handshake_request(TOKEN_PATH)
        head = RequestHead()
        assert hold_behind_request(head, request + b"\x81", transport) == request
        assert not transport.is_reading() and not transport.is_closing()
        assert hold_behind_request(head, b"x" * MAX_PIPELINED, transport) == b""
        assert transport.is_closing()
        assert held_behind_request(head, transport) == b"", "nothing read from a socket dropped"
    finally:
        transport.abort()
        theirs.close()


@pytest.mark.parametrize("ws", ["auto", "websockets-sansio"])
def test_hook_uvicorn_gives_a_server_of_its_own_the_bounded_websocket_protocol(ws: str) -> None:
    # It compared uvicorn's protocol with the bounded one's first base, the slots mixin: a server
    # run by the application (uvicorn.run, Starlette's lifespan) kept uvicorn's own protocol, with
    # none of the adapter's WebSocket bounds, checks or the frames above.
    import uvicorn

    from dara_ws_asgi import asgi_app
    from dara_ws_asgi.uvicorn import _uvicorn_protocols, hook_uvicorn

    endpoint = Endpoint(WebsocketManager(CONFIG), token_authenticator(verify_token))
    server = uvicorn.Server(uvicorn.Config(asgi_app(endpoint), ws=ws, lifespan="off", log_config=None))
    server.config.load()
    assert hook_uvicorn(endpoint, server)
    assert server.config.ws_protocol_class is _uvicorn_protocols(CONFIG.handshake_timeout)[1]


async def _pongs_after_eof(transport: str, count: int, *, behind_request: bool = True) -> int:
    """The pongs a client gets for ``count`` empty pings it sends behind its upgrade request (or
    once the 101 is in), followed by its end of stream (a half-close), then reading everything:
    the negated status when the upgrade is refused."""
    ping = encode_frame(PING, b"", mask_key=b"\0\0\0\0")
    async with running_stack(transport, config=ServerConfig(ping_interval=None, idle_timeout=None)) as stack:
        assert stack.port is not None
        client = await HostileClient.open(stack.port)
        client.write(handshake_request(TOKEN_PATH) + (ping * count if behind_request else b""))
        if behind_request:
            client.write_eof()
        response = await client.read_response(TIMEOUT)
        if response.status != 101:
            return -response.status
        if not behind_request:
            client.write(ping * count)
            client.write_eof()
        answered = 0
        for _ in range(count + 10):  # init, the pongs, then the close or the end of stream
            try:
                frame = await client.read_frame(TIMEOUT)
            except EOFError:
                break
            if frame.opcode == CLOSE:
                break
            answered += frame.opcode == PONG
        assert await client.wait_disconnected(TIMEOUT), "the server let the socket go"
        client.abort()
        return answered


SOCKET_TRANSPORTS = ["websockets", "asgi", "picows", "aiohttp"]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("transport", SOCKET_TRANSPORTS)
def test_more_frames_than_a_feeds_share_with_the_upgrade_then_eof_all_get_their_pongs(
    transport: str, loop: str
) -> None:
    """More frames behind the upgrade request than one feed hands on (``FRAMES_PER_FEED``), then
    the client's end of stream: every ping is answered before the connection ends. Reading
    resumed while frames were still held let uvloop read the EOF in between, and the frames held
    then never reached the library (1,024 pongs of 3,000). aiohttp closed the socket at the end
    of stream, before its answer to the request: the client got nothing, not even the 101."""
    from dara_ws_core.transport import FRAMES_PER_FEED

    count = 3 * FRAMES_PER_FEED - 72
    assert run_on(loop, _pongs_after_eof(transport, count)) == count


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("transport", SOCKET_TRANSPORTS)
def test_more_frames_than_a_feeds_share_after_the_101_then_eof_all_get_their_pongs(
    transport: str, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same once the connection is open: every ping is answered, and nothing is logged as an
    error. aiohttp closed the socket at the end of stream, and resumed reading (its own flow
    control) while frames were held: on uvloop the end of stream came before the last share
    (2,048 pongs of 3,000), and a pong written to the closing socket failed the connection with
    an ERROR and a traceback."""
    from dara_ws_core.transport import FRAMES_PER_FEED

    count = 3 * FRAMES_PER_FEED - 72
    assert run_on(loop, _pongs_after_eof(transport, count, behind_request=False)) == count
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("transport", ["websockets", "asgi"])
def test_an_end_of_stream_read_while_frames_are_held_waits_for_them(
    transport: str, loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library's own flow control may resume reading while frames are still held (websockets'
    message queue draining, uvicorn's receive() emptying its queue, a write buffer draining): the
    peer's end of stream can then be read before they are all handed on. It waits for them: every
    ping is answered. Forced here: after every read that leaves frames held, reading resumes two
    callbacks later, after the next share's pause, as a task woken by I/O would resume it (on
    uvloop the end of stream was read then, and 2,048 pings of 3,000 went unanswered)."""
    from dara_ws_core.transport import FRAMES_PER_FEED

    connection_class: type[Any]
    if transport == "websockets":
        from dara_ws_websockets import _ServerConnection

        connection_class = _ServerConnection
    else:
        from dara_ws_asgi.uvicorn import _uvicorn_protocols

        connection_class = _uvicorn_protocols(CONFIG.handshake_timeout)[1]
    library_read = connection_class.data_received
    resumed = 0

    def data_received(connection: Any, data: bytes) -> None:
        nonlocal resumed
        library_read(connection, data)
        frames = connection.dara_frames
        if frames is not None and frames.more:
            resumed += 1
            loop_ = asyncio.get_running_loop()
            loop_.call_later(0, loop_.call_soon, connection.transport.resume_reading)

    monkeypatch.setattr(connection_class, "data_received", data_received)
    count = 6 * FRAMES_PER_FEED - 72
    assert run_on(loop, _pongs_after_eof(transport, count)) == count
    assert resumed >= 2, "reading was resumed while frames were held"
