"""The stock Dara frontend client, for tests: the real ``WebSocketClient`` of the dara-core
wheel's built bundle, run by node (``tests/frontend/stock_client.cjs``), a process per page.

What the browser would do around it (the page's URL and cookies, a browser ``WebSocket``) is in
the harness; everything the client does is the bundle's own code. The harness reports what the
client and its socket see as events (dicts with ``ev``); :class:`StockClient` keeps them all in
order, and a test waits for the ones it expects with :meth:`StockClient.wait`.

node is required, not optional: ``scripts/test`` installs it with apt when it is missing, and
without it these tests fail (``pytest.fail``) rather than skip.
"""

from __future__ import annotations

__all__ = ["BUNDLE", "StockClient", "bundle_path", "node_path"]

import asyncio
import contextlib
import importlib.resources
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

HARNESS = Path(__file__).resolve().parent / "frontend" / "stock_client.cjs"
BUNDLE = "_assets/auto_js/dara.core.umd.cjs"
#: How long one step may take (a reply, a reconnect: 500 ms retries in the client).
STEP = 10.0
#: The client's 5 s ping runs this many times faster, so a test sees several in a second.
INTERVAL_SCALE = 10
MIN_NODE = 18


def node_path() -> str:
    """The node binary; fails the test (never skips it) when there is none or it is too old."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the stock Dara client runs on it "
                    "(scripts/test installs the nodejs package with apt)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30,
                             check=True).stdout.strip()
    major = int(version.lstrip("v").split(".")[0])
    if major < MIN_NODE:
        pytest.fail(f"node {version} is too old for the stock Dara client's bundle (>= {MIN_NODE})")
    return node


def bundle_path() -> Path:
    """The built frontend bundle of the installed dara-core (the ``[test]`` extra pulls it)."""
    try:
        path = Path(str(importlib.resources.files("dara.core").joinpath(BUNDLE)))
    except ModuleNotFoundError:
        pytest.fail("dara-core is not installed: the [test] extra brings it, with its JS bundle")
    if not path.is_file():
        pytest.fail(f"dara-core has no built bundle at {path}")
    return path


class StockClient:
    """One page running the stock client, in a node process; use :meth:`open`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, port: int, token: str | None, *, interval_scale: int = INTERVAL_SCALE,
                   ) -> AsyncIterator[StockClient]:
        """A page served from ``http://127.0.0.1:{port}`` whose browser holds the session cookie
        ``dara_session_token={token}`` (none if ``None``), with its client not yet connected."""
        process = await asyncio.create_subprocess_exec(
            node_path(), str(HARNESS), str(bundle_path()), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, limit=2**24)
        client = cls(process)
        try:
            loaded = await client.wait("loaded", timeout=60)  # 5.8 MB of JS on a busy machine
            assert loaded["exports"] == ["WebSocketClient", "setupWebsocket"], loaded
            cookie = "" if token is None else f"dara_session_token={token}"
            await client.command("page", origin=f"http://127.0.0.1:{port}", cookie=cookie,
                                 interval_scale=interval_scale)
            yield client
        finally:
            await client.stop()

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            event = json.loads(line)
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        async with self._changed:
            self.events.append({"ev": "exited"})
            self._changed.notify_all()

    async def stop(self) -> None:
        """End the page (closing stdin ends the harness) and collect its output."""
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                async with asyncio.timeout(STEP):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._reader
        assert self.process.stderr is not None
        stderr = (await self.process.stderr.read()).decode(errors="replace")
        assert not stderr.strip(), f"the harness wrote to stderr:\n{stderr}"

    # ------------------------------------------------------------------ commands and events

    async def command(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Run a harness command (see stock_client.cjs) and return its ``done`` event."""
        command_id = next(self._ids)
        await self.send(cmd, id=command_id, **fields)
        done = await self.wait("done", lambda e: e.get("id") == command_id)
        assert "error" not in done, f"{cmd} failed in the page: {done['error']}"
        return done

    async def send(self, cmd: str, **fields: Any) -> None:
        """Send a command without waiting for it to finish (an awaited custom request, say)."""
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        await self.process.stdin.drain()

    def mark(self) -> int:
        """A position in the events: :meth:`wait` with ``since=mark`` looks only after it."""
        return len(self.events)

    def seen(self, ev: str, match: Callable[[dict[str, Any]], bool] = lambda e: True,
             since: int = 0) -> list[dict[str, Any]]:
        """The events named ``ev`` (after ``since``) that ``match``."""
        return [e for e in self.events[since:] if e["ev"] == ev and match(e)]

    async def wait(self, ev: str, match: Callable[[dict[str, Any]], bool] = lambda e: True,
                   since: int = 0, timeout: float = STEP) -> dict[str, Any]:
        """The first event named ``ev`` (after ``since``) that ``match``; waits for it."""
        async with asyncio.timeout(timeout), self._changed:
            while True:
                found = self.seen(ev, match, since)
                if found:
                    return found[0]
                if self.events and self.events[-1]["ev"] == "exited":
                    raise AssertionError(f"the page ended before {ev}: {self.events[-20:]}")
                await self._changed.wait()

    async def wait_count(self, ev: str, count: int,
                         match: Callable[[dict[str, Any]], bool] = lambda e: True, since: int = 0,
                         timeout: float = STEP) -> list[dict[str, Any]]:
        """Waits until ``count`` events named ``ev`` that ``match`` came after ``since``."""
        await self.wait(ev, lambda e: len(self.seen(ev, match, since)) >= count, since, timeout)
        return self.seen(ev, match, since)

    async def frame(self, match: Callable[[dict[str, Any]], bool], since: int = 0) -> dict[str, Any]:
        """The first frame the client's ``messages$`` saw (after ``since``) that ``match``."""
        return dict((await self.wait("frame", lambda e: match(e["msg"]), since))["msg"])

    # ------------------------------------------------------------------ what went wrong

    def complaints(self) -> list[dict[str, Any]]:
        """Everything a developer would see as a problem in the browser: console errors and
        warnings, uncaught exceptions, and protocol violations of the socket."""
        return [e for e in self.events
                if (e["ev"] == "console" and e["level"] in ("error", "warn", "trace"))
                or e["ev"] in ("uncaught", "ws_violation")]
