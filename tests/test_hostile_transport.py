"""Hostile clients against the transports (issue 10: items 3, 4, 6, 9, 11, 12), on real sockets.

Each test runs on every socket transport (websockets, aiohttp, ASGI under uvicorn) through
``tests.stacks`` and attacks it with ``tests.hostile.HostileClient``. Time bounds here are
correctness bounds ("released within close_timeout + a generous margin"), not speed targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dara_ws_core import (
    DEFAULT_PATH,
    Endpoint,
    Identity,
    ServerConfig,
    SlowConsumerPolicy,
    WebsocketManager,
    allow_anonymous,
    extract_token,
    token_authenticator,
)
from dara_ws_core.correlation import CHUNK_SHARES, PROCESS_CHUNKS
from dara_ws_core.driver import ConnectionDriver
from dara_ws_core.exceptions import ChunkError, CloseCode, ConnectionClosed
from dara_ws_core.transport import FRAMES_PER_FEED, MAX_COOKIES, HandshakeRequest, parse_cookies

from .helpers import eventually
from .hostile import (
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    HostileClient,
    close_payload,
    encode_frame,
    handshake_request,
    server_holds_socket,
)
from .hostile import open_channel as open_port_channel
from .stacks import TRANSPORTS, Stack, running_stack, verify_token

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
TOKEN_PATH = "/api/core/ws?token=mallory:s1"
MARGIN = 4.0  # on top of the configured timeout: a loaded 2-core CI machine is slow


@pytest.fixture(params=SOCKETS)
def socket_stack(request: pytest.FixtureRequest) -> Callable[..., contextlib.AbstractAsyncContextManager[Stack]]:
    """``async with socket_stack(config=...) as stack`` on each socket transport."""
    name = str(request.param)

    @contextlib.asynccontextmanager
    async def make(**options: Any) -> AsyncIterator[Stack]:
        async with running_stack(name, **options) as stack:
            yield stack

    return make


async def open_channel(stack: Stack, *, rcvbuf: int | None = None) -> tuple[HostileClient, str]:
    """A raw client past the handshake, with its channel id (from ``init``)."""
    assert stack.port is not None
    return await open_port_channel(stack.port, rcvbuf=rcvbuf)


async def released(port: int, client: HostileClient, timeout: float) -> bool:
    """Whether the server lets go of its socket within ``timeout`` seconds (polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server_holds_socket(port, client.local_port):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# ---------------------------------------------------------------------------- item 3


async def test_a_slow_consumer_closed_with_1013_releases_its_socket_within_close_timeout(
    socket_stack: Any,
) -> None:
    config = ServerConfig(
        slow_consumer_policy=SlowConsumerPolicy.DISCONNECT, max_queue_messages=8,
        close_timeout=1.0, ping_interval=None,
    )
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack, rcvbuf=4096)
        client.stop_reading()
        payload = {"blob": "x" * 60_000}
        async with asyncio.timeout(30):
            while channel in stack.manager.handlers:  # fill every buffer until 1013
                with contextlib.suppress(Exception):
                    await stack.manager.send_message(channel, payload)
                await asyncio.sleep(0)
        assert await released(stack.port or 0, client, config.close_timeout + MARGIN)
        client.abort()


async def test_a_rate_limited_client_that_does_not_read_is_released_within_close_timeout(
    socket_stack: Any,
) -> None:
    config = ServerConfig(rate_limit=50, close_timeout=1.0, ping_interval=None)
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack, rcvbuf=4096)
        client.stop_reading()
        # Big pings whose pongs fill the client's window, then a burst over the limit.
        ping = json.dumps({"type": "ping", "message": "p" * 30_000})
        async with asyncio.timeout(30):
            for _ in range(200):
                client.send_text(ping)
                if not await client.drain(2.0) or channel not in stack.manager.handlers:
                    break
        assert channel not in stack.manager.handlers or await _gone(stack, channel)
        assert await released(stack.port or 0, client, config.close_timeout + MARGIN)
        client.abort()


async def _gone(stack: Stack, channel: str, timeout: float = 10.0) -> bool:
    async with asyncio.timeout(timeout):
        while channel in stack.manager.handlers:
            await asyncio.sleep(0.05)
    return True


# ---------------------------------------------------------------------------- item 4


async def test_half_open_handshakes_are_dropped_and_never_lock_legit_clients_out(
    socket_stack: Any,
) -> None:
    config = ServerConfig(handshake_timeout=1.0, ping_interval=None)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        hangers = [await HostileClient.open(stack.port) for _ in range(20)]
        for hanger in hangers:
            hanger.send_partial_handshake()
        client = await stack.client()  # served meanwhile
        assert client.connected
        results = await asyncio.gather(
            *(h.wait_disconnected(config.handshake_timeout + MARGIN) for h in hangers)
        )
        assert all(results), f"{results.count(False)} of 20 half-open handshakes still held"
        for hanger in hangers:
            hanger.abort()


# ---------------------------------------------------------------------------- item 6


async def test_a_ping_flood_from_a_client_that_never_reads_is_not_buffered_without_bound(
    socket_stack: Any,
) -> None:
    config = ServerConfig(ping_interval=None, idle_timeout=None)
    async with socket_stack(config=config) as stack:
        client, _ = await open_channel(stack, rcvbuf=4096)
        client.stop_reading()
        ping = encode_frame(PING, b"p" * 125)
        batch, written, limit = ping * 512, 0, 64 * 1024 * 1024
        async with asyncio.timeout(120):
            while written < limit:  # each pong is buffered by the server unless it stops reading
                client.write(batch)
                written += len(batch)
                if not await client.drain(3.0):
                    break  # the server stopped reading: the flood is bounded
        assert written < limit, "the server read 64 MiB of pings while their pongs piled up"
        client.abort()


# ---------------------------------------------------------------------------- item 9


@contextlib.asynccontextmanager
async def _served_for_shutdown(kind: str, endpoint: Endpoint) -> AsyncIterator[tuple[int, Callable[[], Any]]]:
    """Serve ``endpoint`` the way ``kind`` does in production; yields the port and a function
    that starts a SIGTERM-style shutdown and returns an awaitable for its end."""
    if kind in ("websockets", "picows"):
        import importlib

        serve = importlib.import_module(f"dara_ws_{kind}").serve
        stack = contextlib.AsyncExitStack()
        ws_server = await stack.enter_async_context(serve(endpoint, "127.0.0.1", 0))
        yield ws_server.port, lambda: asyncio.ensure_future(stack.aclose())
        await stack.aclose()
    elif kind == "aiohttp":  # what web.run_app does on SIGTERM: runner.cleanup(), nothing else
        from aiohttp import web

        from dara_ws_aiohttp import add_route

        app = web.Application()
        add_route(app, endpoint)
        runner = web.AppRunner(app, shutdown_timeout=endpoint.config.shutdown_grace)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield int(runner.addresses[0][1]), lambda: asyncio.ensure_future(runner.cleanup())
        await runner.cleanup()
    else:  # uvicorn running a plain ASGI app, or Starlette with the lifespan helper
        import uvicorn
        from starlette.applications import Starlette

        from dara_ws_asgi import asgi_app, lifespan, websocket_route

        asgi: Any = (
            asgi_app(endpoint) if kind == "uvicorn" else
            Starlette(routes=[websocket_route(endpoint)], lifespan=lifespan(endpoint))
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(asgi, log_config=None, log_level="warning",
                                               timeout_graceful_shutdown=30))
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.02)

        def stop() -> Any:
            server.should_exit = True  # what uvicorn's SIGTERM handler does
            return task

        try:
            yield sock.getsockname()[1], stop
        finally:
            server.should_exit = True
            await task
            sock.close()


