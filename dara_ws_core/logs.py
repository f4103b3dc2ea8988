"""One logger per connection, carrying who the record is about (websockets' ``LoggerAdapter``
pattern): every record a connection writes has ``channel``, ``user`` and ``transport`` attributes,
without an ``extra={...}`` at each call. ``docs/how-to/logging.md`` shows them in JSON logs.
"""

from __future__ import annotations

__all__ = ["ConnectionLogger"]

import logging
import time
from collections.abc import Mapping, MutableMapping
from typing import Any


class ConnectionLogger(logging.LoggerAdapter[logging.Logger]):
    """A ``LoggerAdapter`` whose context (``channel``, ``user``, ``transport``, or ``path`` for a
    handshake) is merged with the ``extra`` of each call (``kind``, ``rchan``...), the call's
    keys winning. The standard adapter replaces the call's ``extra`` with its own before
    Python 3.13."""

    def __init__(self, logger: logging.Logger, context: Mapping[str, object]) -> None:
        super().__init__(logger, dict(context))

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = kwargs.get("extra")
        kwargs["extra"] = self.extra if not extra else {**(self.extra or {}), **extra}
        return msg, kwargs

    peer_errors = 0

    def peer_error(self, level: int, message: str, *args: Any, exc_info: bool = False,
                   **extra: Any) -> None:
        """Log something the connection's peer caused (a dropped frame, an unknown kind, a
        failing handler), at most a few times: the first 10 per connection, then the 100th,
        1,000th... with the count; and, across connections, within :data:`PEER_RECORDS` (a
        client can open connection after connection). A log line costs I/O on the event loop;
        one client flooding bad frames must not turn it into a stall for everyone else, nor
        fill the disk."""
        self.peer_errors = count = self.peer_errors + 1
        if count > 10 and not _is_power_of_ten(count):
            return
        skipped = PEER_RECORDS.take(time.monotonic())
        if skipped is None:
            return
        if count > 10:
            message += f" ({count} such records on this channel; only powers of ten are logged)"
        if skipped:
            message += f" ({skipped} records of peers skipped before it, over the process's budget)"
        self.log(level, message, *args, exc_info=exc_info, extra=extra)


class PeerRecordBudget:
    """How many records peers may cause in the whole process: ``burst`` in a row, then ``rate``
    a second (a token bucket). Pure: the caller gives the time."""

    __slots__ = ("_at", "_tokens", "burst", "rate", "skipped")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._at: float | None = None
        #: Records refused since the last one allowed.
        self.skipped = 0

    def take(self, now: float) -> int | None:
        """One record at ``now`` (seconds, monotonic): ``None`` if over the budget (it is
        counted), else how many were refused before it."""
        tokens = self._tokens
        if self._at is not None:
            tokens = min(float(self.burst), tokens + (now - self._at) * self.rate)
        self._at = now
        if tokens < 1.0:
            self._tokens = tokens
            self.skipped += 1
            return None
        self._tokens = tokens - 1.0
        skipped, self.skipped = self.skipped, 0
        return skipped


#: The process-wide budget of :meth:`ConnectionLogger.peer_error`: 100 records in a row, then
#: 10 a second.
PEER_RECORDS = PeerRecordBudget(burst=100, rate=10.0)


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1
