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
from tests.helpers import run_on

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
    # The backplane's are on a page only with --redis-url: tests/test_metrics_backplane_redis.py.
    wanted = {name for name in dashboard_metrics() if not name.startswith("dara_ws_backplane_")}
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


async def _scraped_once() -> bytes:
    async with serve_metrics(metrics_page(WebsocketManager()), "127.0.0.1", 0) as port:
        return await scrape(port)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_metrics_listener_answers_on_either_loop(loop: str) -> None:
    # `dara-ws serve --loop uvloop --metrics-port`: uvloop's transports are no
    # asyncio.Transport subclasses, and the listener closed every scrape unanswered.
    head, _, body = run_on(loop, _scraped_once()).partition(b"\r\n\r\n")
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


async def silent(port: int, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A socket from ``address`` (a loopback address) that sends nothing."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))


async def closed_by_the_listener(reader: asyncio.StreamReader) -> bool:
    """Whether the listener closed this socket without an answer (within a bound)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    return await asyncio.wait_for(reader.read(), 5)


async def test_sockets_that_send_nothing_make_room_for_a_scrape() -> None:
    """16 silent sockets fill the listener; a newcomer closes the oldest socket of the address
    holding the most that is still sending its request, so a crowd from one address closes its
    own, and a scraper elsewhere is answered whatever their number."""
    clock, rendered = Clock(), list[float]()
    async with serve_metrics(counting_page(rendered, clock), "127.0.0.1", 0) as port:
        held = [await silent(port, "127.0.0.2") for _ in range(16)]
        bystander = await silent(port, "127.0.0.3")  # closes the oldest of 127.0.0.2
        crowd = [await silent(port, "127.0.0.2") for _ in range(20)]  # each closes its own oldest
        assert all([await closed_by_the_listener(reader) for reader, _ in held])
        assert (await answered(*bystander)).endswith(b"\r\n\r\npage 1\n")
        assert (await asyncio.wait_for(scrape(port), 5)).endswith(b"\r\n\r\npage 1\n")
        for _, writer in [*held, bystander, *crowd]:
            writer.close()


async def test_a_socket_has_a_bounded_time_to_send_its_request() -> None:
    clock, rendered = Clock(), list[float]()
    async with serve_metrics(counting_page(rendered, clock), "127.0.0.1", 0,
                             request_timeout=0.2) as port:
        nothing = await silent(port, "127.0.0.2")
        part = await silent(port, "127.0.0.3")
        part[1].write(b"GET /metrics HTTP/1.1\r\nHost")
        assert await closed_by_the_listener(nothing[0])
        assert await closed_by_the_listener(part[0])
        assert rendered == []
        for _, writer in (nothing, part):
            writer.close()


async def test_a_scraper_that_does_not_take_the_answer_is_let_go() -> None:
    """A page far larger than the sockets' buffers, to a peer that never reads it: the socket
    is closed once ``write_timeout`` passed, and its slot goes to the next scrape. While it is
    being answered it is not closed for a newcomer, which gets 503 at once."""
    pages = iter([b"x" * (64 << 20)])  # the first: for the peer that does not read

    def render() -> tuple[bytes, str]:
        return next(pages, b"small\n"), "text/plain"

    async with serve_metrics(render, "127.0.0.1", 0, max_connections=1, write_timeout=0.5) as port:
        _reader, writer = await silent(port, "127.0.0.2")
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually_refused(port)
        answer = b""
        for _ in range(100):  # bounded: the slot is free 0.5 s after the answer began
            with contextlib.suppress(ConnectionResetError):
                answer = await asyncio.wait_for(scrape(port), 20)
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nsmall\n")
        writer.close()


async def eventually_refused(port: int) -> None:
    """Scrape until one is refused (the only slot holds the answer being written)."""
    for _ in range(100):
        with contextlib.suppress(ConnectionResetError):
            if (await asyncio.wait_for(scrape(port), 5)).startswith(
                    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"):
                return
        await asyncio.sleep(0.01)
    raise AssertionError("no scrape was refused while the only slot was being answered")


async def test_leaving_the_listener_closes_the_sockets_it_serves() -> None:
    clock, rendered = Clock(), list[float]()
    async with serve_metrics(counting_page(rendered, clock), "127.0.0.1", 0) as port:
        sockets = [await silent(port, "127.0.0.2") for _ in range(3)]
        assert (await asyncio.wait_for(scrape(port), 5)).startswith(b"HTTP/1.1 200")
    assert all([await closed_by_the_listener(reader) for reader, _ in sockets])
    for _, writer in sockets:
        writer.close()