@pytest.mark.parametrize("kind", ["websockets", "aiohttp", "uvicorn", "starlette", "picows"])
async def test_shutdown_closes_idle_clients_at_once_and_delivers_in_grace_answers(kind: str) -> None:
    release = asyncio.Event()

    async def ask(channel: str, data: Any) -> Any:
        await release.wait()
        return {"answer": data}

    manager = WebsocketManager(ServerConfig(shutdown_grace=20.0, ping_interval=None))
    manager.add_ws_handler("ask", ask)
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    async with _served_for_shutdown(kind, endpoint) as (port, stop):
        clients = []
        for _ in range(8):
            client = await HostileClient.open(port)
            assert (await client.handshake(TOKEN_PATH)).status == 101
            await client.read_frame()  # init
            clients.append(client)
        busy, idle = clients[:4], clients[4:]
        for i, client in enumerate(busy):
            client.send_text(json.dumps(
                {"type": "custom", "message": {"kind": "ask", "data": i, "__rchan": f"r{i}"}}
            ))
        async with asyncio.timeout(10):
            while sum(h.task_count for h in manager.handlers.values()) < len(busy):
                await asyncio.sleep(0.01)
        done = stop()
        # Idle clients are closed with 1001 while the answers are still being computed.
        assert await asyncio.gather(*(c.read_close(10) for c in idle)) == [1001] * len(idle)
        release.set()
        for i, client in enumerate(busy):
            reply = json.loads((await client.read_frame(10)).text)
            assert reply["message"] == {"kind": "ask", "data": {"answer": i}, "__response_for": f"r{i}"}
            assert await client.read_close(10) == 1001
        await asyncio.wait_for(done, 30)
        for client in clients:
            client.abort()


# ---------------------------------------------------------------------------- item 11


async def test_oversized_handshake_headers_get_a_prompt_http_error(socket_stack: Any) -> None:
    async with socket_stack() as stack:
        assert stack.port is not None
        for headers in ([("X-Big", "a" * 65536)], [(f"X-H{i}", "v") for i in range(300)]):
            client = await HostileClient.open(stack.port)
            response = await client.handshake(TOKEN_PATH, headers, timeout=10)
            assert response.status in (400, 431)
            client.abort()


async def test_repeated_cookie_headers_are_parsed_lazily_and_bounded() -> None:
    headers = [("Cookie", "".join(f"k{i}_{j}=v;" for j in range(2000))) for i in range(100)]
    request = HandshakeRequest.build("/api/core/ws?token=t", headers)
    assert len(request.headers["cookie"]) > 1_000_000  # kept as sent, joined once
    assert len(request.cookies) == MAX_COOKIES  # what is parsed is capped
    assert parse_cookies('a=1; b="q"; bad; =x; a=2') == {"a": "1", "b": "q"}


# ---------------------------------------------------------------------------- item 12


async def test_a_frame_of_exactly_max_message_size_is_accepted(socket_stack: Any) -> None:
    config = ServerConfig(max_message_size=4096, ping_interval=None)
    async with socket_stack(config=config) as stack:
        client, _ = await open_channel(stack)
        frame = json.dumps({"type": "ping", "message": ""})
        frame = frame[:-2] + "x" * (4096 - len(frame)) + '"}'
        assert len(frame.encode()) == 4096
        client.send_text(frame)
        reply = await client.read_frame()
        assert reply.opcode == TEXT and json.loads(reply.text)["type"] == "pong"
        client.abort()


@pytest.mark.parametrize("fragment", [b"", b"  "], ids=["empty", "two-bytes"])
async def test_a_message_in_many_tiny_fragments_holds_no_more_than_its_bytes(
    socket_stack: Any, fragment: bytes
) -> None:
    # Fragments are gathered in one buffer: an object kept per fragment (~40 bytes, however
    # small; websockets' assembler ~140, up to 4,096 of them) would let a peer make the server
    # hold many times max_message_size, and empty ones, which max_message_size never counts,
    # without any bound but the library's. Nor is a message refused for its count of fragments
    # (websockets' assembler failed the 4,097th with 1009, where no other transport did).
    async with socket_stack(config=ServerConfig(ping_interval=None, close_timeout=1)) as stack:
        fragments = 60_000
        client, _ = await open_channel(stack)
        client.write(encode_frame(TEXT, '{"type":"ping",', fin=False))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await client.flood(encode_frame(CONTINUATION, fragment, fin=False), count=fragments)
            client.write(encode_frame(PING, b"read-up-to-here"))  # allowed between fragments
            reply = await client.read_frame(timeout=30)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert reply.opcode == PONG, "every fragment before the ping was read"
        # The message's bytes so far (in a buffer that may grow by half again), and change.
        assert held < 2 * len(fragment) * fragments + 256 * 1024, f"{held} bytes held"
        client.write(encode_frame(CONTINUATION, '"message":null}'))
        reply = await client.read_frame()
        assert reply.opcode == TEXT and json.loads(reply.text)["type"] == "pong", "reassembled"
        client.abort()


async def test_replies_within_the_rate_limit_are_delivered_before_the_1008_close(
    socket_stack: Any,
) -> None:
    config = ServerConfig(rate_limit=20, rate_window=60.0, ping_interval=None)
    async with socket_stack(config=config) as stack:
        client, _ = await open_channel(stack)
        ping = encode_frame(TEXT, json.dumps({"type": "ping", "message": "x" * 100}))
        client.write(ping * 25)
        pongs = 0
        async with asyncio.timeout(10):
            while (frame := await client.read_frame()).opcode != CLOSE:
                pongs += json.loads(frame.text)["type"] == "pong"
        assert (pongs, frame.close_code) == (20, 1008)
        client.abort()


@pytest.mark.parametrize("opcode", [TEXT, PING, CLOSE])
async def test_an_unmasked_client_frame_closes_the_connection_with_1002(
    socket_stack: Any, opcode: int
) -> None:
    # RFC 6455 section 5.1: a server closes on an unmasked client frame, data or control, and
    # does not act on it (no pong, no reply, no echoed close code).
    config = ServerConfig(ping_interval=None)
    payload = {TEXT: json.dumps({"type": "ping", "message": ""}).encode(), PING: b"p",
               CLOSE: close_payload(1000)}[opcode]
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack)
        client.send_text(json.dumps({"type": "ping", "message": ""}))  # masked: answered
        reply = await client.read_frame()
        assert reply.opcode == TEXT and json.loads(reply.text)["type"] == "pong"
        # Sent once the pong came: in the same read as the ping, websockets, uvicorn and picows
        # fail the connection as they parse it, before the ping is handled (test_picows).
        client.send_frame(opcode, payload, mask=False)
        frame = await client.read_frame()
        assert (frame.opcode, frame.close_code) == (CLOSE, 1002)
        assert await _gone(stack, channel)
        client.abort()


