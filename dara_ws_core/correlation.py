"""The correlation table of server -> client requests (protocol.md section 4). Pure.

Every ``send_and_wait`` opens an entry under a fresh, unpredictable ``__rchan`` and attaches an
opaque *waiter* (the asyncio layer uses a future). Response frames are fed in; the table answers
with an outcome naming the waiter to complete or fail. An entry's lifecycle is: opened, then
exactly one of completed, failed (bad chunks), discarded (timeout or cancellation, by the caller's
``finally``) or failed on close (:meth:`PendingRequests.close`). No entry outlives its call.

The parts of chunked answers are bounded three ways: per answer (``max_chunks``), per *holder*
(bytes and JSON values of every pending answer's parts: a user's, all its connections together;
for anonymous connections, all those of one address, see :func:`~dara_ws_core.auth.holder_of`;
one channel's when it has neither), and per process (a :class:`ChunkBudget` that every table
shares, :data:`PROCESS_CHUNKS` by default), so that many connections, each within its own bounds,
cannot together hold what no single one may. The process budget is shared fairly: a holder takes
at most :data:`CHUNK_SHARES`-th of it, and its last :data:`CHUNK_SHARES`-th is kept for holders
of small answers only, so a few clients holding big answers never deny chunked answers to others.
Each part is counted with what holding it costs beyond its JSON (:data:`PART_BYTES`,
:data:`PART_VALUES`): many tiny parts count as what they take in memory.
"""

from __future__ import annotations

__all__ = [
    "CHUNK_ADDRESS_SHARES",
    "CHUNK_SHARES",
    "PART_BYTES",
    "PART_VALUES",
    "PROCESS_CHUNKS",
    "ChunkBudget",
    "Completed",
    "Failed",
    "Ignored",
    "Outcome",
    "Partial",
    "PendingRequests",
    "new_rchan",
]

import os
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .auth import Holder
from .chunks import ChunkAssembler
from .codec import _EXACT_ABOVE, count_json_values, dumps, held_text_bytes
from .config import ServerConfig
from .exceptions import ChunkError, DaraWSError, TooManyPendingRequests

if TYPE_CHECKING:
    from .messages import DaraClientMessage

W = TypeVar("W")

#: The limits of a table made without a configuration.
_DEFAULT_CONFIG = ServerConfig()

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


# An answer fed to complete() builds one Completed (the handler's path builds none: take, through
# ServerConnection.receive). A frozen dataclass's generated __init__ sets each
# field with object.__setattr__ (looked up and called per field); this one writes the slots
# through their descriptors, the same frozen object built a third cheaper.
_set_rchan = Completed.__dict__["rchan"].__set__
_set_waiter = Completed.__dict__["waiter"].__set__
_set_value = Completed.__dict__["value"].__set__
Completed.__init__ = _completed_init  # type: ignore[method-assign]
_new = object.__new__


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


#: What holding one part costs beyond its JSON, counted with it against every bound: its slot
#: among the answer's parts and its share of the answer's bookkeeping take about a hundred bytes
#: of Python objects, however small the part (``0`` is one byte on the wire).
PART_BYTES = 128
PART_VALUES = 1
#: A holder (a user, an anonymous peer's address, or a channel with neither) takes at most this
#: fraction of the process's chunk budget, whatever its own bounds say; and the last such
#: fraction of the budget is kept for holders whose parts stay under a 64th of their own bound
#: (small answers).
CHUNK_SHARES = 16
#: What a holder may hold and still use the kept fraction: its bounds divided by this.
_SMALL = 64
#: The channels of one client address, whatever users they name, hold at most this fraction of
#: the process's chunk budget together: without it, one client naming a user for every 16th
#: (free where the authenticator lets anyone name themselves) held all of it, and every other
#: client's chunked answer failed until its own were done.
CHUNK_ADDRESS_SHARES = 4


