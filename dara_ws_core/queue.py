"""The bounded outbound queue of one channel (protocol.md section 6, slow consumers).

Bounded in frames and in bytes. Producers that must not block (broadcast) call :meth:`offer`;
producers that may wait call :meth:`put`. One consumer, the connection's send loop, calls
:meth:`get`. The byte bound applies to the backlog a frame joins: a frame is taken while fewer
than ``max_bytes`` are queued, whatever its own size, so a big message is delayed by backlog,
never refused for its size, and a queue holds at most ``max_bytes`` plus one frame.

Every queue of the process counts its bytes into :data:`PROCESS_QUEUED` as well. A queue given
``max_total`` is full for a frame that would take it past a 256th of that bound
(:data:`TOTAL_SHARES`) while the process's queues hold ``max_total`` together: so connections
that do not read, each within its own bounds, cannot together make the process hold what none
may alone; a queue holding less, a reader keeping up, is never affected.

A queue given its client's ``address`` counts into that address's tally too, and is full past
the same 256th while the queues of its address hold a quarter of ``max_total``
(:data:`ADDRESS_SHARES`): one client's connections that do not read cannot fill ``max_total`` on
their own and so hold every other client's queue to that 256th (under ``drop_oldest``, a
reader that had fallen a little behind lost frames to another client's backlog).
"""

from __future__ import annotations

__all__ = ["ADDRESS_SHARES", "BURST", "PROCESS_QUEUED", "TOTAL_SHARES", "OutboundQueue", "QueuedBytes",
           "address_queued"]

import asyncio
import time
from collections import deque
from typing import Any

from .exceptions import ConnectionClosed

#: How far past its bounds a fan-out may fill a queue (:meth:`OutboundQueue.take_burst`), as a
#: multiple of them.
BURST = 4

#: While the process's queues hold ``max_total`` together, a queue is full past this fraction of
#: it (1 MiB of the default 256 MiB): what each connection may still hold then.
TOTAL_SHARES = 256

#: The queues of one client address hold at most this fraction of ``max_total`` before each of
#: them is full past its 256th, as when the process's queues hold ``max_total``.
ADDRESS_SHARES = 4


