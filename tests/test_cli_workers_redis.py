"""``dara-ws serve --workers N``: N processes on one port sharing a real Redis (issue 14, item 4).

Clients on 127.0.0.1 land on both workers (each answers ``whoami`` with its pid), a broadcast and
a per-user push reach clients on the other worker through Redis, SIGTERM closes every client with
1001 and stops all workers, a worker that dies is started again while the others go on, and a
worker in a crash loop takes the supervisor down with a failure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING

import pytest

from dara_ws_core import CustomServerMessage, DaraClient
from dara_ws_websockets import connect

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

#: A graceful stop of every worker (each closes its clients, then the supervisor exits), bounded.
STOP_BOUND = 30.0


#: Every transport shares the port and the backplane; the supervisor's handling of a dying worker
#: does not depend on the transport, so two of them cover it (each case starts two processes).
ALL_TRANSPORTS = ["picows", "websockets", "aiohttp", "asgi"]


@pytest.fixture
def workers(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--workers", "2", "--clock", "0",
         "--transport", str(request.param), "--redis-url", redis_server.url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert process.stdout is not None
        for _ in range(200):  # bounded: the workers' lines, then the supervisor's
            line = process.stdout.readline()
            assert line, "dara-ws --workers exited before it was ready"
            if line.startswith("dara-ws: 2 workers"):
                break
        url = line.rsplit(" on ", 1)[1].strip()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@asynccontextmanager
async def clients_on_both(url: str) -> AsyncIterator[dict[int, list[tuple[str, DaraClient]]]]:
    """Clients (user ``u{i}``, each its own user) until both workers have two; keyed by the
    worker's pid."""
    by_pid: dict[int, list[tuple[str, DaraClient]]] = {}
    opened: list[DaraClient] = []
    try:
        for i in range(60):  # SO_REUSEPORT hashes each connection: 60 all on one is 2**-59
            client = DaraClient(lambda i=i: connect(f"{url}?token=u{i}"), ping_interval=None)  # type: ignore[misc]
            await client.connect()
            opened.append(client)
            pid = (await client.request("whoami", timeout=10))["pid"]
            by_pid.setdefault(pid, []).append((f"u{i}", client))
            if len(by_pid) == 2 and all(len(c) >= 2 for c in by_pid.values()):
                break
        yield by_pid
    finally:
        for client in opened:
            with suppress(Exception):
                await client.close()


async def _pushed(client: DaraClient, kind: str) -> CustomServerMessage:
    for _ in range(20):  # bounded: skip pushes of other kinds
        message = await client.receive(timeout=10)
        if isinstance(message, CustomServerMessage) and message.message.kind == kind:
            return message
    raise AssertionError(f"no {kind!r} push")


@pytest.mark.parametrize("workers", ALL_TRANSPORTS, indirect=True)
async def test_workers_share_the_port_and_the_backplane_and_stop_together(
    workers: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = workers
    async with clients_on_both(url) as by_pid:
        assert len(by_pid) == 2, "every client landed on one worker"
        (pid_a, on_a), (pid_b, on_b) = by_pid.items()
        assert pid_a != pid_b and process.pid not in (pid_a, pid_b)
        # A broadcast from a client of worker A reaches a client of worker B.
        assert await on_a[0][1].request("chat", "hello", timeout=10) == {"delivered": True}
        chat = await _pushed(on_b[0][1], "chat")
        assert chat.message.data["text"] == "hello"
        # A per-user push asked on worker B reaches that user's connection on worker A.
        user, target = on_a[1]
        told_ok = await on_b[0][1].request("tell", {"user": user, "text": "psst"}, timeout=10)
        assert told_ok == {"delivered": True, "kept": True}
        told = await _pushed(target, "tell")
        assert told.message.data["text"] == "psst"

        process.send_signal(signal.SIGTERM)
        closes = await asyncio.gather(*(c.wait_closed(STOP_BOUND) for _, c in (*on_a, *on_b)))
        assert {close.code for close in closes if close is not None} == {1001}
        assert None not in closes
    await asyncio.get_running_loop().run_in_executor(None, process.wait, STOP_BOUND)
    assert process.returncode == 0


async def _line_with(process: subprocess.Popen[str], text: str) -> str:
    """The supervisor's next output line containing ``text`` (bounded in lines and time)."""
    assert process.stdout is not None
    stdout = process.stdout
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(STOP_BOUND):
        for _ in range(500):
            line = await loop.run_in_executor(None, stdout.readline)
            assert line, f"the supervisor exited before printing {text!r}"
            if text in line:
                return line
    raise AssertionError(f"no line with {text!r}")


def _pid_in(line: str) -> int:
    return int(line.rsplit("pid ", 1)[1].partition(")")[0])


@pytest.mark.parametrize("workers", ["picows", "websockets"], indirect=True)
async def test_a_worker_that_dies_is_started_again_and_the_others_go_on(
    workers: tuple[subprocess.Popen[str], str],
) -> None:
    process, url = workers
    async with clients_on_both(url) as by_pid:
        assert len(by_pid) == 2
        victim, survivor = list(by_pid)
        os.kill(victim, signal.SIGKILL)  # a worker this test started (through the supervisor)
        started = _pid_in(await _line_with(process, "started again"))
        assert started not in (victim, survivor)
        # The survivor's clients were never touched; new clients reach the new worker.
        survivor_client = by_pid[survivor][0][1]
        assert (await survivor_client.request("whoami", timeout=10))["pid"] == survivor
        async with clients_on_both(url) as again:
            assert set(again) == {survivor, started}
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        close = await survivor_client.wait_closed(STOP_BOUND)
        assert close is not None and close.code == 1001
    await asyncio.get_running_loop().run_in_executor(None, process.wait, STOP_BOUND)
    assert process.returncode == 0


@pytest.mark.parametrize("workers", ["websockets"], indirect=True)
async def test_a_worker_in_a_crash_loop_stops_the_others_and_fails_the_supervisor(
    workers: tuple[subprocess.Popen[str], str],
) -> None:
    from dara_ws_cli.workers import MAX_DEATHS

    process, url = workers
    async with clients_on_both(url) as by_pid:
        victim, survivor = list(by_pid)
        for _ in range(MAX_DEATHS - 1):  # each death starts it again, a little later each time
            os.kill(victim, signal.SIGKILL)
            victim = _pid_in(await _line_with(process, "started again"))
        os.kill(victim, signal.SIGKILL)  # the last one: a crash loop
        await _line_with(process, f"died {MAX_DEATHS} times")
        close = await by_pid[survivor][0][1].wait_closed(STOP_BOUND)
        assert close is not None and close.code == 1001  # the survivor was stopped gracefully
    await asyncio.get_running_loop().run_in_executor(None, process.wait, STOP_BOUND)
    assert process.returncode == 1
