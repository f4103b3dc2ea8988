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
"""

from __future__ import annotations

__all__ = ["OutboxLimits", "UserOutbox"]

from collections import deque
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


class UserOutbox:
    """Frames kept per user, for one process (see the module docstring)."""

    def __init__(self, limits: OutboxLimits) -> None:
        self.limits = limits
        self._kept: dict[str, deque[tuple[float, bytes]]] = {}
        self._bytes: dict[str, int] = {}
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
        frames.append((now, frame))
        size = self._bytes.get(user_id, 0) + len(frame)
        cutoff = now - limits.max_age
        while frames and (frames[0][0] <= cutoff or len(frames) > limits.max_messages
                          or size > limits.max_bytes):
            size -= len(frames.popleft()[1])
            self.evicted += 1
        self._bytes[user_id] = size
        self.kept += 1
        return True

    def take(self, user_id: str, now: float) -> list[bytes]:
        """Every frame kept for the user and still within ``max_age``, oldest first; they are
        forgotten (each is handed out once)."""
        frames = self._kept.pop(user_id, None)
        self._bytes.pop(user_id, None)
        if not frames:
            return []
        cutoff = now - self.limits.max_age
        return [frame for at, frame in frames if at > cutoff]

    def expire(self, now: float) -> None:
        """Forget users whose every frame is older than ``max_age`` (call it now and then)."""
        cutoff = now - self.limits.max_age
        for user_id in [u for u, f in self._kept.items() if f[-1][0] <= cutoff]:
            del self._kept[user_id]
            self._bytes.pop(user_id, None)
