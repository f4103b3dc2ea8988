"""``dara-ws serve --metrics-port``: the port an operator's scraper is pointed at, as real processes.

* A metrics port that cannot be bound (in use) ended in a traceback (the WebSocket port's own
  error is one line and status 1): now the same one line, naming ``--metrics-port``.
* With ``--workers N`` the only choice was ``--metrics-port 0``: each worker on a free port of
  its own, printed once, and a worker started again (after a crash) on another one, so the
  scrape target configured from the first line was gone and that worker's metrics with it. Now
  ``--metrics-port P`` gives worker ``i`` the port ``P + i``, the same each time it is started
  again, and each worker's line says whose it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from .test_cli import _line_with, _one_line_error, _run_cli

pytestmark = pytest.mark.timeout(60)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.status == 200
        return str(answer.read().decode())


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1 (bounded search)."""
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket())
            first.bind(("127.0.0.1", 0))
            start = int(first.getsockname()[1])
            if start + count - 1 > 65535:
                continue
            try:
                for offset in range(1, count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", start + offset))
            except OSError:
                continue
            return start
    raise AssertionError(f"no {count} consecutive free ports")


@contextlib.contextmanager
def _supervisor(*args: str) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--clock", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        finally:
            if process.returncode is None:
                process.kill()
                process.wait(timeout=5)


def test_a_metrics_port_in_use_is_one_line_and_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_cli("serve", "--port", "0", "--clock", "0", "--metrics-port", str(port))
    assert result.returncode == 1
    line = _one_line_error(result)
    assert f"127.0.0.1:{port}" in line and "already in use" in line and "--metrics-port" in line


def test_each_worker_serves_its_metrics_on_its_own_port_again_after_a_restart() -> None:
    first = _free_ports(2)
    with _supervisor("--workers", "2", "--metrics-port", str(first)) as process:
        pids: dict[int, int] = {}
        for _ in range(2):
            line = _line_with(process, "metrics on ")
            found = re.search(r"worker (\d) \(pid (\d+)\): metrics on http://127\.0\.0\.1:(\d+)/", line)
            assert found, line
            worker, pid, port = (int(group) for group in found.groups())
            assert port == first + worker, line
            pids[worker] = pid
        assert sorted(pids) == [0, 1]
        _line_with(process, "dara-ws: 2 workers")
        for worker in (0, 1):
            assert "dara_ws_connections_opened_total" in _scrape(first + worker)

        os.kill(pids[0], signal.SIGKILL)  # a crash: the supervisor starts it again
        line = _line_with(process, "metrics on ")
        assert line.startswith("worker 0 (pid ") and f"metrics on http://127.0.0.1:{first}/metrics" in line, line
        assert str(pids[0]) not in line
        _line_with(process, "worker 0 started again")
        assert "dara_ws_connections_opened_total" in _scrape(first)
        assert "dara_ws_connections_opened_total" in _scrape(first + 1)
    assert process.returncode == 0
