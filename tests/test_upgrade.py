"""The one check of an opening request every transport answers with (dara_ws_core.upgrade): pure,
without a socket or an event loop. The same requests on real sockets, on every transport, are in
tests/transports/test_upgrade_requests.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core.transport import RequestHead
from dara_ws_core.upgrade import (
    MAX_HEADER_LINE,
    MAX_HEADERS,
    UNPARSABLE,
    Refusal,
    check_upgrade_request,
    parse_request_line,
    refusal_of_request_line,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's
VALID = [("Host", "127.0.0.1"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
         ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]


def without(name: str) -> list[tuple[str, str]]:
    return [(k, v) for k, v in VALID if k != name]


def replaced(name: str, *values: str) -> list[tuple[str, str]]:
    return without(name) + [(name, value) for value in values]


def status(method: str = "GET", version: str = "1.1", headers: list[tuple[str, str]] = VALID) -> int | None:
    refusal = check_upgrade_request(method, version, headers)
    return None if refusal is None else refusal.status


def test_a_valid_upgrade_request_is_served_whatever_the_case_and_blanks_of_its_headers() -> None:
    assert status() is None
    assert status(version="HTTP/1.1") is None
    assert status(headers=[(k.upper(), f" {v}\t") for k, v in VALID]) is None
    assert status(headers=replaced("Upgrade", "WebSocket")) is None
    assert status(headers=replaced("Connection", "keep-alive, Upgrade")) is None
    assert status(headers=replaced("Connection", "keep-alive", "upgrade")) is None
    assert status(headers=[*VALID, ("Content-Length", "0")]) is None
    assert status(headers=[*VALID, ("X-Other", "x" * 4000)] * 1) is None


@pytest.mark.parametrize(
    ("method", "version", "headers", "expected"),
    [
        ("HEAD", "1.1", VALID, 405),
        ("POST", "1.1", VALID, 405),
        ("get", "1.1", VALID, 405),  # methods are case-sensitive (RFC 9110 9.1)
        ("GET", "1.0", VALID, 505),
        ("GET", "2.0", VALID, 505),
        ("GET", "HTTP/1.2", VALID, 505),
        ("GET", "1.1", [*VALID, ("Sec-WebSocket-Key", KEY)], 400),  # two keys, even the same
        ("GET", "1.1", replaced("Sec-WebSocket-Key", "AAAA"), 400),
        ("GET", "1.1", replaced("Sec-WebSocket-Key", "not base64 at all!!!!!!="), 400),
        ("GET", "1.1", replaced("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAAAAAAA="), 400),  # 20 bytes
        ("GET", "1.1", without("Sec-WebSocket-Key"), 400),
        ("GET", "1.1", replaced("Sec-WebSocket-Version", "8"), 426),
        ("GET", "1.1", replaced("Sec-WebSocket-Version", "13", "13"), 426),
        ("GET", "1.1", replaced("Sec-WebSocket-Version", "13, 8"), 426),
        ("GET", "1.1", without("Sec-WebSocket-Version"), 426),
        ("GET", "1.1", [*VALID, ("Host", "example.com")], 400),
        ("GET", "1.1", without("Host"), 400),
        ("GET", "1.1", without("Upgrade"), 426),
        ("GET", "1.1", replaced("Upgrade", "h2c"), 426),
        ("GET", "1.1", replaced("Upgrade", "websocket", "websocket"), 426),
        ("GET", "1.1", replaced("Upgrade", "websocket, h2c"), 426),
        ("GET", "1.1", without("Connection"), 426),
        ("GET", "1.1", replaced("Connection", "keep-alive"), 426),
        ("GET", "1.1", [*VALID, ("Content-Length", "5")], 400),
        ("GET", "1.1", [*VALID, ("Transfer-Encoding", "chunked")], 400),
        ("GET", "1.1", [*VALID, ("Content-Length", "0"), ("Content-Length", "0")], 400),
        ("GET", "1.1", [*VALID, ("X-Big", "a" * MAX_HEADER_LINE)], 431),
        ("GET", "1.1", VALID + [("X-H", "v")] * (MAX_HEADERS - len(VALID) + 1), 431),
    ],
    ids=["HEAD", "POST", "lower-case-get", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "two-keys", "short-key",
         "key-not-base64", "key-of-20-bytes", "no-key", "version-8", "two-versions", "version-list",
         "no-version", "two-hosts", "no-host", "no-upgrade", "upgrade-h2c", "two-upgrades",
         "two-upgrade-tokens", "no-connection", "connection-keep-alive", "content-length",
         "chunked", "two-content-lengths", "header-line-too-long", "too-many-headers"],
)
def test_each_fault_gets_its_status(method: str, version: str, headers: list[tuple[str, str]], expected: int) -> None:
    assert status(method, version, headers) == expected


def test_the_limits_are_websockets_own_and_a_line_at_the_limit_passes() -> None:
    at_limit = ("X-Big", "a" * (MAX_HEADER_LINE - len("X-Big: ")))
    assert status(headers=[*VALID, at_limit]) is None
    assert status(headers=VALID + [("X-H", "v")] * (MAX_HEADERS - len(VALID))) is None


def test_the_first_failing_check_decides() -> None:
    # The order is that of websockets' parser, which refuses some of these before any adapter
    # sees the request: the request line (version), the headers' size, a body; then the rest.
    assert status("POST", "1.0", without("Host")) == 505
    assert status("POST", "1.1", [*VALID, ("Content-Length", "5")]) == 400
    assert status("HEAD", "1.1", without("Host")) == 405
    assert status("GET", "1.1", [*without("Host"), ("Upgrade", "h2c")]) == 400
    assert status("GET", "1.1", [*replaced("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Key", "AAAA")]) == 426
    long_line = [*VALID, ("X-Big", "a" * MAX_HEADER_LINE), ("Content-Length", "5")]
    assert status("GET", "1.1", long_line) == 431


def test_every_refusal_carries_the_headers_its_status_asks_for() -> None:
    def headers(method: str = "GET", version: str = "1.1", hdrs: list[tuple[str, str]] = VALID) -> dict[str, str]:
        refusal = check_upgrade_request(method, version, hdrs)
        assert refusal is not None
        return dict(refusal.headers)

    assert headers("HEAD") == {"Allow": "GET"}  # RFC 9110 15.5.6
    both = {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"}  # RFC 9110 15.5.22, RFC 6455 4.4
    assert headers(hdrs=without("Upgrade")) == both
    assert headers(hdrs=replaced("Sec-WebSocket-Version", "8")) == both


def test_a_refusal_encodes_as_a_whole_response_that_closes() -> None:
    refusal = Refusal(405, "Method Not Allowed", (("Allow", "GET"),), "a WebSocket upgrade is a GET")
    head, _, body = refusal.encode().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 405 Method Not Allowed"
    assert "Allow: GET" in lines and "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert body == refusal.text.encode() == b"Method Not Allowed: a WebSocket upgrade is a GET\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("GET /api/core/ws?token=a HTTP/1.1", ("GET", "/api/core/ws?token=a", "1.1")),
        ("HEAD / HTTP/1.0", ("HEAD", "/", "1.0")),
        ("GET / HTTP/2.0", ("GET", "/", "2.0")),
        ("GET / HTTP/1.10", None),
        ("GET / http/1.1", None),
        ("GET http://example.com/ HTTP/1.1", None),  # the absolute form: no upgrade uses it
        ("GET /", None),
        ("GARBAGE", None),
        ("", None),
        (" / HTTP/1.1", None),
        ("\x16\x03\x01 hello", None),
    ],
)
def test_a_request_line_is_parsed_strictly(line: str, expected: tuple[str, str, str] | None) -> None:
    assert parse_request_line(line) == expected


def test_a_request_a_library_refused_unread_gets_505_for_another_version_else_400() -> None:
    assert refusal_of_request_line("GET / HTTP/1.2").status == 505
    assert refusal_of_request_line("GET / HTTP/1.0").status == 505
    assert refusal_of_request_line("GET / HTTP/1.1") is UNPARSABLE  # refused for something else
    assert refusal_of_request_line("\x16\x03\x01") is UNPARSABLE
    assert UNPARSABLE.status == 400


@given(st.lists(st.integers(1, 40), min_size=1, max_size=50))
def test_the_request_head_keeps_the_request_line_however_reads_cut_it(sizes: list[int]) -> None:
    head = RequestHead()
    stream = b"GET /api/core/ws HTTP/1.0\r\nHost: a\r\n\r\n\x81\x80frame"
    start = 0
    for size in sizes * 60:  # the read sizes, over and over until the stream is read
        if start >= len(stream):
            break
        head.feed(stream[start:start + size])
        start += size
    assert head.line.text == "GET /api/core/ws HTTP/1.0" and head.line.ended
    assert bytes(head.behind) == b"\x81\x80frame"


def test_a_crlf_cut_between_two_reads_ends_the_request_line() -> None:
    head = RequestHead()
    for part in (b"GET / HTTP/1.1\r", b"\nHost: a\r\n\r\n"):
        head.feed(part)
    assert head.line.text == "GET / HTTP/1.1" and head.line.ended


def test_the_request_head_keeps_at_most_a_header_line_of_an_endless_request_line() -> None:
    head = RequestHead()
    for _ in range(10):
        head.feed(b"G" * 4096)
    assert len(head.line.line) == MAX_HEADER_LINE and head.line.ended
    head.feed(b"\r\n\r\n")
    assert len(head.line.line) == MAX_HEADER_LINE and head.ended


_TOKEN = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-"), min_size=1, max_size=12)


@given(st.lists(st.tuples(_TOKEN, st.text(max_size=30)), max_size=20))
def test_headers_the_check_does_not_read_never_change_its_answer(extra: list[tuple[str, str]]) -> None:
    read = {"host", "upgrade", "connection", "sec-websocket-version", "sec-websocket-key", "content-length",
            "transfer-encoding"}
    others = [(name, value) for name, value in extra if name.lower() not in read]
    assert check_upgrade_request("GET", "1.1", VALID + others) is None
    assert status("GET", "1.1", without("Host") + others) == 400


@given(st.text(max_size=10), st.text(max_size=10),
       st.lists(st.tuples(st.text(max_size=30), st.text(max_size=60)), max_size=140))
def test_the_check_answers_anything_without_raising(method: str, version: str, headers: list[tuple[str, str]]) -> None:
    refusal = check_upgrade_request(method, version, headers)
    assert refusal is None or refusal.status in {400, 405, 426, 431, 505}
