"""``dara-ws serve --metrics-port``: the server's metrics as a Prometheus page, ``GET /metrics``.

One set of instruments (:func:`dara_ws_core.telemetry.instrument`) read by the OpenTelemetry
Prometheus exporter (the ``[prometheus]`` extra), the way dara-core 1.30 exposes its own: the
same names reach an OTLP collector and a scrape. The page is served by a small HTTP listener on
the event loop, beside the WebSocket port, so it works on every transport and every collection
reads ``manager.stats()`` on the loop's thread (prometheus-client's own ``start_http_server``
would read it from another thread while the loop changes it).

Rendering the page (a full collection) takes the loop for a few milliseconds, so scrapers cannot
make it pay that at their own rate: the page is rendered at most once per second
(:class:`CachedPage`), and the listener serves at most ``max_connections`` sockets at once. The
listener binds the WebSocket port's interface, so its peers are not all scrapers: a socket has a
second to send its request and a few to take the answer, and sockets that send nothing make room
for a newcomer (:func:`serve_metrics`), so that no peer keeps the scraper out.
"""

from __future__ import annotations

__all__ = ["CachedPage", "metrics_page", "require_exporter", "serve_metrics"]

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

from dara_ws_core import WebsocketManager, host_of

#: A request line and headers larger than this get no answer: the page takes no input.
_MAX_REQUEST = 8192
#: Seconds a socket has to send its whole request (a scraper sends it at once), and to take
#: the answer.
REQUEST_TIMEOUT = 1.0
WRITE_TIMEOUT = 5.0
#: What a socket beyond the listener's cap gets, written without waiting (it fits any buffer).
_FULL = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")

Page = tuple[bytes, str]


