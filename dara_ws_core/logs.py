"""One logger per connection, carrying who the record is about (websockets' ``LoggerAdapter``
pattern): every record a connection writes has ``channel``, ``user`` and ``transport`` attributes,
without an ``extra={...}`` at each call. ``docs/how-to/logging.md`` shows them in JSON logs.

What a peer can make the process log is bounded, and fairly: records a peer's input causes
(:meth:`ConnectionLogger.peer_error`) come out of a process budget, of which each source (the
remote address of the handshake) gets a share; records of the application's own failures
(:meth:`ConnectionLogger.app_error`: a handler raised, timed out, or returned what JSON cannot
carry) have a budget of their own, and the first of each (handler kind, exception type) is always
written. So a client flooding bad input cannot hide the tracebacks of real bugs, nor another
client's records. :func:`quiet_accept_errors` does the same for asyncio's accept loop, and
:class:`RepeatedRecords` for the records a server library writes at any peer's will.
"""

from __future__ import annotations

__all__ = ["ConnectionLogger", "RepeatedRecords", "quiet_accept_errors"]

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

#: Where the records of the current connection come from, for the shares of the peers' budget
#: (and every other share counted per address): its client's address key, as
#: ``Endpoint.client_address`` finds it (set by ``Endpoint.authenticate``; the connection's tasks
#: inherit it). ``None``: the share of sources that have no address.
current_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("dara_ws_source", default=None)


def _name_of(func: object) -> str:
    """What a log line calls the application's callable ``func`` (a handler, a responder):
    ``module.qualname`` (``functools.partial`` and bound methods unwrapped), else its type. In
    the message text itself, so that the default format names it."""
    while isinstance(func, functools.partial):
        func = func.func
    func = getattr(func, "__func__", func)
    qualname = getattr(func, "__qualname__", None)
    if not isinstance(qualname, str):
        return f"{type(func).__module__}.{type(func).__qualname__} instance"
    module = getattr(func, "__module__", None)
    return f"{module}.{qualname}" if isinstance(module, str) else qualname


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
        1,000th... with the count; and, across connections, within the source's share of
        :data:`PEER_SHARES` and the process's :data:`PEER_RECORDS` (a client can open connection
        after connection). A log line costs I/O on the event loop; one client flooding bad
        frames must not turn it into a stall for everyone else, nor fill the disk, nor use up
        what other clients' records may take."""
        self.peer_errors = count = self.peer_errors + 1
        if count > 10 and not _is_power_of_ten(count):
            return
        now = time.monotonic()
        if not PEER_SHARES.take(current_source.get(), now):
            PEER_RECORDS.skipped += 1
            return
        skipped = PEER_RECORDS.take(now)
        if skipped is None:
            return
        if count > 10:
            message += f" ({count} such records on this channel; only powers of ten are logged)"
        if skipped:
            message += f" ({skipped} records of peers skipped before it, over the process's budget)"
        self.log(level, message, *args, exc_info=exc_info, extra=extra)

    def app_error(self, level: int, message: str, key: tuple[str, str], *args: Any,
                  exc_info: bool = False, **extra: Any) -> None:
        """Log a failure of the application's own code (``key``: the handler's kind and the
        exception's type): always the first of each key (:data:`FIRST_FAILURES`), then within
        :data:`APP_RECORDS`, a budget apart from the peers' so that no client's bad input can
        use it up. A client that makes a handler fail again and again still costs a bounded
        rate of records."""
        if FIRST_FAILURES.first(key):
            self.log(level, message, *args, exc_info=exc_info, extra=extra)
            return
        skipped = APP_RECORDS.take(time.monotonic())
        if skipped is None:
            return
        if skipped:
            message += f" ({skipped} records of application failures skipped before it, over the budget)"
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