class QueuedBytes:
    """Bytes queued in every outbound queue of the process together. A frame queued for many
    channels (a fan-out's) counts once for each: an upper bound of what the queues hold.
    Counted by the queues of one event loop: nothing here is locked."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


#: The tally every :class:`OutboundQueue` counts into: the process's.
PROCESS_QUEUED = QueuedBytes()


class _AddressQueued(QueuedBytes):
    """The bytes the open queues of one client address hold, and how many queues count in."""

    __slots__ = ("address", "queues")

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.queues = 0


#: The tallies of the client addresses that have an open queue, by address key.
_BY_ADDRESS: dict[str, _AddressQueued] = {}


def address_queued(address: str) -> int:
    """Bytes the open queues of ``address`` hold together."""
    tally = _BY_ADDRESS.get(address)
    return 0 if tally is None else tally.bytes


def _address_tally(address: str | None) -> _AddressQueued | None:
    if address is None:
        return None
    tally = _BY_ADDRESS.get(address)
    if tally is None:
        tally = _BY_ADDRESS[address] = _AddressQueued(address)
    tally.queues += 1
    return tally

#: Never appended to: see ``OutboundQueue.__init__``.
_SHARED_EMPTY: deque[Any] = deque(maxlen=0)

#: Who waits for a queue taken past its bounds to be back within them (:meth:`OutboundQueue.calm`):
#: a sender held back for the burst its fan-outs caused. Here rather than in a slot: a slot would
#: cost every connection 8 bytes for what only a burst uses.
_CALM: dict[OutboundQueue, list[asyncio.Future[None]]] = {}


class OutboundQueue:
    """FIFO of encoded frames with a frame-count and a byte bound."""

    __slots__ = ("_address", "_bytes", "_closed", "_floor", "_frames", "_full_since", "_getter", "_putters",
                 "dropped", "max_bytes", "max_messages", "max_total")

    def __init__(self, max_messages: int, max_bytes: int, max_total: int | None = None,
                 address: str | None = None) -> None:
        """``max_total``: the bytes of every queue of the process together past which this one
        takes no frame that would take it past ``max_total // TOTAL_SHARES`` (``None``: none).
        ``address``: its client's address key, whose queues together hold at most a quarter of
        ``max_total`` before the same holds for each of them (``None``: not counted by address)."""
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_total = max_total
        self._address = None if max_total is None else _address_tally(address)
        # What this queue may hold while the process's queues are over max_total.
        self._floor = max_bytes if max_total is None else max_total // TOTAL_SHARES
        # Most channels never queue (frames go straight to the socket) and never have a waiting
        # producer, so both deques start as one shared empty deque, replaced on first append:
        # about 1.5 KB less per idle connection.
        self._frames: deque[bytes] = _SHARED_EMPTY
        self._bytes = 0
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = _SHARED_EMPTY
        self._closed = False
        # When a fan-out last found the queue full and took a frame past its bounds
        # (take_burst): cleared once a frame taken out brings it back within them.
        self._full_since: float | None = None
        #: Frames discarded by :meth:`drop_oldest_and_put`.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._frames)

    def __del__(self) -> None:
        # A queue dropped without close() (a test's, an application's own) gives back its bytes:
        # the process's tally never keeps what no queue holds.
        if not self._closed:
            self._release()

    @property
    def nbytes(self) -> int:
        """Bytes currently queued."""
        return self._bytes

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def idle(self) -> bool:
        """Open with nothing queued: a frame may skip the queue (one check per delivery)."""
        return not self._frames and not self._closed

    def _fits(self, size: int) -> bool:
        # The byte bound is on the backlog a frame joins, not on the backlog plus the frame: a
        # frame is never refused for its own size. Else one frame near ``max_bytes`` (a broadcast
        # of a message near ``max_message_size``, its default) filled the whole bound, and a
        # reader still taking in the previous one counted as slow: disconnected, though reading.
        # A queue holds at most ``max_bytes`` plus one frame.
        # While every queue together holds max_total, a queue is full past its floor: connections
        # that read nothing and keep asking for replies (each within its own bounds) no longer
        # add up without bound. A sender waiting on it is woken as its own reader drains it.
        if not self._frames:
            return True
        queued = self._bytes
        return (len(self._frames) < self.max_messages and queued < self.max_bytes
                and (queued + size <= self._floor or self.max_total is None
                     or (PROCESS_QUEUED.bytes < self.max_total
                         and (self._address is None
                              or self._address.bytes < self.max_total // ADDRESS_SHARES))))

    def _append(self, frame: bytes) -> None:
        if self._frames is _SHARED_EMPTY:
            self._frames = deque()
        self._frames.append(frame)
        self._bytes += len(frame)
        PROCESS_QUEUED.bytes += len(frame)
        if self._address is not None:
            self._address.bytes += len(frame)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    def offer(self, frame: bytes) -> bool:
        """Enqueue without waiting; ``False`` if there is no room (nothing changes then).

        Raises ``ConnectionClosed`` if the queue is closed.
        """
        if self._closed:
            raise ConnectionClosed(reason="channel is closed")
        # Waiting producers go first, so an offer never overtakes a put that is waiting.
        if self._putters or not self._fits(len(frame)):
            return False
        self._append(frame)
        return True

    def take_burst(self, frame: bytes, grace: float | None) -> bool:
        """For a fan-out that found the queue full: take ``frame`` past the bounds while the
        queue holds less than ``BURST`` times them and has not been full for more than
        ``grace`` seconds (``None``: no time limit). A reader taking in a burst of broadcasts at
        its own pace catches up; one that does not read is refused once either ends. ``False``
        (nothing changes) when refused. Raises ``ConnectionClosed`` if the queue is closed."""
        if self._closed:
            raise ConnectionClosed(reason="channel is closed")
        if len(self._frames) >= BURST * self.max_messages or self._bytes >= BURST * self.max_bytes:
            return False
        now = time.monotonic()
        since = self._full_since
        if since is None:
            self._full_since = now
        elif grace is not None and now - since > grace:
            return False
        self._append(frame)
        return True

    @property
    def in_burst(self) -> bool:
        """Whether a fan-out took frames past the bounds and the queue has not caught up since."""
        return self._full_since is not None

    def calm(self) -> asyncio.Future[None] | None:
        """A future done once the queue is back within its bounds (or closed); ``None`` when it
        is already. Whoever stops waiting for it before then calls :meth:`forget_calm`."""
        if self._full_since is None or self._closed:
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _CALM.setdefault(self, []).append(waiter)
        return waiter

    def forget_calm(self, waiter: asyncio.Future[None]) -> None:
        waiters = _CALM.get(self)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del _CALM[self]

    def _wake_calm(self) -> None:
        for waiter in _CALM.pop(self, ()):
            if not waiter.done():
                waiter.set_result(None)

    def append_kept(self, frame: bytes) -> None:
        """Enqueue past the bounds: for a user's kept history, which has bounds of its own.
        Raises ``ConnectionClosed`` if the queue is closed."""
        if self._closed:
            raise ConnectionClosed(reason="channel is closed")
        self._append(frame)

    def drop_oldest_and_put(self, frame: bytes, discarded: list[bytes] | None = None) -> int:
        """Enqueue, discarding the oldest frames until ``frame`` fits; returns how many were
        dropped, and appends them to ``discarded`` if given (the caller looks for its own)."""
        if self._closed:
            raise ConnectionClosed(reason="channel is closed")
        dropped = self._drop_oldest(len(frame), discarded)
        self._append(frame)
        return dropped

    def _drop_oldest(self, size: int, discarded: list[bytes] | None) -> int:
        """Discard the oldest frames until ``size`` more bytes fit; how many were discarded."""
        dropped = 0
        while not self._fits(size):
            old = self._frames.popleft()
            self._bytes -= len(old)
            PROCESS_QUEUED.bytes -= len(old)
            if self._address is not None:
                self._address.bytes -= len(old)
            dropped += 1
            if discarded is not None:
                discarded.append(old)
        self.dropped += dropped
        return dropped

    async def put(self, frame: bytes, timeout: float | None = None) -> None:
        """Enqueue, waiting for room up to ``timeout`` seconds.

        Raises ``TimeoutError`` when the time passes and ``ConnectionClosed`` if the queue closes.
        """
        if self.offer(frame):
            return
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                waiter: asyncio.Future[None] = loop.create_future()
                if self._putters is _SHARED_EMPTY:
                    self._putters = deque()
                self._putters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    # A wake-up we were given but cannot use goes to the next producer.
                    self._putters.remove(waiter)
                    self._wake_putter()
                    raise
                self._putters.remove(waiter)
                if self._closed:
                    raise ConnectionClosed(reason="channel is closed")
                if self._fits(len(frame)):
                    self._append(frame)
                    self._wake_putter()
                    return

    def _wake_putter(self) -> None:
        if self._putters and self._fits(0):
            first = self._putters[0]
            if not first.done():
                first.set_result(None)

    async def get(self) -> bytes:
        """Wait for the next frame; raises ``ConnectionClosed`` once the queue is closed.

        After :meth:`close` queued frames are abandoned: the connection they were for is gone.
        """
        while not self._frames:
            if self._closed:
                raise ConnectionClosed(reason="channel is closed")
            getter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._getter = getter
            try:
                await getter
            finally:
                self._getter = None
        if self._closed:
            raise ConnectionClosed(reason="channel is closed")
        return self._pop()

    def get_nowait(self) -> bytes | None:
        """The next frame if one is queued, else ``None``."""
        if not self._frames or self._closed:
            return None
        return self._pop()

    def _pop(self) -> bytes:
        frames = self._frames
        frame = frames.popleft()
        self._bytes -= len(frame)
        PROCESS_QUEUED.bytes -= len(frame)
        if self._address is not None:
            self._address.bytes -= len(frame)
        if not frames:
            # Drained: the deque goes back to the shared empty one, so a channel that queued
            # only its init frame (then writes straight to the socket) holds none while idle.
            self._frames = _SHARED_EMPTY
        if self._full_since is not None and self._fits(0):
            self._full_since = None  # caught up: the next burst has its own grace
            if _CALM:
                self._wake_calm()
        if self._putters:
            self._wake_putter()
        return frame

    def _release(self) -> None:
        """Give back what it holds to the tallies, and its place in its address's."""
        PROCESS_QUEUED.bytes -= self._bytes
        tally = self._address
        if tally is not None:
            self._address = None
            tally.bytes -= self._bytes
            tally.queues -= 1
            if not tally.queues:
                del _BY_ADDRESS[tally.address]

    def close(self) -> None:
        """Close the queue: drop queued frames, wake the consumer and every waiting producer."""
        if self._closed:
            return
        self._closed = True
        self._frames.clear()
        self._release()
        self._bytes = 0
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
        for waiter in self._putters:
            if not waiter.done():
                waiter.set_result(None)
        if _CALM:
            self._wake_calm()
