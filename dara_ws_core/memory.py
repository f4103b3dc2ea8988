"""An in-memory transport pair: the core without sockets, for fast tests and for users' own tests.

:func:`memory_pair` gives two connected :class:`MemoryTransport` ends with WebSocket semantics:
text (``str``) and binary (``bytes``) frames, a receiver-side size limit that closes with 1009, a
bounded inbound buffer that makes senders wait (like TCP backpressure; any number of tasks may
wait at once, and each is woken, oldest first, as room comes), and closing handshakes
with codes. :class:`MemoryServer` runs an :class:`~dara_ws_core.endpoint.Endpoint` over such pairs,
authentication included.
"""

from __future__ import annotations

__all__ = ["MemoryServer", "MemoryTransport", "memory_pair"]

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable

from .codec import utf8_size_exceeds
from .exceptions import CloseCode, ConnectionClosed
from .transport import HandshakeRequest


class MemoryTransport:
    """One end of an in-memory WebSocket connection (implements the ``Transport`` contract)."""

    def __init__(self, *, max_queue: int = 64, max_size: int | None = None) -> None:
        self.max_queue = max_queue
        self.max_size = max_size
        self._peer: MemoryTransport | None = None
        self._frames: deque[str | bytes] = deque()
        # Every task waiting on this end, oldest first: receivers for a frame, the peer's senders
        # for room in ``_frames``. One future each, so no wake-up can overwrite another's.
        self._readers: deque[asyncio.Future[None]] = deque()
        self._writers: deque[asyncio.Future[None]] = deque()
        self._close: tuple[int, str] | None = None
        self._close_sent = False

    @property
    def closed(self) -> bool:
        return self._close_sent or self._close is not None

    @property
    def close_code(self) -> int | None:
        """The close code once closed (sent or received), else ``None``."""
        return None if self._close is None else self._close[0]

    @staticmethod
    def _wake_next(waiters: deque[asyncio.Future[None]]) -> None:
        """Wake the oldest waiter still waiting (a cancelled one is skipped, not counted)."""
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _wake_all(self) -> None:
        for waiters in (self._readers, self._writers):
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)

    @staticmethod
    def _give_up(waiters: deque[asyncio.Future[None]], fut: asyncio.Future[None], ready: bool) -> None:
        """A waiter leaves (cancelled): if it had been woken and what it waited for is still
        there (``ready``), the wake-up goes on to the next one, as ``asyncio.Queue`` does, so
        none is lost. Inlined waits rather than a helper coroutine: a receive waits once per
        frame on a quiet connection, and the in-process benchmarks run over this transport."""
        fut.cancel()
        with contextlib.suppress(ValueError):
            waiters.remove(fut)
        if ready:
            MemoryTransport._wake_next(waiters)

    def _closed_error(self) -> ConnectionClosed:
        code, reason = self._close or (CloseCode.NORMAL, "")
        return ConnectionClosed(code, reason)

    async def _push(self, frame: str | bytes) -> None:
        peer = self._peer
        if self.closed or peer is None:
            raise self._closed_error()
        while len(peer._frames) >= peer.max_queue:
            room = asyncio.get_running_loop().create_future()
            peer._writers.append(room)
            try:
                await room
            except BaseException:
                self._give_up(peer._writers, room, len(peer._frames) < peer.max_queue)
                raise
            if self.closed:
                raise self._closed_error()
        peer._frames.append(frame)
        self._wake_next(peer._readers)

    async def send(self, frame: bytes) -> None:
        """Send a text frame (UTF-8 bytes, delivered to the peer as ``str``)."""
        await self._push(frame.decode())

    async def send_text(self, text: str) -> None:
        """Send a text frame given as ``str`` (tests of raw input)."""
        await self._push(text)

    async def send_binary(self, data: bytes) -> None:
        """Send a binary frame (delivered to the peer as ``bytes``)."""
        await self._push(bytes(data))

    async def receive(self) -> str | bytes:
        while not self._frames:
            if self._close is not None:
                raise self._closed_error()
            arrival = asyncio.get_running_loop().create_future()
            self._readers.append(arrival)
            try:
                await arrival
            except BaseException:
                self._give_up(self._readers, arrival, bool(self._frames))
                raise
        frame = self._frames.popleft()
        self._wake_next(self._writers)
        if self.max_size is not None and (
            len(frame) > self.max_size
            if isinstance(frame, bytes)
            else utf8_size_exceeds(frame, self.max_size)
        ):
            await self.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
            raise self._closed_error()
        return frame

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        if self._close_sent:
            return
        self._close_sent = True
        if self._close is None:
            self._close = (int(code), reason)
        peer = self._peer
        if peer is not None and peer._close is None:
            peer._close = (int(code), reason)
            peer._close_sent = True  # the peer echoes the close, as a WebSocket does
            peer._wake_all()
        self._wake_all()

    def abort(self) -> None:
        """Drop the connection: both ends see 1006 (abnormal closure) unless already closed."""
        for end in (self, self._peer):
            if end is not None and end._close is None:
                end._close = (int(CloseCode.ABNORMAL), "connection aborted")
                end._close_sent = True
                end._frames.clear()
                end._wake_all()


