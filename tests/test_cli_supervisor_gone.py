"""``dara-ws serve --workers N`` whose supervisor is killed (SIGKILL, the out-of-memory killer), as
real processes on 127.0.0.1.

The workers used to serve on without it, orphans holding the port with ``SO_REUSEPORT``: the next
supervisor started on that port (a deploy, a restart by hand) shared it with them, so clients
kept landing on the old code, and nothing would ever stop those workers. Each worker now holds a
pipe from its supervisor on stdin and, once that pipe ends, stops as on SIGTERM: its clients are
closed with 1001 (the stock client reconnects elsewhere), and it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dara_ws_core import DaraClient
from dara_ws_websockets import connect

from .test_cli import _line_with

pytestmark = pytest.mark.timeout(60)


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by whoever adopted it, maybe never here)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _start_supervisor() -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--workers", "2", "--port", "0", "--clock", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the workers")
async def test_workers_stop_gracefully_when_their_supervisor_is_killed() -> None:
    supervisor = _start_supervisor()
    workers: list[int] = []
    try:
        line = await asyncio.to_thread(_line_with, supervisor, "dara-ws: 2 workers")
        url = line.split()[-1]
        workers = _children(supervisor.pid)
        assert len(workers) == 2, workers
        clients = [DaraClient(functools.partial(connect, f"{url}?token=user{n}"), ping_interval=None)
                   for n in range(4)]
        for client in clients:
            await client.connect()

        supervisor.kill()
        await asyncio.to_thread(supervisor.wait, 10)

        for client in clients:  # every client, whichever worker it landed on
            closed = await client.wait_closed(timeout=10)
            assert closed is not None and closed.code == 1001, closed
        deadline = time.monotonic() + 15
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not [pid for pid in workers if _running(pid)], "workers serving without a supervisor"
    finally:
        for pid in [*workers, supervisor.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(supervisor.wait, 10)


def test_a_worker_that_cannot_listen_does_not_say_its_supervisor_is_gone() -> None:
    # A worker's own failure (its port in use, Redis unreachable) closes its end of the pipe on
    # the way out: that is not the supervisor gone, and an operator reading the forwarded log
    # was told it was (a WARNING before the real cause).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # Its stdin a pipe kept open (as the supervisor's is) until it exits.
        worker = subprocess.Popen(
            [sys.executable, "-m", "dara_ws_cli", "serve", "--supervised", "--port", str(taken.getsockname()[1]),
             "--clock", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            assert worker.stdout is not None
            output = worker.stdout.read()  # to its end: the worker exited
            assert worker.wait(30) == 1
        finally:
            worker.kill()
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait(30)
    assert "already in use" in output
    assert "supervisor is gone" not in output, output
