"""A pytest plugin that runs real ``redis-server`` processes for the backplane tests.

Each server listens on a free port on 127.0.0.1, keeps nothing on disk (so a restart loses the
data, the harshest case for the backplane) and is stopped at teardown. A missing ``redis-server``
is a test *failure*, never a skip: ``.ci/run`` installs it (Debian package ``redis-server``).

Use it with ``pytest_plugins = ["tests.redis_server"]``; fixtures: ``redis_server`` (one per
module) and ``redis_factory`` (``redis_factory()`` starts a fresh one for a single test).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["RedisServer", "free_port", "read_line", "redis_binary"]

READY = "Ready to accept connections"


def redis_binary() -> str:
    """The ``redis-server`` on PATH; fails the test loudly if there is none."""
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not on PATH: the backplane tests need a real Redis. Install it "
            "(Debian: apt-get install -y redis-server; .ci/run does this).",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_line(process: subprocess.Popen[bytes], until: Callable[[str], bool],
              timeout: float) -> list[str]:
    """Read ``process``'s stdout lines until one satisfies ``until``; fail after ``timeout``.

    Start the process with ``bufsize=0``: a buffered reader would keep lines that ``select``
    cannot see."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(f"no ready line within {timeout} s; got {lines[-5:]}")
            line = process.stdout.readline().decode(errors="replace")
            if not line:
                raise RuntimeError(f"process exited ({process.poll()}); output: {lines[-5:]}")
            lines.append(line.rstrip())
            if until(line):
                return lines


class _PortTaken(Exception):
    pass


class RedisServer:
    """One ``redis-server`` on 127.0.0.1; :meth:`restart` keeps the port and loses the data."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = redis_binary()
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.output: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it accepts connections. A fresh server whose free port was
        taken meanwhile (another test run) retries on another port."""
        for attempt in range(3):
            try:
                self._start(timeout)
                return
            except _PortTaken:
                if self.output_ready or attempt == 2:
                    break
                self.port = free_port()
        pytest.fail(f"redis-server could not bind a port: {self.output[-3:]}", pytrace=False)

    @property
    def output_ready(self) -> bool:
        return any(READY in line for line in self.output)

    def _start(self, timeout: float) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--logfile", ""],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            bufsize=0,
        )
        try:
            self.output += read_line(self.process, lambda line: READY in line, timeout)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            if "Address already in use" in str(exc):
                raise _PortTaken from None
            pytest.fail(f"redis-server did not start: {exc}", pytrace=False)
        # Keep draining its log so that it never blocks on a full pipe.
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()

    def _drain(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.output.append(line.decode(errors="replace").rstrip())

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process.stdout is not None:
            process.stdout.close()

    def kill(self) -> None:
        """Kill it at once, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the tests of one module."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start fresh redis-servers for one test (to restart or kill them)."""
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}")
        server.workdir.mkdir()
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
