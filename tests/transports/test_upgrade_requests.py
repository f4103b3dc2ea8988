"""One upgrade request, one answer, on every socket transport (review16 #5): raw bytes over real
sockets on 127.0.0.1 against websockets, aiohttp, ASGI under uvicorn and picows, each of which
used to refuse (or upgrade) its own set of bad requests with its own statuses. Every one now
answers what dara_ws_core.upgrade.check_upgrade_request says (tests/test_upgrade.py tests the
check alone), and lets the socket go."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from dara_ws_core import Endpoint, HandshakeRequest, Identity, ServerConfig, WebsocketManager, token_authenticator
from dara_ws_core.upgrade import MAX_HEADER_LINE, check_upgrade_request, loose_line_ends, parse_request_line
from tests.hostile import HostileClient, handshake_request
from tests.stacks import TRANSPORTS, Stack, running_stack, served_port, verify_token

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
PATH = "/api/core/ws?token=mallory:s1"
VALID = handshake_request(PATH)
ELSEWHERE = handshake_request("/elsewhere")
KEY = base64.b64encode(b"0123456789abcdef").decode()
HANDSHAKE_TIMEOUT = 2.0


def lines_of(request: bytes) -> list[bytes]:
    return request.removesuffix(b"\r\n\r\n").split(b"\r\n")


def request_of(lines: list[bytes]) -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n"


def without(name: bytes, request: bytes = VALID) -> bytes:
    return request_of([line for line in lines_of(request) if not line.lower().startswith(name.lower() + b":")])


def plus(*lines: bytes, request: bytes = VALID) -> bytes:
    return request_of([*lines_of(request), *lines])


#: Each case: the request's bytes and the status every transport answers it with (101: upgraded).
CASES: dict[str, tuple[bytes, int]] = {
    "valid": (VALID, 101),
    "HEAD": (VALID.replace(b"GET ", b"HEAD ", 1), 405),
    "POST": (VALID.replace(b"GET ", b"POST ", 1), 405),
    "HTTP/1.0": (VALID.replace(b" HTTP/1.1", b" HTTP/1.0", 1), 505),
    "HTTP/2.0": (VALID.replace(b" HTTP/1.1", b" HTTP/2.0", 1), 505),
    "HTTP/1.2": (VALID.replace(b" HTTP/1.1", b" HTTP/1.2", 1), 505),  # no parser of websockets' nor aiohttp's
    "lower-case-get": (VALID.replace(b"GET ", b"get ", 1), 405),  # a method, not one aiohttp's parser reads
    "no-version": (VALID.replace(b" HTTP/1.1", b"", 1), 400),  # HTTP/0.9 to aiohttp's parser
    "two-spaces": (VALID.replace(b"GET ", b"GET  ", 1), 400),  # aiohttp's parser takes it
    "duplicate-key": (plus(f"Sec-WebSocket-Key: {KEY}".encode()), 400),
    "key-of-3-bytes": (handshake_request(PATH, key="AAAA"), 400),
    "no-key": (without(b"Sec-WebSocket-Key"), 400),
    "version-8": (VALID.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 426),
    "duplicate-version": (plus(b"Sec-WebSocket-Version: 13"), 426),
    "two-hosts": (plus(b"Host: example.com"), 400),
    "no-host": (without(b"Host"), 400),
    "no-upgrade": (without(b"Upgrade"), 426),
    "duplicate-upgrade": (plus(b"Upgrade: websocket"), 426),
    "connection-keep-alive": (VALID.replace(b"Connection: Upgrade", b"Connection: keep-alive"), 426),
    # What Firefox sends (picows answered it 400), and the same in other cases and orders.
    "connection-keep-alive-upgrade": (VALID.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"), 101),
    "connection-upgrade-keep-alive": (VALID.replace(b"Connection: Upgrade", b"Connection: upgrade , Keep-Alive"), 101),
    "upgrade-in-capitals": (VALID.replace(b"Upgrade: websocket", b"Upgrade: WebSocket"), 101),
    # Upgrade is one value, as aiohttp (400) and uvicorn (plain HTTP: 404) read it, where
    # websockets and picows upgraded a list.
    # Line ends other than CRLF, and folded lines: 400 from every parser but h11, which took them
    # (uvicorn upgraded them; picows read a bare LF as part of a header's value).
    "folded-header": (plus(b"X-A: a", b" folded"), 400),
    "folded-header-with-a-tab": (plus(b"X-A: a", b"\tfolded"), 400),
    "a-line-ended-by-lf": (VALID.replace(b"Upgrade: websocket\r\n", b"Upgrade: websocket\n"), 400),
    "a-line-ended-by-cr": (VALID.replace(b"Upgrade: websocket\r\n", b"Upgrade: websocket\r"), 400),
    "every-line-ended-by-lf": (VALID.replace(b"\r\n", b"\n"), 400),
    "upgrade-list-with-an-empty-element": (VALID.replace(b"Upgrade: websocket", b"Upgrade: websocket,"), 426),
    # Every Connection header counts: uvicorn read only the last (404).
    "upgrade-token-in-the-first-of-two-connections": (plus(b"Connection: keep-alive"), 101),
    "upgrade-token-in-the-last-of-two-connections": (
        VALID.replace(b"Connection: Upgrade", b"Connection: keep-alive\r\nConnection: Upgrade"), 101),
    # An upgrade has no body to wait for: aiohttp answered 100 first, and 417 to another value.
    "expect-100-continue": (plus(b"Expect: 100-continue"), 101),
    "expect-another": (plus(b"Expect: something"), 101),
    "body": (plus(b"Content-Length: 5"), 400),
    "garbage-request-line": (b"\x16\x03\x01\x02\x00 garbage\r\n\r\n", 400),
    "header-line-too-long": (plus(b"X-Big: " + b"a" * 20_000), 431),
    "header-line-of-9-kib": (plus(b"X-Big: " + b"a" * 9000), 431),  # under picows' 16 KiB head
    "header-line-of-64-kib": (plus(b"X-Big: " + b"a" * 65536), 431),
    "too-many-headers": (plus(*(f"X-H{i}: v".encode() for i in range(300))), 431),
    # The check comes before the target on every transport: aiohttp's router answered these 404
    # first, and uvicorn the one without Upgrade (a plain request for the ASGI app).
    "POST-elsewhere": (ELSEWHERE.replace(b"GET ", b"POST ", 1), 405),
    "HEAD-elsewhere": (ELSEWHERE.replace(b"GET ", b"HEAD ", 1), 405),
    "HTTP/1.0-elsewhere": (ELSEWHERE.replace(b" HTTP/1.1", b" HTTP/1.0", 1), 505),
    "no-upgrade-elsewhere": (without(b"Upgrade", ELSEWHERE), 426),
    "no-upgrade-%2F": (without(b"Upgrade", handshake_request("/api%2Fcore%2Fws")), 426),
    # No subprotocol is chosen: a list of tokens is served, anything else is 400, as websockets'
    # parser answers it (aiohttp and picows upgraded it).
    "protocols": (plus(b"Sec-WebSocket-Protocol: chat, , v2.json", b"Sec-WebSocket-Protocol: x"), 101),
    "protocol-not-tokens": (plus(b'Sec-WebSocket-Protocol: a b,,"c"'), 400),
    "protocol-empty": (plus(b"Sec-WebSocket-Protocol: "), 400),
    "second-protocol-not-a-token": (plus(b"Sec-WebSocket-Protocol: chat", b"Sec-WebSocket-Protocol: a/b"), 400),
}


@dataclass(frozen=True)
class Outcome:
    """What a server did with one request: its status (``None``: it closed without one), and
    whether it let the socket go after a refusal."""

    status: int | None
    closed: bool

    @property
    def kind(self) -> str:
        if self.status is None:
            return "close"
        return "upgraded" if self.status == 101 else "refused"


async def outcome(port: int, request: bytes) -> Outcome:
    client = await HostileClient.open(port)
    try:
        client.write(request)
        try:
            response = await client.read_response(timeout=5.0)
        except EOFError:
            return Outcome(None, True)
        if response.status == 101:
            return Outcome(101, False)
        return Outcome(response.status, await client.wait_disconnected(HANDSHAKE_TIMEOUT + 4.0))
    finally:
        client.abort()


def expected(request: bytes, transport: str = "") -> int | None:
    """What the check says of ``request``: 101, the refusal's status, or ``None`` for a request
    whose first line is no HTTP request line, or whose head has a bare CR or LF or a folded line
    (400 then close, or a close). Under uvicorn, h11
    merges equal ``Content-Length`` headers into one (RFC 9112 6.3 allows it) before anything
    else sees them: there, the check gets one."""
    raw = request.split(b"\r\n\r\n", 1)[0]
    head = raw.decode("latin-1").split("\r\n")
    parsed = parse_request_line(head[0])
    if parsed is None or loose_line_ends(raw):
        return None
    headers = [(name, value.strip()) for name, _, value in (line.partition(":") for line in head[1:])]
    if transport == "asgi":
        lengths = [value for name, value in headers if name.lower() == "content-length"]
        if len(lengths) > 1 and len(set(lengths)) == 1:
            headers = [h for h in headers if h[0].lower() != "content-length"] + [("Content-Length", lengths[0])]
    refusal = check_upgrade_request(parsed[0], parsed[2], headers)
    return 101 if refusal is None else refusal.status


@pytest.fixture(params=SOCKETS)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    # A short handshake_timeout: aiohttp lets a socket go only after it (a refused request's
    # unsent body, a kept-alive connection after its router's 405).
    config = ServerConfig(ping_interval=None, handshake_timeout=HANDSHAKE_TIMEOUT)
    async with running_stack(str(request.param), config) as stack:
        yield stack


async def test_every_transport_answers_each_bad_upgrade_request_with_the_same_status(served: Stack) -> None:
    assert served.port is not None
    seen = {name: await outcome(served.port, request) for name, (request, _) in CASES.items()}
    assert {name: o.status for name, o in seen.items()} == {name: status for name, (_, status) in CASES.items()}
    # And lets go of every refused socket (the garbage one too: 400, then close).
    assert [name for name, o in seen.items() if o.status != 101 and not o.closed] == []
    # Which is what the check says of each (a garbage request line: nothing, 400 by every parser).
    assert {name: expected(request) or 400 for name, (request, _) in CASES.items()} == {
        name: status for name, (_, status) in CASES.items()}
    assert (await served.client()).connected  # and it still serves


async def test_under_uvicorn_with_httptools_the_upgrade_headers_are_read_as_on_every_transport() -> None:
    # The stacks above run uvicorn with h11; its default parser when installed is httptools.
    config = ServerConfig(ping_interval=None, handshake_timeout=HANDSHAKE_TIMEOUT)
    names = ["valid", "upgrade-list-with-an-empty-element", "upgrade-token-in-the-first-of-two-connections",
             "upgrade-token-in-the-last-of-two-connections", "connection-keep-alive-upgrade", "folded-header",
             "every-line-ended-by-lf"]
    async with served_port("asgi-httptools", config) as port:
        assert {name: (await outcome(port, CASES[name][0])).status for name in names} == {
            name: CASES[name][1] for name in names}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_under_aiohttp_the_request_line_is_read_on_either_event_loop(loop: str) -> None:
    # aiohttp's protocol was given the class that reads the request line in its connection_made:
    # uvloop's transport had taken its data_received already, so on uvloop no line was read
    # (HTTP/1.2 got aiohttp's 400, "GET  /path" was upgraded).
    names = ["valid", "HTTP/1.2", "lower-case-get", "two-spaces", "header-line-of-9-kib", "body"]

    async def statuses() -> dict[str, int | None]:
        config = ServerConfig(ping_interval=None, handshake_timeout=HANDSHAKE_TIMEOUT)
        async with running_stack("aiohttp", config) as stack:
            assert stack.port is not None
            return {name: (await outcome(stack.port, CASES[name][0])).status for name in names}

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        seen = uvloop.run(statuses())
    else:
        seen = asyncio.run(statuses())
    assert seen == {name: CASES[name][1] for name in names}


# ---------------------------------------------------------------------------- mutations

_VALUES: dict[bytes, list[bytes]] = {
    b"Host": [b"127.0.0.1", b"example.com:8080", b""],
    b"Upgrade": [b"websocket", b"WebSocket", b"h2c", b"websocket, h2c", b""],
    b"Connection": [b"Upgrade", b"keep-alive", b"keep-alive, Upgrade", b"close", b""],
    b"Sec-WebSocket-Key": [KEY.encode(), b"AAAA", b"!!!!!!!!!!!!!!!!!!!!!!==", base64.b64encode(b"x" * 20), b""],
    b"Sec-WebSocket-Version": [b"13", b"8", b"13, 8", b"14", b""],
}


def _mutate(rng: random.Random, request: bytes) -> bytes:
    lines = lines_of(request)
    first, headers = lines[0], lines[1:]
    match rng.randrange(7):
        case 0:
            method = rng.choice([b"GET", b"HEAD", b"POST", b"OPTIONS", b"get"])
            first = method + b" " + first.partition(b" ")[2]
        case 1:
            version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2"])
            first = first.rpartition(b" ")[0] + b" " + version
        case 2 if headers:
            del headers[rng.randrange(len(headers))]
        case 3 if headers:
            headers.insert(rng.randrange(len(headers) + 1), rng.choice(headers))
        case 4:
            name = rng.choice(list(_VALUES))
            headers = [line for line in headers if not line.lower().startswith(name.lower() + b":")]
            headers.insert(rng.randrange(len(headers) + 1), name + b": " + rng.choice(_VALUES[name]))
        case 5:
            headers.append(rng.choice([b"Content-Length: 0", b"Content-Length: 3", b"Transfer-Encoding: chunked",
                                       b"X-Big: " + b"a" * MAX_HEADER_LINE, b"X-Other: 1"]))
        case _:
            first = rng.choice([b"GARBAGE", b"GET", b"GET /api/core/ws", first.replace(b" ", b"  ", 1)])
    return request_of([first, *headers])


def mutations(count: int, seed: int) -> list[bytes]:
    """``count`` requests, each a valid upgrade request mutated one to three times (seeded: the
    same list for every transport, and on every run)."""
    rng = random.Random(seed)
    found = []
    for _ in range(count):
        request = VALID
        for _ in range(rng.randint(1, 3)):
            request = _mutate(rng, request)
        found.append(request)
    return found


MUTATIONS = mutations(60, seed=6455)


def test_the_mutations_reach_every_kind_of_answer() -> None:
    kinds = [expected(request) for request in MUTATIONS]
    assert {101, 400, 405, 426, 505, None} <= set(kinds), kinds


async def test_two_equal_content_lengths_are_refused_but_where_h11_merged_them_first(served: Stack) -> None:
    # RFC 9112 6.3 lets a server refuse them or take them as one: websockets' parser takes them,
    # aiohttp's and picows' refuse them, and so does the check (400); under uvicorn, h11 merges
    # them into one before the adapter sees the request, which declares no body then.
    assert served.port is not None
    got = await outcome(served.port, plus(b"Content-Length: 0", b"Content-Length: 0"))
    assert got.status == (101 if served.transport == "asgi" else 400)


async def test_every_transport_answers_mutated_upgrade_requests_as_the_check_says(served: Stack) -> None:
    assert served.port is not None
    port = served.port
    wrong: list[tuple[bytes, int | None, Outcome]] = []
    for request in MUTATIONS:
        want = expected(request, served.transport)
        got = await outcome(port, request)
        # An unparsable request: "refused" (400) or "close", as its parser does; else the
        # check's answer, upgraded or refused (the status may be a parser's own: h11,
        # aiohttp's and websockets' parsers each refuse a few requests before any check).
        kind = "upgraded" if want == 101 else "refused"
        if (got.kind not in ("refused", "close")) if want is None else (got.kind != kind):
            wrong.append((request, want, got))
    assert wrong == []


async def test_a_bad_upgrade_request_costs_no_handler_nor_authentication(served: Stack) -> None:
    assert served.port is not None
    calls: list[HandshakeRequest] = []
    authenticate = served.endpoint.authenticate

    async def counted(request: HandshakeRequest) -> Identity:
        calls.append(request)
        return await authenticate(request)

    served.endpoint.authenticate = counted  # type: ignore[method-assign]
    bad = [request for name, (request, status) in CASES.items() if status != 101]
    await asyncio.gather(*(outcome(served.port, request) for request in bad))
    assert calls == []
    assert not served.manager.handlers


async def test_under_aiohttp_an_upgraded_connection_reads_through_aiohttps_own_protocol() -> None:
    # serve() gives each socket a protocol of its own class until its request is parsed (to
    # answer what aiohttp's parser refuses as the other transports do); an upgraded connection
    # then reads through aiohttp's, with no call more per read (its class only answers a peer's
    # end of stream, see test_pipelined_frames).
    from aiohttp.web_protocol import RequestHandler

    from dara_ws_aiohttp import serve

    endpoint = Endpoint(WebsocketManager(ServerConfig(ping_interval=None)), token_authenticator(verify_token))
    async with serve(endpoint, "127.0.0.1", 0) as server, await HostileClient.open(server.port) as client:
        assert (await client.handshake(PATH)).status == 101
        assert server.native.server is not None
        assert [type(handler).data_received for handler in server.native.server.connections] == [
            RequestHandler.data_received]