# ---------------------------------------------------------------------------- review 6: adapter parity


@pytest.mark.parametrize("path", ["/wrong/path", "/api/core/wsx", "/api/core", "/"])
async def test_an_upgrade_on_a_path_that_is_not_the_endpoints_gets_404_not_a_refusal(
    socket_stack: Any, path: str
) -> None:
    # Review 19 (11): on ASGI a typo in the URL looked like an authentication failure (403).
    async with socket_stack() as stack:
        assert stack.port is not None
        statuses = []
        for target in (f"{path}?token=mallory:s1", TOKEN_PATH, "/api/core/ws?token=bad"):
            client = await HostileClient.open(stack.port)
            try:
                statuses.append((await client.handshake(target)).status)
            finally:
                client.abort()
        assert statuses == [404, 101, 403]



_OTHER_PATH = b"GET /other HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
_UNREAD_BODY = b"POST /other HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"


@pytest.mark.parametrize(
    ("first", "then"),
    [
        # A complete request (404), then an upgrade whose head never ends, on the same connection.
        (_OTHER_PATH, handshake_request(TOKEN_PATH, complete=False)),
        # A request answered before its body is read, then a body that never ends.
        (_UNREAD_BODY, b"x" * 1000),
    ],
    ids=["head-after-a-response", "body-after-its-response"],
)
async def test_a_kept_alive_connection_cannot_stretch_the_handshake_timeout(
    socket_stack: Any, first: bytes, then: bytes
) -> None:
    # handshake_timeout bounds every request a connection has not completed, not only the first:
    # uvicorn's keep-alive timer stops at the first byte of the next request and aiohttp reads an
    # unread body for 10 s, so a dripping client held such a socket past the bound.
    config = ServerConfig(handshake_timeout=1.0, ping_interval=None)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        client = await HostileClient.open(stack.port)
        client.write(first)
        with contextlib.suppress(EOFError):  # or the server closes at once: fine too
            assert (await client.read_response()).status >= 400

        async def drip() -> None:  # one byte at a time, so that no idle timer ever fires
            for i in range(len(then)):
                if client.lost:
                    return
                client.write(then[i : i + 1])
                await asyncio.sleep(0.2)

        dripping = asyncio.create_task(drip())
        try:
            assert await client.wait_disconnected(config.handshake_timeout + MARGIN)
        finally:
            dripping.cancel()
            client.abort()


async def test_clients_that_abort_right_after_their_upgrade_request_are_not_logged(
    socket_stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A peer that leaves mid-upgrade is no server error; aiohttp logged one ERROR with a
    # traceback for each (any peer could flood the logs), the other transports none.
    calls = 0
    authenticate = token_authenticator(verify_token)

    def counting(request: HandshakeRequest) -> Any:
        nonlocal calls
        calls += 1
        return authenticate(request)

    caplog.set_level(logging.WARNING)
    async with socket_stack(config=ServerConfig(ping_interval=None), authenticator=counting) as stack:
        assert stack.port is not None
        aborted = 20
        for _ in range(aborted):
            client = await HostileClient.open(stack.port)
            client.write(handshake_request(TOKEN_PATH))
            client.abort()
        await eventually(lambda: calls >= aborted, "every aborted upgrade reached the endpoint")
        # A full client after them: by its first answer the aborted upgrades are long handled.
        client, _ = await open_channel(stack)
        client.send_text(json.dumps({"type": "ping", "message": None}))
        assert json.loads((await client.read_frame()).text)["type"] == "pong"
        client.abort()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"{len(errors)} ERROR records, e.g. {errors[0].name}: {errors[0].getMessage()}"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/core/ws HTTP/1.1\r\nHost\r\n\r\n",  # a header without ':'
        # An upgrade to another protocol: uvicorn warned of each (review16 fz, found with #1).
        b"GET /api/core/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, close\r\nUpgrade: h2c\r\n\r\n",
    ],
    ids=["unparsable", "upgrade-to-h2c"],
)
async def test_requests_the_server_cannot_parse_are_logged_at_most_rate_limited(
    socket_stack: Any, caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    # aiohttp logged an ERROR with a traceback, uvicorn a WARNING, for each: a peer could write
    # to the log at will. At most the first ten and then each power of ten are written.
    caplog.set_level(logging.WARNING)
    async with socket_stack(config=ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        for _ in range(100):
            client = await HostileClient.open(stack.port)
            client.write(request_bytes)
            assert await client.wait_disconnected()
            client.abort()
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) <= 11, f"{len(records)} records, e.g. {records[0].getMessage()}"


@pytest.mark.parametrize(
    "requests",
    [
        _OTHER_PATH + _OTHER_PATH,  # two pipelined requests, the first answered 404
        handshake_request("/api/core/ws?token=bad") + _OTHER_PATH,  # behind a refused upgrade (403)
        _OTHER_PATH + _UNREAD_BODY + b"x" * 100,
    ],
    ids=["behind-a-404", "behind-a-403", "a-body-behind-a-404"],
)
async def test_requests_pipelined_behind_a_refused_one_are_logged_at_most_rate_limited(
    socket_stack: Any, caplog: pytest.LogCaptureFixture, requests: bytes
) -> None:
    # websockets read what follows a request as WebSocket frames, failed on it, and then logged
    # "unexpected internal error" with a traceback (an assertion) when it answered the request:
    # one ERROR per connection, at any peer's will.
    caplog.set_level(logging.WARNING)
    config = ServerConfig(ping_interval=None, handshake_timeout=1.0)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        clients = [await HostileClient.open(stack.port) for _ in range(20)]
        for client in clients:
            client.write(requests)
        timeout = config.handshake_timeout + MARGIN
        assert all(await asyncio.gather(*(client.wait_disconnected(timeout) for client in clients)))
        for client in clients:
            client.abort()
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) <= 11, f"{len(records)} records, e.g. {records[0].name}: {records[0].getMessage()}"
    assert not [r for r in records if r.levelno >= logging.ERROR], records[0].getMessage()


def _reset(client: HostileClient) -> None:
    """A TCP RST: the socket is closed with a zero linger, so nothing (no FIN) is sent first."""
    sock = client.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.abort()


@pytest.mark.parametrize(
    ("leave", "expected"),
    [
        (_reset, 1006),  # RFC 6455 7.1.5: closed without a close frame
        (lambda client: client.transport.write_eof(), 1006),  # a FIN, no close frame
        (lambda client: client.send_close(None), 1005),  # a close frame without a code
    ],
    ids=["rst", "fin", "close-frame-without-code"],
)
async def test_the_close_code_of_a_peer_that_leaves_is_the_same_on_every_transport(
    socket_stack: Any, leave: Callable[[HostileClient], None], expected: int
) -> None:
    config = ServerConfig(ping_interval=None, close_timeout=1.0)
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack)
        waiting = asyncio.create_task(stack.manager.send_and_wait(channel, {"q": 1}, timeout=10))
        await client.read_frame()  # the request is out: the channel waits for its answer
        leave(client)
        with pytest.raises(ConnectionClosed) as raised:
            await waiting
        assert raised.value.code == expected
        await _gone(stack, channel)
        assert dict(stack.manager.counters.close_codes) == {expected: 1}
        client.abort()


