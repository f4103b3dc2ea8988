"""The one contract every transport adapter implements.

An adapter translates a native WebSocket (``websockets``, ``aiohttp``, ASGI, in-memory ...) to
:class:`Transport` and does nothing else: no protocol logic lives in adapters. The core owns
framing rules, limits, heartbeat and close codes (protocol.md sections 1 and 6), so behaviour does
not change with the adapter.

Adapter duties, in full:

* Before accepting, build a :class:`HandshakeRequest` (``HandshakeRequest.build`` parses the query
  string and cookies) and call ``Endpoint.authenticate``; on ``AuthenticationFailed`` answer HTTP 403
  and create nothing.
* After accepting, wrap the socket in a :class:`Transport` and ``await endpoint.serve(transport,
  identity)``.
* ``receive()`` returns ``str`` for a text frame and ``bytes`` for a binary frame, and raises
  :class:`~dara_ws_core.exceptions.ConnectionClosed` (with the close code) once the peer is gone,
  whether the native library reports closes as exceptions or as messages.
* ``send(frame)`` sends ``frame`` (UTF-8 JSON) as one **text** frame.
* ``abort()`` drops the TCP connection at once (the native transport's ``abort()``).
* Pass ``ServerConfig.max_message_size`` and the keepalive settings to the native library.

Optional, for speed: :class:`SupportsSendNowait`, a ``send_nowait(frame) -> bool`` that writes
a text frame synchronously if the native library can take it without waiting (connection open,
write buffer below its limit) and returns ``False`` otherwise, without side effects. The driver
checks for it once per connection (``isinstance``); with it, a broadcast writes straight to the
sockets of clients that keep up, as ``websockets.broadcast`` does, and queues only for the others.

Optional, for fewer system calls: :class:`SupportsCork`, coalesced writes. ``send_corked(frame)
-> bool`` takes a text frame as ``send_nowait`` does (same refusals, same write limit, the corked
bytes counted in it) but only appends it to the connection's pending output; ``flush()`` writes
all of that output in one write. The driver flushes every connection it corked once per
event-loop iteration (one ``loop.call_soon`` for all of them), and before any awaited ``send``
or ``close``, so a burst of broadcasts costs one system call per connection, in order. A
transport with it needs no ``send_nowait``: the driver prefers the cork.

Optional, for memory: :class:`SupportsDisconnected`, a ``disconnected`` property that is true once
the connection is over (its TCP connection closed or aborted: nothing is left to abort). When a
connection closes, the driver arms a timer that aborts it ``close_timeout`` later (a peer that
does not read never finishes a closing handshake); the timer holds the transport, and through it
every object of the connection. With ``disconnected``, the driver drops the timer as soon as the
connection is over, so a closed connection is freed at once.

Optional, for one task switch less per inbound message: :class:`SupportsPush`. A library that
calls back with each message (picows) would otherwise buffer it and wake the connection's
receive loop, a task, which then handles it; ``receive_pushed(push, limit)`` instead hands the
messages that arrive while the loop waits with nothing buffered straight to ``push`` (the
driver's synchronous handling of one message) from the library's callback, up to ``limit`` of
them, in order. ``push`` returns ``False`` when the loop must run (an answer to await, a close,
an error): the call then returns ``None``, and what arrives meanwhile is buffered as usual,
within the same inbox bounds and flow control. A ``request`` answered this way resolves the
waiting ``send_and_wait`` from the callback that read it.

Optional, for broadcasts: :class:`SupportsWriter`, a ``writer`` attribute: a callable (best a C
one) that writes a text frame at once and cannot refuse it, offered (not ``None``) only while
``send_nowait`` would accept a frame (open, not closing, writing not paused). It skips what is
corked: the driver uses it only for a connection with nothing corked. While the fan-outs write
through (one frame per connection per iteration, see the driver), a broadcast calls it for each
recipient in place of ``send_nowait``: no Python call and no checks of the transport's state per
recipient, which the transport keeps in ``writer`` instead. The core keeps the writer next to
its own per-connection state, and sets ``writer_lost``: the transport calls it whenever it sets
``writer`` to ``None``, synchronously, so that the core stops writing with it at once.

Every socket adapter also has ``serve(endpoint, host="127.0.0.1", port=8000)``, an async context
manager that yields a :class:`Server` (``port=0`` picks a free port).
"""

from __future__ import annotations

