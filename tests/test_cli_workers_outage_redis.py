"""``dara-ws serve --workers 2 --redis-url``: a worker that dies during a Redis outage, as real
processes on 127.0.0.1 with a real ``redis-server``.

The workers serving when Redis went away kept serving their own clients, but the one started
again in their place waited for Redis (5 s), failed before it listened, and so on: each failure
a death, five within a minute a crash loop, and the supervisor then stopped the healthy workers
too. An outage of Redis while one worker crashed took the whole set down. A worker started again
now listens at once and joins the bus once Redis is back, as the others do; only the first start
of the set checks that Redis answers (a wrong ``--redis-url`` is still one line and status 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import CustomServerMessage, DaraClient
from dara_ws_websockets import connect

from .test_cli import _line_with

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def _line(process: subprocess.Popen[str], text: str, timeout: float) -> str:
    return await asyncio.wait_for(asyncio.to_thread(_line_with, process, text), timeout)


async def _clients_on_each_worker(url: str, tries: int = 40) -> dict[int, tuple[str, DaraClient]]:
    """One client per worker, by pid: (its user, the client). The kernel picks the worker:
    connect until both have one."""
    found: dict[int, tuple[str, DaraClient]] = {}
    for n in range(tries):
        user = f"user{n}"
        client = DaraClient(functools.partial(connect, f"{url}?token={user}"), ping_interval=None)
        await client.connect()
        pid = (await client.request("whoami", timeout=5))["pid"]
        if pid in found:
            await client.close()
        else:
            found[pid] = (user, client)
        if len(found) == 2:
            return found
    raise AssertionError(f"{tries} connections all landed on {list(found)}")


def _start_workers(redis_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--workers", "2", "--port", "0", "--clock", "0",
         "--redis-url", redis_url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the workers")
async def test_a_worker_started_again_during_a_redis_outage_serves_and_joins_the_bus_later(
    redis_factory: Callable[[], RedisServer],
) -> None:
    redis = redis_factory()
    supervisor = _start_workers(redis.url)
    clients: dict[int, tuple[str, DaraClient]] = {}
    try:
        url = (await _line(supervisor, "dara-ws: 2 workers", 30)).split()[-1]
        first = _children(supervisor.pid)
        redis.stop()
        os.kill(first[0], signal.SIGKILL)  # a crash while Redis is away
        await _line(supervisor, "started again", 15)
        assert supervisor.poll() is None
        # Both workers serve their own clients meanwhile, the one started again included.
        probe = DaraClient(lambda: connect(f"{url}?token=probe"), ping_interval=None)
        async with probe:
            assert await probe.request("echo", 1, timeout=5) == 1

        redis.start()  # back on its port: every worker joins the bus again
        clients = await _clients_on_each_worker(url)
        assert first[0] not in clients and first[1] in clients  # one worker is the new one
        (_, teller), (reader_user, reader) = clients.values()
        answer: Any = None
        for _ in range(100):  # until the restarted worker's directory entry is on the bus
            answer = await teller.request("tell", {"user": reader_user, "text": "hi"}, timeout=5)
            with contextlib.suppress(TimeoutError):
                got = await reader.receive(timeout=0.2)
                assert isinstance(got, CustomServerMessage) and got.message.kind == "tell", got
                break
        else:
            raise AssertionError(f"a tell across the workers never arrived (last: {answer})")
    finally:
        for _, client in clients.values():
            await client.close()
        supervisor.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(supervisor.wait, 40)
        finally:
            if supervisor.returncode is None:
                supervisor.kill()
                await asyncio.to_thread(supervisor.wait, 5)

