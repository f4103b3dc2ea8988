"""The correlation table of server -> client requests (protocol.md section 4). Pure.

Every ``send_and_wait`` opens an entry under a fresh, unpredictable ``__rchan`` and attaches an
opaque *waiter* (the asyncio layer uses a future). Response frames are fed in; the table answers
with an outcome naming the waiter to complete or fail. An entry's lifecycle is: opened, then
exactly one of completed, failed (bad chunks), discarded (timeout or cancellation, by the caller's
``finally``) or failed on close (:meth:`PendingRequests.close`). No entry outlives its call.
"""

from __future__ import annotations

__all__ = [
    "Completed",
    "Failed",
    "Ignored",
    "Outcome",
    "Partial",
    "PendingRequests",
    "new_rchan",
]

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic_core import from_json

from .chunks import ChunkAssembler
from .codec import dumps
from .exceptions import ChunkError, DaraWSError, TooManyPendingRequests
from .messages import DaraClientMessage

W = TypeVar("W")

#: The hex digit that holds uuid4's variant bits (RFC 4122: 10xx), by the random digit it replaces.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


#: How many ``__rchan`` values one draw of random bytes makes (see :func:`new_rchan`).
_RCHANS_PER_DRAW = 64
#: The ``__rchan`` values drawn and not yet given out; emptied in a forked child (see below).
_rchans: list[str] = []
#: Where each hex digit of 16 random bytes goes in the 36 characters of a uuid4's text: all but
#: digit 12, which gives way to the version digit (4), and digit 16, which carries the variant.
_UUID_TEXT = tuple(zip(
    (*range(0, 8), *range(8, 12), *range(13, 16), *range(17, 20), *range(20, 32)),
    (*range(0, 8), *range(9, 13), *range(15, 18), *range(20, 23), *range(24, 36)), strict=True))
#: The variant digit (RFC 4122: 10xx) by the random hex digit it replaces, as a bytes table.
_VARIANT_TABLE = bytes.maketrans(b"0123456789abcdef", "".join(_VARIANT[d] for d in "0123456789abcdef").encode())


def _draw_rchans(count: int) -> list[str]:
    """``count`` uuid4 texts from one ``os.urandom`` call (122 random bits each, as
    ``uuid.uuid4()`` draws them). Laid out digit by digit over all of them at once (a slice
    assignment in C per digit), not formatted one by one."""
    digits = os.urandom(16 * count).hex().encode()
    text = bytearray(b"-" * (36 * count))
    for digit, at in _UUID_TEXT:
        text[at::36] = digits[digit::32]
    text[14::36] = b"4" * count
    text[19::36] = digits[16::32].translate(_VARIANT_TABLE)
    out = text.decode()
    return [out[at:at + 36] for at in range(0, 36 * count, 36)]


def new_rchan() -> str:
    """A fresh ``__rchan``: the text of a uuid4, without a ``UUID`` object or an int, one per
    server request. They are drawn a few dozen at a time (one system call for all, not one per
    request) and kept in this process only: a forked child starts with none, so two worker
    processes never give out the same values (nor one worker's clients learn another's)."""
    rchans = _rchans
    if not rchans:
        rchans.extend(_draw_rchans(_RCHANS_PER_DRAW))
    return rchans.pop()


if hasattr(os, "register_at_fork"):  # POSIX: the values drawn before a fork stay the parent's
    os.register_at_fork(after_in_child=_rchans.clear)


@dataclass(frozen=True, slots=True)
class Completed(Generic[W]):
    """The answer is complete: give ``value`` to ``waiter``. The entry is removed."""

    rchan: str
    waiter: W
    value: Any


def _completed_init(self: Completed[Any], rchan: str, waiter: Any, value: Any) -> None:
    _set_rchan(self, rchan)
    _set_waiter(self, waiter)
    _set_value(self, value)


# Every answered request builds one Completed. A frozen dataclass's generated __init__ sets each
# field with object.__setattr__ (looked up and called per field); this one writes the slots
# through their descriptors, the same frozen object built a third cheaper.
_set_rchan = Completed.__dict__["rchan"].__set__
_set_waiter = Completed.__dict__["waiter"].__set__
_set_value = Completed.__dict__["value"].__set__
Completed.__init__ = _completed_init  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class Failed(Generic[W]):
    """The request failed: fail ``waiter`` with ``error`` (a ``ChunkError`` for an answer that
    broke the protocol, ``ConnectionClosed`` when the connection ends). The entry is removed."""

    rchan: str
    waiter: W
    error: DaraWSError


@dataclass(frozen=True, slots=True)
class Partial:
    """A chunk was stored; more are expected."""

    rchan: str
    received: int
    expected: int


@dataclass(frozen=True, slots=True)
class Ignored:
    """The frame answers no pending request (unknown, already answered, or timed out)."""

    rchan: str


Outcome = Completed[W] | Failed[W] | Partial | Ignored


class _Entry(Generic[W]):
    __slots__ = ("assembler", "held", "waiter")

    def __init__(self, waiter: W) -> None:
        self.waiter = waiter
        self.assembler: ChunkAssembler | None = None
        self.held = 0  # bytes of the parts stored