__all__ = ["PROCESS_RECEIVING", "RECEIVING_SHARES", "ClientFrameHeaders", "HandshakeRequest", "ReceivingBudget",
           "ReceivingCharge", "Server", "SupportsCork", "SupportsDisconnected", "SupportsPush", "SupportsSendNowait",
           "SupportsWriter", "Transport", "address_key", "parse_cookies", "text_frame_header"]

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from struct import Struct
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl, urlsplit


@runtime_checkable
class Transport(Protocol):
    """One accepted WebSocket connection, as the core sees it."""

    async def send(self, frame: bytes) -> None:
        """Send ``frame`` (UTF-8 encoded JSON) as one text frame.

        Raises ``ConnectionClosed`` if the connection is closed.
        """

    async def receive(self) -> str | bytes:
        """Wait for the next frame: ``str`` for text, ``bytes`` for binary.

        Raises ``ConnectionClosed`` (with the peer's close code) once the connection is closed.
        """

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake with ``code`` and return; idempotent."""

    def abort(self) -> None:
        """Drop the connection now, without a closing handshake: release the socket and its
        buffers. Idempotent, never raises; a no-op once the connection is fully closed.

        The endpoint calls it when a close has not completed within
        ``ServerConfig.close_timeout`` (a peer that does not read).
        """

    @property
    def closed(self) -> bool:
        """Whether the connection is closed or closing."""


@runtime_checkable
class SupportsSendNowait(Protocol):
    """The optional fast path of a transport (see the module docstring)."""

    def send_nowait(self, frame: bytes) -> bool:
        """Write ``frame`` as a text frame now if possible without waiting; else ``False``."""


@runtime_checkable
class SupportsWriter(Protocol):
    """The optional unchecked write of a transport (see the module docstring)."""

    #: Writes one text frame now; ``None`` while ``send_nowait`` would refuse one.
    writer: Callable[[bytes], object] | None
    #: Set by the core (``None`` until then): the transport calls it, without arguments, each
    #: time it sets ``writer`` to ``None``, at once (a paused write, a close, a disconnect). The
    #: core keeps the writer where its fan-out reads it, and must drop it then.
    writer_lost: Callable[[], object] | None


@runtime_checkable
class SupportsCork(Protocol):
    """The optional coalesced writes of a transport (see the module docstring)."""

    def send_corked(self, frame: bytes) -> bool:
        """Add ``frame`` as a text frame to the pending output without writing it, if the
        connection is open and its buffered output (pending included) is below its write limit;
        else ``False``, without side effects."""

    def flush(self) -> bool | None:
        """Write the pending output in one write; a no-op when there is none or the connection
        is closing (what an abort or a lost connection left pending is dropped). Never raises.

        Returns ``False`` when it dropped corked frames (the library closed the connection
        first): the core then counts them as not written, so that a kept per-user message among
        them goes to the user's next connection. ``True`` or ``None``: written (or nothing to
        write)."""


@runtime_checkable
class SupportsDisconnected(Protocol):
    """The optional end-of-connection report of a transport (see the module docstring)."""

    @property
    def disconnected(self) -> bool:
        """Whether the connection is over (closed or aborted): nothing is left to abort."""


@runtime_checkable
class SupportsPush(Protocol):
    """The optional push hand-over of inbound messages (see the module docstring)."""

    async def receive_pushed(self, push: Callable[[str | bytes], bool], limit: int) -> str | bytes | None:
        """``receive()``, except that while it waits with nothing buffered, each message that
        arrives is handed to ``push`` (which must not raise) instead of ending the wait, up to
        ``limit`` of them, in order. Returns the next buffered message as ``receive()`` does, or
        ``None`` once ``push`` returned ``False`` or took ``limit`` messages; later messages
        are buffered for the next call. Raises ``ConnectionClosed`` as ``receive()`` does."""


#: Headers of final, unmasked text frames of 0-125 bytes, made once: most frames are small.
_SMALL_TEXT_HEADERS = tuple(bytes((0x81, size)) for size in range(126))
_HEADER16 = Struct("!BBH")
_HEADER64 = Struct("!BBQ")


def text_frame_header(size: int) -> bytes:
    """The header of a final, unmasked, uncompressed text frame of ``size`` payload bytes (RFC
    6455 section 5.2): for adapters that cork frames their library cannot frame without writing
    (server side only; a client masks its frames)."""
    if size < 126:
        return _SMALL_TEXT_HEADERS[size]
    if size < 65536:
        return _HEADER16.pack(0x81, 126, size)
    return _HEADER64.pack(0x81, 127, size)


#: A masked frame header with opcode 3 (reserved: RFC 6455 5.2), which every parser fails on.
_RESERVED_OPCODE = b"\x83\x80"
#: A masked text frame header declaring a 2**62-byte payload, over any ``max_size``: a parser
#: given one fails the connection with 1009 (message too big) before reading further.
_TOO_BIG = b"\x81\xff" + (1 << 62).to_bytes(8, "big")
#: A holder (a user, an anonymous peer's address, or a connection with neither) takes at most
#: this fraction of ``ServerConfig.max_receiving_total_bytes``.
RECEIVING_SHARES = 16


class ReceivingBudget:
    """Bytes of inbound messages still being received, in all and by holder (the key
    :func:`~dara_ws_core.auth.holder_of` gives), for every :class:`ReceivingCharge` sharing it.
    Counted on one event loop: nothing is locked."""

    __slots__ = ("bytes", "holders")

    def __init__(self) -> None:
        self.bytes = 0
        #: What each holder's connections hold together, for the holders holding anything.
        self.holders: dict[Hashable, int] = {}


#: The budget every connection shares unless given its own: the process's.
PROCESS_RECEIVING = ReceivingBudget()


class ReceivingCharge:
    """What one connection's message in progress holds, counted in a :class:`ReceivingBudget`
    under its ``holder`` (``None``: the connection alone). :meth:`take` refuses bytes that would
    take the holder past ``total // RECEIVING_SHARES`` or the budget past ``total`` (the
    configuration's ``max_receiving_total_bytes``); :meth:`release` gives back what the message
    held, once it is complete or the connection ends (idempotent). Pure."""

    __slots__ = ("budget", "held", "holder", "share", "total")

    def __init__(self, total: int, holder: Hashable = None, budget: ReceivingBudget | None = None) -> None:
        self.budget = PROCESS_RECEIVING if budget is None else budget
        self.total = total
        self.share = max(1, total // RECEIVING_SHARES)
        self.holder = self if holder is None else holder
        #: Bytes this connection holds now.
        self.held = 0

    def take(self, size: int) -> bool:
        """Count ``size`` more bytes; ``False`` (and nothing counted) past a bound."""
        budget = self.budget
        holders = budget.holders
        mine = holders.get(self.holder, 0) + size
        total = budget.bytes + size
        if mine > self.share or total > self.total:
            return False
        budget.bytes = total
        holders[self.holder] = mine
        self.held += size
        return True

    def release(self) -> None:
        """Give back everything this connection holds."""
        held = self.held
        if held:
            self.held = 0
            budget = self.budget
            budget.bytes -= held
            left = budget.holders[self.holder] - held
            if left:
                budget.holders[self.holder] = left
            else:
                del budget.holders[self.holder]

    def __del__(self) -> None:
        self.release()  # a connection dropped without release() never keeps its share


class ClientFrameHeaders:
    """Follows the frame headers of a client's byte stream, for the adapters whose library lets
    through what RFC 6455 section 5.2 forbids, so that every transport closes on it with 1002:
    an unmasked frame, a payload length not in its shortest form (the 16-bit form for under 126
    bytes, the 64-bit form for under 65,536), and a 64-bit length with its most significant bit
    set. A few operations a frame: payloads are skipped, not read. Pure.

    With a ``charge`` (:class:`ReceivingCharge`), it also counts the bytes of the message in
    progress against the process's budget, from the lengths the headers declare: every fragment
    of a fragmented message, and a whole message's single frame when its payload goes on past
    the bytes fed (a frame that arrives in one read is never counted: a small message costs one
    comparison). What was counted is given back once the message's final frame has all been
    fed. A frame the charge refuses is refused before its payload arrives, with
    :attr:`refused_code` 1009.

    :meth:`feed` returns what to hand the library now: everything before the first refused
    frame, and before a header split across reads (held until it is whole, so that the library
    never sees the start of a refused header).
    """

    __slots__ = ("_above", "_head", "_last", "_skip", "charge", "refused", "refused_code")

    def __init__(self, charge: ReceivingCharge | None = None) -> None:
        self._head = b""  # the start of a frame header split across reads
        self._skip = 0  # payload bytes (and mask key) of the current frame still to come
        self._last = False  # the counted message's final frame has begun
        self._above = 0x80  # 0x100 while the message in progress holds bytes of the charge
        #: The budget the bytes of messages in progress are counted in (None: not counted).
        self.charge = charge
        #: Why the stream was refused, once it is: nothing after it is parsed.
        self.refused: str | None = None
        #: The close code the refused frame calls for: 1002, or 1009 past a budget.
        self.refused_code = 1002

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` (with what was held before it) to hand the library; after it,
        if :attr:`refused` is set, comes a frame the connection must be failed on
        (:attr:`refused_code`)."""
        if self.refused is not None:
            return b""
        held = self._head
        buf = held + data if held else data
        pos, end = self._skip, len(buf)
        # Header bytes above it skip the count (one comparison a frame): 0x80, a final frame of
        # a message or a control frame while nothing is counted; 0x100 (none) while it is.
        above = self._above
        while pos + 2 <= end:
            first, second = buf[pos], buf[pos + 1]
            if not second & 0x80:
                return self._refuse(buf, pos, "unmasked frame")
            length = second & 0x7F
            if length < 126:
                if first > above:  # a final frame or a control, nothing counted
                    pos += 6 + length  # header, mask key, payload
                    continue
                size = 2
            else:
                size = 4 if length == 126 else 10
                if pos + size > end:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + size], "big")
                if length < (126 if size == 4 else 65536):
                    return self._refuse(buf, pos, "payload length not in its shortest form")
                if length >> 63:
                    return self._refuse(buf, pos, "payload length with its most significant bit set")
            pos += size + 4 + length
            # Counted: a fragment, a frame going on past this read, any frame while a message
            # is counted. A whole message in this read is not: the library takes it at once.
            if first <= above or pos > end:
                if not self._count(first, pos > end, length):
                    return self._refuse(buf, pos - size - 4 - length,
                                        "messages being received exceed their budget", 1009)
                above = self._above
        if above > 0x80 and self._last and pos <= end:  # the counted message's final frame is all here
            self._give_back()
        if pos < end:  # a header cut short: held until the rest comes
            self._head, self._skip = buf[pos:], 0
            return buf[:pos]
        self._head, self._skip = b"", pos - end
        return buf

    def _count(self, first: int, unfinished: bool, length: int) -> bool:
        """Count a frame (header byte ``first``, ``length`` payload bytes, going on past the
        bytes fed when ``unfinished``) in the message in progress; ``False`` past the budget."""
        charge = self.charge
        if charge is None:
            return True
        if self._last:  # a new frame: the counted message's final frame has all passed
            self._give_back()
        if first & 0x0F >= 8:  # a control frame (or a reserved opcode the library refuses)
            return True
        if first & 0x80:  # a message's final frame
            self._last = True
            if first & 0x0F and not unfinished:  # a single frame, all here: nothing to hold
                return True
        if not charge.take(length):
            return False
        self._above = 0x100
        return True

    def _give_back(self) -> None:
        self._last, self._above = False, 0x80
        if self.charge is not None:
            self.charge.release()

    def feed_failing(self, data: bytes) -> bytes:
        """:meth:`feed` for a library with no way in to fail a connection but its own parser
        (websockets' sans-I/O protocol, under websockets and uvicorn): a refused frame's header
        is replaced, once, by one the parser fails with :attr:`refused_code` (a reserved opcode
        for 1002, a length over any ``max_size`` for 1009)."""
        if self.refused is not None:
            return b""
        good = self.feed(data)
        if self.refused is None:
            return good
        return good + (_TOO_BIG if self.refused_code == 1009 else _RESERVED_OPCODE)

    def release(self) -> None:
        """Give back what the message in progress holds (the connection is over)."""
        self._give_back()

    def _refuse(self, buf: bytes, pos: int, why: str, code: int = 1002) -> bytes:
        self.refused = why
        self.refused_code = code
        self._head = b""
        self.release()
        return buf[:pos]


