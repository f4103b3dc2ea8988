"""``dara-ws serve --metrics-port``: the server's metrics as a Prometheus page, ``GET /metrics``.

One set of instruments (:func:`dara_ws_core.telemetry.instrument`) read by the OpenTelemetry
Prometheus exporter (the ``[prometheus]`` extra), the way dara-core 1.30 exposes its own: the
same names reach an OTLP collector and a scrape. The page is served by a small HTTP listener on
the event loop, beside the WebSocket port, so it works on every transport and every collection
reads ``manager.stats()`` on the loop's thread (prometheus-client's own ``start_http_server``
would read it from another thread while the loop changes it).
"""

from __future__ import annotations

__all__ = ["metrics_page", "serve_metrics"]

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from dara_ws_core import WebsocketManager

#: A request line and headers larger than this get no answer: the page takes no input.
_MAX_REQUEST = 8192


def metrics_page(manager: WebsocketManager) -> Callable[[], tuple[bytes, str]]:
    """Instrument ``manager`` for a Prometheus page; returns what renders it (body, content type).

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
    return lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)


@contextlib.asynccontextmanager
async def serve_metrics(render: Callable[[], tuple[bytes, str]], host: str, port: int) -> AsyncIterator[int]:
    """Answer ``GET /metrics`` on ``host:port`` (``0``: any free port) until the block exits;
    yields the port. Anything else gets 404; one request per connection."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
            writer.close()

    server = await asyncio.start_server(answer, host, port, limit=_MAX_REQUEST)
    async with server:
        yield int(server.sockets[0].getsockname()[1])