class _Tally:
    """Bytes and JSON values of parts held."""

    __slots__ = ("bytes", "values")

    def __init__(self) -> None:
        self.bytes = 0
        self.values = 0


class ChunkBudget(_Tally):
    """Bytes (as on the wire, or as held decoded when more, plus :data:`PART_BYTES` a part) and JSON values (plus
    :data:`PART_VALUES` a part) of the parts that the unfinished chunked answers of every table
    sharing this budget hold, in all and by user. Each table checks it against the ceilings of
    its own configuration (``max_chunked_total_bytes``, ``max_chunked_total_values``).

    Counted by the tables of one event loop: nothing here is locked.
    """

    __slots__ = ("users",)

    def __init__(self) -> None:
        super().__init__()
        #: What each holder's connections hold together (a user's; the anonymous ones of an
        #: address), and each client address's (keyed ``(PendingRequests, address)``), for
        #: those holding anything.
        self.users: dict[Hashable, _Tally] = {}


#: The budget every :class:`PendingRequests` shares unless given its own: the process's.
PROCESS_CHUNKS = ChunkBudget()


class _Held(_Tally):
    """What one channel's pending answers hold, counted in ``budget`` too (in all, and under the
    channel's user and its client's address, for those it has). Created with the channel's
    first part. A table dropped without :meth:`PendingRequests.close` (a user's own table, a
    test's) gives its share back when this object goes, so the process-wide count never keeps
    what nobody holds."""

    __slots__ = ("budget", "keys")

    def __init__(self, budget: ChunkBudget, keys: tuple[Hashable, ...]) -> None:
        super().__init__()
        self.budget = budget
        #: Under which keys of ``budget.users`` it counts: the user's, the address's.
        self.keys = keys

    def add(self, size: int, values: int) -> None:
        self.bytes += size
        self.values += values
        budget = self.budget
        budget.bytes += size
        budget.values += values
        users = budget.users
        for key in self.keys:
            tally = users.get(key)
            if tally is None:
                users[key] = tally = _Tally()
            tally.bytes += size
            tally.values += values

    def release(self, size: int, values: int) -> None:
        if not (size or values):  # an answer whose first part was refused: nothing to give back
            return
        self.bytes -= size
        self.values -= values
        budget = self.budget
        budget.bytes -= size
        budget.values -= values
        users = budget.users
        for key in self.keys:
            tally = users[key]
            tally.bytes -= size
            tally.values -= values
            if not (tally.bytes or tally.values):  # the table lists users holding something
                del users[key]

    def __del__(self) -> None:
        if self.bytes or self.values:
            self.release(self.bytes, self.values)


class _Entry(Generic[W]):
    """A request whose answer comes in parts: its waiter, the parts' assembler and what they
    hold. A plain request's entry is its waiter itself (no object per request, the usual case);
    the first part of a chunked answer replaces it with one of these."""

    __slots__ = ("assembler", "held", "values", "waiter")

    def __init__(self, waiter: W, assembler: ChunkAssembler) -> None:
        self.waiter = waiter
        self.assembler = assembler
        self.held = self.values = 0


#: What ``pop`` gives for an absent entry (a waiter may be any object, ``None`` included).
_ABSENT: Any = object()


#: The entries of every channel without a pending request (never written to: see open()).
_NO_ENTRIES: dict[str, Any] = {}


