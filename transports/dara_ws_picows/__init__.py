"""The picows transport (picows >= 2.3, Cython): serve an endpoint on picows' callback API.

picows parses frames in C and writes them with a synchronous ``send``, which is what the core's
``send_nowait`` fast path wants. Its listener factory is synchronous, and the core's authenticator
is not: so a small gate reads the HTTP request first (bounded in bytes, headers and time), refuses
what every transport refuses (:func:`~dara_ws_core.upgrade.check_upgrade_request`, then
:func:`~dara_ws_core.upgrade.check_target`: 400 or 404), runs ``Endpoint.authenticate`` and
answers 403 itself; only an accepted request is handed to
picows, which answers 101 and parses frames from then on. No protocol logic lives here.

    async with serve(endpoint, "127.0.0.1", 8000) as server:  # a dara_ws_core.Server
        await server.native.serve_forever()  # the asyncio.Server
"""

from __future__ import annotations

__all__ = ["PicowsTransport", "Server", "serve"]

import asyncio
import asyncio.selector_events
import ctypes
import logging
import mmap
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from types import MethodType
from typing import Any, cast

try:
    from picows import WSAutoPingStrategy
    from picows.picows import WSProtocol  # type: ignore[attr-defined]  # what ws_create_server builds
except ImportError as exc:  # the extra is missing: say which one to install
    raise ImportError(
        'dara_ws_picows needs the picows library: pip install "dara-ws-core[picows]"', name=exc.name
    ) from exc

from dara_ws_core.endpoint import UNAVAILABLE, Admission, Endpoint, host_of
from dara_ws_core.exceptions import AuthenticationFailed, EndpointClosed
from dara_ws_core.tls import CountedTLS
from dara_ws_core.transport import HandshakeRequest, ReceivingCharge, Server
from dara_ws_core.upgrade import (
    UNPARSABLE,
    Refusal,
    check_target,
    check_upgrade_request,
    loose_line_ends,
    parse_request_line,
    refusal_of_request_line,
)

from .transport import PicowsTransport

#: The opening request's limit: bytes up to the blank line (its lines and headers are bounded as
#: on every transport, by check_upgrade_request).
MAX_HEAD = 16 * 1024 - 256  # picows itself drops a request of 16 KiB without an answer
#: picows' first read buffer per connection (it grows as frames need): idle connections stay small.
READ_BUFFER = 4096
#: Bytes one read hands to picows at most. picows offers its whole read buffer to every read and
#: doubles it whenever a read fills it, so a client writing megabytes of tiny frames at once
#: would have them all parsed, and buffered in the inbox, in one callback while every other
#: connection waits (pausing only stops the next read). 64 KiB, as websockets reads.
READ_LIMIT = 64 * 1024