async def test_a_peer_that_never_answers_a_ping_is_recorded_as_lost(socket_stack: Any) -> None:
    # The server's close frame goes unanswered as well: no close frame came, so 1006 (RFC 6455
    # 7.1.5). uvicorn reported 1005 here, websockets the 1011 it sent, picows the 1001 it sent.
    config = ServerConfig(ping_interval=0.5, ping_timeout=0.5, close_timeout=1.0)
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack)
        client.stop_reading()  # and never sends a pong
        with pytest.raises(ConnectionClosed) as raised:
            await stack.manager.send_and_wait(channel, {"q": 1}, timeout=10)
        assert raised.value.code == 1006
        await _gone(stack, channel)
        assert dict(stack.manager.counters.close_codes) == {1006: 1}
        client.abort()


@contextlib.asynccontextmanager
async def _uvicorn_serving(app: Any, http: str) -> AsyncIterator[int]:
    """``app`` served by uvicorn itself (``http``: its h11 or httptools protocol) on 127.0.0.1,
    as an application run under ``uvicorn.run`` is; yields the port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=http, log_config=None, log_level="warning"))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started, "uvicorn started")
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_the_handshake_timeout_never_cuts_an_http_request_being_served(http: str) -> None:
    # Starlette under uvicorn with the adapter's hardening, on either of uvicorn's HTTP parsers
    # (httptools is its default when installed): the bound is on the time between requests, so
    # a route slower than handshake_timeout still answers, and the connection is closed only
    # once it sits idle (or half-sent) for handshake_timeout after that answer.
    pytest.importorskip(http)
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from dara_ws_asgi import lifespan, websocket_route

    answered = asyncio.Event()

    async def slow(_: Any) -> PlainTextResponse:
        await answered.wait()
        return PlainTextResponse("done")

    config = ServerConfig(handshake_timeout=0.5, ping_interval=None)
    endpoint = Endpoint(WebsocketManager(config), token_authenticator(verify_token))
    app = Starlette(routes=[Route("/slow", slow), websocket_route(endpoint)], lifespan=lifespan(endpoint))
    async with _uvicorn_serving(app, http) as port:
        client = await HostileClient.open(port)
        client.write(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # Three handshake timeouts with the request being served: still open.
        assert not await client.wait_disconnected(3 * config.handshake_timeout)
        answered.set()
        assert (await client.read_response()).status == 200
        client.write(handshake_request(TOKEN_PATH, complete=False))  # then a head never ending
        assert await client.wait_disconnected(config.handshake_timeout + MARGIN)
        client.abort()


async def test_a_slow_consumer_gets_its_1013_without_its_backlog_written_first(
    socket_stack: Any,
) -> None:
    """The close frame of a slow consumer is not queued behind the backlog that made it slow:
    once it reads again, a client gets 1013 after at most what the socket buffers held, not
    the ``max_queue_bytes`` the server had queued for it (behind which, on a slow link, the
    close timeout aborted the connection without any close frame)."""
    blob = 512 * 1024
    config = ServerConfig(
        slow_consumer_policy=SlowConsumerPolicy.DISCONNECT, max_queue_bytes=24 * blob,
        close_timeout=10.0, ping_interval=None,
    )
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack, rcvbuf=4096)
        client.stop_reading()
        counters = stack.manager.counters
        async with asyncio.timeout(30):
            while channel in stack.manager.handlers:  # fan-out frames until the 1013
                await stack.manager.broadcast({"blob": "x" * blob})
                await asyncio.sleep(0)
        client.resume_reading()
        frames = 0
        async with asyncio.timeout(config.close_timeout):
            while (frame := await client.read_frame(config.close_timeout)).opcode != 0x8:
                frames += 1
        assert frame.close_code == CloseCode.TRY_AGAIN_LATER
        # What the kernel and the library buffered: a few frames of 512 KiB, not 24.
        assert frames < 12
        assert counters.frames_dropped >= 16  # the backlog, dropped rather than written
        client.abort()


async def test_a_reader_behind_by_a_burst_of_broadcasts_catches_up_and_a_stalled_one_is_closed(
    socket_stack: Any,
) -> None:
    """A fan-out queues a burst past ``max_queue_bytes`` for a reader that takes it in at its own
    pace (up to four times the bound, for up to ``send_timeout``); a reader that stays behind for
    longer, or beyond that, is closed with 1013. So one client whose messages are rebroadcast in
    a burst does not get every slower reader disconnected."""
    blob, bound, grace = 256 * 1024, 16, 0.5
    config = ServerConfig(
        slow_consumer_policy=SlowConsumerPolicy.WAIT, max_queue_bytes=bound * blob, send_timeout=grace,
        close_timeout=5.0, ping_interval=None,
    )
    async with socket_stack(config=config) as stack:
        manager = stack.manager

        async def burst(start: int, count: int) -> None:
            for i in range(start, start + count):
                await manager.broadcast({"i": i, "blob": "x" * blob})

        behind, channel = await open_channel(stack, rcvbuf=4096)
        behind.stop_reading()
        await burst(0, 40)  # 2.5 times the bound, in one go (the socket buffers hold some)
        assert manager.handlers[channel].queue.nbytes > config.max_queue_bytes  # past it: kept
        behind.resume_reading()
        got: list[int] = []
        async with asyncio.timeout(20):
            while len(got) < 40:
                frame = await behind.read_frame(10)
                assert frame.opcode == 0x1, frame
                got.append(json.loads(frame.payload)["message"]["i"])
        assert got == list(range(40))
        assert channel in manager.handlers

        stalled, stalled_channel = await open_channel(stack, rcvbuf=4096)
        stalled.stop_reading()
        await burst(40, 40)  # past the bound, and then for longer than send_timeout
        assert manager.handlers[stalled_channel].queue.nbytes > config.max_queue_bytes
        slow_before = sum(manager.counters.slow_consumer.values())
        await asyncio.sleep(2 * grace)  # the time bound itself is what is tested
        async with asyncio.timeout(20):  # (the reader takes in what it was sent meanwhile)
            while len(got) < 80:
                got.append(json.loads((await behind.read_frame(10)).payload)["message"]["i"])
        await burst(80, 1)
        assert stalled_channel not in manager.handlers
        assert sum(manager.counters.slow_consumer.values()) == slow_before + 1
        assert channel in manager.handlers  # the reader that caught up is still there

        never, never_channel = await open_channel(stack, rcvbuf=4096)
        never.stop_reading()
        behind.stop_reading()
        sent = 0
        while never_channel in manager.handlers:  # the size bound: closed within 4x the bound
            await burst(100 + sent, 1)
            sent += 1
            assert sent <= 5 * bound + 16, "never closed"
        assert sent >= 4 * bound - 16
        for client in (behind, stalled, never):
            client.abort()


async def test_a_client_whose_rebroadcast_outruns_a_reader_is_held_back_not_the_reader_closed(
    socket_stack: Any,
) -> None:
    """One client's messages, each rebroadcast to the others (a chat), faster than another client
    reads: once its fan-outs have queued a share of the bounds past a reader's (a quarter), the
    server stops reading the sender until the reader caught up. The reader, which reads at its
    own pace, gets everything and is never closed as slow; the burst costs the sender time."""
    blob, count = 64 * 1024, 300  # about 19 MiB: far past 4x the bound below and the socket buffers
    senders = 3  # together, each held back for its own share or for the queue twice past its bounds
    config = ServerConfig(slow_consumer_policy=SlowConsumerPolicy.WAIT, max_queue_bytes=16 * blob,
                          send_timeout=5.0, close_timeout=5.0, ping_interval=None)
    async with socket_stack(config=config) as stack:
        manager = stack.manager

        async def chat(channel_id: str, data: Any) -> None:
            await manager.broadcast({"kind": "chat", "data": data}, custom=True, ignore_channel=channel_id)

        manager.add_ws_handler("chat", chat)
        reader, reader_channel = await open_channel(stack, rcvbuf=4096)
        reader.stop_reading()
        clients = [(await open_channel(stack))[0] for _ in range(senders)]

        async def flood(sender: HostileClient, first: int) -> None:
            for i in range(first, count, senders):
                text = f"{i:05}" + "x" * blob
                sender.send_text(json.dumps({"type": "custom", "message": {"kind": "chat", "data": text}}))
                assert await sender.drain(30), "the sender was never read again"

        flooding = asyncio.gather(*(flood(sender, i) for i, sender in enumerate(clients)))
        try:
            await eventually(lambda: manager.counters.senders_paused >= 1 or reader_channel not in manager.handlers,
                             timeout=20)
            assert reader_channel in manager.handlers, "the reader was closed as slow"
            reader.resume_reading()
            got: list[int] = []
            async with asyncio.timeout(60):
                while len(got) < count:
                    frame = await reader.read_frame(20)
                    assert frame.opcode == TEXT, frame
                    got.append(int(json.loads(frame.payload)["message"]["data"][:5]))
            await flooding
        finally:
            flooding.cancel()
        assert sorted(got) == list(range(count))
        for sender in range(senders):  # each sender's messages in the order it sent them
            assert [i for i in got if i % senders == sender] == list(range(sender, count, senders))
        assert reader_channel in manager.handlers
        assert not manager.counters.slow_consumer
        for client in (reader, *clients):
            client.abort()


async def _user_channel(stack: Stack, user: str, *, rcvbuf: int | None = None) -> HostileClient:
    """A raw client of ``user`` past the handshake and its ``init``."""
    assert stack.port is not None
    client = await HostileClient.open(stack.port, rcvbuf=rcvbuf)
    response = await client.handshake(f"/api/core/ws?token={user}:s1")
    assert response.status == 101, response
    await client.read_frame()  # init
    return client


#: Frames of the chat-room tests below: 16 of them fill a reader's queue bound.
BLOB = 64 * 1024
#: WAIT with a 16-frame bound and no keepalive; the longest pause is then 10 s.
ROOM = ServerConfig(slow_consumer_policy=SlowConsumerPolicy.WAIT, max_queue_bytes=16 * BLOB,
                    send_timeout=60.0, ping_interval=None, ping_timeout=None, close_timeout=5.0)


@contextlib.asynccontextmanager
async def _chat_room(socket_stack: Any, config: ServerConfig = ROOM) -> AsyncIterator[Stack]:
    """A server under ``config`` whose ``chat`` rebroadcasts to every other connection and whose
    ``echo`` answers."""
    async with socket_stack(config=config) as stack:
        manager = stack.manager

        async def chat(channel_id: str, data: Any) -> None:
            await manager.broadcast({"kind": "chat", "data": data}, custom=True, ignore_channel=channel_id)

        manager.add_ws_handler("chat", chat)
        manager.add_ws_handler("echo", lambda channel_id, data: data)
        yield stack


async def _fill_twice_past(manager: Any, user: str) -> Any:
    """Queue server pushes (no sender to charge) for ``user``'s one connection, which does not
    read, until twice its bound stays queued past the socket buffers; its queue."""
    (channel,) = manager.get_user_channels(user)
    queue = manager.handlers[channel].queue
    for _ in range(200):
        await manager.send_message_to_user(user, {"kind": "x", "data": "x" * BLOB}, custom=True)
        await asyncio.sleep(0.001)
        if queue.nbytes >= 2 * ROOM.max_queue_bytes:
            break
    assert queue.nbytes >= 2 * ROOM.max_queue_bytes
    return queue


async def test_a_held_back_sender_waits_only_for_the_readers_its_own_messages_filled(
    socket_stack: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """A sender held back for its fan-outs (``owe``) waits for the queues *it* took past their
    bounds, not for every queue taking a burst: another reader that never catches up, with a
    burst the server queued for it, does not keep the sender paused for the whole pause."""
    caplog.set_level(logging.DEBUG, logger="dara_ws_core")
    async with _chat_room(socket_stack) as stack:
        manager = stack.manager

        async def tell(channel_id: str, data: Any) -> None:
            await manager.send_message_to_user("mine", {"kind": "told", "data": {"n": data, "blob": "x" * BLOB}},
                                               custom=True)

        manager.add_ws_handler("tell", tell)
        other = await _user_channel(stack, "other", rcvbuf=4096)
        mine = await _user_channel(stack, "mine", rcvbuf=4096)
        sender = await _user_channel(stack, "sender")
        other.stop_reading()
        mine.stop_reading()
        other_queue = await _fill_twice_past(manager, "other")  # the server's own burst
        count = 200  # 12.5 MiB: past the socket buffers and a quarter of the bound past the queue's
        for n in range(count):
            sender.send_text(json.dumps({"type": "custom", "message": {"kind": "tell", "data": n}}))
        await eventually(lambda: manager.counters.senders_paused >= 1, timeout=20)
        mine.resume_reading()
        got: list[int] = []
        async with asyncio.timeout(30):
            while len(got) < count:
                frame = await mine.read_frame(10)
                assert frame.opcode == TEXT, frame
                got.append(json.loads(frame.payload)["message"]["data"]["n"])
        assert got == list(range(count))
        sender.send_text(json.dumps({"type": "custom", "message": {"kind": "echo", "data": "hi", "__rchan": "r1"}}))
        reply = json.loads((await sender.read_frame(20)).payload)
        assert reply["message"]["__response_for"] == "r1"
        assert other_queue.in_burst  # still behind all along
        pauses = [r.getMessage() for r in caplog.records if "reading paused" in r.getMessage()]
        assert pauses, "the sender was never held back"
        # Each pause waited for the one queue its messages filled, never for the other's burst.
        assert all("past 1 queues'" in message for message in pauses), pauses
        for client in (other, mine, sender):
            client.abort()


async def test_a_message_into_a_burst_others_caused_does_not_hold_its_sender_back(
    socket_stack: Any,
) -> None:
    """A reader twice past its bounds (a burst the server queued) and a client that sends one
    chat message, rebroadcast to that reader too: the client did not make the burst, so its
    reading is not paused for it (its next request is answered, ``senders_paused`` stays 0)."""
    async with _chat_room(socket_stack) as stack:
        manager = stack.manager
        reader = await _user_channel(stack, "reader", rcvbuf=4096)
        reader.stop_reading()
        (reader_channel,) = manager.get_user_channels("reader")
        talker = await _user_channel(stack, "talker")
        await _fill_twice_past(manager, "reader")
        talker.send_text(json.dumps({"type": "custom", "message": {"kind": "chat", "data": "hello"}}))
        talker.send_text(json.dumps({"type": "custom", "message": {"kind": "echo", "data": "hi", "__rchan": "r1"}}))
        reply = json.loads((await talker.read_frame(20)).payload)
        assert reply["message"]["__response_for"] == "r1"
        assert manager.counters.senders_paused == 0
        assert reader_channel in manager.handlers
        for client in (reader, talker):
            client.abort()


async def test_a_sender_that_goes_quiet_forgets_its_fan_outs_when_their_window_ends(
    socket_stack: Any,
) -> None:
    """What a connection's fan-outs past readers' bounds are counted with (its last frame, the
    queues they went to) lasts one window (``send_timeout``), even if the connection sends
    nothing more: an idle connection holds no copy of a burst, nor other connections' queues."""
    async with _chat_room(socket_stack, dataclasses.replace(ROOM, send_timeout=5.0)) as stack:
        manager = stack.manager
        reader = await _user_channel(stack, "reader", rcvbuf=4096)
        reader.stop_reading()
        talker = await _user_channel(stack, "talker")
        (talker_channel,) = manager.get_user_channels("talker")
        await _fill_twice_past(manager, "reader")
        talker.send_text(json.dumps({"type": "custom", "message": {"kind": "chat", "data": "x" * BLOB}}))
        talker.send_text(json.dumps({"type": "custom", "message": {"kind": "echo", "data": "hi", "__rchan": "r1"}}))
        reply = json.loads((await talker.read_frame(20)).payload)
        assert reply["message"]["__response_for"] == "r1"
        driver = manager.handlers[talker_channel]._sink
        assert isinstance(driver, ConnectionDriver)
        assert driver._owed is not None, "the chat was not counted against its sender"
        await eventually(lambda: driver._owed is None, "the window forgotten while idle", timeout=20)
        assert manager.counters.senders_paused == 0
        for client in (reader, talker):
            client.abort()


