"""What ``dara-ws serve`` logs when it is stopped, as a real process with a client connected.

The drain a SIGTERM starts may take ``shutdown_grace`` (5 s): the log said nothing of it, only
websockets' own "server closing" once done, and nothing at all under aiohttp or picows, so an
operator reading the log of a process that went quiet could not tell it was stopping, nor why.
Now it says, at INFO, what stopped it, how many connections it closes and the grace, and once
every connection is closed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

from dara_ws_core import DaraClient
from dara_ws_websockets import connect

from .test_cli import _line_with

pytestmark = pytest.mark.timeout(60)


def _start(transport: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--clock", "0",
         "--transport", transport],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.parametrize("transport", ["websockets", "aiohttp", "picows"])
async def test_a_stop_says_why_and_what_it_closes(transport: str) -> None:
    server = _start(transport)
    try:
        url = (await asyncio.to_thread(_line_with, server, "dara-ws demo")).split()[-1]
        client = DaraClient(lambda: connect(f"{url}?token=alice"), ping_interval=None)
        await client.connect()
        server.send_signal(signal.SIGTERM)
        closed = await client.wait_closed(timeout=10)
        assert closed is not None and closed.code == 1001, closed
        stopping = await asyncio.to_thread(_line_with, server, "stopping (")
        assert " INFO " in stopping and "(SIGTERM)" in stopping, stopping
        assert "closing 1 connection(s) with 1001" in stopping and "5 s" in stopping, stopping
        stopped = await asyncio.to_thread(_line_with, server, "stopped serving")
        assert " INFO " in stopped, stopped
        assert await asyncio.to_thread(server.wait, 30) == 0
    finally:
        if server.returncode is None:
            server.kill()
            await asyncio.to_thread(server.wait, 10)