class _Quiet(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows logs every connection at INFO and every peer's protocol error at ERROR: what a
    client does is not a server error, so all of it goes to DEBUG (tracebacks keep their level).
    A shared adapter also spares picows a child ``Logger`` per connection."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("exc_info"):
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


_LOG = _Quiet(logging.getLogger("dara_ws_picows"), {})


#: The gate's own refusals, beside the upgrade check's (the same statuses on every transport).
_TOO_LARGE = Refusal(431, "Request Header Fields Too Large")
_FULL = UNAVAILABLE
_FORBIDDEN = Refusal(403, "Forbidden")


def _parse(head: bytes) -> tuple[str, list[tuple[str, str]]] | Refusal:
    """The request target and headers of a WebSocket upgrade request's head, or the refusal
    every transport answers it (:func:`~dara_ws_core.upgrade.check_upgrade_request`)."""
    lines = head.decode("latin-1").split("\r\n")
    if loose_line_ends(head):  # as websockets' and aiohttp's parsers answer it
        return UNPARSABLE
    parsed = parse_request_line(lines[0])
    if parsed is None or parsed[2] != "1.1":  # 400, or 505 before the headers, as websockets
        return refusal_of_request_line(lines[0])
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return UNPARSABLE
        headers.append((name, value.strip()))
    return check_upgrade_request(parsed[0], parsed[2], headers) or (parsed[1], headers)


def _for_picows(head: bytes) -> bytes:
    """A request head :func:`_parse` took, as picows takes it: picows upgrades only a
    ``Connection`` of exactly ``upgrade`` and an ``Upgrade`` of exactly ``websocket`` (in any
    case), and answered 400 to the lists RFC 9110 allows and the check takes, Firefox's
    ``Connection: keep-alive, Upgrade`` among them. Those headers are written as picows reads
    them; the others are left as they came."""
    lines = head.split(b"\r\n")
    kept = [line for line in lines[1:] if line.partition(b":")[0].lower() not in (b"connection", b"upgrade")]
    return b"\r\n".join([lines[0], *kept, b"Connection: Upgrade", b"Upgrade: websocket"])


class _Gate(asyncio.Protocol):
    """Reads one opening request, authenticates it, then hands the socket to picows."""

    def __init__(self, server: _Serving) -> None:
        self._server = server
        self._head = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        #: The endpoint's answer for this socket (max_connections); freed when the socket goes
        #: (by picows' protocol once handed over).
        self._admission = Admission.DROP
        self._host: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._host = host_of(transport.get_extra_info("peername"))
        self._admission = self._server.endpoint.take_slot(self._host, self._evict)
        if self._admission is Admission.DROP:
            transport.abort()
            return
        self._timer = asyncio.get_running_loop().call_later(
            self._server.endpoint.config.handshake_timeout, transport.abort
        )

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._task is not None:
            return
        # Search only what can hold a new end of the head: a client sending it byte by byte
        # must not make every chunk rescan everything before it.
        start = max(0, len(self._head) - 3)
        self._head += data
        end = self._head.find(b"\r\n\r\n", start)
        if end < 0:
            if self._head.find(b"\n\n", max(0, start - 1)) >= 0:  # a head ended by bare LFs
                self._reject(UNPARSABLE)
            elif len(self._head) > MAX_HEAD:
                self._reject(_TOO_LARGE)
            return
        if end > MAX_HEAD:
            self._reject(_TOO_LARGE)
            return
        self._server.endpoint.settled(self._evict)  # its request is whole: never evicted now
        parsed = _parse(bytes(self._head[:end]))
        if isinstance(parsed, Refusal):
            self._reject(parsed)
            return
        self._head[:end] = _for_picows(bytes(self._head[:end]))
        if refusal := check_target(parsed[0], self._server.endpoint.path):
            self._reject(refusal)
            return
        handshake = HandshakeRequest.build(*parsed, transport.get_extra_info("peername"))
        if self._admission is not Admission.ADMIT:
            self._reject(_FULL)
            return
        transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._accept(transport, handshake))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
        self._transport = None
        self._server.endpoint.free_slot(self._admission, self._host, self._evict)

    def _evict(self) -> bool:
        # The key the socket waits under in the endpoint's slots until its head is whole (a
        # bound method, equal each time it is taken: stored nowhere, no reference cycle).
        if self._transport is not None:
            self._transport.abort()
        return True

    def _reject(self, refusal: Refusal) -> None:
        if self._transport is not None:
            self._transport.write(refusal.encode())
            self._transport.close()

    async def _accept(self, transport: asyncio.Transport, handshake: HandshakeRequest) -> None:
        try:
            identity = await self._server.endpoint.authenticate(handshake)
        except EndpointClosed:  # the shutdown overtook it: going away, not refusing the client
            self._reject(_FULL)
            return
        except AuthenticationFailed:
            self._reject(_FORBIDDEN)
            return
        if self._transport is None:  # gone meanwhile
            return
        if self._timer is not None:
            self._timer.cancel()
        self._task = None
        # From here the socket is picows': its protocol frees the slot (the gate never hears of
        # the socket again).
        admission, self._admission = self._admission, Admission.DROP
        listener = self._server.handover(transport, bytes(self._head), admission, self._host,
                                         self._server.endpoint.receiving_charge(identity, self._host))
        if listener is not None:  # else picows refused the upgrade headers (400)
            self._server.run(listener, identity)