#: The entries of every channel without a pending request (never written to: see open()).
_NO_ENTRIES: dict[str, Any] = {}


class PendingRequests(Generic[W]):
    """Pending server -> client requests of one channel, bounded in count and chunk sizes.

    ``max_chunked_bytes`` bounds the parts held for *all* of the channel's pending answers
    together: a client answering many requests at once holds no more than one answer could.
    """

    __slots__ = ("_entries", "_held", "max_chunked_bytes", "max_chunks", "max_pending")

    def __init__(
        self, *, max_pending: int = 1024, max_chunks: int = 10_000, max_chunked_bytes: int = 2**26
    ) -> None:
        self.max_pending = max_pending
        self.max_chunks = max_chunks
        self.max_chunked_bytes = max_chunked_bytes
        # A shared empty table until the first request: most connections never get one, and an
        # empty dict per connection is 64 bytes. Only open() adds; it swaps in a table first.
        self._entries: dict[str, _Entry[W]] = _NO_ENTRIES
        self._held = 0  # bytes of parts held, over every entry

    @property
    def held_bytes(self) -> int:
        """Bytes of chunked-answer parts held for this channel's pending requests."""
        return self._held

    def _remove(self, rchan: str) -> _Entry[W]:
        entry = self._entries.pop(rchan)
        self._held -= entry.held
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, rchan: object) -> bool:
        return rchan in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def waiter(self, rchan: str) -> W:
        """The waiter of a pending request; raises ``KeyError`` if there is none."""
        return self._entries[rchan].waiter

    def open(self, waiter: W, rchan: str | None = None) -> str:
        """Open a request and return its ``__rchan``: a new uuid4 (122 random bits, like Dara's),
        or ``rchan`` when the frame was encoded elsewhere (a request relayed by the backplane;
        the caller owes it the same unpredictability).

        Raises :class:`TooManyPendingRequests` at the limit, ``ValueError`` if ``rchan`` is
        already pending (two requests must never share an answer).
        """
        if len(self._entries) >= self.max_pending:
            raise TooManyPendingRequests(
                f"{len(self._entries)} requests already pending on this channel"
            )
        if rchan is None:
            rchan = new_rchan()
        elif rchan in self._entries:
            raise ValueError(f"request {rchan!r} is already pending")
        entries = self._entries
        if entries is _NO_ENTRIES:
            self._entries = entries = {}
        entries[rchan] = _Entry(waiter)
        return rchan

    def receive(self, message: DaraClientMessage) -> Outcome[W]:
        """Feed one response frame.

        The parts of a chunked answer are held as compact JSON ``bytes`` until the last arrives,
        then decoded together: what a pending answer holds is its size on the wire, counted in
        UTF-8 bytes against ``max_chunked_bytes``, not the many times more that decoded Python
        objects take.
        """
        rchan = message.channel
        if message.chunk_count is None:
            return self.complete(rchan, message.message)
        entry = self._entries.get(rchan)
        if entry is None:
            return Ignored(rchan)
        try:
            if entry.assembler is None:
                entry.assembler = ChunkAssembler(
                    message.chunk_count,
                    max_chunks=self.max_chunks,
                    max_bytes=self.max_chunked_bytes,
                )
            part = dumps(message.message)
            if self._held + len(part) > self.max_chunked_bytes:
                raise ChunkError(
                    f"chunked answers pending on this channel exceed {self.max_chunked_bytes} bytes"
                )
            parts = entry.assembler.feed(
                part,
                chunk_count=message.chunk_count,
                chunk_index=message.chunk_index,
                size=len(part),
            )
        except ChunkError as exc:
            self._remove(rchan)
            return Failed(rchan, entry.waiter, exc)
        entry.held += len(part)
        self._held += len(part)
        if parts is None:
            return Partial(rchan, entry.assembler.received, entry.assembler.expected)
        self._remove(rchan)
        # Without pydantic-core's string cache, as every frame (see codec._NO_STRING_CACHE).
        return Completed(rchan, entry.waiter, [from_json(part, cache_strings=False) for part in parts])

    def complete(self, rchan: str, value: Any) -> Completed[W] | Failed[W] | Ignored:
        """Feed a plain (not chunked) answer: ``value`` for the request ``rchan``."""
        entry = self._entries.pop(rchan, None)
        if entry is None:
            return Ignored(rchan)
        if entry.assembler is not None:  # only a chunked answer holds parts
            self._held -= entry.held
            # Dara let a plain frame silently replace collected parts; we refuse it.
            return Failed(rchan, entry.waiter, ChunkError("plain answer after chunked parts"))
        return Completed(rchan, entry.waiter, value)

    def discard(self, rchan: str) -> None:
        """Forget a request (its caller timed out or was cancelled); no-op if already gone."""
        if rchan in self._entries:
            self._remove(rchan)

    def close(self) -> list[W]:
        """Remove every entry and return their waiters, to be failed with the close exception."""
        waiters = [entry.waiter for entry in self._entries.values()]
        self._entries.clear()
        self._held = 0
        return waiters
