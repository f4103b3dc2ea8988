"""The one check of an opening request every transport answers with (dara_ws_core.upgrade), and
the one rule for what its target names: pure, without a socket or an event loop. The same
requests on real sockets, on every transport, are in tests/transports/test_upgrade_requests.py
and tests/transports/test_request_targets.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dara_ws_core.transport import HandshakeRequest, RequestHead
from dara_ws_core.upgrade import (
    MAX_HEADER_LINE,
    MAX_HEADERS,
    NOT_FOUND,
    UNPARSABLE,
    Refusal,
    Target,
    check_target,
    check_upgrade_request,
    loose_line_ends,
    normalize_path,
    parse_request_line,
    read_target,
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
        ("GET", "1.1", replaced("Upgrade", "websocket,"), 426),
        ("GET", "1.1", without("Connection"), 426),
        ("GET", "1.1", replaced("Connection", "keep-alive"), 426),
        ("GET", "1.1", [*VALID, ("Content-Length", "5")], 400),
        ("GET", "1.1", [*VALID, ("Transfer-Encoding", "chunked")], 400),
        ("GET", "1.1", [*VALID, ("Content-Length", "0"), ("Content-Length", "0")], 400),
        ("GET", "1.1", [*VALID, ("X-Big", "a" * MAX_HEADER_LINE)], 431),
        ("GET", "1.1", VALID + [("X-H", "v")] * (MAX_HEADERS - len(VALID) + 1), 431),
        ("GET", "1.1", [*VALID, ("Sec-WebSocket-Protocol", 'a b,,"c"')], 400),
        ("GET", "1.1", [*VALID, ("Sec-WebSocket-Protocol", "")], 400),
        ("GET", "1.1", [*VALID, ("Sec-WebSocket-Protocol", " , ,")], 400),
        ("GET", "1.1", [*VALID, ("Sec-WebSocket-Protocol", "chat"), ("Sec-WebSocket-Protocol", "a/b")], 400),
    ],
    ids=["HEAD", "POST", "lower-case-get", "HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "two-keys", "short-key",
         "key-not-base64", "key-of-20-bytes", "no-key", "version-8", "two-versions", "version-list",
         "no-version", "two-hosts", "no-host", "no-upgrade", "upgrade-h2c", "two-upgrades",
         "two-upgrade-tokens", "upgrade-list", "no-connection", "connection-keep-alive", "content-length",
         "chunked", "two-content-lengths", "header-line-too-long", "too-many-headers",
         "protocol-not-tokens", "protocol-empty", "protocol-only-commas", "second-protocol-not-a-token"],
)
def test_each_fault_gets_its_status(method: str, version: str, headers: list[tuple[str, str]], expected: int) -> None:
    assert status(method, version, headers) == expected


@pytest.mark.parametrize("protocols", [["chat"], ["chat, superchat"], [",chat ,\t, v2.json,"], ["a", "b, c"],
                                       [", ".join(f"p{i}" for i in range(1000))]])
def test_a_list_of_subprotocols_websockets_parser_takes_is_served_without_one(protocols: list[str]) -> None:
    assert status(headers=[*VALID, *(("Sec-WebSocket-Protocol", value) for value in protocols)]) is None


@pytest.mark.parametrize(("head", "loose"), [
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: b", False),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n", False),
    (b"GET / HTTP/1.1\nHost: a", True),
    (b"GET / HTTP/1.1\r\nHost: a\rX: b", True),
    (b"GET / HTTP/1.1\r\nX: a\r\n b", True),
    (b"GET / HTTP/1.1\r\nX: a\r\n\tb", True),
    (b"GET / HTTP/1.1\r\nX: a b\t c", False),  # blanks inside a value are no fold
])
def test_a_head_is_loose_with_a_bare_cr_or_lf_or_a_folded_line(head: bytes, loose: bool) -> None:
    assert loose_line_ends(head) is loose


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
        ("GET http://example.com/ HTTP/1.1", ("GET", "http://example.com/", "1.1")),  # check_target reads it
        ("GET * HTTP/1.1", ("GET", "*", "1.1")),  # and refuses this one (400)
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
            "transfer-encoding", "sec-websocket-protocol"}
    others = [(name, value) for name, value in extra if name.lower() not in read]
    assert check_upgrade_request("GET", "1.1", VALID + others) is None
    assert status("GET", "1.1", without("Host") + others) == 400


@given(st.text(max_size=10), st.text(max_size=10),
       st.lists(st.tuples(st.text(max_size=30), st.text(max_size=60)), max_size=140))
def test_the_check_answers_anything_without_raising(method: str, version: str, headers: list[tuple[str, str]]) -> None:
    refusal = check_upgrade_request(method, version, headers)
    assert refusal is None or refusal.status in {400, 405, 426, 431, 505}


# ---------------------------------------------------------------------------- the request target

ENDPOINT = "/api/core/ws"

#: Each case: a request target and what check_target answers it for ENDPOINT (None: it is the
#: endpoint's). The same table runs on real sockets in tests/transports/test_request_targets.py.
TARGETS: dict[str, int | None] = {
    "/api/core/ws": None,
    "/api/core/ws?token=a%20b&x=%zz": None,  # the query is the application's
    "/api/core/ws?": None,
    # RFC 3986 6.2.2.2: a percent-encoded unreserved character is the character, in either case.
    "/api/core/%77s": None,
    "/api/core/%77%73": None,
    "/%61pi/co%72e/w%73": None,
    "/api/core/w%73": None,
    "/api/core/%57s": 404,  # %57 is "W": the path is case-sensitive
    "/api%2Dx": 404,  # "-", decoded, names /api-x
    # Any other percent-encoding stays distinct from its character (6.2.2.1: whatever the case).
    "/api%2Fcore%2Fws": 404,
    "/api%2fcore%2fws": 404,
    "/api/core/ws%3F": 404,
    "/api/core/ws%3Ftoken=a": 404,
    "/api/core/w%2573": 404,
    "/api/core/ws%00": 404,
    # Malformed percent-encodings (RFC 3986 2.1).
    "/api/core/%7Ws": 400,
    "/api/core/ws%": 400,
    "/api/core/ws%4": 400,
    "/api/core/%zz/../ws": 400,
    # Dot-segments are not removed, empty segments not merged, nor the case folded.
    "/api/core/../core/ws": 404,
    "/api/core/./ws": 404,
    "/x/../api/core/ws": 404,
    "/../api/core/ws": 404,
    "/api/core/%2E%2E/core/ws": 404,
    "/api/core/%2e/ws": 404,
    "//api/core/ws": 404,
    "/api//core/ws": 404,
    "/api/core/ws/": 404,
    "/API/core/ws": 404,
    "/api/core/ws;x": 404,
    # The absolute form, which a server MUST accept (RFC 9112 3.2.2), with any host.
    "http://127.0.0.1:8000/api/core/ws": None,
    "HTTP://127.0.0.1:8000/api/core/ws?token=a": None,
    "ws://127.0.0.1:8000/api/core/ws": None,
    "wss://example.com/api/core/%77s": None,
    "https://example.com/api/core/ws": None,
    "http://example.com": 404,  # the path "/"
    "http://example.com?x=1": 404,
    "http://example.com/api%2Fcore%2Fws": 404,
    "ftp://example.com/api/core/ws": 400,
    "http:/api/core/ws": 400,
    "http:///api/core/ws": 400,
    "http://user@example.com/api/core/ws": 400,
    # The forms of CONNECT and OPTIONS, and no form at all.
    "127.0.0.1:8000": 400,
    "*": 400,
    "api/core/ws": 400,
    # Octets no target holds (RFC 9112 3.2), and a fragment.
    "/api/core/ws#top": 400,
    "/api/core/ws?token=a#top": 400,
    "/api/core/ws\x7f": 400,
    "/api/core/ws\x00": 400,
    "/api/core/w\xe9s": 400,
    "/api/core/ws\t": 400,
}


@pytest.mark.parametrize(("target", "expected"), list(TARGETS.items()))
def test_a_request_target_names_the_endpoints_path_only_once_normalized(target: str, expected: int | None) -> None:
    refusal = check_target(target, ENDPOINT)
    assert (None if refusal is None else refusal.status) == expected
    if expected == 404:
        assert refusal is NOT_FOUND
    read = read_target(target)
    # A 400 is a target that names no path; anything else names one, to compare.
    assert isinstance(read, Refusal) == (expected == 400)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/core/ws", "/api/core/ws"),
        ("/api/core/%77s", "/api/core/ws"),
        ("/%41%5a%61%7A%30%39%2D%2E%5F%7E", "/AZaz09-._~"),  # every unreserved kind
        ("/a%2fb%2Fc", "/a%2Fb%2Fc"),
        ("/%3f%25%20%c3%a9", "/%3F%25%20%C3%A9"),
        ("/%zz", None),
        ("/%4", None),
        ("/%", None),
        ("/%%41", None),
        ("", ""),
    ],
)
def test_normalizing_decodes_only_unreserved_characters_and_upper_cases_the_rest(
        path: str, expected: str | None) -> None:
    assert normalize_path(path) == expected


def test_a_target_keeps_its_query_as_sent_and_the_absolute_form_its_path() -> None:
    assert read_target("/api/core/ws?token=a%20b") == Target("/api/core/ws", "token=a%20b")
    assert read_target("http://h:1?x=1") == Target("/", "x=1")
    assert read_target("ws://h/api/core/%77s?") == Target("/api/core/ws", "")


def test_the_endpoints_path_is_compared_normalized_too() -> None:
    assert check_target("/api/core/ws", "/api/core/%77s") is None
    assert check_target("/a%2fb", "/a%2Fb") is None
    assert check_target("/a/b", "/a%2Fb") is NOT_FOUND
    assert check_target("/a%zz", "/a%zz").status == 400  # type: ignore[union-attr]


def test_an_authenticator_sees_the_normalized_path_whatever_the_form() -> None:
    for target in ("/api/core/%77s?token=t", "http://127.0.0.1:8000/api/core/ws?token=t", "/api/core/w%73?token=t"):
        request = HandshakeRequest.build(target, [])
        assert (request.path, dict(request.query)) == ("/api/core/ws", {"token": "t"}), target
    assert HandshakeRequest.build("/api%2fcore", []).path == "/api%2Fcore"
    with pytest.raises(ValueError, match="malformed percent-encoding"):
        HandshakeRequest.build("/api/%zz", [])


_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_TARGET_FORM = read_target("*")
#: Path characters (RFC 3986 pchar, and "/") that are not percent signs.
_PCHARS = _UNRESERVED + "!$&'()*+,;=:@"
_PATHS = st.lists(st.text(st.sampled_from(_PCHARS), min_size=1, max_size=8), min_size=1, max_size=5).map(
    lambda segments: "/" + "/".join(segments))


def _encoded(char: str, upper: bool) -> str:
    code = f"%{ord(char):02X}"
    return code if upper else code.lower()


@given(_PATHS, st.data())
def test_encoding_unreserved_characters_of_a_path_keeps_it_named(path: str, data: st.DataObject) -> None:
    positions = [i for i, char in enumerate(path) if char in _UNRESERVED]
    chosen = data.draw(st.sets(st.sampled_from(positions), max_size=len(positions))) if positions else set()
    upper = data.draw(st.booleans())
    target = "".join(_encoded(char, upper) if i in chosen else char for i, char in enumerate(path))
    assert check_target(target, path) is None
    assert check_target("http://example.com" + target + "?q=1", path) is None
    assert HandshakeRequest.build(target, []).path == normalize_path(path)


@given(_PATHS, st.data())
def test_encoding_a_slash_or_another_reserved_character_never_names_the_path(path: str, data: st.DataObject) -> None:
    positions = [i for i, char in enumerate(path) if char not in _UNRESERVED]  # "/" at least
    i = data.draw(st.sampled_from(positions))
    target = path[:i] + _encoded(path[i], data.draw(st.booleans())) + path[i + 1:]
    # Another path (404), or no path at all when it is the leading slash (400).
    assert check_target(target, path) is (NOT_FOUND if i else _TARGET_FORM)


@given(st.text(max_size=40))
def test_any_target_gets_an_answer_without_raising_and_normalizing_is_idempotent(target: str) -> None:
    refusal = check_target(target, ENDPOINT)
    assert refusal is None or refusal.status in {400, 404}
    read = read_target(target)
    if isinstance(read, Target):
        assert normalize_path(read.path) == read.path
        assert check_target(read.path, ENDPOINT) == refusal  # the normalized path names the same