_Native = TypeVar("_Native")


@dataclass(frozen=True, slots=True)
class Server(Generic[_Native]):
    """A running server, as every socket adapter's ``serve()`` yields it.

    ``port`` is the bound one (the real port when 0 was asked) and ``url`` the endpoint's
    ``ws://host:port/path``. ``native`` is the library's own server, for what only it can do:
    ``websockets.asyncio.server.Server`` (``await server.native.serve_forever()``),
    ``aiohttp.web.AppRunner`` or ``uvicorn.Server``.
    """

    host: str
    port: int
    url: str
    native: _Native

    @classmethod
    def build(
        cls, host: str, port: int, path: str, native: _Native, *, secure: bool = False
    ) -> Server[_Native]:
        """For adapters: the server listening on ``host:port`` for ``path`` (``wss://`` when
        ``secure``; an IPv6 host goes in brackets in the URL)."""
        netloc = f"[{host}]" if ":" in host else host
        return cls(host, port, f"{'wss' if secure else 'ws'}://{netloc}:{port}{path}", native)


#: Most bytes of ``Cookie`` header parsed and most cookies kept (RFC 6265 section 6.1 asks
#: browsers for 4096-byte cookies and 50 per domain): the rest is ignored, so an
#: unauthenticated client cannot make the parse cost more than this.
MAX_COOKIE_BYTES = 64 * 1024
MAX_COOKIES = 256