async def test_a_held_back_sender_the_server_closes_is_let_go_before_its_pause_ends(
    socket_stack: Any,
) -> None:
    """A sender paused for its burst that the application closes (``close_channel``, as a
    revocation does): the pause ends with the connection, which is removed and gets its close
    frame, not after the whole pause (10 s here)."""
    async with _chat_room(socket_stack) as stack:
        manager = stack.manager
        reader = await _user_channel(stack, "reader", rcvbuf=4096)
        reader.stop_reading()
        sender = await _user_channel(stack, "sender")
        (sender_channel,) = manager.get_user_channels("sender")
        for i in range(300):  # about 19 MiB: past a quarter of the bounds beyond the reader's
            message = {"kind": "chat", "data": f"{i:05}" + "x" * BLOB}
            sender.send_text(json.dumps({"type": "custom", "message": message}))
        await eventually(lambda: manager.counters.senders_paused >= 1, "the sender paused", timeout=20)
        loop = asyncio.get_running_loop()
        paused = loop.time()
        assert manager.close_channel(sender_channel, CloseCode.POLICY_VIOLATION, "revoked")
        await eventually(lambda: sender_channel not in manager.handlers, "the sender removed", timeout=20)
        assert loop.time() - paused < 8.0  # well before the 10 s pause ends
        reader.abort()
        sender.abort()