class SourceShares:
    """Each source's share of a budget: ``burst`` records in a row, then ``rate`` a second, per
    source, for the last ``max_sources`` sources seen (the least recently seen is forgotten,
    its share restored). Pure: the caller gives the time."""

    __slots__ = ("_budgets", "burst", "max_sources", "rate")

    def __init__(self, burst: int, rate: float, max_sources: int = 1024) -> None:
        self.burst = burst
        self.rate = rate
        self.max_sources = max_sources
        self._budgets: dict[str | None, PeerRecordBudget] = {}

    def take(self, source: str | None, now: float) -> bool:
        """Whether ``source`` may write one more record at ``now``."""
        budgets = self._budgets
        budget = budgets.pop(source, None)  # re-inserted last: the dict is in order of use
        if budget is None:
            budget = PeerRecordBudget(self.burst, self.rate)
            if len(budgets) >= self.max_sources:
                del budgets[next(iter(budgets))]
        budgets[source] = budget
        return budget.take(now) is not None


class FirstFailures:
    """Which (handler kind, exception type) failures were logged already: at most ``limit``
    remembered (the application has few kinds; beyond the limit, a new key is no longer
    sure to be written)."""

    __slots__ = ("_seen", "limit")

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._seen: set[tuple[str, str]] = set()

    def first(self, key: tuple[str, str]) -> bool:
        """Whether ``key`` is seen for the first time (and remembered, while there is room)."""
        seen = self._seen
        if key in seen or len(seen) >= self.limit:
            return False
        seen.add(key)
        return True


#: The process-wide budget of :meth:`ConnectionLogger.peer_error`: 100 records in a row, then
#: 10 a second.
PEER_RECORDS = PeerRecordBudget(burst=100, rate=10.0)
#: Each source's share of it: 20 records in a row (one connection's first ten and a few powers
#: of ten), then two a second, so that one client cannot take more than a fifth of the burst
#: or the rate away from the others.
PEER_SHARES = SourceShares(burst=20, rate=2.0)
#: The budget of :meth:`ConnectionLogger.app_error`, beyond each failure's first record.
APP_RECORDS = PeerRecordBudget(burst=100, rate=10.0)
#: The failures logged once already.
FIRST_FAILURES = FirstFailures()


class _AcceptErrors:
    """A loop exception handler for :func:`quiet_accept_errors`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._default = loop.get_exception_handler()
        self._interval = interval
        self._next = float("-inf")
        self._skipped = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            if self._default is not None:
                self._default(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self._interval
        skipped, self._skipped = self._skipped, 0
        exc = context.get("exception")
        logging.getLogger("dara_ws_core").error(
            "cannot accept connections: %s (%d more such errors in the last %.3g s, not logged); "
            "the process is out of file descriptors: set ServerConfig.max_connections under the "
            "open-files limit", exc, skipped, self._interval)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = 10.0) -> None:
    """Install on ``loop`` an exception handler that writes asyncio's "socket.accept() out of
    system resource" errors (the process ran out of descriptors: asyncio logs one with a
    traceback for every failed ``accept()``, a thousand a second under a connection flood) as
    one line without traceback at most every ``interval`` seconds, with the count of those left
    out. Every other error goes to the handler installed before (or asyncio's default). Call it
    once, from the loop's thread, before serving."""
    loop.set_exception_handler(_AcceptErrors(loop, interval))


class RepeatedRecords(logging.Filter):
    """A filter for a server library's logger: the records of ``messages`` (the format strings
    the library logs them with), which any peer can make it write at will, pass for the first
    ten of each, then the 100th, the 1,000th... with the count, as the core bounds what one
    client makes it log. Every other record passes. :meth:`install` puts one on a logger."""

    def __init__(self, messages: Iterable[str]) -> None:
        super().__init__()
        #: How many records of each message were seen.
        self.counts = dict.fromkeys(messages, 0)

    @classmethod
    def install(cls, logger: logging.Logger, messages: Iterable[str]) -> None:
        """Add a filter of ``messages`` to ``logger``, unless one of them is there already."""
        messages = tuple(messages)
        if not any(isinstance(known, cls) and tuple(known.counts) == messages for known in logger.filters):
            logger.addFilter(cls(messages))

    def filter(self, record: logging.LogRecord) -> bool:
        count = self.counts.get(record.msg)
        if count is None:
            return True
        self.counts[record.msg] = count = count + 1
        if count > 10:
            if not _is_power_of_ten(count):
                return False
            record.msg = f"{record.msg} ({count} such records; only powers of ten are logged)"
        return True


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1