def parse_cookies(header: str | None) -> dict[str, str]:
    """Parse a ``Cookie`` header (``name=value; name2=value2``, RFC 6265 section 5.4) in one
    linear pass; malformed pairs are skipped rather than failing the handshake, and only the
    first ``MAX_COOKIE_BYTES`` characters and ``MAX_COOKIES`` cookies count. The first
    occurrence of a name wins (the most specific path, as browsers order them)."""
    if not header:
        return {}
    cookies: dict[str, str] = {}
    for part in header[:MAX_COOKIE_BYTES].split(";", MAX_COOKIES)[:MAX_COOKIES]:
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or name in cookies:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies[name] = value
    return cookies


class _LazyCookies(Mapping[str, str]):
    """The cookies of a handshake, parsed on first use: most authenticators read a token from
    the query and never pay for the header."""

    __slots__ = ("_header", "_parsed")

    def __init__(self, header: str | None) -> None:
        self._header = header
        self._parsed: dict[str, str] | None = None

    def _cookies(self) -> dict[str, str]:
        if self._parsed is None:
            self._parsed = parse_cookies(self._header)
            self._header = None
        return self._parsed

    def __getitem__(self, name: str) -> str:
        return self._cookies()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cookies())

    def __len__(self) -> int:
        return len(self._cookies())

    def __repr__(self) -> str:
        return repr(self._cookies())


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """What an authenticator may read of the opening HTTP request (protocol.md section 5).

    ``headers`` keys are lower-case; the last value wins for repeated query parameters.
    """

    path: str
    query: Mapping[str, str] = field(default_factory=_empty)
    headers: Mapping[str, str] = field(default_factory=_empty)
    cookies: Mapping[str, str] = field(default_factory=_empty)
    remote: tuple[str, int] | None = None

    @classmethod
    def build(
        cls,
        target: str,
        headers: Iterable[tuple[str, str]],
        remote: object = None,
    ) -> HandshakeRequest:
        """Build from a request target (``/path?query``) and raw header pairs. ``remote`` is the
        peer's address as the library gives it (a socket's ``peername``, whose IPv6 form has
        four items, or an ASGI ``client`` list): its host and port are kept, anything else (a Unix
        socket's path, ``None``) is no address."""
        split = urlsplit(target)
        # Repeated headers are joined as HTTP allows (cookies with "; ", RFC 6265), in one
        # join per name: appending one by one is quadratic in the repeats.
        values: dict[str, list[str]] = {}
        for name, value in headers:
            values.setdefault(name.lower(), []).append(value)
        hdrs = {
            key: vals[0] if len(vals) == 1 else ("; " if key == "cookie" else ", ").join(vals)
            for key, vals in values.items()
        }
        return cls(
            path=split.path or "/",
            query=dict(parse_qsl(split.query, keep_blank_values=True)),
            headers=hdrs,
            cookies=_LazyCookies(hdrs.get("cookie")),
            remote=(
                (str(remote[0]), int(remote[1]))
                if isinstance(remote, tuple | list) and len(remote) >= 2 else None
            ),
        )

    @property
    def origin(self) -> str | None:
        """The ``Origin`` header (sent by browsers), or ``None``."""
        return self.headers.get("origin")


def address_key(host: str) -> str:
    """What the bounds counted per address count a peer's ``host`` as: an IPv4 host as it is;
    an IPv6 host as the /64 network it is in (``2001:db8:1:2::/64``: one site's usual
    allocation, from which a client could otherwise take a fresh address for each connection),
    an IPv4-mapped one as its IPv4 address; anything unparsable as it is."""
    if ":" not in host or "/" in host:  # IPv4, a name, or a key already
        return host
    import ipaddress  # only once an IPv6 peer comes: most servers never load it

    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
