"""The backplane's metrics on a real scrape: two ``dara-ws serve --redis-url --metrics-port 0``
processes on a real ``redis-server``, a client on one telling a user on the other.

* The events of ``dara_ws_backplane_messages_total`` are the ones the telemetry docs list: the
  table named nine, and the page had fourteen (``lost``, ``gaps``, ``recovered``,
  ``spool_dropped`` and ``outbox_refused`` missing from the docs, ``lost`` being the one to
  alert on).
* The Grafana dashboard's backplane row asks for metrics that are on that page, and the counters
  say what happened: every ``tell`` published by one process, received and delivered by the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dara_ws_core import DaraClient
from dara_ws_websockets import connect

from .test_metrics_page import dashboard_metrics, scraped_names

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest.importorskip("opentelemetry.exporter.prometheus")
pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "telemetry.md"
TELLS = 200  # the lag is sampled one delivery in 64: a few samples


def documented_events() -> set[str]:
    row = next(line for line in DOCS.read_text().splitlines()
               if line.startswith("| `dara_ws.backplane.messages`"))
    attributes = row.split("|")[3]
    return set(re.findall(r"`([a-z_]+)`", attributes)) - {"backplane"}


@contextlib.contextmanager
def _demo(redis_url: str) -> Iterator[tuple[str, str]]:
    """A demo process on the bus: (its WebSocket URL, its metrics URL)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--clock", "0",
         "--redis-url", redis_url, "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert process.stdout is not None
        metrics = None
        for _ in range(100):
            line = process.stdout.readline()
            assert line, "the demo exited before it was ready"
            if "metrics on " in line:
                metrics = line.split()[-1]
            if "dara-ws demo" in line:
                assert metrics is not None
                yield line.split()[-1], metrics
                break
        else:
            raise AssertionError("the demo never said it was ready")
    finally:
        process.terminate()
        process.wait(timeout=30)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


def _events(page: str) -> dict[str, float]:
    """``dara_ws_backplane_messages_total`` by event."""
    return {match[1]: float(match[2]) for match in re.finditer(
        r'^dara_ws_backplane_messages_total\{dara_ws_backplane_event="([a-z_]+)"\} (\S+)$', page,
        re.MULTILINE)}


async def test_the_backplane_metrics_are_the_documented_ones_and_count_what_happened(
    redis_server: RedisServer,
) -> None:
    with _demo(redis_server.url) as (url_a, metrics_a), _demo(redis_server.url) as (url_b, metrics_b):
        teller = DaraClient(lambda: connect(f"{url_a}?token=teller"), ping_interval=None)
        reader = DaraClient(lambda: connect(f"{url_b}?token=reader"), ping_interval=None)
        async with teller, reader:
            for n in range(TELLS):
                answer = await teller.request("tell", {"user": "reader", "text": str(n)}, timeout=10)
                assert answer["delivered"], answer
            got = [await reader.receive(timeout=10) for _ in range(TELLS)]
            assert len(got) == TELLS
            await asyncio.sleep(1.1)  # the page is rendered at most once a second
            page_a, page_b = _scrape(metrics_a), _scrape(metrics_b)
    a, b = _events(page_a), _events(page_b)
    assert set(a) == set(b) == documented_events(), sorted(set(a) ^ documented_events())
    assert a["published"] >= TELLS
    assert b["received"] >= TELLS and b["delivered"] >= TELLS
    assert a["lost"] == b["lost"] == 0
    names = scraped_names(page_b)
    backplane = {name for name in dashboard_metrics() if name.startswith("dara_ws_backplane_")}
    assert len(backplane) >= 3
    assert sorted(backplane - names) == []