def memory_pair(
    *, max_queue: int = 64, server_max_size: int | None = None, client_max_size: int | None = None
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected ends: ``(server_side, client_side)``."""
    server = MemoryTransport(max_queue=max_queue, max_size=server_max_size)
    client = MemoryTransport(max_queue=max_queue, max_size=client_max_size)
    server._peer, client._peer = client, server
    return server, client


class MemoryServer:
    """Serves an endpoint over in-memory pairs: ``await server.connect(...)`` is a client socket.

    It opens the endpoint as it is built, as each adapter's ``serve()`` does as it starts (an
    endpoint shut down before is served again; one whose ``shutdown()`` is still running raises
    ``RuntimeError``). Like a closed server, it refuses connections (``ConnectionRefusedError``)
    once the endpoint is shut down and once :meth:`close` has been called.

    The endpoint is duck-typed (``config``, ``authenticate``, ``serve``, ``closed``) to keep
    this module free of the endpoint's imports.
    """

    def __init__(self, endpoint: object, *, max_queue: int = 64) -> None:
        self.endpoint = endpoint
        # Served from here on, as each adapter's serve() does as it starts: a module's endpoint
        # shut down by an earlier test's serve() refused every handshake here with 403.
        reopen = getattr(endpoint, "open", None)
        if reopen is not None:
            reopen()
        self.max_queue = max_queue
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def connect(
        self, target: str = "/api/core/ws", headers: Iterable[tuple[str, str]] = ()
    ) -> MemoryTransport:
        """Authenticate (raising ``AuthenticationFailed`` as a 403 would) and start serving.
        Raises ``ConnectionRefusedError``, as connecting to a closed server does, once this
        server is closed or its endpoint shut down."""
        endpoint = self.endpoint
        if self._closed or getattr(endpoint, "closed", False):
            # Not a 403: no server is there to answer one (a socket server's port is closed).
            why = "it is closed" if self._closed else f"its endpoint is shut down ({endpoint!r})"
            raise ConnectionRefusedError(f"the MemoryServer takes no connection: {why}; build a new "
                                         "MemoryServer to serve the endpoint again")
        request = HandshakeRequest.build(target, headers, ("127.0.0.1", 0))
        identity = await endpoint.authenticate(request)  # type: ignore[attr-defined]
        server_end, client_end = memory_pair(
            max_queue=self.max_queue,
            server_max_size=endpoint.config.max_message_size,  # type: ignore[attr-defined]
        )
        task = asyncio.get_running_loop().create_task(
            endpoint.serve(server_end, identity)  # type: ignore[attr-defined]
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client_end

    async def close(self) -> None:
        """Take no new connection, and wait for every served connection to finish (close the
        clients first)."""
        self._closed = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