class CachedPage:
    """``render`` called at most once per ``ttl`` seconds (on ``clock``): every call within that
    time returns the page it rendered last, so a scrape costs a collection only once a second
    whatever the number of scrapers. Prometheus scrapes every 15 s or more: a page up to a
    second old changes nothing for it."""

    __slots__ = ("_clock", "_page", "_render", "_rendered_at", "ttl")

    def __init__(self, render: Callable[[], Page], ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._render, self.ttl, self._clock = render, ttl, clock
        self._page: Page | None = None
        self._rendered_at = 0.0

    def __call__(self) -> Page:
        now = self._clock()
        page = self._page
        if page is None or now - self._rendered_at >= self.ttl:
            self._page = page = self._render()
            self._rendered_at = now
        return page


def require_exporter() -> None:
    """Raise ``ImportError`` naming the extra unless the page's libraries are installed."""
    try:
        import opentelemetry.exporter.prometheus
        import opentelemetry.sdk.metrics  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError('the /metrics page needs the prometheus extra: pip install "dara-ws-core[prometheus]"',
                          name=exc.name) from exc


def metrics_page(manager: WebsocketManager) -> Callable[[], Page]:
    """Instrument ``manager`` for a Prometheus page; returns what renders it (body, content
    type), at most once a second (:class:`CachedPage`).

    Raises ``ImportError`` naming the extra when the exporter is missing.
    """
    require_exporter()
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from dara_ws_core.telemetry import instrument

    registry = CollectorRegistry()
    # As dara-core configures it: no otel_scope_* labels, so its dashboards' queries match.
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    instrument(manager, MeterProvider(metric_readers=[reader]))
    return CachedPage(lambda: (generate_latest(registry), CONTENT_TYPE_LATEST))


@contextlib.asynccontextmanager
async def serve_metrics(render: Callable[[], Page], host: str, port: int, *,
                        max_connections: int = 16, request_timeout: float = REQUEST_TIMEOUT,
                        write_timeout: float = WRITE_TIMEOUT) -> AsyncIterator[int]:
    """Answer ``GET /metrics`` on ``host:port`` (``0``: any free port) until the block exits;
    yields the port. Anything else gets 404; one request per connection. ``render`` is called
    for every ``GET /metrics``: give it a cached page (:func:`metrics_page` does).

    A scraper sends its request at once and reads the answer: a socket whose request has not all
    arrived within ``request_timeout`` seconds, or that has not taken the answer within
    ``write_timeout``, is closed. At most ``max_connections`` sockets are served at once; a
    newcomer beyond them closes a socket still sending its request, the oldest of the address
    holding the most sockets (as the WebSocket endpoint's :class:`~dara_ws_core.ConnectionSlots`
    makes room), rather than being refused: idle sockets, whatever their number, never keep a
    scraper out, and a peer crowding the listener closes its own first. Only when every slot
    holds a socket being answered does a newcomer get ``503`` with ``Retry-After: 1``, closed
    at once."""
    listener = _Listener(render, _Slots(max_connections), request_timeout, write_timeout)
    server = await asyncio.get_running_loop().create_server(lambda: _Scrape(listener), host, port)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for scrape in listener.slots.served():  # their requests and answers end now
            scrape.transport.abort()
        await server.wait_closed()


class _Slots:
    """The listener's sockets (pure): those served, oldest first, by address, and which of them
    are still sending their request."""

    __slots__ = ("_by_address", "_served", "_waiting", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._served: dict[_Scrape, str | None] = {}
        self._waiting: dict[_Scrape, None] = {}
        self._by_address: dict[str | None, int] = {}

    def served(self) -> list[_Scrape]:
        return list(self._served)

    def victim(self) -> _Scrape | None:
        """When every slot is taken: the socket to close for a newcomer, the oldest still
        sending its request of the address holding the most sockets; ``None`` if there is
        room, or if every socket is being answered. At most ``limit`` steps."""
        if len(self._served) < self.limit:
            return None
        victim, most = None, 0
        for scrape in self._waiting:  # oldest first: the first of the most wins
            held = self._by_address[self._served[scrape]]
            if held > most:
                victim, most = scrape, held
        return victim

    def take(self, scrape: _Scrape, address: str | None) -> bool:
        """Serve ``scrape`` (still sending its request) if there is room."""
        if len(self._served) >= self.limit:
            return False
        self._served[scrape] = address
        self._waiting[scrape] = None
        self._by_address[address] = self._by_address.get(address, 0) + 1
        return True

    def settle(self, scrape: _Scrape) -> None:
        """Its whole request arrived: it is answered, not closed for a newcomer."""
        self._waiting.pop(scrape, None)

    def release(self, scrape: _Scrape) -> None:
        """It is gone (or being closed): its slot is free. Idempotent."""
        self._waiting.pop(scrape, None)
        if scrape in self._served:
            address = self._served.pop(scrape)
            left = self._by_address.pop(address) - 1
            if left:
                self._by_address[address] = left


@dataclass(slots=True)
class _Listener:
    render: Callable[[], Page]
    slots: _Slots
    request_timeout: float
    write_timeout: float


class _Scrape(asyncio.Protocol):
    """One socket of the listener: its request within ``request_timeout``, then the answer
    taken within ``write_timeout``. Its request is read as it arrives (no task)."""

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.head: bytearray | None = bytearray()  # None once answered
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # (uvloop's transports are no asyncio.Transport subclasses: no isinstance check here)
        self.transport = transport = cast(asyncio.Transport, base)
        listener, slots = self.listener, self.listener.slots
        victim = slots.victim()
        if victim is not None:
            slots.release(victim)
            victim.transport.abort()
        if not slots.take(self, host_of(transport.get_extra_info("peername"))):
            self.head = None
            transport.write(_FULL)
            transport.close()
            return
        self.timer = asyncio.get_running_loop().call_later(listener.request_timeout, transport.abort)

    def data_received(self, data: bytes) -> None:
        head = self.head
        if head is None:
            return
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_REQUEST:  # the page takes no input: no answer
                self.transport.abort()
            return
        listener = self.listener
        listener.slots.settle(self)
        self.head = None
        if self.timer is not None:
            self.timer.cancel()
        transport = self.transport
        # Paused while anything is left unsent: resumed (and closed) once the kernel took it all,
        # so that the close lets go of the socket at once.
        transport.set_write_buffer_limits(0)
        transport.write(_response(bytes(head[:end]), listener.render))
        if transport.get_write_buffer_size():
            self.timer = asyncio.get_running_loop().call_later(listener.write_timeout, transport.abort)
        else:
            transport.close()

    def resume_writing(self) -> None:
        self.transport.close()  # all of the answer is the kernel's

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.listener.slots.release(self)


def _response(head: bytes, render: Callable[[], Page]) -> bytes:
    parts = head.split(b" ", 2)
    if len(parts) == 3 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
        body, content_type = render()
        status = b"200 OK"
    else:
        body, content_type, status = b"Not Found\n", "text/plain", b"404 Not Found"
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type.encode()
            + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n" + body)
