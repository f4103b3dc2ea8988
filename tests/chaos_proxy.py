"""A fault-injecting TCP proxy for the chaos tests: it sits between a server process and
``redis-server`` on 127.0.0.1 and, on demand, for a bounded time, delays, drops or half-opens the
link.

* ``delay``: every chunk, both ways, is forwarded ``delay`` seconds after it arrived (in order:
  a latency, not a throughput limit);
* ``drop``: every connection is closed at once and new ones are closed as soon as they arrive (a
  link down, or Redis unreachable: the client sees connection errors);
* ``half_open``: connections stay open but nothing crosses them any more, in either direction
  (a NAT or a peer that vanished without a FIN): only a timeout can tell. When the fault ends,
  those connections are closed (as the NAT forgetting them would), since resuming a byte stream
  with a hole in it would corrupt the protocol.

Only ever listens on and connects to 127.0.0.1. Every fault is bounded (:meth:`ChaosProxy.fault`
restores the link when its time is up), every connection is tracked and closed by :meth:`close`.
"""

from __future__ import annotations

__all__ = ["ChaosProxy"]

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator

MODES = ("pass", "delay", "drop", "half_open")
_CHUNK = 65536
_LONGEST_FAULT = 30.0
_MAX_IN_FLIGHT = 10_000  # chunks read and not yet forwarded, per direction


class _Link:
    """One proxied connection: two pumps (client to server, server to client)."""

    def __init__(self, proxy: ChaosProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.writers = (client[1], server[1])
        self.half_opened = False
        self.tasks = [asyncio.ensure_future(self._pump(client[0], server[1])),
                      asyncio.ensure_future(self._pump(server[0], client[1]))]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        # Read and forward apart, so that a delay is a latency (each chunk leaves ``delay`` after
        # it arrived), not a throughput limit (one chunk per ``delay``).
        due: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=_MAX_IN_FLIGHT)
        forward = asyncio.ensure_future(self._forward(due, writer))
        try:
            while chunk := await reader.read(_CHUNK):
                if proxy.mode == "half_open":
                    self.half_opened = True
                    continue  # swallowed: nothing crosses
                delay = proxy.delay if proxy.mode == "delay" else 0.0
                await due.put((loop.time() + delay, chunk))
            await due.put(None)
            await forward
        except (OSError, ConnectionError):
            pass
        finally:
            forward.cancel()
            self.close()

    @staticmethod
    async def _forward(due: asyncio.Queue[tuple[float, bytes] | None],
                       writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, ConnectionError):
            while (item := await due.get()) is not None:
                when, chunk = item
                if when > loop.time():
                    await asyncio.sleep(when - loop.time())
                writer.write(chunk)
                await writer.drain()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class ChaosProxy:
    """A TCP proxy from ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>`` (see the module
    docstring). Use ``async with ChaosProxy(port) as proxy``, then ``proxy.url``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self.delay = 0.0
        self.port = 0
        #: Connections accepted, and closed by a ``drop``.
        self.accepted = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        links, self._links = self._links, set()
        for link in links:
            link.close()
        for link in links:
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "drop":
            self.dropped += 1
            writer.close()
            return
        try:
            upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        link = _Link(self, (reader, writer), upstream)
        link.half_opened = self.mode == "half_open"
        self._links.add(link)
        for task in link.tasks:
            task.add_done_callback(functools.partial(self._forget, link))

    def _forget(self, link: _Link, _: object) -> None:
        self._links.discard(link)

    @contextlib.asynccontextmanager
    async def fault(self, mode: str, seconds: float, *, delay: float = 0.2) -> AsyncIterator[None]:
        """Inject ``mode`` while the block runs, for at least ``seconds`` (at most 30 s), then
        restore the link: ``async with proxy.fault("half_open", 1.5): ...``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        seconds = min(seconds, _LONGEST_FAULT)
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        self.mode, self.delay = mode, delay
        for link in list(self._links):
            if mode == "drop":
                self.dropped += 1
                link.close()
            elif mode == "half_open":  # a connection quiet meanwhile is cut off all the same
                link.half_opened = True
        try:
            yield
            await asyncio.sleep(max(0.0, until - loop.time()))
        finally:
            self.mode = "pass"
            for link in list(self._links):  # a half-open connection is never resumed
                if link.half_opened:
                    link.close()
