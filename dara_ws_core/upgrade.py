"""What every transport answers an opening request that is not a WebSocket upgrade it can serve
(RFC 6455 sections 4.2.1 and 4.2.2; protocol.md section 5). Pure: no I/O, no event loop.

Each library checks the request in its own way and with its own statuses (aiohttp upgraded
``HEAD`` and HTTP/1.0 requests and took two ``Sec-WebSocket-Key`` headers, uvicorn answered a
request with no ``Upgrade`` header 404 and a draft-8 one 400, websockets and picows let two
``Host`` headers through...). Every adapter calls :func:`check_upgrade_request` on what its
library parsed, before anything else is decided about the request (its path, the capacity,
authentication), and answers the :class:`Refusal` it returns, so one bad request gets one
status whatever serves it. The checks, in order, the first failing one deciding:

=====================================================  ======  ====================================
The request                                            Status  Why this status
=====================================================  ======  ====================================
is not HTTP/1.1 (HTTP/1.0, say)                         505     RFC 9110 15.6.6; RFC 6455 asks 1.1
has a header line over :data:`MAX_HEADER_LINE` bytes,   431     RFC 6585 section 5; the limits are
or more than :data:`MAX_HEADERS` headers                        websockets' own
declares a body (``Transfer-Encoding``, or a            400     an upgrade has none; a body would
``Content-Length`` other than one 0)                            be read as frames (RFC 9112 6.3:
                                                                two lengths, even equal, are an
                                                                error to h11, llhttp and picows)
is not a ``GET`` (``HEAD`` too)                         405     RFC 9110 15.5.6, with ``Allow: GET``
has no ``Host`` header, or more than one                400     RFC 9112 section 3.2
has no one ``Upgrade`` of the one value ``websocket``,  426     RFC 9110 15.5.22, with ``Upgrade:
or no ``upgrade`` token in ``Connection``                       websocket``
has a ``Sec-WebSocket-Version`` other than one ``13``   426     RFC 6455 4.4, with the version the
                                                                server speaks
has no ``Sec-WebSocket-Key`` of 16 base64-encoded       400     RFC 6455 4.2.1
bytes, or more than one
has a ``Sec-WebSocket-Protocol`` that is not a list     400     RFC 6455 4.1 and 11.3.4 (1#token);
of tokens                                                       websockets' parser refuses it
=====================================================  ======  ====================================

Every 426 names both what is missing: ``Upgrade: websocket`` and ``Sec-WebSocket-Version: 13``.
No subprotocol is ever chosen (protocol.md section 1): a well-formed ``Sec-WebSocket-Protocol``
is served without one, as RFC 6455 4.2.2 lets a server answer.

Then :func:`check_target` decides whether the request target names the endpoint's path, on the
raw target the library received (its own decoding differed: uvicorn and aiohttp decode every
percent-encoding, ``%2F`` too, websockets and picows none), and what a target that names nothing
gets:

=====================================================  ======  ====================================
The request target                                     Status  Why
=====================================================  ======  ====================================
holds an octet that is no visible ASCII character      400     RFC 9112 section 3.2 (h11's and
(a space, a control, UTF-8), or a ``#`` fragment                aiohttp's parsers refuse the former)
is in none of the forms below (``*``, the authority     400     RFC 9112 3.2.3-4: only ``OPTIONS``
form ``host:port``, ``api/core/ws``), or absolute               and ``CONNECT`` use them; RFC 9110
with another scheme than http, https, ws or wss, no             4.2.4: userinfo is an error
host, or userinfo (``http://user@host/``)
has a malformed percent-encoding in its path (``%zz``,  400     RFC 3986 section 2.1
``%4``, ``%`` at the end)
has a path that is not the endpoint's once normalized   404
=====================================================  ======  ====================================

The target is the origin form (``/api/core/ws?query``) or the absolute form
(``http://host:port/api/core/ws?query``, which RFC 9112 section 3.2.2 says a server MUST
accept; its host is not checked: this server answers one site). Its path is normalized as RFC
3986 section 6.2.2 says (:func:`normalize_path`): a percent-encoded unreserved character (``A-Z
a-z 0-9 - . _ ~``) is that character, hex digits are upper-cased, and every other
percent-encoding stays distinct from the character it encodes: ``/api%2Fcore%2Fws`` is not
``/api/core/ws`` (a ``%2F`` is a slash inside a segment), ``/api/core/%77s`` is. Dot-segments
are not removed: ``/api/core/../core/ws`` (``%2E%2E`` too) is not the endpoint's path (404).
A browser removes them before it sends a request, and a proxy whose rules pass
``/public/../api/core/ws`` on must not have it reach the endpoint. Neither are empty segments
merged (``/api//core/ws``), nor a trailing slash dropped, nor the case of the path folded. The
query is the application's: passed on as it came.
"""

