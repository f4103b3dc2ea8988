"""What a hostile peer can make the server log (review 9, item 6): on every socket transport,
many connections each bring one kind of bad input (a broken frame, a broken handshake, a bad
message); the records at WARNING and above stay within the rate limits, however many
connections there are. uvicorn logged an ERROR with a traceback for each text frame that was
not UTF-8; the core's per-connection count let a client log once per new connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from dara_ws_core import Authenticator, HandshakeRequest, Identity, ServerConfig, logs

from .hostile import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    TEXT,
    TOKEN_PATH,
    HostileClient,
    close_payload,
    encode_frame,
    handshake_request,
    open_channel,
)
from .stacks import TRANSPORTS, running_stack, verify_token

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
CONNECTIONS = 30  # of each kind: more than every bound below
BURST, RATE = 5, 0.2  # the process-wide budget of peer records, small for the test
FIRST_LOGGED = 11  # the first ten and the 10th's power, of requests the server cannot parse

# Sent once past the handshake: each closes the connection (1002, 1003, 1007, 1009).
FRAMES = {
    "utf8": encode_frame(TEXT, b'{"type":"ping","message":"\xff"}'),
    "binary": encode_frame(BINARY, b"x"),
    "not-json": encode_frame(TEXT, b"nope"),
    "rsv1": encode_frame(TEXT, b"{}", rsv=4),
    "unmasked": encode_frame(TEXT, b"{}", mask=False),
    "long-ping": encode_frame(PING, b"p" * 126),
    "continuation": encode_frame(CONTINUATION, b"x"),
    "close-999": encode_frame(CLOSE, close_payload(999)),
    "close-not-utf8": encode_frame(CLOSE, struct.pack("!H", 1000) + b"\xff"),
    "huge-length": bytes([0x81, 0xFF]) + struct.pack("!Q", 1 << 62),
    "deep": encode_frame(TEXT, b"[" * 100_000),
}
# Sent past the handshake, then a ping: each is dropped and the connection stays.
MESSAGES = {
    "unknown-type": b'{"type":"zzz"}',
    "invalid-field": b'{"type":"ping","message":1,"__rchan":5}',
    "unknown-answer": b'{"type":"message","channel":"nobody","message":1}',
}
# Sent instead of a handshake.
REQUESTS = {
    "unparsable": b"GET /api/core/ws HTTP/1.1\r\nHost\r\n\r\n",
    "bad-token": handshake_request("/api/core/ws?token=bad"),
    "version-8": handshake_request(TOKEN_PATH).replace(b"Version: 13", b"Version: 8"),
    "post": handshake_request(TOKEN_PATH).replace(b"GET", b"POST", 1),
    "tls": bytes.fromhex("160301002a010000260303") + bytes(32),
    "huge-header": b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    "bad-method": b"G\x01T / HTTP/1.1\r\n\r\n",
    "cut-short": handshake_request(TOKEN_PATH)[:30],
}


async def _frame(port: int, frame: bytes) -> None:
    client, _ = await open_channel(port)
    client.write(frame)
    assert await client.read_close() in (1002, 1003, 1007, 1009, None)  # None: closed at once
    client.abort()


async def _message(port: int, text: bytes) -> None:
    client, _ = await open_channel(port)
    client.send_text(text.decode())
    client.send_text(json.dumps({"type": "ping", "message": None}))
    for _ in range(3):  # bounded: the pong comes after what the bad message caused
        if json.loads((await client.read_frame()).text)["type"] == "pong":
            break
    client.abort()


async def _request(port: int, data: bytes) -> None:
    client = await HostileClient.open(port)
    client.write(data)
    if data != REQUESTS["cut-short"]:  # else: the client leaves mid-request
        # A response (a server may keep the connection for the next request), or the
        # connection closed without one, or at the handshake timeout.
        with contextlib.suppress(EOFError):
            await client.read_response(5.0)
    client.abort()


@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_flood_of_bad_input_from_many_connections_logs_within_the_limits(
    transport: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logs, "PEER_RECORDS", logs.PeerRecordBudget(burst=BURST, rate=RATE))
    caplog.set_level(logging.WARNING)
    per_kind: Counter[str] = Counter()
    start = time.monotonic()
    async with running_stack(transport, ServerConfig(ping_interval=None, handshake_timeout=1.0)) as stack:
        assert stack.port is not None
        port = stack.port
        kinds: list[tuple[str, Callable[[int, bytes], Awaitable[None]], bytes]]
        kinds = [(name, _frame, data) for name, data in FRAMES.items()]
        kinds += [(name, _message, data) for name, data in MESSAGES.items()]
        kinds += [(name, _request, data) for name, data in REQUESTS.items()]
        for name, attack, data in kinds:
            before = len(caplog.records)
            await asyncio.gather(*(attack(port, data) for _ in range(CONNECTIONS)))
            per_kind[name] = len(caplog.records) - before
    elapsed = time.monotonic() - start
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # Any kind logged once per connection would be CONNECTIONS records by itself.
    bound = FIRST_LOGGED + BURST + RATE * elapsed
    assert bound < CONNECTIONS
    example = f"{records[0].name}: {records[0].getMessage()}" if records else ""
    assert len(records) <= bound, f"{len(records)} records {dict(+per_kind)}, e.g. {example}"


def _breaks_on(token: str) -> Authenticator:
    """The test stack's authenticator, and a bug of the application's: a verifier that raises
    (not ``AuthenticationFailed``) for one token a peer may send as often as it likes."""

    async def authenticate(request: HandshakeRequest) -> Identity:
        if request.query.get("token") == token:
            raise KeyError("the application's bug")
        return verify_token(request.query.get("token", ""))

    return authenticate


@pytest.mark.parametrize("transport", SOCKETS)
async def test_handshakes_that_make_the_authenticator_fail_log_within_the_application_budget(
    transport: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Each is refused (403): a bug must never let anyone in. Its traceback is written at least
    # once, then within the budget of application failures, however many handshakes hit it.
    budget = logs.PeerRecordBudget(burst=BURST, rate=RATE)
    monkeypatch.setattr(logs, "APP_RECORDS", budget)
    monkeypatch.setattr(logs, "FIRST_FAILURES", logs.FirstFailures())
    caplog.set_level(logging.WARNING)
    start = time.monotonic()
    async with running_stack(transport, ServerConfig(ping_interval=None),
                             authenticator=_breaks_on("boom")) as stack:
        assert stack.port is not None
        port = stack.port

        async def handshake() -> None:
            async with await HostileClient.open(port) as client:
                response = await client.handshake("/api/core/ws?token=boom")
                assert response.status == 403, response

        await asyncio.gather(*(handshake() for _ in range(CONNECTIONS)))
    elapsed = time.monotonic() - start
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert records and records[0].exc_info is not None  # the first, with its traceback
    bound = 1 + BURST + RATE * elapsed
    assert bound < CONNECTIONS
    assert len(records) <= bound, f"{len(records)} records, e.g. {records[-1].getMessage()}"
