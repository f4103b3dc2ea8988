"""A per-user outbox: what ``send_message_to_user`` sent while the user had no connection, kept
(bounded by count, bytes and age) and handed to the user's next connection, oldest first, once.

Pure: no I/O, no event loop; the caller passes the clock. One process without a backplane keeps
it here (:class:`UserOutbox`); with a backplane it lives on the bus (``MemoryBroker``, Redis
Streams in ``dara_ws_redis``) so that it is delivered on whichever process the user lands and
survives the restart of the sending one.

What is covered, and why:

* **Per-user sends** (``send_message_to_user``) with no live connection of the user anywhere:
  kept. A user is the one recipient that outlives a connection (the stock client reconnects
  after 500 ms with a *new* channel), so task notifications and store updates sent to the user
  in that window reach the next connection instead of being lost.
* **Not broadcasts**: a broadcast is for whoever is connected; keeping one per absent user would
  cost memory for every user ever seen.
* **Not per-channel sends** (``send_message``, ``send_and_wait``): a channel never comes back (the
  next connection has a new id), so nothing could ever receive them; they still raise
  ``UnknownChannel``.
* **Not frames a closing connection had queued**: they are dropped with the connection, as
  before. A message published to a process whose user's connection closes before the directory
  says so is lost too (the window is one directory write, milliseconds).
* A frame larger than the byte bound is not kept. Messages older than the age bound are dropped,
  the oldest first when the count or byte bound is reached.

Read, then acknowledge. A new connection does not *take* the frames (read and delete in one
step): it *leases* them (:meth:`UserOutbox.lease`), and they stay until the connection's transport
has written them, when it acknowledges the ones written (:meth:`UserOutbox.settle`, which also
ends the lease). So a connection, or a whole process, that dies before writing them loses
nothing: the next connection of the user leases them again. While a live holder has the lease, a
second new connection of the user gets nothing (the first one is delivering them: exactly once);
a lease whose holder is gone (its channel closed without settling, its process dead or cut off
from the bus) is void, and the next connection takes over from the first frame not acknowledged.
Each frame has an id, increasing per user, so an acknowledgement names the last frame written
and never removes one kept after it.
"""

from __future__ import annotations

__all__ = ["OutboxLimits", "UserOutbox"]

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds of one user's outbox (defaults near AnyCable's reliable streams)."""

    #: Most messages kept per user.
    max_messages: int = 100
    #: Most bytes kept per user (encoded frames).
    max_bytes: int = 1024 * 1024
    #: Seconds a message is kept.
    max_age: float = 300.0

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1 or self.max_age <= 0:
            raise ValueError("outbox limits must be positive")


#: One kept frame: (id, frame).
Kept = tuple[int, bytes]


class UserOutbox:
    """Frames kept per user, for one process (see the module docstring)."""

    def __init__(self, limits: OutboxLimits) -> None:
        self.limits = limits
        # user -> frames kept: (id, when, frame), ids increasing.
        self._kept: dict[str, deque[tuple[int, float, bytes]]] = {}
        self._bytes: dict[str, int] = {}
        self._leases: dict[str, Hashable] = {}
        self._next_id = 1
        #: Frames kept, and frames dropped by a bound before anyone took them.
        self.kept = 0
        self.evicted = 0

    def __len__(self) -> int:
        """Users with frames kept."""
        return len(self._kept)

    def keep(self, user_id: str, frame: bytes, now: float) -> bool:
        """Keep ``frame`` for the user's next connection; ``False`` if it is larger than
        ``max_bytes`` (never kept). Drops expired frames, then the oldest beyond the bounds."""
        limits = self.limits
        if len(frame) > limits.max_bytes:
            self.evicted += 1
            return False
        frames = self._kept.setdefault(user_id, deque())
        frames.append((self._next_id, now, frame))
        self._next_id += 1
        size = self._bytes.get(user_id, 0) + len(frame)
        cutoff = now - limits.max_age
        while frames and (frames[0][1] <= cutoff or len(frames) > limits.max_messages
                          or size > limits.max_bytes):
            size -= len(frames.popleft()[2])
            self.evicted += 1
        self._bytes[user_id] = size
        self.kept += 1
        return True

    def lease(self, user_id: str, holder: Hashable, now: float,
              alive: Callable[[Hashable], bool]) -> list[Kept]:
        """The frames kept for the user and still within ``max_age``, oldest first, leased to
        ``holder`` until it :meth:`settle` s; ``[]`` if a live holder (``alive(holder)``) has
        the lease already. The frames stay kept until acknowledged."""
        current = self._leases.get(user_id)
        if current is not None and current != holder and alive(current):
            return []
        frames = self._kept.get(user_id)
        cutoff = now - self.limits.max_age
        while frames and frames[0][1] <= cutoff:
            self._bytes[user_id] -= len(frames.popleft()[2])
        if not frames:
            self._forget(user_id)
            return []
        self._leases[user_id] = holder
        return [(kid, frame) for kid, _, frame in frames]

    def settle(self, user_id: str, holder: Hashable, upto: int | None) -> int:
        """``holder`` wrote the leased frames up to id ``upto`` (``None``: none of them): they
        are forgotten, and the lease ends. A holder whose lease was voided meanwhile changes
        nothing. Returns how many frames were acknowledged."""
        if self._leases.get(user_id) != holder:
            return 0
        del self._leases[user_id]
        frames = self._kept.get(user_id)
        acked = 0
        while frames and upto is not None and frames[0][0] <= upto:
            self._bytes[user_id] -= len(frames.popleft()[2])
            acked += 1
        if not frames:
            self._forget(user_id)
        return acked

    def take(self, user_id: str, now: float) -> list[bytes]:
        """Every frame kept for the user and still within ``max_age``, oldest first, forgotten
        at once (read and acknowledged in one step: for callers with nothing to lose)."""
        kept = self.lease(user_id, _TAKER, now, lambda holder: False)
        self.settle(user_id, _TAKER, kept[-1][0] if kept else None)
        return [frame for _, frame in kept]

    def expire(self, now: float) -> None:
        """Forget users whose every frame is older than ``max_age`` (call it now and then)."""
        cutoff = now - self.limits.max_age
        for user_id in [u for u, f in self._kept.items() if f[-1][1] <= cutoff]:
            self._forget(user_id)

    def _forget(self, user_id: str) -> None:
        self._kept.pop(user_id, None)
        self._bytes.pop(user_id, None)
        self._leases.pop(user_id, None)


_TAKER = object()
