"""The one contract every transport adapter implements.

An adapter translates a native WebSocket (``websockets``, ``aiohttp``, ASGI, in-memory ...) to
:class:`Transport` and does nothing else: no protocol logic lives in adapters. The core owns
framing rules, limits, heartbeat and close codes (protocol.md sections 1 and 6), so behaviour does
not change with the adapter.

Adapter duties, in full:

* Before accepting, build a :class:`HandshakeRequest` (``HandshakeRequest.build`` parses the query
  string and cookies) and call ``Endpoint.authenticate``; on ``AuthenticationFailed`` answer HTTP 403
  (on its subclass ``EndpointClosed``, the endpoint shut down meanwhile, 503 with ``Retry-After``:
  ``endpoint.UNAVAILABLE``) and create nothing.
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

Optional, for reads that allocate only what arrived: :class:`SharedBufferReads`, a base class
for an adapter's ``asyncio.Protocol`` that makes it a ``BufferedProtocol`` reading into one
buffer for each thread (of :data:`READ_BUFFER_SIZE`).

Every socket adapter also has ``serve(endpoint, host="127.0.0.1", port=8000)``, an async context
manager that yields a :class:`Server` (``port=0`` picks a free port).
"""

from __future__ import annotations

__all__ = ["FRAMES_PER_FEED_FLOOR", "MAX_PIPELINED", "NOT_UTF8", "PARSED_PER_TURN", "PROCESS_RECEIVING",
           "READ_BUFFER_SIZE", "RECEIVING_ADDRESS_SHARES", "RECEIVING_RESERVE", "RECEIVING_SHARES",
           "RECEIVING_SMALL", "ClientFrameHeaders", "HandshakeRequest", "HoldsFrames", "ReceivingBudget",
           "ReceivingCharge", "RequestHead", "Server", "SharedBufferReads",
           "SupportsCork", "SupportsDisconnected", "SupportsPush", "SupportsSendNowait", "SupportsWriter",
           "Transport", "TrustedProxies", "TurnShares", "address_key", "close_frame_error", "end_after_held",
           "feed_held_later", "held_behind_request", "hold_behind_request", "late_text", "parse_cookies",
           "read_behind_request", "sendable_close_code", "supports", "text_frame_header"]

import asyncio
import functools
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from struct import Struct
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable
from urllib.parse import parse_qsl

from .codec import NOT_UTF8
from .upgrade import Refusal, RequestLine, read_target

if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv6Address


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


def supports(transport: object, capability: type) -> bool:
    """``isinstance(transport, capability)`` for one of the optional capabilities above
    (:class:`SupportsCork`, :class:`SupportsSendNowait`, ...), decided the same way: each of the
    capability's members present on the transport, and a method's not ``None``.

    On Python 3.11, ``isinstance`` with a runtime protocol collects the protocol's members on
    every call (30-45 µs): the driver's five checks cost a connection about a tenth of its
    handshake. Here they are collected once per capability."""
    for name, method in _members(capability):
        value = getattr(transport, name, _ABSENT)
        if value is _ABSENT or (method and value is None):
            return False
    return True


_ABSENT = object()


@functools.cache
def _members(capability: type) -> tuple[tuple[str, bool], ...]:
    # A capability's own members: its methods and properties, and its annotated attributes
    # (SupportsWriter's), each with whether it is a method.
    names = [name for name in vars(capability) if not name.startswith("_")]
    names += [name for name in vars(capability).get("__annotations__", {}) if name not in names]
    return tuple((name, callable(getattr(capability, name, None))) for name in names)


#: Headers of final, unmasked text frames of 0-125 bytes, made once: most frames are small.
_SMALL_TEXT_HEADERS = tuple(bytes((0x81, size)) for size in range(126))
_HEADER16 = Struct("!BBH")
_HEADER64 = Struct("!BBQ")


#: The size of the buffer each thread's :class:`SharedBufferReads` protocols read into: asyncio's
#: own socket reads allocate an object this size (``max_size``) each time, which glibc serves
#: from the top of the heap and, once it is freed, may give back to the system: two system calls
#: and fresh page faults per read. That took a third of a server's time in a closed loop of small
#: requests, or none of it, depending on what the process had allocated before (11.5k against
#: 17.5k replies/s between two starts of the same code).
READ_BUFFER_SIZE = 256 * 1024
_READ_BUFFERS = threading.local()  # .buffer: this thread's