async def test_under_disconnect_a_reader_taking_in_a_burst_may_still_send_requests(
    socket_stack: Any,
) -> None:
    """Under ``DISCONNECT`` a fan-out takes a burst for a reader at its own pace as under
    ``WAIT``: the reply to a request the reader sends meanwhile joins the burst instead of
    counting as no room (which closed the reader with 1013 and dropped the rest)."""
    blob = 256 * 1024
    config = ServerConfig(slow_consumer_policy=SlowConsumerPolicy.DISCONNECT, max_queue_bytes=16 * blob,
                          send_timeout=10.0, close_timeout=5.0, ping_interval=None)
    async with socket_stack(config=config) as stack:
        manager = stack.manager
        manager.add_ws_handler("echo", lambda channel_id, data: data)
        reader, channel = await open_channel(stack, rcvbuf=4096)
        reader.stop_reading()
        for i in range(40):  # 2.5 times the bound
            await manager.broadcast({"i": i, "blob": "x" * blob})
        assert manager.handlers[channel].queue.in_burst
        reader.send_text(json.dumps({"type": "custom", "message": {"kind": "echo", "data": "hi", "__rchan": "r1"}}))
        assert await reader.drain(5)
        reader.resume_reading()
        got: list[Any] = []
        async with asyncio.timeout(30):
            while len(got) < 41:
                frame = await reader.read_frame(10)
                assert frame.opcode == TEXT, frame
                message = json.loads(frame.payload)["message"]
                got.append(message.get("i", message))
        assert got[:40] == list(range(40))
        assert got[40]["data"] == "hi" and got[40]["__response_for"] == "r1"
        assert channel in manager.handlers
        reader.abort()


@pytest.mark.parametrize("version", ["8", "7", "12", "14"])
async def test_a_websocket_version_other_than_13_is_never_upgraded(
    socket_stack: Any, version: str,
) -> None:
    """RFC 6455 (4.4): a server answers a version it does not speak with 426 and the version it
    does. aiohttp upgraded drafts 7 and 8; no transport may."""
    async with socket_stack() as stack:
        assert stack.port is not None
        async with await HostileClient.open(stack.port) as client:
            request = handshake_request(TOKEN_PATH).replace(
                b"Sec-WebSocket-Version: 13", f"Sec-WebSocket-Version: {version}".encode())
            client.write(request)
            response = await client.read_response()
            # 426 on every transport (dara_ws_core.upgrade): websockets and uvicorn said 400.
            assert response.status == 426, response
            assert response.header("Sec-WebSocket-Version") == "13"
        assert not stack.manager.handlers


# ---------------------------------------------------------------------------- review 12: shares by address


def _named_or_anonymous() -> Callable[[HandshakeRequest], Identity]:
    """The demo's authentication: a token names its user; without one, an anonymous identity."""
    anonymous = allow_anonymous()

    def authenticate(request: HandshakeRequest) -> Identity:
        token = extract_token(request)
        if token is None:
            return anonymous(request)  # type: ignore[return-value]  # sync by construction
        return verify_token(token)

    return authenticate


async def _first_part(stack: Stack, client: HostileClient, channel: str, part: str) -> asyncio.Task[Any]:
    """Ask ``channel`` (``send_and_wait``) and answer with the first of two parts: the answer is
    held until :func:`_last_part`. Returns the request's task and leaves its ``__rchan`` on it."""
    task = asyncio.create_task(stack.manager.send_and_wait(channel, {"q": 1}, timeout=20))
    request = json.loads((await client.read_frame()).text)["message"]
    rchan = request["__rchan"]
    client.send_text(json.dumps({"type": "message", "channel": rchan, "chunk_count": 2,
                                 "chunk_index": 0, "message": part}))
    task.set_name(rchan)
    return task


def _last_part(client: HostileClient, task: asyncio.Task[Any]) -> None:
    client.send_text(json.dumps({"type": "message", "channel": task.get_name(), "chunk_count": 2,
                                 "chunk_index": 1, "message": "end"}))


