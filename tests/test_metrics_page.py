"""``dara-ws serve --metrics-port``: a real demo process scraped over HTTP on 127.0.0.1, and the
checked-in Grafana dashboard's queries checked against that scrape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.exporter.prometheus")

from dara_ws_cli.metrics import CachedPage, metrics_page, serve_metrics
from dara_ws_core import WebsocketManager

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "dara-ws.json"
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scraped_names(page: str) -> set[str]:
    """The sample names of a Prometheus text page."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in page.splitlines()
            if line and not line.startswith("#")}


def dashboard_metrics() -> set[str]:
    """Every metric name in the dashboard's queries (labels in ``by (...)``, matchers and ranges
    taken out first)."""
    names: set[str] = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"by \([^)]*\)|\{[^}]*\}|\[[^]]*\]", "", target["expr"])
            names.update(re.findall(r"\bdara_[a-z0-9_]+", expr))
    return names


def test_dara_ws_serve_answers_metrics_with_the_dashboards_names() -> None:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", str(port), "--metrics-port", "0",
         "--clock", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert server.stdout is not None
        metrics_url = None
        line = server.stdout.readline()
        while "dara-ws demo" not in line:
            assert line, "the demo server exited before it was ready"
            if line.startswith("metrics on "):
                metrics_url = line.split()[-1]
            line = server.stdout.readline()
        assert metrics_url is not None and metrics_url.startswith("http://127.0.0.1:")
        probe = subprocess.run(
            [sys.executable, "-m", "dara_ws_cli", "probe",
             f"ws://127.0.0.1:{port}/api/core/ws?token=probe"],
            check=False, capture_output=True, text=True, timeout=30,
        )
        assert probe.returncode == 0, probe.stderr
        # One client stays connected through the scrape, with a clock push on the way.
        client = subprocess.Popen(
            [sys.executable, "-c", _STAY_CONNECTED, f"ws://127.0.0.1:{port}/api/core/ws?token=stay"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "connected"
            with urllib.request.urlopen(metrics_url, timeout=10) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                page = response.read().decode()
        finally:
            client.terminate()
            client.wait(timeout=20)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(metrics_url.replace("/metrics", "/other"), timeout=10)
        assert missing.value.code == 404
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert server.returncode == 0
    names = scraped_names(page)
    for name in ("dara_websocket_message_executions_total", "dara_websocket_message_active",
                 "dara_websocket_message_duration_seconds_bucket",
                 "dara_websocket_queue_duration_seconds_bucket",
                 "dara_websocket_round_trip_duration_seconds_bucket", "dara_ws_connections"):
        assert name in names, name
    assert 'dara_websocket_message_executions_total{dara_outcome="success"' in page
    assert "otel_scope_name" not in page  # as dara-core configures its exporter
    wanted = dashboard_metrics()
    assert len(wanted) >= 15
    assert sorted(wanted - names) == []


_STAY_CONNECTED = """
import asyncio, sys
from dara_ws_core import DaraClient
from dara_ws_websockets import connect

async def main():
    client = DaraClient(lambda: connect(sys.argv[1]), ping_interval=None)
    await client.connect()
    await client.receive(timeout=10)  # a clock push: outbound frames were counted
    print("connected", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_the_metrics_listener_serves_an_in_process_manager() -> None:
    manager = WebsocketManager()
    render = metrics_page(manager)
    async with serve_metrics(render, "127.0.0.1", 0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await reader.read()
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"dara_websocket_message_active" in body


async def scrape(port: int, path: bytes = b"/metrics") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def counting_page(rendered: list[float], clock: Clock) -> CachedPage:
    def render() -> tuple[bytes, str]:
        rendered.append(clock.now)
        return f"page {len(rendered)}\n".encode(), "text/plain"

    return CachedPage(render, 1.0, clock)


def test_the_page_is_rendered_at_most_once_a_second() -> None:
    clock, rendered = Clock(), list[float]()
    page = counting_page(rendered, clock)
    assert [page()[0] for _ in range(100)] == [b"page 1\n"] * 100
    clock.now += 0.99
    assert page()[0] == b"page 1\n"
    clock.now += 0.01
    assert page()[0] == b"page 2\n"
    assert rendered == [100.0, 101.0]
    assert isinstance(metrics_page(WebsocketManager()), CachedPage)


async def test_concurrent_scrapes_share_one_rendering() -> None:
    clock, rendered = Clock(), list[float]()
    async with serve_metrics(counting_page(rendered, clock), "127.0.0.1", 0) as port:
        answers = await asyncio.gather(*(scrape(port) for _ in range(12)))
        assert [a.partition(b"\r\n\r\n")[2] for a in answers] == [b"page 1\n"] * 12
        clock.now += 1.0
        assert (await scrape(port)).endswith(b"\r\n\r\npage 2\n")
    assert len(rendered) == 2


async def test_sockets_beyond_the_listeners_cap_get_503_at_once() -> None:
    clock, rendered = Clock(), list[float]()
    async with serve_metrics(counting_page(rendered, clock), "127.0.0.1", 0, max_connections=4) as port:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        # Those four say nothing; the listener holds them (for up to 10 s), and no more.
        # A fifth is answered and closed at once, not held: a reader gets the 503 (one that
        # sent its request may see a reset instead, its request being unread at the close).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert (await asyncio.wait_for(scrape(port), 5)).startswith(b"HTTP/1.1 503")
        assert rendered == []
        for _, writer in idle:
            writer.close()
        answer = b""
        for _ in range(200):  # bounded: the listener sees the four closes within a few loop turns
            with contextlib.suppress(ConnectionResetError):  # still refused
                answer = await scrape(port)
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.01)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"page 1\n")
