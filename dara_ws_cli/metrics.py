"""``dara-ws serve --metrics-port``: the server's metrics as a Prometheus page, ``GET /metrics``.

One set of instruments (:func:`dara_ws_core.telemetry.instrument`) read by the OpenTelemetry
Prometheus exporter (the ``[prometheus]`` extra), the way dara-core 1.30 exposes its own: the
same names reach an OTLP collector and a scrape. The page is served by a small HTTP listener on
the event loop, beside the WebSocket port, so it works on every transport and every collection
reads ``manager.stats()`` on the loop's thread (prometheus-client's own ``start_http_server``
would read it from another thread while the loop changes it).

Rendering the page (a full collection) takes the loop for a few milliseconds, so scrapers cannot
make it pay that at their own rate: the page is rendered at most once per second
(:class:`CachedPage`), and the listener serves at most ``max_connections`` sockets at once
(beyond: ``503`` and the socket closed at once).
"""

from __future__ import annotations

__all__ = ["CachedPage", "metrics_page", "serve_metrics"]

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from dara_ws_core import WebsocketManager

#: A request line and headers larger than this get no answer: the page takes no input.
_MAX_REQUEST = 8192
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


def metrics_page(manager: WebsocketManager) -> Callable[[], Page]:
    """Instrument ``manager`` for a Prometheus page; returns what renders it (body, content
    type), at most once a second (:class:`CachedPage`).

    Raises ``ImportError`` naming the extra when the exporter is missing.
    """
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError as exc:
        raise ImportError('the /metrics page needs pip install "dara-ws-core[prometheus]"',
                          name=exc.name) from exc
    from dara_ws_core.telemetry import instrument

    registry = CollectorRegistry()
    # As dara-core configures it: no otel_scope_* labels, so its dashboards' queries match.
    reader = PrometheusMetricReader(registry=registry, scope_info_enabled=False)
    instrument(manager, MeterProvider(metric_readers=[reader]))
    return CachedPage(lambda: (generate_latest(registry), CONTENT_TYPE_LATEST))


@contextlib.asynccontextmanager
async def serve_metrics(render: Callable[[], Page], host: str, port: int, *,
                        max_connections: int = 16) -> AsyncIterator[int]:
    """Answer ``GET /metrics`` on ``host:port`` (``0``: any free port) until the block exits;
    yields the port. Anything else gets 404; one request per connection, whose request must
    arrive within 10 s. Beyond ``max_connections`` sockets at once, a new one gets ``503`` with
    ``Retry-After: 1`` and is closed at once, so that a flood of scrapes or of idle sockets
    holds no more than that many. ``render`` is called for every ``GET /metrics``: give it a
    cached page (:func:`metrics_page` does)."""
    open_sockets = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_sockets
        if open_sockets >= max_connections:
            writer.write(_FULL)
            writer.close()
            return
        open_sockets += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = head[:_MAX_REQUEST].split(b" ", 2)
            if len(parts) == 3 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body, content_type = render()
                status = b"200 OK"
            else:
                body, content_type, status = b"Not Found\n", "text/plain", b"404 Not Found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type.encode()
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            open_sockets -= 1
            writer.close()

    server = await asyncio.start_server(answer, host, port, limit=_MAX_REQUEST)
    async with server:
        yield int(server.sockets[0].getsockname()[1])