async def test_the_anonymous_connections_of_one_address_share_one_chunk_share(socket_stack: Any) -> None:
    # Each anonymous connection is a new user: keyed by user, N of them from one host held N
    # shares of the process's chunk budget, and 16 took it all (review12 #5). They share the
    # share of their address; a named user keeps its own.
    share = 4000
    config = ServerConfig(ping_interval=None, max_chunked_total_bytes=CHUNK_SHARES * share)
    async with socket_stack(config=config, authenticator=_named_or_anonymous()) as stack:
        assert stack.port is not None
        first, first_channel = await open_port_channel(stack.port, path=DEFAULT_PATH)
        second, second_channel = await open_port_channel(stack.port, path=DEFAULT_PATH)
        alice, alice_channel = await open_port_channel(stack.port, path=f"{DEFAULT_PATH}?token=alice:s1")
        held = await _first_part(stack, first, first_channel, "x" * (share * 3 // 4))
        await eventually(lambda: ("address", "127.0.0.1") in PROCESS_CHUNKS.users)
        # The second anonymous connection of the address: over what the address may hold.
        refused = await _first_part(stack, second, second_channel, "y" * (share // 2))
        with pytest.raises(ChunkError, match="for this address exceed"):
            await refused
        # A named user on the same address has a share of its own.
        own = await _first_part(stack, alice, alice_channel, "z" * (share * 3 // 4))
        _last_part(alice, own)
        assert await own == ["z" * (share * 3 // 4), "end"]
        # Once the first answer is done, the address's share is free for the second connection.
        _last_part(first, held)
        assert await held == ["x" * (share * 3 // 4), "end"]
        again = await _first_part(stack, second, second_channel, "y" * (share // 2))
        _last_part(second, again)
        assert await again == ["y" * (share // 2), "end"]
        for client in (first, second, alice):
            client.abort()


# ---------------------------------------------------------------------------- review 12: frame outcomes


def _ping_frame(length_form: int, declared: int | None = None, pad: int = 0) -> bytes:
    """A masked text frame carrying a protocol ping (padded with ``pad`` spaces), its length in
    the 7-bit (``7``), 16-bit (``16``) or 64-bit (``64``) form, whatever its size; ``declared``
    overrides the length written (the frame is then only its header and mask key)."""
    payload = json.dumps({"type": "ping", "message": ""}).encode() + b" " * pad
    length = len(payload) if declared is None else declared
    if length_form == 7:
        head = bytes([0x81, 0x80 | length])
    elif length_form == 16:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\0\0\0\0" + (payload if declared is None else b"")  # a zero mask key


@pytest.mark.parametrize(
    "frame",
    [
        _ping_frame(16),  # 15 bytes in the 16-bit form
        _ping_frame(64, pad=200),  # 227 bytes in the 64-bit form
        _ping_frame(64, declared=1 << 63),  # the top bit of a 64-bit length
        _ping_frame(64, declared=(1 << 64) - 1),
    ],
    ids=["16-bit-form-for-27-bytes", "64-bit-form-for-227-bytes", "64-bit-length-2**63", "64-bit-length-max"],
)
async def test_a_payload_length_rfc6455_forbids_closes_with_1002_on_every_transport(
    socket_stack: Any, frame: bytes
) -> None:
    # RFC 6455 5.2: the shortest length form MUST be used, and a 64-bit length's top bit MUST be
    # 0. picows closed on both with 1002; websockets, aiohttp and uvicorn took the first and
    # answered the second with 1009 (review12 #6). Nothing in such a frame is acted on.
    config = ServerConfig(ping_interval=None)
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack)
        for valid in (_ping_frame(7), _ping_frame(16, pad=200), _ping_frame(64, pad=70_000)):
            client.write(valid)
            reply = await client.read_frame()
            assert reply.opcode == TEXT and json.loads(reply.text)["type"] == "pong"
        # The header of the refused frame arrives a byte at a time: it is refused all the same.
        for at in range(len(frame)):
            client.write(frame[at : at + 1])
            await client.drain()
        closing = await client.read_frame()
        assert (closing.opcode, closing.close_code) == (CLOSE, 1002)
        assert await _gone(stack, channel)
        client.abort()


@pytest.mark.parametrize("code", [1000, 1001, 3000, 4000, 4999])
async def test_a_peer_close_is_answered_with_its_own_code_on_every_transport(socket_stack: Any, code: int) -> None:
    # RFC 6455 5.5.1: the answer to a close typically echoes its code; aiohttp said 1000 to all.
    config = ServerConfig(ping_interval=None)
    async with socket_stack(config=config) as stack:
        client, channel = await open_channel(stack)
        client.send_close(code, "bye")
        echo = await client.read_frame()
        assert (echo.opcode, echo.close_code) == (CLOSE, code)
        assert await _gone(stack, channel)
        client.abort()


def _user_gone(manager: Any, user: str) -> bool:
    return not manager.get_user_channels(user)


@pytest.mark.parametrize("ending", ["close frame", "connection lost"])
async def test_a_request_sent_with_the_peer_s_close_gets_its_handler_started(socket_stack: Any, ending: str) -> None:
    """A client sends a request to an async handler and ends the connection in the same write
    (``send(); close()``: the close frame, or the connection lost, right behind the message).
    Some libraries hand over the close in the same loop iteration as the message, others in the
    next: on every transport the handler's task starts before the close cancels it (what it
    does before its first wait is done: here a note; the demo's ``tell``)."""
    done: list[Any] = []
    async with socket_stack() as stack:
        manager = stack.manager

        async def note(channel_id: str, data: Any) -> str:
            done.append(data)
            await asyncio.sleep(0.05)
            return "noted"

        manager.add_ws_handler("note", note)
        for n in range(3):
            user = f"noter{n}"
            client = await _user_channel(stack, user)
            request = encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "note", "data": n}}))
            if ending == "close frame":
                client.write(request + encode_frame(CLOSE, close_payload(1000)))
            else:
                client.write(request)
                client.abort()
            await eventually(functools.partial(_user_gone, manager, user), "the channel removed", timeout=10)
            assert done == list(range(n + 1))
            client.abort()


#: Close frames no endpoint may send (RFC 6455 5.5.1, 7.4), and what each is failed with.
_FORBIDDEN_CLOSES: dict[str, tuple[bytes, int]] = {
    **{f"code-{code}": (struct.pack("!H", code), 1002)
       for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)},
    "one-byte": (b"\x03", 1002),
    "reason-not-utf8": (close_payload(1000) + b"\xff", 1007),
}


async def test_a_peer_close_with_a_code_no_endpoint_may_send_fails_with_1002_on_every_transport(
    socket_stack: Any,
) -> None:
    # picows echoed the code (0, 1006, 5000, 65535 went back on the wire) and aiohttp answered
    # 1000 to 1006 and to 5000 and above; websockets and uvicorn fail them with 1002
    # (review16 fz #5). The core is told the code the connection was failed with.
    config = ServerConfig(ping_interval=None)
    async with socket_stack(config=config) as stack:

        async def answer(payload: bytes) -> tuple[int, int | None]:
            client, channel = await open_channel(stack)
            client.send_frame(CLOSE, payload)
            frame = await client.read_frame()
            await _gone(stack, channel)
            client.abort()
            return frame.opcode, frame.close_code

        answers = await asyncio.gather(*(answer(payload) for payload, _ in _FORBIDDEN_CLOSES.values()))
        assert dict(zip(_FORBIDDEN_CLOSES, answers, strict=True)) == {
            name: (CLOSE, code) for name, (_, code) in _FORBIDDEN_CLOSES.items()
        }
        assert dict(stack.manager.counters.close_codes) == {1002: len(_FORBIDDEN_CLOSES) - 1, 1007: 1}


@pytest.mark.parametrize("body", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
                         ids=["content-length", "chunked"])
async def test_an_upgrade_request_that_declares_a_body_is_answered_400_and_let_go_on_every_transport(
    socket_stack: Any, body: tuple[str, str]
) -> None:
    # Under uvicorn, websockets' parser refused it and nothing answered or closed the socket,
    # past every timeout; websockets closed with no answer and aiohttp upgraded it (review16
    # fz #1). Every transport answers 400 and lets the socket go, and still serves.
    config = ServerConfig(ping_interval=None, handshake_timeout=1.0)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        clients = [await HostileClient.open(stack.port) for _ in range(10)]
        for client in clients:
            client.write(handshake_request(TOKEN_PATH, [body]))
        assert [(await client.read_response()).status for client in clients] == [400] * 10
        timeout = config.handshake_timeout + MARGIN
        assert all(await asyncio.gather(*(released(stack.port, client, timeout) for client in clients)))
        for client in clients:
            client.abort()
        assert (await stack.client()).connected
        # The same request without a body (Content-Length: 0 is no body) is served.
        upgrade = await HostileClient.open(stack.port)
        upgrade.write(handshake_request(TOKEN_PATH, [("Content-Length", "0")]))
        assert (await upgrade.read_response()).status == 101
        upgrade.abort()


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_under_uvicorn_a_handshake_the_application_leaves_unanswered_holds_its_slot_until_dropped(
    http: str,
) -> None:
    # A Starlette app with the adapter's lifespan: uvicorn's WebSocket protocol was left
    # unbounded (hook_uvicorn never swapped it in), so a route that neither accepts nor refuses
    # held the socket for ever, and its slot was freed at the upgrade (review16 fz #1). The
    # socket now holds its slot until it is gone, and goes at handshake_timeout.
    pytest.importorskip(http)
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    from dara_ws_asgi import lifespan, websocket_route

    reached = asyncio.Event()

    async def undecided(websocket: WebSocket) -> None:  # reads until the peer is gone
        reached.set()
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    config = ServerConfig(handshake_timeout=1.0, ping_interval=None, max_connections=1)
    endpoint = Endpoint(WebsocketManager(config), token_authenticator(verify_token))
    app = Starlette(routes=[WebSocketRoute("/undecided", undecided), websocket_route(endpoint)],
                    lifespan=lifespan(endpoint))
    async with _uvicorn_serving(app, http) as port:
        waiting = await HostileClient.open(port)
        waiting.write(handshake_request("/undecided"))
        async with asyncio.timeout(5):
            await reached.wait()  # the application has the request
        other = await HostileClient.open(port)
        other.write(handshake_request(TOKEN_PATH))
        assert (await other.read_response()).status == 503  # the one slot is the first socket's
        other.abort()
        assert await waiting.wait_disconnected(config.handshake_timeout + MARGIN)
        waiting.abort()
        served = await HostileClient.open(port)
        served.write(handshake_request(TOKEN_PATH))
        assert (await served.read_response()).status == 101
        # Accepted, the connection is no longer under the handshake's deadline.
        assert not await served.wait_disconnected(2 * config.handshake_timeout)
        served.abort()


@pytest.mark.parametrize("kind", ["pings", "fragments"])
async def test_a_read_of_many_tiny_frames_is_handled_a_share_a_turn_of_the_loop_every_frame_in_order(
    socket_stack: Any, kind: str
) -> None:
    # 256 KiB of empty pings or fragments is some 43,000 frames in one read. Handed to the
    # library's parser at once (in Python for websockets and uvicorn), it held the event loop
    # for one to two seconds a read, every other connection waiting (a bystander's echo took
    # 1 to 2.4 s instead of 5 ms). The server hands on FRAMES_PER_FEED frames a turn of the loop,
    # reading paused until the rest is handled; every frame is still answered, in order.
    async with socket_stack(config=ServerConfig(ping_interval=None, idle_timeout=None)) as stack:
        if stack.transport == "picows":
            # picows parses a read in C and calls back per frame: nothing holds frames back
            # between its parser and the adapter (~260 ms of empty pings a 256 KiB read).
            pytest.skip("picows hands every frame of a read on at once, from its C parser")
        client, _ = await open_channel(stack)
        count = 40 * FRAMES_PER_FEED
        turns = 0
        done = asyncio.Event()

        async def count_turns() -> None:
            nonlocal turns
            for _ in range(10_000_000):  # bounded: the test's timeout ends it long before
                if done.is_set():
                    return
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(count_turns())
        key = b"\0\0\0\0"  # the same frame, count times, in one write
        if kind == "pings":
            flood = encode_frame(PING, b"", mask_key=key) * count
        else:
            flood = (encode_frame(TEXT, '{"type":"ping",', fin=False, mask_key=key)
                     + encode_frame(CONTINUATION, b"", fin=False, mask_key=key) * count
                     + encode_frame(CONTINUATION, '"message":null}', mask_key=key))
        client.write(flood + encode_frame(TEXT, json.dumps({"type": "ping", "message": "last"}), mask_key=key))
        start = turns
        if kind == "pings":
            for _ in range(count):
                frame = await client.read_frame(timeout=30)
                assert (frame.opcode, frame.payload) == (PONG, b"")
        else:  # the fragmented message, whole
            assert json.loads((await client.read_frame(timeout=30)).text) == {"type": "pong", "message": None}
        last = await client.read_frame(timeout=30)
        handled_in = turns - start
        done.set()
        await ticker
        assert last.opcode == TEXT and json.loads(last.text)["type"] == "pong", "every frame handled, in order"
        assert handled_in >= count // FRAMES_PER_FEED, (
            f"{count} frames handled in {handled_in} turns of the loop: more than {FRAMES_PER_FEED} a turn")
        client.abort()


async def test_upgrades_offering_subprotocols_are_served_without_one_and_logged_at_most_rate_limited(
    socket_stack: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    # aiohttp logged a WARNING for each, with the client's whole list (up to a header line's
    # 8 KiB): any peer could write to the log at will, where the other transports write nothing.
    caplog.set_level(logging.WARNING)
    offered = ", ".join(f"protocol-{i}" for i in range(400))
    async with socket_stack(config=ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        for _ in range(100):
            async with await HostileClient.open(stack.port) as client:
                response = await client.handshake(TOKEN_PATH, [("Sec-WebSocket-Protocol", offered)])
                assert response.status == 101 and response.header("Sec-WebSocket-Protocol") is None, response
                assert json.loads((await client.read_frame()).text)["type"] == "init"
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) <= 11, f"{len(records)} records, e.g. {records[0].getMessage()[:200]}"