def _read_buffer() -> memoryview:
    """This thread's read buffer, made at its first read. One serves every connection of a
    loop, since asyncio reads into it and hands the count over in one synchronous step
    (``get_buffer``, ``recv_into``, ``buffer_updated``: the selector loop's and TLS's reads
    alike), and the protocol copies out what arrived before returning. Not two loops' (servers
    in two threads): their reads run at the same time (``recv_into`` lets the GIL go), and one
    would write over the other's bytes before they were copied out."""
    try:
        return _READ_BUFFERS.buffer  # type: ignore[no-any-return]
    except AttributeError:
        buffer = _READ_BUFFERS.buffer = memoryview(bytearray(READ_BUFFER_SIZE))
        return buffer


class SharedBufferReads(asyncio.BufferedProtocol):
    """A base for a library's ``asyncio.Protocol`` subclass (put it after the library's class):
    asyncio then reads the socket into one buffer for the thread (of :data:`READ_BUFFER_SIZE`)
    and the protocol's own ``data_received`` gets the bytes that arrived, as before. The transport decides how it reads
    when it is given the protocol: a protocol whose class changes to one with this base later
    takes effect after ``transport.set_protocol(protocol)``."""

    __slots__ = ()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # (In the thread whose get_buffer it follows: the same buffer.)
        self.data_received(bytes(_READ_BUFFERS.buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """The library's (which comes first in the class's bases)."""
        raise NotImplementedError


def text_frame_header(size: int) -> bytes:
    """The header of a final, unmasked, uncompressed text frame of ``size`` payload bytes (RFC
    6455 section 5.2): for adapters that cork frames their library cannot frame without writing
    (server side only; a client masks its frames)."""
    if size < 126:
        return _SMALL_TEXT_HEADERS[size]
    if size < 65536:
        return _HEADER16.pack(0x81, 126, size)
    return _HEADER64.pack(0x81, 127, size)


def sendable_close_code(code: int) -> bool:
    """Whether a close frame may carry ``code`` on the wire (RFC 6455 section 7.4): the
    defined codes 1000-1003 and 1007-1014, and 3000-4999 (registered and private). 1004 is
    reserved, and 1005, 1006 and 1015 only report what happened: none of them is ever sent."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def close_frame_error(payload: bytes) -> int | None:
    """What a peer's close frame with ``payload`` is failed with, or ``None`` if it is valid,
    for the adapters whose library does not check it (RFC 6455 sections 5.5.1 and 7.4): an
    empty payload is valid (no code); one byte, or a code :func:`sendable_close_code` refuses,
    is a protocol error (1002); a reason that is not UTF-8 is 1007. Pure."""
    if not payload:
        return None
    if len(payload) < 2 or not sendable_close_code(int.from_bytes(payload[:2], "big")):
        return 1002
    try:
        payload[2:].decode()
    except UnicodeDecodeError:
        return 1007
    return None




def late_text(data: bytes | bytearray) -> str:
    """A text message an adapter kept as its UTF-8 bytes while it waited for the core, decoded
    as the core takes it: decoded, a text holds 1, 2 or 4 bytes a character (PEP 393), up to 4
    times its bytes (an ASCII text with one emoji), so what waits is kept as it came. Bytes
    that are not UTF-8 give :data:`NOT_UTF8` (closed with 1007, after what came before)."""
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8


#: A masked frame header with opcode 3 (reserved: RFC 6455 5.2), which every parser fails on.
_RESERVED_OPCODE = b"\x83\x80"
#: A masked text frame header declaring a 2**62-byte payload, over any ``max_size``: a parser
#: given one fails the connection with 1009 (message too big) before reading further.
_TOO_BIG = b"\x81\xff" + (1 << 62).to_bytes(8, "big")
#: A holder (a user, an anonymous peer's address, or a connection with neither) takes at most
#: this fraction of ``ServerConfig.max_receiving_total_bytes``.
RECEIVING_SHARES = 16
#: The connections of one client address, whatever users they name, take at most this fraction
#: of it together: without it, one client naming 16 users (free where the authenticator lets
#: anyone name themselves) filled the budget with messages it never finished, and every other
#: client's message that did not arrive in one read was refused with 1009 until they ended.
RECEIVING_ADDRESS_SHARES = 4
#: The last ``1 / RECEIVING_RESERVE`` of the budget only takes the messages of holders that then
#: hold at most ``1 / RECEIVING_SMALL`` of their share, from addresses holding at most as much of
#: theirs (256 KiB and 1 MiB by default): without it, clients from enough addresses (16, within
#: their shares) filled the budget with messages they never finished, and every other client's
#: message that did not arrive in one read was refused with 1009 until they ended.
RECEIVING_RESERVE = 16
RECEIVING_SMALL = 64


class ReceivingBudget:
    """Bytes of inbound messages still being received, in all and by holder (the key
    :func:`~dara_ws_core.auth.holder_of` gives), for every :class:`ReceivingCharge` sharing it.
    Counted on one event loop: nothing is locked."""

    __slots__ = ("bytes", "holders")

    def __init__(self) -> None:
        self.bytes = 0
        #: What each holder's connections hold together, and each client address's (keyed
        #: ``(ReceivingCharge, address)``), for those holding anything.
        self.holders: dict[Hashable, int] = {}


#: The budget every connection shares unless given its own: the process's.
PROCESS_RECEIVING = ReceivingBudget()


class ReceivingCharge:
    """What one connection's message in progress holds, counted in a :class:`ReceivingBudget`
    under its ``holder`` (``None``: the connection alone) and its client's ``address`` (the
    address key every share counted per address uses, ``current_source``; ``None``: none).
    :meth:`take` refuses bytes that would take the holder past ``total // RECEIVING_SHARES``,
    the address past ``total // RECEIVING_ADDRESS_SHARES`` or the budget past ``total`` (the
    configuration's ``max_receiving_total_bytes``); :meth:`release` gives back what the message
    held, once it is complete or the connection ends (idempotent). Pure."""

    __slots__ = ("address", "address_share", "budget", "held", "holder", "share", "total")

    def __init__(self, total: int, holder: Hashable = None, budget: ReceivingBudget | None = None,
                 address: str | None = None) -> None:
        self.budget = PROCESS_RECEIVING if budget is None else budget
        self.total = total
        self.share = max(1, total // RECEIVING_SHARES)
        self.holder = self if holder is None else holder
        #: The address's key among the holders (of its own kind: never a holder's).
        self.address: Hashable = None if address is None else (ReceivingCharge, address)
        self.address_share = max(1, total // RECEIVING_ADDRESS_SHARES)
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
        address = self.address
        theirs = 0
        if address is not None:
            theirs = holders.get(address, 0) + size
            if theirs > self.address_share:
                return False
        if total > self.total - self.total // RECEIVING_RESERVE and (
                mine > self.share // RECEIVING_SMALL or theirs > self.address_share // RECEIVING_SMALL):
            return False  # the reserve: for small messages of holders and addresses holding little
        if address is not None:
            holders[address] = theirs
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
            for key in (self.holder, self.address):
                if key is None:
                    continue
                left = budget.holders[key] - held
                if left:
                    budget.holders[key] = left
                else:
                    del budget.holders[key]

    def __del__(self) -> None:
        self.release()  # a connection dropped without release() never keeps its share


#: The most frames :meth:`ClientFrameHeaders.feed` hands on at once: about 20 ms of websockets'
#: parser (~20 us a frame), and more than any client sends in one read but a flood of tiny frames.
FRAMES_PER_FEED = 1024


class TurnShares:
    """What each client address has used in the current turn of the event loop, against
    ``share`` per turn for all of its connections together, and against ``total`` per turn for
    every address together.

    A bound per connection and per turn (:data:`FRAMES_PER_FEED` frames parsed, a few messages
    handled) is a bound per turn only while one client has one connection: a client with 64
    connections, each flooding pings within its own share, had the loop parse 64 shares a turn,
    and every other client's pushes waited a second or more for each turn. With it, one address
    adds about ``share`` to a turn however many connections it has. A share per address is a
    bound per turn only while few addresses are busy: 48 addresses (one client holding many,
    or many clients) flooding pings had the loop parse 48 shares a turn, as the 64 connections
    of one address did. So with ``total``, the addresses together use at most ``total`` a turn,
    and once more of them are busy than ``total // share`` (counted over this turn and the one
    before), each address's share of a turn is ``total`` divided among them (at least 1), so
    that every busy address has its part of each turn.

    :meth:`left` and :meth:`spend` count (``address`` ``None``: not counted, nothing left out;
    :meth:`left_on` and :meth:`spend_on` for a non-``None`` address, given the running loop);
    the first :meth:`spend` of a turn asks the running loop to call :meth:`new_turn` at the start
    of the next one (:attr:`turn` counts them). Without a running loop nothing is counted. A
    connection of an address that has used its share may :meth:`wait` for its place: the waiting
    ones of each address are woken in the order they came, ``wake`` a turn, so that none waits for
    ever behind the others; each by a turn of its own loop (servers on the loops of several
    threads share the counts, and each loop wakes only its own waiters). Each woken one may then
    use ``grant`` (or, while ``total`` is divided, that part of it the address's share is of
    ``share``; at least 1): :meth:`wait`'s result."""

    __slots__ = ("_active", "_loop", "_waiting", "grant", "share", "spent", "total", "turn", "used", "wake")

    def __init__(self, share: int, wake: int = 1, *, grant: int | None = None, total: int | None = None) -> None:
        self.share = share
        self.wake = wake
        self.grant = share if grant is None else grant
        self.total = total
        #: What each address used in this turn, for those that used anything; and all of them.
        self.used: dict[Hashable, int] = {}
        self.spent = 0
        #: The addresses that used anything (or waited) in the last turn that counted.
        self._active = 0
        #: The turns begun since the first.
        self.turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # while a new_turn is due on it
        #: The connections waiting for their place, by loop and address, in the order they came.
        self._waiting: dict[asyncio.AbstractEventLoop, dict[Hashable, deque[asyncio.Future[int]]]] = {}

    def share_now(self) -> int:
        """Each address's share of this turn: ``share``, or ``total`` divided among the busy
        addresses once they are more than ``total // share``."""
        total = self.total
        if total is None:
            return self.share
        using, active = len(self.used), self._active
        busy = active if active > using else using + 1  # (+1: the address asking may be new)
        return self.share if busy * self.share <= total else max(1, total // busy)

    def left(self, address: Hashable) -> int:
        """What the connections of ``address`` may still use in this turn."""
        if address is None:
            return 1 << 62
        loop = asyncio._get_running_loop()
        if loop is None:
            return self.share
        return self.left_on(loop, address)

    def left_on(self, loop: asyncio.AbstractEventLoop, address: Hashable) -> int:
        """:meth:`left` for a caller that knows the running loop, ``loop``: on Python 3.11
        every look-up of the running loop is a ``getpid()`` system call (its check for a
        fork), two per message handled with :meth:`left` and :meth:`spend`."""
        if self._loop is not loop:  # nothing used yet in this turn
            return self.share_now()
        left = self.share_now() - self.used.get(address, 0)
        total = self.total
        if total is not None and total - self.spent < left:
            left = total - self.spent
        return left if left > 0 else 0  # (max() parses keywords: some 700 instructions)

    def spend_on(self, loop: asyncio.AbstractEventLoop, address: Hashable, amount: int) -> int:
        """:meth:`spend` on ``loop``, the running loop (see :meth:`left_on`); then what the
        connections of ``address`` may still use in this turn (zero or less: nothing)."""
        if self._loop is not loop:
            self._begin(loop)
        used = self.used
        spent = used[address] = used.get(address, 0) + amount
        self.spent += amount
        left = self.share_now() - spent
        total = self.total
        if total is not None and total - self.spent < left:
            left = total - self.spent
        return left

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:  # the first of a turn (or of another loop: nothing carried over)
            self.used.clear()
            self.spent = 0
            self._loop = loop
            loop.call_soon(self.new_turn, loop)

    def spend(self, address: Hashable, amount: int) -> None:
        """Count ``amount`` used by a connection of ``address`` in this turn."""
        if address is None or not amount:
            return
        loop = asyncio._get_running_loop()
        if loop is None:
            return
        self._begin(loop)
        used = self.used
        used[address] = used.get(address, 0) + amount
        self.spent += amount

    def wait(self, address: Hashable) -> asyncio.Future[int]:
        """A future done when this connection of ``address`` has its place in a later turn, with
        what it may then use whatever its address used; cancel it to give up."""
        loop = asyncio.get_running_loop()
        self._begin(loop)
        waiter: asyncio.Future[int] = loop.create_future()
        self._waiting.setdefault(loop, {}).setdefault(address, deque()).append(waiter)
        return waiter

    def new_turn(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """A new turn of the loop: every address has its whole share again, and the first
        ``wake`` connections waiting of each have their place."""
        loop = loop or asyncio._get_running_loop()
        waiting = self._waiting
        if loop is self._loop or self._loop is None:
            queues = None if loop is None else waiting.get(loop)
            self._active = max(len(self.used), 0 if queues is None else len(queues))
            self.used.clear()
            self.spent = 0
            self._loop = None
            self.turn += 1
        # (Else another loop's counts took over meanwhile, a server's in another thread: this
        # loop's waiters still have their turn, and theirs only: a future is set by its loop.)
        if not waiting:  # (the usual turn)
            return
        for other in [other for other in waiting if other is not loop and other.is_closed()]:
            del waiting[other]  # a loop that ended without cancelling its waiters: dropped
        queues = None if loop is None else waiting.get(loop)
        if loop is None or queues is None:
            return
        share = self.share_now()
        grant = self.grant if share >= self.share else max(1, self.grant * share // self.share)
        for address in list(queues):
            queue = queues[address]
            woken = 0
            while queue and woken < self.wake:
                waiter = queue.popleft()
                if not waiter.done():  # (one cancelled gave up its place)
                    waiter.set_result(grant)
                    woken += 1
            if not queue:
                del queues[address]
        if queues:
            self._begin(loop)  # the others wait for the next turn
        else:
            del waiting[loop]


#: The frames the connections of one client address hand their libraries in one turn of the
#: event loop (:meth:`ClientFrameHeaders.feed`), together: one connection's feed share; and those
#: of every address together, four such shares (about 80 ms of websockets' parser), divided among
#: the addresses once more than four are busy. Past its share, each feed still hands on
#: :data:`FRAMES_PER_FEED_FLOOR`.
PARSED_PER_TURN = TurnShares(FRAMES_PER_FEED, total=4 * FRAMES_PER_FEED)
#: What a feed hands on, at most, once its address has used its share of the turn.
FRAMES_PER_FEED_FLOOR = 4


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
    never sees the start of a refused header); and at most :data:`FRAMES_PER_FEED` frames, the
    rest held (:attr:`more`) for the adapter to feed on the next turn of the event loop, with
    reading paused: one read of tiny frames (256 KiB of empty pings or fragments is some 43,000
    frames) costs the library's parser per frame, in Python for websockets and uvicorn, and
    handed over at once it held the event loop for a second or more, every connection with it.
    """

    __slots__ = ("_above", "_head", "_last", "_loop", "_skip", "charge", "ended", "more", "refused", "refused_code")

    def __init__(self, charge: ReceivingCharge | None = None) -> None:
        self._head = b""  # the start of a frame header split across reads
        self._skip = 0  # payload bytes (and mask key) of the current frame still to come
        self._last = False  # the counted message's final frame has begun
        self._above = 0x80  # 0x100 while the message in progress holds bytes of the charge
        self._loop: asyncio.AbstractEventLoop | None = None  # the connection's, from its first count
        #: The budget the bytes of messages in progress are counted in (None: not counted).
        self.charge = charge
        #: Why the stream was refused, once it is: nothing after it is parsed.
        self.refused: str | None = None
        #: The close code the refused frame calls for: 1002, or 1009 past a budget.
        self.refused_code = 1002
        #: Whether whole frames are held past this feed's :data:`FRAMES_PER_FEED`: feed again
        #: (``feed(b"")`` will do) on a later turn of the loop, with reading paused meanwhile.
        self.more = False
        #: Whether the peer's end of stream came while frames were held (:func:`end_after_held`):
        #: the adapter hands it to its library once they are all fed, not before.
        self.ended = False

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
        charge = self.charge
        address = None if charge is None else charge.address
        # This feed's share: FRAMES_PER_FEED, and no more than its client address has left of
        # its share of this turn (PARSED_PER_TURN), whatever its other connections.
        # The connection's loop, looked up once (see TurnShares.left_on); none outside a loop.
        loop = None if address is None else self._loop or self._running_loop()
        share = FRAMES_PER_FEED
        if loop is not None:
            left = PARSED_PER_TURN.left_on(loop, address)
            if left < FRAMES_PER_FEED:
                share = left if left > FRAMES_PER_FEED_FLOOR else FRAMES_PER_FEED_FLOOR
        count = 0  # counted up: a small int costs no allocation
        while pos + 2 <= end:
            if count == share:  # this feed's share: the frames after it wait for the next
                break
            count += 1
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
        if loop is not None and count:
            PARSED_PER_TURN.spend_on(loop, address, count)
        if above > 0x80 and self._last and pos <= end:  # the counted message's final frame is all here
            self._give_back()
        if pos < end:  # a header cut short (held until the rest comes), or frames past the share
            self.more = count == share  # else a header cut short
            self._head, self._skip = buf[pos:], 0
            return buf[:pos]
        if self.more:
            self.more = False
        self._head, self._skip = b"", pos - end
        return buf

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        self._loop = loop = asyncio._get_running_loop()
        return loop

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
        self.more = False
        self.release()
        return buf[:pos]


#: The blank line that ends an HTTP request's head (RFC 9112 section 2.1): every line ends in CRLF.
_HEAD_END = b"\r\n\r\n"


class RequestHead:
    """Finds where a client's upgrade request ends in its byte stream, for the adapters whose
    library would parse what follows the request as frames while the handshake is still being
    answered (websockets' sans-I/O protocol, under websockets and uvicorn): frames read then
    would be acted on, or refused, before the connection is open, and would escape
    :class:`ClientFrameHeaders`, which starts with the connection.

    :meth:`feed` returns the part of a read that belongs to the request's head (up to and
    including the blank line that ends it), for the library; every byte after it is kept in
    :attr:`behind`, in order, however the reads cut the stream. Once the connection is open,
    the adapter hands :attr:`behind` to a new :class:`ClientFrameHeaders` and then to its
    library: frames a client sent without waiting for the answer are read exactly as if they
    had come after it. Holding them is bounded by the adapter: :func:`hold_behind_request`
    stops reading at the first byte held. Pure.
    """

    __slots__ = ("_tail", "behind", "ended", "line")

    def __init__(self) -> None:
        self._tail = b""  # the last bytes of the head so far, which may start its end
        #: Whether the head has ended (every byte fed since is in :attr:`behind`).
        self.ended = False
        #: The bytes that came after the head, before the connection opened.
        self.behind = bytearray()
        #: The request line: what a library that refuses a request without saying why was
        #: refusing (:func:`~dara_ws_core.upgrade.refusal_of_request_line`).
        self.line = RequestLine()

    def feed(self, data: bytes) -> bytes:
        """The part of ``data`` that belongs to the request's head; the rest goes to
        :attr:`behind`."""
        if self.ended:
            self.behind += data
            return b""
        self.line.feed(data)
        tail = self._tail
        end = (tail + data).find(_HEAD_END)
        if end < 0:
            self._tail = (tail + data)[-3:]
            return data
        cut = end + len(_HEAD_END) - len(tail)  # >= 1: the tail alone holds no end
        self.ended, self._tail = True, b""
        self.behind += data[cut:]
        return data[:cut]


#: The most bytes an adapter holds behind a client's upgrade request before it has answered
#: (:func:`hold_behind_request`). Reading stops at the first of them, so one read (256 KiB with
#: asyncio) holds them all unless something resumed reading before the answer.
MAX_PIPELINED = 1024 * 1024


class _Reading(Protocol):
    def pause_reading(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...


def hold_behind_request(head: RequestHead, data: bytes, transport: _Reading) -> bytes:
    """:meth:`RequestHead.feed` for an adapter, on a read before the connection opened: what to
    hand the library now. Reading stops once something is held, until the adapter has answered
    and hands it on; past :data:`MAX_PIPELINED` held, the socket is dropped (before the answer,
    no close frame can say why)."""
    data = head.feed(data)
    held = len(head.behind)
    if held:
        transport.pause_reading()
        if held > MAX_PIPELINED:
            transport.abort()
            return b""
    return data


def held_behind_request(head: RequestHead | None, transport: _Reading) -> bytes:
    """Once the connection is open: what :func:`hold_behind_request` held, for the adapter to
    read now (through a new :class:`ClientFrameHeaders`, then its library), and resume reading
    after; nothing if nothing was held or the socket is already closing."""
    if head is None or not head.behind or transport.is_closing():
        return b""
    return bytes(head.behind)


class _HeldReading(Protocol):
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class HoldsFrames(Protocol):
    """An adapter's connection (its asyncio protocol) whose reads go through a
    :class:`ClientFrameHeaders`, which holds the frames past a feed's share
    (:data:`FRAMES_PER_FEED`): what :func:`feed_held_later` and :func:`end_after_held` need."""

    @property
    def dara_frames(self) -> ClientFrameHeaders | None:
        """The connection's frame headers (``None`` until it is open)."""

    @property
    def transport(self) -> _HeldReading | None:
        """The asyncio transport it reads from (``None``: gone)."""

    def data_received(self, data: bytes) -> None:
        """Its read: ``data`` through :attr:`dara_frames` to the library (``b""``: the next share)."""

    def dara_resumable(self) -> bool:
        """Whether reading may resume once the held frames are handed on: nothing else (the
        library's own flow control, a full write buffer) paused it meanwhile."""

    def dara_ended(self) -> None:
        """Hand the library the peer's end of stream that :func:`end_after_held` kept back,
        now that every frame before it is fed, and close the transport unless the library
        keeps it (what the transport does when ``eof_received`` does not)."""


def feed_held_later(connection: HoldsFrames) -> None:
    """For an adapter's read that left frames held (``dara_frames.more``) with no later feed on
    its way yet: reading pauses, and the held frames are handed on a share a turn of the event
    loop, other connections served in between; then comes the end of stream kept back
    meanwhile (:func:`end_after_held`), or else reading resumes (``dara_resumable``)."""
    transport = connection.transport
    if transport is not None:
        transport.pause_reading()
        asyncio.get_running_loop().call_soon(_feed_held, connection)


def _feed_held(connection: HoldsFrames) -> None:
    frames, transport = connection.dara_frames, connection.transport
    if frames is None or not frames.more or transport is None or transport.is_closing():
        return
    connection.data_received(b"")
    if frames.more:
        transport.pause_reading()  # (resumed meanwhile by whatever paused it too)
        asyncio.get_running_loop().call_soon(_feed_held, connection)
    elif frames.ended:
        connection.dara_ended()
    elif connection.dara_resumable():
        transport.resume_reading()


def read_behind_request(connection: HoldsFrames, held: bytes) -> None:
    """Once the connection is open (``dara_frames`` set): what the client sent behind its
    request (:func:`held_behind_request`) read as if it came after the answer. Reading resumes
    after it, unless frames are still held (:func:`feed_held_later` resumes once they are handed
    on: on uvloop a read, an end of stream too, would come in between) or the library paused it
    too (it resumes)."""
    if not held:
        return
    connection.data_received(held)
    frames, transport = connection.dara_frames, connection.transport
    if frames is not None and not frames.more and transport is not None and connection.dara_resumable():
        transport.resume_reading()


def end_after_held(connection: HoldsFrames) -> bool:
    """For an adapter's ``eof_received``: ``True`` when the peer's end of stream came while
    frames are held (the library's own flow control resumed reading before they were all
    handed on): the adapter answers ``True``, so that the transport stays open, and the end
    waits for :func:`feed_held_later`'s last share (``dara_ended``). Handed on first, the end
    of stream closed the connection, and the held frames were lost (pings unanswered, messages
    never handled). Over TLS, where asyncio ends the connection whatever ``eof_received``
    answers, they are all handed on now, and the end follows at once (``False``)."""
    frames, transport = connection.dara_frames, connection.transport
    if frames is None or not frames.more or transport is None:
        return False
    if transport.get_extra_info("sslcontext") is None:
        frames.ended = True
        return True
    while frames.more and not transport.is_closing():  # each feed takes a share, or ends
        connection.data_received(b"")
    return False


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

    def __repr__(self) -> str:
        native = type(self.native)
        return f"<Server {self.url} ({native.__module__}.{native.__qualname__})>"


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

    ``path`` is the target's path normalized (:func:`~dara_ws_core.upgrade.normalize_path`:
    ``/api/core/%77s`` is ``/api/core/ws``, a ``%2F`` stays one), whatever the transport and
    whether the client sent the origin or the absolute form; ``headers`` keys are lower-case;
    the last value wins for repeated query parameters.
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
        """Build from a request target as sent (``/path?query``, or the absolute form
        ``http://host/path?query``) and raw header pairs. ``remote`` is the peer's address as the
        library gives it (a socket's ``peername``, whose IPv6 form has four items, or an ASGI
        ``client`` list): its host and port are kept, anything else (a Unix socket's path,
        ``None``) is no address. Raises ``ValueError`` for a target that names no path
        (:func:`~dara_ws_core.upgrade.read_target`: adapters answer those first)."""
        read = read_target(target)
        if isinstance(read, Refusal):
            raise ValueError(f"{target!r} is no request target: {read.detail}")
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
            path=read.path,
            query=dict(parse_qsl(read.query, keep_blank_values=True)),
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


#: Most entries of an ``X-Forwarded-For`` header read, from the right: a chain of proxies is a
#: few hops long, and a client must not make the parse cost more than this.
MAX_FORWARDED_HOPS = 16


class TrustedProxies:
    """The reverse proxies whose ``X-Forwarded-For`` header names the client
    (``ServerConfig.forwarded_allow_ips``, uvicorn's setting of that name): what the bounds
    counted per address count a request from one of them as. Pure; built once per endpoint.

    ``allowed`` is a comma-separated string or a sequence of IP addresses and networks
    (``"10.0.0.0/8"``), or ``"*"`` for any peer, a Unix socket's too. A request whose socket
    peer is not one of them keeps the peer's address, whatever its headers say: a client cannot
    name itself. From a trusted peer, the header is read from the right, each proxy having
    appended the address it was connected from: the client is the right-most address that is
    not a trusted proxy (with ``"*"``, the right-most address: the one the proxy that connected
    appended, as the entries left of it are the client's own words). A header with no entry,
    or one that is not an IP address before that, is ignored: the peer's address counts."""

    __slots__ = ("_anyone", "_networks")

    def __init__(self, allowed: str | Iterable[str]) -> None:
        import ipaddress  # only for a server behind a proxy

        items = allowed.split(",") if isinstance(allowed, str) else allowed
        names = [item.strip() for item in items if item.strip()]
        self._anyone = "*" in names
        try:
            self._networks = tuple(ipaddress.ip_network(name, strict=False) for name in names if name != "*")
        except ValueError as exc:
            raise ValueError(f"forwarded_allow_ips: {exc}") from None

    def __bool__(self) -> bool:
        """Whether any peer is trusted at all."""
        return self._anyone or bool(self._networks)

    def trusts(self, host: str | None) -> bool:
        """Whether a peer at ``host`` (an address, or an address key: an IPv6 /64) is a trusted
        proxy; ``None`` (no address: a Unix socket) only with ``"*"``."""
        if self._anyone:
            return True
        if host is None:
            return False
        import ipaddress

        try:
            if "/" in host:  # an address key: trusted if a proxy may be in it
                network = ipaddress.ip_network(host, strict=False)
                return any(network.overlaps(n) for n in self._networks)
            address = _ip(host)
        except ValueError:
            return False
        return address is not None and any(address in n for n in self._networks)

    def client_host(self, peer: str | None, forwarded: str | None) -> str | None:
        """The client's host for a request whose socket peer is at ``peer`` and whose
        ``X-Forwarded-For`` header is ``forwarded`` (repeated headers joined with commas, as
        :meth:`HandshakeRequest.build` does): ``peer`` unless it is a trusted proxy and the
        header names someone well-formed."""
        if not forwarded or not self.trusts(peer):
            return peer
        entries = forwarded.rsplit(",", MAX_FORWARDED_HOPS)[-MAX_FORWARDED_HOPS:]
        client = peer
        for entry in reversed(entries):
            address = _forwarded_ip(entry)
            if address is None:  # malformed: who sent it is unknown
                return peer
            client = str(address)
            if self._anyone or not any(address in n for n in self._networks):
                return client
        return client  # every hop a trusted proxy: the left-most of them read


def _ip(host: str) -> IPv4Address | IPv6Address | None:
    """``host`` as an IP address (an IPv4-mapped IPv6 one as its IPv4 address, a zone dropped);
    ``None`` if it is none."""
    import ipaddress

    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _forwarded_ip(entry: str) -> IPv4Address | IPv6Address | None:
    """One ``X-Forwarded-For`` entry's address: ``192.0.2.1``, ``2001:db8::1``, or with a port
    as some proxies write it (``192.0.2.1:4711``, ``[2001:db8::1]:4711``); ``None`` for
    anything else (``unknown``, an obfuscated name)."""
    entry = entry.strip()
    if entry.startswith("["):
        entry, bracket, port = entry[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
    elif entry.count(":") == 1:
        entry, _, port = entry.partition(":")
        if not port.isdigit():
            return None
    return _ip(entry) if entry else None