def _madvise() -> Callable[[int, int, int], int] | None:
    """The C library's ``madvise``, or ``None`` where there is none (Windows)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return cast("Callable[[int, int, int], int]", function)


_MADVISE = _madvise() if hasattr(mmap, "MADV_DONTNEED") else None


def _release_pages(free: memoryview, keep: int = READ_LIMIT) -> int:
    """Hand the memory pages of ``free`` (a writable view of a buffer's unused space: whatever it
    holds is never read again) past its first ``keep`` bytes back to the system; returns how
    many bytes were handed back. Nothing is freed: the range stays the buffer's, and a page is
    given again, zeroed, the next time it is written. Linux and other POSIX systems only."""
    if _MADVISE is None or len(free) <= keep:
        return 0
    start = ctypes.addressof(ctypes.c_char.from_buffer(free))
    first = -(-(start + keep) // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only
    end = (start + len(free)) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= first or _MADVISE(first, end - first, mmap.MADV_DONTNEED) != 0:
        return 0
    return end - first


#: asyncio's own socket transport (its selector loop's), looked up without naming a private class.
_SOCKET_TRANSPORT: type | None = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)


def _stock_size() -> Callable[[Any], int] | None:
    """asyncio's ``get_write_buffer_size`` of its own socket transport, where it is
    ``len(self._buffer)`` of a ``bytearray`` the transport keeps for its lifetime (Python 3.11:
    cleared in place, never rebound); ``None`` elsewhere (3.12 sums a deque of chunks)."""
    size = getattr(_SOCKET_TRANSPORT, "get_write_buffer_size", None)
    code = getattr(size, "__code__", None)
    if code is None or code.co_names != ("len", "_buffer") or \
            getattr(_SOCKET_TRANSPORT, "_buffer_factory", None) is not bytearray:
        return None
    return cast("Callable[[Any], int]", size)


_STOCK_SIZE = _stock_size()


def _write_buffer_size(transport: asyncio.Transport) -> Callable[[], int] | None:
    """What ``transport.get_write_buffer_size()`` returns, as a C callable: the ``__len__`` of
    asyncio's own socket transport's write buffer (:func:`_stock_size`), or ``None`` for any
    other transport (uvloop's is in C already; TLS; a subclass may keep its buffer otherwise).

    picows asks the size before every frame it writes (a frame goes straight to the socket
    only while nothing waits in asyncio's buffer): through asyncio's method that is a Python
    call, about 600 of the 1,100 instructions picows spends on a small frame (callgrind), once
    per recipient of a broadcast. The buffer's ``__len__`` returns the same number from C."""
    if _STOCK_SIZE is None or type(transport) is not _SOCKET_TRANSPORT \
            or type(transport).get_write_buffer_size is not _STOCK_SIZE:
        return None
    buffer = vars(transport).get("_buffer")
    return buffer.__len__ if type(buffer) is bytearray else None


def _joined_writelines(transport: asyncio.Transport) -> Callable[[Any], None] | None:
    """For asyncio's own socket transport where its ``writelines`` keeps the buffers it is given
    (Python 3.12 and later: views kept in its buffer until sent) and never pauses the protocol,
    asyncio's base ``writelines``, bound to it: the buffers joined into one ``write()``, copied
    at once and flow-controlled. ``None`` elsewhere (3.11's is that one already; other loops).

    picows writes a server frame over 8 KiB with ``writelines([header, payload])``, the header a
    view of picows' own write buffer, which it reuses for the next frame. With 3.12's method,
    what a slow reader left unsent grew without bound (``pause_writing`` never came: 24 MiB for
    50 broadcasts of 512 KiB, the 1013 never sent), and the header kept in asyncio's buffer was
    the memory picows wrote the next frames' headers into."""
    if _SOCKET_TRANSPORT is None or type(transport) is not _SOCKET_TRANSPORT \
            or getattr(_SOCKET_TRANSPORT, "writelines", None) is _BASE_WRITELINES:
        return None
    return MethodType(_BASE_WRITELINES, transport)


#: asyncio's base ``writelines``: ``self.write(b"".join(list_of_data))``.
_BASE_WRITELINES = asyncio.WriteTransport.writelines


class _BoundedReads(asyncio.BufferedProtocol):
    """picows' protocol as the socket's, with every read bounded to :data:`READ_LIMIT` bytes,
    and what a large frame grew its read buffer by handed back once the frame is handled."""

    __slots__ = ("_admission", "_endpoint", "_host", "_joined", "_protocol", "_releasing", "buffer_updated")

    def __init__(self, protocol: WSProtocol, endpoint: Endpoint, admission: Admission,
                 host: str | None) -> None:
        self._protocol = protocol
        self._endpoint = endpoint
        self._admission, self._host = admission, host  # the gate's slot, freed with the socket
        self._releasing = False
        #: The transport given a writelines of its own (_joined_writelines), which holds it:
        #: taken back at connection_lost, so that no cycle is left to the collector.
        self._joined: asyncio.Transport | None = None
        # picows' own method (in C), called by the loop without a Python call around it.
        self.buffer_updated = protocol.buffer_updated  # type: ignore[method-assign]  # an instance slot

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer: memoryview = self._protocol.get_buffer(sizehint)  # a view of picows' buffer
        return buffer[:READ_LIMIT]

    def release(self) -> None:
        """After a frame over ``RELEASE_ABOVE``: picows grew its read buffer to hold it and
        never shrinks it, nor lets it be replaced, so an idle connection would keep the pages
        of the largest frame it ever received. Once picows has handled what it read (later in
        this loop iteration), the pages past what the next read may fill go back to the
        system: what an idle connection holds is its unread bytes and one read's room."""
        if not self._releasing:
            self._releasing = True
            asyncio.get_running_loop().call_soon(self._release)

    def _release(self) -> None:
        self._releasing = False
        _release_pages(self._protocol.get_buffer(-1))

    def eof_received(self) -> bool | None:
        return cast("bool | None", self._protocol.eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        joined, self._joined = self._joined, None
        if joined is not None:
            vars(joined).pop("writelines", None)
        admission, self._admission = self._admission, Admission.DROP
        self._endpoint.free_slot(admission, self._host)
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()


class _Serving:
    """One server's shared state: the endpoint, picows' options, the connections' tasks."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        config = endpoint.config
        interval, timeout = config.ping_interval, config.ping_timeout
        self._options = (
            _LOG, True, None,  # logger, disconnect_on_exception, handshake timeout (the gate's)
            interval is not None, interval or 20.0, min(timeout or interval or 20.0, interval or 20.0),
            WSAutoPingStrategy.PING_WHEN_IDLE, False,  # pongs are the listener's (flow control)
            config.max_message_size, None, READ_BUFFER,
        )
        self.tasks: set[asyncio.Task[None]] = set()

    def handover(self, transport: asyncio.Transport, head: bytes, admission: Admission,
                 host: str | None, charge: ReceivingCharge | None = None) -> PicowsTransport | None:
        config = self.endpoint.config
        if charge is None:
            charge = ReceivingCharge(config.max_receiving_total_bytes)
        listener = PicowsTransport(config.max_message_size, config.close_timeout, charge)
        protocol = WSProtocol(None, None, False, lambda request: listener, *self._options)
        reads = _BoundedReads(protocol, self.endpoint, admission, host)
        listener.release_reads = reads.release
        transport.set_protocol(reads)
        joined = _joined_writelines(transport)
        if joined is not None:  # (picows looks writelines up at each frame over 8 KiB)
            transport.writelines = joined  # type: ignore[method-assign,assignment]
            reads._joined = transport
        # While picows and the listener take their hold of the transport (picows' WSTransport
        # in connection_made, the listener once upgraded), its buffer size is a C call
        # (_write_buffer_size); the transport's own method is back afterwards.
        buffered = _write_buffer_size(transport)
        if buffered is not None:
            transport.get_write_buffer_size = buffered  # type: ignore[method-assign]
        try:
            protocol.connection_made(transport)
            view = memoryview(head)
            while view:  # what the gate read goes to picows as if it had read it itself
                buffer = protocol.get_buffer(-1)
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                protocol.buffer_updated(size)
                view = view[size:]
        finally:
            if buffered is not None:
                del transport.get_write_buffer_size
        if transport.is_closing():
            return None
        transport.resume_reading()
        return listener if listener.accepted else None

    def run(self, listener: PicowsTransport, identity: Any) -> None:
        task = asyncio.get_running_loop().create_task(self.endpoint.serve(listener, identity))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@asynccontextmanager
async def serve(
    endpoint: Endpoint, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any
) -> AsyncIterator[Server[asyncio.Server]]:
    """Serve ``endpoint`` on ``ws://host:port{endpoint.path}``; other paths get 404.

    Yields a :class:`~dara_ws_core.Server` (``port=0`` picks a free port) whose ``native`` is the
    ``asyncio.Server``. Extra keyword arguments go to ``loop.create_server`` (``reuse_port=True``,
    ``backlog=``, ``ssl=`` a server ``ssl.SSLContext``: then ``wss://``). On exit listening
    stops, then the endpoint shuts down gracefully (connections close with 1001). Raises
    ``OSError`` if the address cannot be bound.
    """
    endpoint.open()
    serving = _Serving(endpoint)

    def gate() -> _Gate:
        return _Gate(serving)

    # Over TLS, each socket counted from its accept (its TLS handshake bounded by handshake_timeout).
    tls = CountedTLS.take_from(kwargs, (endpoint,))
    server = await asyncio.get_running_loop().create_server(
        gate if tls is None else tls.factory(gate), host, port, **kwargs)
    try:
        port = int(server.sockets[0].getsockname()[1])
        yield Server.build(host, port, endpoint.path, server, secure=tls is not None)
    finally:
        server.close()
        await endpoint.shutdown()
        for task in list(serving.tasks):
            task.cancel()
        await asyncio.gather(*serving.tasks, return_exceptions=True)