from __future__ import annotations

__all__ = ["MAX_HEADERS", "MAX_HEADER_LINE", "NOT_FOUND", "UNPARSABLE", "Refusal", "RequestLine", "Target",
           "check_target", "check_upgrade_request", "connection_upgrades", "loose_line_ends", "normalize_path",
           "parse_request_line", "read_target", "refusal_of_request_line"]

import binascii
import re
from base64 import b64decode
from collections.abc import Iterable
from dataclasses import dataclass

#: The most headers, and the longest header line (name, ": " and value), of an opening request:
#: websockets' limits (``MAX_NUM_HEADERS``, ``MAX_LINE_LENGTH``), which it enforces itself.
MAX_HEADERS = 128
MAX_HEADER_LINE = 8192


@dataclass(frozen=True, slots=True)
class Refusal:
    """The HTTP answer to an opening request that is refused: ``status``, its ``reason`` phrase,
    the ``headers`` the status asks for, and ``detail``, what was wrong (for a log or a body)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    detail: str = ""

    @property
    def text(self) -> str:
        """The response's body: the reason, and the detail."""
        return f"{self.reason}: {self.detail}\n" if self.detail else f"{self.reason}\n"

    def encode(self) -> bytes:
        """The whole response, for an adapter that writes to the socket itself: the status line,
        ``headers``, :attr:`text` and ``Connection: close`` (a refused socket is let go)."""
        data = self.text.encode()
        lines = [f"HTTP/1.1 {self.status} {self.reason}",
                 *(f"{name}: {value}" for name, value in self.headers),
                 "Content-Type: text/plain", f"Content-Length: {len(data)}", "Connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def _bad(detail: str) -> Refusal:
    return Refusal(400, "Bad Request", (), detail)


_TOO_LARGE = "Request Header Fields Too Large"
_UPGRADE = (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"))
_NOT_GET = Refusal(405, "Method Not Allowed", (("Allow", "GET"),), "a WebSocket upgrade is a GET")
_NOT_11 = Refusal(505, "HTTP Version Not Supported", (), "a WebSocket upgrade is an HTTP/1.1 request")
_BODY = _bad("an upgrade request has no body")
_HOST = _bad("exactly one Host header is required")
_NO_UPGRADE = Refusal(426, "Upgrade Required", _UPGRADE, "Upgrade: websocket and Connection: Upgrade are required")
_VERSION = Refusal(426, "Upgrade Required", _UPGRADE, "this server speaks WebSocket version 13")
_KEY = _bad("exactly one Sec-WebSocket-Key of 16 base64-encoded bytes is required")
_PROTOCOL = _bad("Sec-WebSocket-Protocol must be a comma-separated list of tokens")
#: The answer to a request whose first line is not an HTTP request line.
UNPARSABLE = _bad("not an HTTP request")
#: The answer to a request whose target names another path than the endpoint's.
NOT_FOUND = Refusal(404, "Not Found")
_TARGET_OCTETS = _bad("a request target is visible ASCII, without a fragment")
_TARGET_FORM = _bad("the request target is a path (/api/core/ws) or an http, https, ws or wss URI with a host")
_PERCENT = _bad("malformed percent-encoding in the request target")


def _tokens(values: list[str]) -> list[str]:
    """The comma-separated tokens of a header's values, lower-cased, empty ones dropped (RFC 9110
    section 5.6.1 allows them)."""
    return [token for value in values for part in value.split(",") if (token := part.strip(" \t").lower())]


#: An HTTP token (RFC 9110 section 5.6.2).
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


def _token_list(value: str) -> bool:
    """Whether ``value`` is a ``1#token`` list (RFC 9110 5.6.1): tokens between commas and
    blanks, empty elements allowed, at least one token; what websockets' parser takes."""
    parts = [part.strip(" \t") for part in value.split(",")]
    return any(parts) and all(not part or _TOKEN.fullmatch(part) for part in parts)


def loose_line_ends(head: bytes) -> bool:
    """Whether a request's head (its bytes up to the blank line) holds a CR or an LF that is not
    part of a CRLF, or a folded line (one starting with a blank: obs-fold, RFC 9112 5.2), which
    websockets', aiohttp's and llhttp's parsers answer 400 and h11 takes (RFC 9112 2.2 lets a
    parser take a bare LF, 5.2 unfold): an adapter whose parser takes them refuses the request
    with :data:`UNPARSABLE`, as the others do. Pure."""
    strict = head.replace(b"\r\n", b"")
    return b"\r" in strict or b"\n" in strict or b"\r\n " in head or b"\r\n\t" in head


def connection_upgrades(values: Iterable[str]) -> bool:
    """Whether ``Connection`` headers of ``values`` hold an ``upgrade`` token, in any of them
    (RFC 9110 5.3: repeated headers are one list), as :func:`check_upgrade_request` reads
    them; for an adapter whose library reads only one (uvicorn reads the last)."""
    return "upgrade" in _tokens(list(values))


def check_upgrade_request(method: str, version: str, headers: Iterable[tuple[str, str]]) -> Refusal | None:
    """Whether an opening request is a WebSocket upgrade this server serves: ``None`` if it is,
    else the :class:`Refusal` to answer (the module docstring lists the checks).

    ``method`` as sent (case matters: ``get`` is not ``GET``); ``version`` as ASGI writes it
    (``"1.1"``, or ``"HTTP/1.1"``); ``headers`` the raw name-value pairs in order, repeats
    included (names in any case, values with or without surrounding blanks)."""
    if version.removeprefix("HTTP/") != "1.1":
        return _NOT_11
    values: dict[str, list[str]] = {}
    for count, (name, value) in enumerate(headers, 1):
        if count > MAX_HEADERS:
            return Refusal(431, _TOO_LARGE, (), f"more than {MAX_HEADERS} headers")
        if len(name) + len(value) + 2 > MAX_HEADER_LINE:
            return Refusal(431, _TOO_LARGE, (), f"a header line over {MAX_HEADER_LINE} bytes")
        key = name.lower()
        if key in _READ:
            values.setdefault(key, []).append(value.strip(" \t"))
    if "transfer-encoding" in values or values.get("content-length", ["0"]) != ["0"]:
        return _BODY
    if method != "GET":
        return _NOT_GET
    if len(values.get("host", ())) != 1:
        return _HOST
    # Upgrade as aiohttp and uvicorn read it: one value, no list (``websocket,`` was upgraded by
    # websockets and picows, refused 400 by aiohttp, taken for plain HTTP by uvicorn).
    if [value.lower() for value in values.get("upgrade", [])] != ["websocket"] or not connection_upgrades(
            values.get("connection", [])):
        return _NO_UPGRADE
    if values.get("sec-websocket-version") != ["13"]:
        return _VERSION
    keys = values.get("sec-websocket-key", [])
    if len(keys) != 1 or len(keys[0]) != 24:  # 16 bytes in base64: 24 characters, "==" ending
        return _KEY
    try:
        if len(b64decode(keys[0], validate=True)) != 16:
            return _KEY
    except binascii.Error:
        return _KEY
    if not all(map(_token_list, values.get("sec-websocket-protocol", ()))):
        return _PROTOCOL
    return None


#: The headers :func:`check_upgrade_request` reads (lower-case).
_READ = frozenset({"host", "upgrade", "connection", "sec-websocket-version", "sec-websocket-key",
                   "sec-websocket-protocol", "content-length", "transfer-encoding"})


#: The characters a percent-encoding of which is the character itself (RFC 3986 section 2.3).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
#: The schemes of an absolute-form target served here (RFC 9110 4.2, RFC 6455 section 3).
_SCHEMES = frozenset({"http", "https", "ws", "wss"})


def normalize_path(path: str) -> str | None:
    """``path`` normalized as RFC 3986 section 6.2.2.1-2 says: each percent-encoded unreserved
    character (``A-Z a-z 0-9 - . _ ~``) decoded, the hex digits of every other percent-encoding
    upper-cased (``%2f`` is ``%2F``, and stays one); ``None`` if a percent-encoding is malformed
    (``%zz``, ``%4``). Nothing else changes (no dot-segment removal: see the module docstring).
    Two paths name the same resource when their normalized forms are equal."""
    if "%" not in path:
        return path
    first, *rest = path.split("%")
    parts = [first]
    for part in rest:
        digits = part[:2]
        if len(digits) != 2 or digits[0] not in _HEX or digits[1] not in _HEX:
            return None
        char = chr(int(digits, 16))
        parts.append(char if char in _UNRESERVED else "%" + digits.upper())
        parts.append(part[2:])
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Target:
    """A request target read by :func:`read_target`: its ``path`` normalized
    (:func:`normalize_path`), and its ``query`` as sent (without the ``?``, ``""`` when none)."""

    path: str
    query: str = ""


def read_target(target: str) -> Target | Refusal:
    """The :class:`Target` a request target names (RFC 9112 section 3.2: the origin form
    ``/path?query`` or the absolute form ``http://host/path?query``), or the 400 :class:`Refusal`
    to answer a target that is none (the module docstring lists them). ``target`` as the library
    received it, undecoded (Latin-1 text of HTTP's octets). Pure."""
    if not target.isascii() or not target.isprintable() or " " in target or "#" in target:
        return _TARGET_OCTETS
    if not target.startswith("/"):
        scheme, colon, rest = target.partition("://")
        if not colon or scheme.lower() not in _SCHEMES:
            return _TARGET_FORM
        # The authority ends at the path or the query (RFC 3986 section 3.2).
        end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, target = rest[:end], rest[end:]
        if not authority or "@" in authority:
            return _TARGET_FORM
        if not target.startswith("/"):  # an empty path is "/" (RFC 9112 section 3.2.2)
            target = "/" + target
    path, _, query = target.partition("?")
    normalized = normalize_path(path)
    return _PERCENT if normalized is None else Target(normalized, query)


def check_target(target: str, path: str) -> Refusal | None:
    """Whether the request ``target`` names ``path`` (an endpoint's): ``None`` if it does, else
    the :class:`Refusal` to answer, :data:`NOT_FOUND` for another path and 400 for a target that
    names none (:func:`read_target`). Both are compared normalized (:func:`normalize_path`).
    Every adapter calls it on the raw target its library received, after
    :func:`check_upgrade_request`: one target, one answer on every transport."""
    read = read_target(target)
    if isinstance(read, Refusal):
        return read
    return None if read.path == normalize_path(path) else NOT_FOUND


def parse_request_line(line: str) -> tuple[str, str, str] | None:
    """The method, target and version (``"1.1"``) of an HTTP/1 request line (RFC 9112 section
    3: ``method SP target SP HTTP/d.d``), or ``None`` if it is none. The target is any non-empty
    run of characters without a space: :func:`check_target` decides what it names."""
    method, _, rest = line.partition(" ")
    target, _, version = rest.partition(" ")
    if (not method or not target or len(version) != 8 or not version.startswith("HTTP/")
            or not version[5].isdigit() or version[6] != "." or not version[7].isdigit()):
        return None
    return method, target, version[5:]


def refusal_of_request_line(line: str) -> Refusal:
    """For an adapter whose library refused a request without saying why: 505 when its request
    line is one of another HTTP version (websockets' parser takes only 1.0 and 1.1), else
    :data:`UNPARSABLE` (400)."""
    parsed = parse_request_line(line)
    return _NOT_11 if parsed is not None and parsed[2] != "1.1" else UNPARSABLE


class RequestLine:
    """Reads a request's first line out of its byte stream, however reads cut it, for an adapter
    whose library refuses or takes a request line without saying what it was (websockets'
    parser refuses HTTP/1.2 unread; aiohttp's takes ``GET  /path`` and ``GET /path``, and
    refuses ``get``). :attr:`line` holds at most :data:`MAX_HEADER_LINE` bytes. Pure."""

    __slots__ = ("ended", "line")

    def __init__(self) -> None:
        #: The line without its CRLF once :attr:`ended`; what came of it until then.
        self.line = bytearray()
        #: Whether the line is whole (or over :data:`MAX_HEADER_LINE` bytes, and cut there).
        self.ended = False

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream (nothing once :attr:`ended`)."""
        if self.ended:
            return
        line = self.line
        start = max(0, len(line) - 1)  # a CR that ended the last read
        line += data[: MAX_HEADER_LINE + 2 - len(line)]
        end = line.find(b"\r\n", start)
        if end >= 0:
            del line[end:]
            self.ended = True
        elif len(line) > MAX_HEADER_LINE:
            del line[MAX_HEADER_LINE:]
            self.ended = True

    @property
    def text(self) -> str:
        """The line as text (Latin-1, as HTTP's octets)."""
        return self.line.decode("latin-1")