class PendingRequests(Generic[W]):
    """Pending server -> client requests of one channel, bounded in count and chunk sizes.

    The limits are those of ``config`` (a :class:`~dara_ws_core.config.ServerConfig`, shared by
    every table made with it), or of the keywords given, which override it. The parts held for
    *all* of the channel's pending answers together, and of every table of the same ``user``
    (the holder, :func:`~dara_ws_core.auth.holder_of`: the connections of one user share, and
    the anonymous connections of one address), are bounded in bytes (``max_chunked_bytes``) and in
    JSON values (``max_chunked_values``), and never by more than a :data:`CHUNK_SHARES`-th of the
    process's bounds: a client answering many requests at once, or from many connections, holds
    no more than one answer could, and a dozen clients cannot take what the process allows. The
    parts held by every table sharing ``budget`` (:data:`PROCESS_CHUNKS`, the process's, by
    default) are bounded by ``max_chunked_total_bytes`` and ``max_chunked_total_values``, whose
    last :data:`CHUNK_SHARES`-th only takes the parts of users (or channels) holding under a 64th
    of their own bounds. The tables of one client ``address`` (its key, as ``current_source``
    holds it) hold at most a :data:`CHUNK_ADDRESS_SHARES`-th of the process's bounds together,
    whatever users they name. A part beyond any bound fails its request with
    :class:`~dara_ws_core.exceptions.ChunkError`; the connection stays.
    """

    __slots__ = ("_address", "_budget", "_config", "_entries", "_held", "_user", "max_pending")

    def __init__(
        self,
        config: ServerConfig | None = None,
        user: Holder | None = None,
        address: str | None = None,
        *,
        budget: ChunkBudget | None = None,
        max_pending: int | None = None,
        max_chunks: int | None = None,
        max_chunked_bytes: int | None = None,
        max_chunked_values: int | None = None,
    ) -> None:
        if config is None:
            config = _DEFAULT_CONFIG
        if not (max_pending is None and max_chunks is None and max_chunked_bytes is None
                and max_chunked_values is None):
            config = replace(
                config,
                max_pending_requests=config.max_pending_requests if max_pending is None else max_pending,
                max_chunks=config.max_chunks if max_chunks is None else max_chunks,
                max_chunked_bytes=config.max_chunked_bytes if max_chunked_bytes is None else max_chunked_bytes,
                max_chunked_values=config.max_chunked_values if max_chunked_values is None else max_chunked_values,
            )
        self._config = config
        self._budget = PROCESS_CHUNKS if budget is None else budget
        # A read of every request (open()), hence a slot of its own.
        self.max_pending = config.max_pending_requests
        # A shared empty table until the first request: most connections never get one, and an
        # empty dict per connection is 64 bytes. Only open() adds; it swaps in a table first.
        # An entry is the request's waiter, or an _Entry once its answer comes in parts.
        self._entries: dict[str, W | _Entry[W]] = _NO_ENTRIES
        self._held: _Held | None = None  # made by the first part of a chunked answer
        self._user = user
        # The client address's key among the budget's holders (of its own kind: never a user's).
        self._address: Hashable = None if address is None else (PendingRequests, address)

    @property
    def max_chunks(self) -> int:
        """Most parts of one answer."""
        return self._config.max_chunks

    @property
    def max_chunked_bytes(self) -> int:
        """Most bytes of parts held for all of this channel's pending answers (and its user's):
        ``max_chunked_bytes``, at most a :data:`CHUNK_SHARES`-th of the process's bound."""
        config = self._config
        return min(config.max_chunked_bytes, max(1, config.max_chunked_total_bytes // CHUNK_SHARES))

    @property
    def max_chunked_values(self) -> int:
        """Most JSON values of parts held for all of this channel's pending answers (and its
        user's): ``max_chunked_values``, at most a :data:`CHUNK_SHARES`-th of the process's."""
        config = self._config
        return min(config.max_chunked_values, max(1, config.max_chunked_total_values // CHUNK_SHARES))

    @property
    def held_bytes(self) -> int:
        """Bytes of chunked-answer parts held for this channel's pending requests."""
        return 0 if self._held is None else self._held.bytes

    @property
    def held_values(self) -> int:
        """JSON values of chunked-answer parts held for this channel's pending requests (an
        upper bound, counted as for a frame: see :func:`~dara_ws_core.codec.count_json_values`)."""
        return 0 if self._held is None else self._held.values

    def _remove(self, rchan: str) -> None:
        entry = self._entries.pop(rchan)
        if type(entry) is _Entry and self._held is not None:
            self._held.release(entry.held, entry.values)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, rchan: object) -> bool:
        return rchan in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def waiter(self, rchan: str) -> W:
        """The waiter of a pending request; raises ``KeyError`` if there is none."""
        entry = self._entries[rchan]
        return entry.waiter if type(entry) is _Entry else entry  # type: ignore[return-value]

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
        entries[rchan] = waiter
        return rchan

    def receive(self, message: DaraClientMessage) -> Outcome[W]:
        """Feed one response frame (:meth:`receive_part` with its fields)."""
        return self.receive_part(message.channel, message.chunk_count, message.chunk_index,
                                 message.message)

    def receive_part(self, rchan: str, chunk_count: int | None, chunk_index: int | None,
                     message: Any) -> Outcome[W]:
        """Feed one response frame, by its fields: ``channel`` (``rchan``), ``chunk_count``,
        ``chunk_index`` and ``message``.

        Each part of a chunked answer is kept as its frame decoded it, so that its cost is paid
        with its frame, which ``max_message_values`` bounds; the last part only builds the list.
        What a part holds is counted as its compact JSON (UTF-8 bytes, or for a part with
        non-ASCII text what its strings hold decoded if that is more:
        :func:`~dara_ws_core.codec.held_text_bytes`; and JSON values counted as for a frame)
        plus :data:`PART_BYTES` and :data:`PART_VALUES`, against the channel's, the user's and
        the process's bounds.
        """
        if chunk_count is None:
            return self.complete(rchan, message)
        entries = self._entries
        entry = entries.get(rchan, _ABSENT)
        if entry is _ABSENT:
            return Ignored(rchan)
        config = self._config
        held = self._held
        chunked: _Entry[W] | None = entry if type(entry) is _Entry else None
        waiter: W = entry if chunked is None else chunked.waiter
        try:
            if chunked is None:  # the first part: the entry gets its assembler
                chunked = _Entry(waiter, ChunkAssembler(
                    chunk_count,
                    max_chunks=config.max_chunks,
                    max_bytes=self.max_chunked_bytes,
                ))
                entries[rchan] = chunked
            part = dumps(message)
            size = len(part)
            if not part.isascii():
                # Decoded, its strings may take up to 4 bytes a character where the wire took
                # one (an ASCII text with one emoji): counted as held, not as sent.
                size = max(size, held_text_bytes(message))
            size += PART_BYTES
            values = count_json_values(part, _EXACT_ABOVE) + PART_VALUES
            self._check(held, size, values)
            parts = chunked.assembler.feed(
                message,
                chunk_count=chunk_count,
                chunk_index=chunk_index,
                size=size,
            )
        except ChunkError as exc:
            self._remove(rchan)
            # Without its traceback: through this frame's locals it would keep every part of
            # the failed answer alive as long as the caller keeps the exception.
            return Failed(rchan, waiter, exc.with_traceback(None))
        if held is None:
            self._held = held = _Held(self._budget, tuple(
                key for key in (self._user, self._address) if key is not None))
        held.add(size, values)
        chunked.held += size
        chunked.values += values
        if parts is None:
            return Partial(rchan, chunked.assembler.received, chunked.assembler.expected)
        self._remove(rchan)
        return Completed(rchan, waiter, parts)

    def _check(self, held: _Held | None, size: int, values: int) -> None:
        """Raise :class:`ChunkError` if a part costing ``size`` bytes and ``values`` JSON values
        would take its holder (the channel's user, or the channel) or the process over a bound,
        or into the process's last share while the holder holds more than small answers."""
        config = self._config
        budget = self._budget
        user = self._user
        mine: _Tally | None = held if user is None else budget.users.get(user)
        mine_bytes, mine_values = (size, values) if mine is None else (mine.bytes + size, mine.values + values)
        whose = ("on this channel" if user is None else "for this user" if type(user) is str
                 else "for this address")
        max_bytes, max_values = self.max_chunked_bytes, self.max_chunked_values
        if mine_bytes > max_bytes:
            raise ChunkError(f"chunked answers pending {whose} exceed {max_bytes} bytes")
        if mine_values > max_values:
            raise ChunkError(f"chunked answers pending {whose} exceed {max_values} JSON values")
        if self._address is not None:
            theirs = budget.users.get(self._address)
            their_bytes, their_values = (size, values) if theirs is None else (theirs.bytes + size,
                                                                              theirs.values + values)
            if (their_bytes > config.max_chunked_total_bytes // CHUNK_ADDRESS_SHARES
                    or their_values > config.max_chunked_total_values // CHUNK_ADDRESS_SHARES):
                raise ChunkError("chunked answers pending from this client address exceed a "
                                 f"{CHUNK_ADDRESS_SHARES}th of the process's bounds")
        total_bytes, total_values = budget.bytes + size, budget.values + values
        if total_bytes > config.max_chunked_total_bytes:
            raise ChunkError(f"chunked answers pending in this process exceed "
                             f"{config.max_chunked_total_bytes} bytes")
        if total_values > config.max_chunked_total_values:
            raise ChunkError(f"chunked answers pending in this process exceed "
                             f"{config.max_chunked_total_values} JSON values")
        # The last share of the process's budget stays for small answers, so that clients
        # holding big ones (each within its share) never deny everyone else a chunked answer.
        if ((total_bytes > config.max_chunked_total_bytes - config.max_chunked_total_bytes // CHUNK_SHARES
             or total_values > config.max_chunked_total_values - config.max_chunked_total_values // CHUNK_SHARES)
                and (mine_bytes > max_bytes // _SMALL or mine_values > max_values // _SMALL)):
            raise ChunkError("chunked answers pending in this process are near their bounds: "
                             f"only small ones are taken ({max_bytes // _SMALL} bytes and "
                             f"{max_values // _SMALL} JSON values {whose})")

    def take(self, rchan: str) -> W | None:
        """The waiter of the plain (not chunked) request ``rchan``, removed: what
        :meth:`complete` puts in its ``Completed``, without building one (a requesting server's
        commonest event, only to be unpacked). ``None``, nothing changed, where :meth:`complete`
        decides otherwise (an unknown or settled request, one holding chunked parts)."""
        entries = self._entries
        entry = entries.get(rchan, _ABSENT)
        if entry is _ABSENT or type(entry) is _Entry:
            return None
        del entries[rchan]
        return entry  # type: ignore[no-any-return]

    def complete(self, rchan: str, value: Any) -> Completed[W] | Failed[W] | Ignored:
        """Feed a plain (not chunked) answer: ``value`` for the request ``rchan``."""
        entry = self._entries.pop(rchan, _ABSENT)
        if entry is _ABSENT:
            return Ignored(rchan)
        if type(entry) is _Entry:  # only a chunked answer holds parts
            if self._held is not None:
                self._held.release(entry.held, entry.values)
            # Dara let a plain frame silently replace collected parts; we refuse it.
            return Failed(rchan, entry.waiter, ChunkError("plain answer after chunked parts"))
        # Completed(rchan, entry, value) without the call of its __init__ (from C, a Python
        # frame of its own): the same frozen object, its slots written through their descriptors.
        done: Completed[W] = _new(Completed)
        _set_rchan(done, rchan)
        _set_waiter(done, entry)
        _set_value(done, value)
        return done

    def discard(self, rchan: str) -> None:
        """Forget a request (its caller timed out or was cancelled); no-op if already gone."""
        if rchan in self._entries:
            self._remove(rchan)

    def close(self) -> list[W]:
        """Remove every entry and return their waiters, to be failed with the close exception."""
        waiters: list[W] = [entry.waiter if type(entry) is _Entry else entry  # type: ignore[misc]
                            for entry in self._entries.values()]
        self._entries.clear()
        held = self._held
        if held is not None:
            held.release(held.bytes, held.values)
        return waiters
