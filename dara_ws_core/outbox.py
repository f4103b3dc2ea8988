"""A per-user outbox: a bounded history of what ``send_message_to_user`` sent to each user, with
the point up to which the user has it, so that nothing sent to a user is lost while they reconnect
(with a new channel, as the stock client does) or while their process is cut off from the bus.

Pure: no I/O, no event loop; the caller passes the clock. One process without a backplane keeps
it here (:class:`UserOutbox`); with a backplane it lives on the bus (``MemoryBroker``, a Redis
Stream per user in ``dara_ws_redis``) so that it is delivered on whichever process the user lands
and survives the restart of the sending one. The model is AnyCable's reliable streams.

**Every per-user message is appended** (when the outbox is on), whether the user is connected
anywhere or not, bounded per user by count, bytes and age. A sender has at most a
:data:`HISTORY_SHARES`-th of one user's history waiting, and only what was written or expired
makes room for its message: one that still waits is never dropped for a sender's (the new one
is refused). Server code's message drops the user's oldest entries, whoever sent them. Each entry
has an id, increasing per user (a Redis Stream id, ``"<ms>-<seq>"``; :func:`id_key` orders them)
and a per-user sequence number ``n`` (1, 2, 3...: a jump tells how many were dropped by a bound).
The message that reaches the user's channels carries both.

**Written, for the user.** A per-user message counts as delivered *for the user* once a
transport has written it to at least one of the user's connections. Each process acknowledges
what its connections wrote (:meth:`UserOutbox.ack`: the user's *written* mark only moves
forward). What a connection had queued but not written when it closed is not acknowledged, so it
stays for the user's next connection, unless another connection of the user wrote it (the stock
client reconnects with a new channel, so nothing can resume per channel: the user is the unit).
The mark says "everything up to here was written", so with a backplane a connection
acknowledges only as far as it wrote every entry since it was admitted (:class:`WrittenRun`:
entries are numbered without gaps, and a process's own send may reach its connections before one
numbered earlier by another process).

**A new connection** gets the entries after the written mark (oldest first, within the age):
it *leases* them (:meth:`UserOutbox.lease`), and while a live holder has the lease a second new
connection of the user gets none of them (the first is delivering them: once); a lease whose
holder is gone is void. The holder settles once its transport wrote them
(:meth:`UserOutbox.settle`: acknowledged up to the last one written; the lease ends). Until
then, and after a holder that ended without writing them all until the next lease, another
connection's acknowledgement never moves the mark past them: it got only newer entries, live.

**A process cut off from the bus** remembers, per local user, the last entry it handed to the
user's channels (:class:`DeliveryCursors`). When its subscription is back it reads each local
user's history after that entry and hands over what it missed, in order, before anything newer;
an entry that arrives both live and from the history is handed over once (dedup by id). Only
what a bound dropped meanwhile is lost, and counted (``n`` jumps).

**The outbox as a whole** is bounded in users and bytes (:class:`OutboxLimits`): at a bound,
histories whose every entry was written make room (kept apart from the waiting ones, so this costs
O(1) per history dropped, whatever waits); a message still waiting for its user is never dropped
for another's, the new one is refused instead. Each message is **charged to its sender** (the
caller says who: the manager charges the user whose frame is being handled, or for an anonymous
one its address), and a sender takes at most its *share* of each shared bound: ``max_per_sender``
messages waiting, and never more than a :data:`SENDER_SHARES`-th of the users (each message
waiting may hold a history) or of the bytes. A name can be free (an authenticator may let a
client pick its user id), so each message is also charged to its sender's **address**
(:func:`address_of`), and the senders of one address take together at most an
:data:`ADDRESS_SHARES`-th of the users and of the bytes: a client minting names holds its
address's share, not one per name. Senders together never take the last
:data:`SENDER_SHARES`-th of the users and bytes: that one is server code's, which is charged to
nobody. Of what they may take, the last such fraction is kept for senders holding little (under
a :data:`SENDER_SMALL`-th of their share) from addresses holding little (the same): however many
addresses take their share, a message from one that holds little is still kept. On the bus the
same bounds are kept where it appends (``dara_ws_redis``), and :class:`BusRefusals` remembers its
refusals for the sending process.

Not covered: broadcasts (for whoever is connected now; keeping them per absent user would cost
memory for every user ever seen) and per-channel sends (a channel never comes back): at most
once, with the broadcasts' sequence numbers telling a process how many it missed. A frame larger
than the byte bound is not kept.
"""

from __future__ import annotations

__all__ = ["ADDRESS_SHARES", "HISTORY_SHARES", "SENDER_SHARES", "SENDER_SMALL", "BusRefusals", "ClosedWrites",
           "DeliveryCursors", "OutboxLimits", "QueuedMarks", "Stamped", "UserOutbox", "WriteLog", "WrittenRun",
           "address_of", "anonymous_sender", "id_key", "sender_of"]

import bisect
import functools
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, overload

from .transport import address_key

if TYPE_CHECKING:
    from .auth import Identity

#: A sender takes at most this fraction of the outbox's users and bytes, whatever
#: ``max_per_sender`` says. Senders together take at most all but the last such fraction of each
#: (server code's, charged to nobody: no sender can take it); and of what they may take, the
#: last such fraction is kept for senders holding under a :data:`SENDER_SMALL`-th of their share
#: from addresses holding under a :data:`SENDER_SMALL`-th of theirs.
SENDER_SHARES = 16
#: What a sender (or an address) may hold and still use the kept fraction: its share divided by
#: this.
SENDER_SMALL = 64
#: The senders of one address (:func:`address_of`) take together at most this fraction of the
#: outbox's users and bytes: a client that names itself anew for each connection (a sender
#: each) is held to its address's share, and at least this many addresses are needed to fill
#: what senders may take.
ADDRESS_SHARES = 4
#: A sender has at most this fraction of one user's history waiting (``max_messages`` and
#: ``max_bytes``): it takes four senders at their share to fill a history, and even then none of
#: them can push out another's message still waiting (see :meth:`UserOutbox.add`).
HISTORY_SHARES = 4


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """Bounds of one user's outbox (defaults near AnyCable's reliable streams)."""

    #: Most messages kept per user.
    max_messages: int = 100
    #: Most bytes kept per user (encoded frames).
    max_bytes: int = 1024 * 1024
    #: Seconds a message is kept.
    max_age: float = 300.0
    #: Most users with a history, and most bytes of all of them, in one process's outbox
    #: (beyond, histories all written are dropped, the one written longest ago first; when only
    #: histories with entries still waiting are left, the new message is refused).
    max_users: int = 100_000
    max_total_bytes: int = 256 * 1024 * 1024
    #: Most messages charged to one sender (the user whose frame was being handled when the
    #: message was sent; for an anonymous one, its address) waiting in the outbox at once, and
    #: at most a :data:`SENDER_SHARES`-th of ``max_users`` (:attr:`sender_messages`); its bytes
    #: waiting are at most a :data:`SENDER_SHARES`-th of ``max_total_bytes``
    #: (:attr:`sender_bytes`); the senders of one address (:func:`address_of`) together at
    #: most :attr:`address_messages` and :attr:`address_bytes`. Beyond, that sender's messages
    #: (or that address's) are refused, and other senders'
    #: still kept. A message leaves its sender's count once written to its user, dropped by a
    #: bound, or expired.
    max_per_sender: int = 1000

    def __post_init__(self) -> None:
        if (self.max_messages < 1 or self.max_bytes < 1 or self.max_age <= 0
                or self.max_users < 1 or self.max_total_bytes < 1 or self.max_per_sender < 1):
            raise ValueError("outbox limits must be positive")

    @property
    def sender_messages(self) -> int:
        """Most messages one sender may have waiting: ``max_per_sender``, at most a
        :data:`SENDER_SHARES`-th of ``max_users`` (each may hold a history)."""
        return min(self.max_per_sender, max(1, self.max_users // SENDER_SHARES))

    @property
    def history_messages(self) -> int:
        """Most messages one sender may have waiting in one user's history: a
        :data:`HISTORY_SHARES`-th of ``max_messages`` (at least one)."""
        return max(1, self.max_messages // HISTORY_SHARES)

    @property
    def history_bytes(self) -> int:
        """Most bytes of one sender's messages waiting in one user's history: a
        :data:`HISTORY_SHARES`-th of ``max_bytes``."""
        return max(1, self.max_bytes // HISTORY_SHARES)

    @property
    def sender_bytes(self) -> int:
        """Most bytes one sender's messages waiting may take: a :data:`SENDER_SHARES`-th of
        ``max_total_bytes``."""
        return max(1, self.max_total_bytes // SENDER_SHARES)

    @property
    def address_messages(self) -> int:
        """Most messages the senders of one address may have waiting together: an
        :data:`ADDRESS_SHARES`-th of ``max_users``."""
        return max(1, self.max_users // ADDRESS_SHARES)

    @property
    def address_bytes(self) -> int:
        """Most bytes the messages waiting of one address's senders may take together: an
        :data:`ADDRESS_SHARES`-th of ``max_total_bytes``."""
        return max(1, self.max_total_bytes // ADDRESS_SHARES)


@functools.lru_cache(maxsize=1024)
def anonymous_sender(address: str | None) -> str:
    """The sender an anonymous connection's kept messages are charged to: its remote address
    (``None``, a connection without one, such as a Unix socket's: one sender for all of them),
    as :func:`~dara_ws_core.endpoint.host_of` counts it: an IPv6 address by its /64, which one
    client usually has whole; an IPv4 one mapped into IPv6 as that IPv4 address. Behind a
    reverse proxy not in ``ServerConfig.forwarded_allow_ips`` every client has the proxy's
    address: they are one sender. Starts with a NUL,
    which :func:`sender_of` keeps for these."""
    if address is None:
        return "\0anonymous"
    return f"\0anonymous {address_key(address)}"


def sender_of(identity: Identity | None, source: str | None) -> str:
    """Who the kept messages of a connection of ``identity`` whose peer is ``source`` (its
    address key) are charged to: its user; for an anonymous one (or none), its address
    (:func:`anonymous_sender`: a new connection is no new quota). A user id that starts with a
    NUL (a client that may name itself, as with the demo's tokens) gets a prefix of its own, so
    no user can be charged as an address, nor an address as a user."""
    if identity is None or identity.anonymous:
        return anonymous_sender(source)
    user_id = identity.user_id
    return user_id if not user_id.startswith("\0") else f"\0user {user_id}"


@overload
def address_of(source: str) -> str: ...
@overload
def address_of(source: None) -> None: ...
@functools.lru_cache(maxsize=1024)  # the send path asks once per kept message: no frame
def address_of(source: str | None) -> str | None:
    """The address a connection whose peer is ``source`` (its address key) is charged to as well
    as its sender, named or not (:data:`ADDRESS_SHARES`): the key its anonymous connections are
    charged to (:func:`anonymous_sender`), so that a client naming itself anew for each
    connection (as the demo's tokens allow) shares one address's room. ``None`` without an
    address (a Unix socket's peer, a test): nothing to group by, only the sender counts."""
    return None if source is None else anonymous_sender(source)


def id_key(entry_id: str) -> tuple[int, int]:
    """The order of entry ids: ``"<ms>-<seq>"`` (Redis Stream ids) or ``"<n>"``."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Stamped(NamedTuple):
    """One entry of a user's history: its id, its per-user sequence number, the frame."""

    id: str
    n: int
    frame: bytes


#: One entry of a history: id, sequence number, when kept, the frame, its sender (``None``: not
#: charged to anyone) and its sender's address (``None``: none, or not charged).
_Entry = tuple[int, int, float, bytes, str | None, str | None]


class _History:
    """One user's entries kept (``(id, n, when, frame, sender, address)``, oldest first) and
    marks."""

    __slots__ = ("charged", "droppable", "entries", "held", "lease", "leased", "seq", "size",
                 "written")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.charged = 0  # entries with a sender not written yet (0: nothing to release)
        # Sender -> its entries here not written yet, and their bytes (its share of the user).
        self.held: dict[str, list[int]] = {}
        self.droppable = False  # nothing waits: counted in UserOutbox._written_*
        self.size = 0  # bytes of the frames kept
        self.seq = 0  # the last sequence number given
        self.written = 0  # the written mark (an id; 0: none)
        # The holder of the lease (_VOID: it ended before writing them all) and the last entry
        # leased: while either is set, no acknowledgement of an entry after it moves the mark
        # (the holder may not have written the entries between: only it can say).
        self.lease: Hashable | None = None
        self.leased = 0


class UserOutbox:
    """Every user's bounded history, for one process (see the module docstring).

    Ids are integers inside (``str`` in :class:`Stamped`, as the bus's): the send path
    (:meth:`add`, :meth:`ack` with an ``int``) parses and builds nothing."""

    def __init__(self, limits: OutboxLimits, ids: Iterator[int] | None = None) -> None:
        self.limits = limits
        # Entry ids, increasing (share one source between outboxes whose ids must never go
        # back, as Redis's clock-based ids never do).
        self._ids = ids if ids is not None else itertools.count(1)
        # Ordered by the last append (moved to the end on each): the first user is the one sent
        # to least recently, whose newest entry is the oldest (expiry).
        self._users: dict[str, _History] = {}
        # The histories whose every entry was written (nothing of theirs is waiting: droppable),
        # in the order they became so: what the global bounds may drop, the first first (an
        # OrderedDict: popping its first is O(1)). A history sent to again stays in place,
        # marked not droppable, and is skipped when its turn comes (so the send path neither
        # removes nor re-inserts): it is there at most once, and skipped at most once.
        self._written: OrderedDict[str, _History] = OrderedDict()
        self._written_bytes = 0  # bytes of the droppable histories
        self._written_users = 0  # how many there are
        # Sender -> its messages kept and not written yet, and their bytes (its share); the
        # same per address of the senders (address_of).
        self._senders: dict[str, list[int]] = {}
        self._addresses: dict[str, list[int]] = {}
        # The shares (OutboxLimits.sender_messages, sender_bytes, address_*), what a sender and
        # an address may hold and still use the kept fraction, where that fraction begins (past
        # it, only senders holding little) and where server code's begins (past it, no sender).
        self._sender_messages = limits.sender_messages
        self._sender_bytes = limits.sender_bytes
        self._address_messages = limits.address_messages
        self._address_bytes = limits.address_bytes
        # A sender's share of one user's history (OutboxLimits.history_messages, history_bytes).
        self._history_messages = limits.history_messages
        self._history_bytes = limits.history_bytes
        self._small_messages = self._sender_messages // SENDER_SMALL
        self._small_bytes = self._sender_bytes // SENDER_SMALL
        self._little_messages = self._address_messages // SENDER_SMALL
        self._little_bytes = self._address_bytes // SENDER_SMALL
        self._near_users = limits.max_users - 2 * (limits.max_users // SENDER_SHARES)
        self._near_bytes = limits.max_total_bytes - 2 * (limits.max_total_bytes // SENDER_SHARES)
        self._peers_users = limits.max_users - limits.max_users // SENDER_SHARES
        self._peers_bytes = limits.max_total_bytes - limits.max_total_bytes // SENDER_SHARES
        self._total = 0  # bytes of every user's frames kept
        self._expires = 0.0  # no user's newest entry expires before (a cutoff): none to forget
        #: Frames kept, and frames dropped by a bound; users dropped by ``max_users`` or
        #: ``max_total_bytes`` (their entries, all written, counted in ``evicted``); frames not
        #: kept because only entries still waiting for their user could have made room, or
        #: because their sender (or its address) had its share waiting, or held more than a
        #: little while only the kept fraction was left, or the senders' room was full, or (a
        #: sender's) had its share of the user's history waiting, or found that history full of
        #: entries waiting (``refused`` counts all, and ``refused_sender`` all but the first).
        self.kept = 0
        self.evicted = 0
        self.users_evicted = 0
        self.refused = 0
        self.refused_sender = 0

    def __len__(self) -> int:
        """Users with entries not written to any of their connections yet."""
        return sum(1 for user in self._users if self.pending(user))

    @property
    def users(self) -> int:
        """Users with a history (written or not): what ``max_users`` bounds."""
        return len(self._users)

    @property
    def total_bytes(self) -> int:
        """Bytes of every user's frames kept: what ``max_total_bytes`` bounds."""
        return self._total

    def pending(self, user_id: str) -> int:
        """How many of the user's entries no connection of theirs has written."""
        history = self._users.get(user_id)
        if history is None:
            return 0
        mark = history.written
        return sum(1 for kid, *_ in history.entries if kid > mark)

    def charged(self, sender: str) -> int:
        """How many messages of ``sender`` are kept and not written yet."""
        return self._senders.get(sender, _NOTHING)[0]

    def charged_bytes(self, sender: str) -> int:
        """The bytes of the messages of ``sender`` kept and not written yet."""
        return self._senders.get(sender, _NOTHING)[1]

    def address_charged(self, address: str) -> int:
        """How many messages of the senders of ``address`` are kept and not written yet."""
        return self._addresses.get(address, _NOTHING)[0]

    def address_charged_bytes(self, address: str) -> int:
        """The bytes of the messages of the senders of ``address`` kept and not written yet."""
        return self._addresses.get(address, _NOTHING)[1]

    def add(self, user_id: str, frame: bytes, now: float, sender: str | None = None,
            address: str | None = None) -> int:
        """Append ``frame`` to the user's history, charged to ``sender`` (``None``: to nobody,
        as a send from server code) and to its ``address`` (:func:`address_of`; ``None``: not
        known); its id, or 0 if it is not kept: larger than ``max_bytes``,
        ``sender`` has its share waiting (:attr:`OutboxLimits.sender_messages`,
        :attr:`~OutboxLimits.sender_bytes`), or ``address`` has (:attr:`~OutboxLimits.address_messages`,
        :attr:`~OutboxLimits.address_bytes`), or the entries waiting fill all but server code's
        :data:`SENDER_SHARES`-th of ``max_users`` or ``max_total_bytes``, or all but the next
        such share too and the sender or its address holds more than a :data:`SENDER_SMALL`-th
        of its share, or there is no room under the process's bounds
        without dropping entries kept for another user that none of their connections wrote
        yet, or (``sender`` given) it has its share of this user's history waiting or the
        history is full of entries still waiting (:meth:`_history_room`) (all but the first
        counted in ``refused``; the shares and a full history in ``refused_sender`` too).
        Drops expired entries, and the user's own oldest beyond the user's bounds (for a
        ``sender``, only written ones)."""
        limits = self.limits
        users = self._users
        size = len(frame)
        if size > limits.max_bytes:
            self.evicted += 1
            return 0
        cutoff = now - limits.max_age
        if cutoff >= self._expires:
            self._forget_expired(user_id, cutoff)
        if sender is None:
            held = place = address = None
        else:
            held = self._senders.get(sender)
            if held is not None:
                if held[0] >= self._sender_messages or held[1] + size > self._sender_bytes:
                    return self._refuse(True)
            elif size > self._sender_bytes:
                return self._refuse(True)
            place = None if address is None else self._addresses.get(address)
            if place is not None and (place[0] >= self._address_messages
                                      or place[1] + size > self._address_bytes):
                return self._refuse(True)
        history = users.get(user_id)
        new = history is None
        if history is not None and history.droppable:  # being sent to: no longer droppable
            history.droppable = False
            self._written_bytes -= history.size
            self._written_users -= 1
        if (self._total + size > self._near_bytes or (new and len(users) >= self._near_users)) and (
                not self._room(size, new, sender, held, place)):
            if history is not None:
                self._check_written(user_id, history)
            return 0
        mine = None  # the sender's share of this user's history (inline: every send)
        if sender is not None:
            if history is None:
                if size > self._history_bytes:
                    return self._refuse(True)
            else:
                mine = history.held.get(sender)
                if (size > self._history_bytes if mine is None else (
                        mine[0] >= self._history_messages or mine[1] + size > self._history_bytes)) or (
                        (len(history.entries) >= limits.max_messages
                         or history.size + size > limits.max_bytes)
                        and not self._history_room(history, size, cutoff)):
                    self._check_written(user_id, history)
                    return self._refuse(True)
        if history is None:
            history = _History()
        else:
            del users[user_id]
        users[user_id] = history  # the most recently sent to: last
        before = history.size
        kid = next(self._ids)
        n = history.seq = history.seq + 1
        entries = history.entries
        entries.append((kid, n, now, frame, sender, address))
        if sender is not None:
            if held is None:
                self._senders[sender] = [1, size]
            else:
                held[0] += 1
                held[1] += size
            if place is not None:
                place[0] += 1
                place[1] += size
            elif address is not None:
                self._addresses[address] = [1, size]
            history.charged += 1
            if mine is None:
                history.held[sender] = [1, size]
            else:
                mine[0] += 1
                mine[1] += size
        size += history.size
        if len(entries) > limits.max_messages:  # a user at the count bound: the oldest goes
            oldest = entries.popleft()  # inline: every send to such a user comes here
            size -= len(oldest[3])
            self.evicted += 1
            if oldest[4] is not None and oldest[0] > history.written:
                self._release(oldest[4], oldest[5], len(oldest[3]))
                history.charged -= 1
                self._unhold(history, oldest[4], len(oldest[3]))
        if size > limits.max_bytes or len(entries) > limits.max_messages or entries[0][2] <= cutoff:
            while entries and (entries[0][2] <= cutoff or len(entries) > limits.max_messages
                               or size > limits.max_bytes):
                size -= self._drop_oldest(history)
        history.size = size
        self._total += size - before
        self.kept += 1
        return kid

    def _drop_oldest(self, history: _History) -> int:
        """Drop the history's oldest entry (a bound): its size. Releases its sender's charge
        if it was still waiting."""
        kid, _, _, frame, sender, address = history.entries.popleft()
        self.evicted += 1
        if sender is not None and kid > history.written:
            self._release(sender, address, len(frame))
            history.charged -= 1
            self._unhold(history, sender, len(frame))
        return len(frame)

    def _room(self, size: int, new: bool, sender: str | None, held: list[int] | None,
              place: list[int] | None) -> bool:
        """Near a bound of the process (past all but its last two :data:`SENDER_SHARES`-ths,
        counting the histories all written too): whether a message of ``size`` bytes (for a user
        without a history if ``new``) may be kept, from ``sender`` (``None``: server code)
        holding ``held`` whose address holds ``place`` (``None``: nothing, or no address).
        Of what waits, the last share is server code's alone, and the one before it is for
        senders holding little from addresses holding little; room is made under the bounds
        themselves (:meth:`_make_room`). Counts a refusal."""
        if sender is not None:
            waiting = self._total - self._written_bytes + size
            users = len(self._users) - self._written_users if new else -1
            if waiting > self._peers_bytes or users >= self._peers_users or (
                    (waiting > self._near_bytes or users >= self._near_users)
                    and not self._little(size, held, place)):
                self._refuse(True)
                return False

        limits = self.limits
        if (self._total + size > limits.max_total_bytes or (new and len(self._users) >= limits.max_users)) and (
                not self._make_room(size, new)):
            self._refuse(False)
            return False
        return True

    def _history_room(self, history: _History, size: int, cutoff: float) -> bool:
        """Whether a message of ``size`` bytes from a client (not server code) may join the
        user's ``history`` at its bounds (``max_messages``, ``max_bytes``): what the append will
        drop to keep them, the oldest first, is only entries written or expired. A message still
        waiting for the user is never dropped for a client's, nor for its own sender's next one
        (that one was answered kept): the new message is refused instead. The caller checked
        the sender's share of the history (:attr:`OutboxLimits.history_messages`,
        :attr:`~OutboxLimits.history_bytes`). Drops nothing; O(1) but for the entries the
        append then drops (the bytes bound's), each looked at once more."""
        limits = self.limits
        entries = history.entries
        extra = history.size + size - limits.max_bytes
        if extra <= 0:  # the count bound only: its oldest entry goes, if it may
            first = entries[0]
            return first[0] <= history.written or first[2] <= cutoff
        # The bytes bound: the entries it drops, and the count's (the append drops them).
        over = len(entries) + 1 - limits.max_messages
        mark = history.written
        for kid, _, when, frame, *_ in entries:
            if over <= 0 and extra <= 0:
                break
            if kid > mark and when > cutoff:  # still waiting for the user: not ours
                return False
            over -= 1
            extra -= len(frame)
        return True

    @staticmethod
    def _unhold(history: _History, sender: str, size: int) -> None:
        """A message of ``sender`` of ``size`` bytes no longer waits in ``history``."""
        held = history.held[sender]
        if held[0] == 1:
            del history.held[sender]
        else:
            held[0] -= 1
            held[1] -= size

    def _little(self, size: int, held: list[int] | None, place: list[int] | None) -> bool:
        """Whether a sender holding ``held`` from an address holding ``place`` (``None``:
        nothing) holds little, ``size`` more bytes included: under a :data:`SENDER_SMALL`-th of
        its share's messages (or none: a share too small to have a 64th), and of its bytes."""
        if held is None:
            if size > self._small_bytes:
                return False
        elif held[0] >= self._small_messages or held[1] + size > self._small_bytes:
            return False
        if place is None:
            return size <= self._little_bytes
        return place[0] < self._little_messages and place[1] + size <= self._little_bytes

    def _refuse(self, by_sender: bool) -> int:
        """Count a message not kept (``by_sender``: for its sender's share); 0."""
        self.refused += 1
        if by_sender:
            self.refused_sender += 1
        return 0

    def _release(self, sender: str, address: str | None, size: int) -> None:
        """A message of ``sender`` from ``address`` of ``size`` bytes is no longer waiting."""
        _uncount(self._senders, sender, size)
        if address is not None:
            _uncount(self._addresses, address, size)

    def _release_all(self, history: _History) -> None:
        """A history is forgotten: release the charges of its entries still waiting."""
        if history.charged:
            mark = history.written
            for kid, _, _, frame, sender, address in history.entries:
                if sender is not None and kid > mark:
                    self._release(sender, address, len(frame))
            history.charged = 0
            history.held.clear()

    def _mark(self, user_id: str, history: _History, kid: int) -> None:
        """Move the user's written mark forward to ``kid``: the entries it passes leave their
        senders' counts, and a history with nothing waiting becomes droppable."""
        before = history.written
        if kid > before:
            history.written = kid
            if history.charged:
                senders, addresses = self._senders, self._addresses
                released = 0
                mine = history.held
                for entry in reversed(history.entries):
                    if entry[0] <= before:
                        break
                    sender = entry[4]
                    if sender is not None and entry[0] <= kid:  # _release, inline
                        held = senders[sender]
                        if held[0] == 1:
                            del senders[sender]
                        else:
                            held[0] -= 1
                            held[1] -= len(entry[3])
                        address = entry[5]
                        if address is not None:
                            held = addresses[address]
                            if held[0] == 1:
                                del addresses[address]
                            else:
                                held[0] -= 1
                                held[1] -= len(entry[3])
                        held = mine[sender]  # and its share of this user's history
                        if held[0] == 1:
                            del mine[sender]
                        else:
                            held[0] -= 1
                            held[1] -= len(entry[3])
                        released += 1
                history.charged -= released
        if not history.droppable:
            self._check_written(user_id, history)

    def _check_written(self, user_id: str, history: _History) -> None:
        """Count the history among the droppable ones if nothing of it is waiting."""
        entries = history.entries
        if not history.droppable and history.lease is None and (
                not entries or entries[-1][0] <= history.written):
            self._droppable(user_id, history)

    def _droppable(self, user_id: str, history: _History) -> None:
        history.droppable = True
        self._written_bytes += history.size
        self._written_users += 1
        if user_id not in self._written:
            self._written[user_id] = history

    def _forget(self, user_id: str, history: _History) -> None:
        """Forget a user's history (every entry expired)."""
        self._total -= history.size
        self._written.pop(user_id, None)
        if history.droppable:
            self._written_bytes -= history.size
            self._written_users -= 1
        self._release_all(history)

    def _forget_expired(self, user_id: str, cutoff: float) -> None:
        """Forget the users sent to least recently while their newest entry expired (never
        ``user_id``, the one being sent to). Bounded work: each user visited is dropped, and the
        first one kept ends it."""
        users = self._users
        while users:
            first = next(iter(users))
            history = users[first]
            if first == user_id or history.entries[-1][2] > cutoff:
                self._expires = history.entries[-1][2]
                return
            del users[first]
            self._forget(first, history)
        self._expires = 0.0

    def _make_room(self, size: int, new: bool) -> bool:
        """Make room under the process's bounds for ``size`` more bytes, and one more user if
        ``new``, by forgetting histories whose every entry a connection of their user wrote
        (nothing of theirs is waiting: only their past goes), the one written longest ago
        first (the caller took the history being sent to out of them).

        A history with an entry not written yet is never dropped for another user's message:
        one client sending to many made-up users would otherwise wipe what is kept for everyone
        else. The new message is refused instead (the caller still delivers it live). Written
        histories are kept apart, with their bytes summed, so whether there is room is known at
        once, and each one dropped costs O(1): no history still waiting is ever looked at.
        Whether there is room."""
        limits = self.limits
        written = self._written
        extra_bytes = self._total + size - limits.max_total_bytes
        extra_users = len(self._users) + new - limits.max_users
        if extra_bytes > self._written_bytes or extra_users > self._written_users:
            return False
        users = self._users
        while extra_bytes > 0 or extra_users > 0:
            uid, history = written.popitem(last=False)
            if not history.droppable:  # sent to again since: waiting, not ours to drop
                continue
            del users[uid]
            self._written_bytes -= history.size
            self._written_users -= 1
            self._total -= history.size
            extra_bytes -= history.size
            extra_users -= 1
            self.evicted += len(history.entries)
            self.users_evicted += 1
        return True

    def append(self, user_id: str, frame: bytes, now: float) -> Stamped | None:
        """:meth:`add`, returning the entry (``None`` if not kept)."""
        kid = self.add(user_id, frame, now)
        if not kid:
            return None
        return Stamped(str(kid), self._users[user_id].seq, frame)

    def keep(self, user_id: str, frame: bytes, now: float) -> bool:
        """:meth:`append`, saying only whether it was kept."""
        return self.add(user_id, frame, now) != 0

    def after(self, user_id: str, entry_id: str | None, now: float) -> tuple[list[Stamped], int]:
        """The user's entries after ``entry_id`` (all if ``None``) and within ``max_age``,
        oldest first, and the last sequence number given to the user (0: none)."""
        history = self._users.get(user_id)
        if history is None:
            return [], 0
        return self._after(history, 0 if entry_id is None else id_key(entry_id)[0], now), history.seq

    def _after(self, history: _History, mark: int, now: float) -> list[Stamped]:
        cutoff = now - self.limits.max_age
        return [Stamped(str(kid), n, frame) for kid, n, when, frame, *_ in history.entries
                if kid > mark and when > cutoff]

    def written(self, user_id: str) -> str | None:
        """The user's written mark (the last entry a connection of theirs wrote), if any."""
        history = self._users.get(user_id)
        return str(history.written) if history is not None and history.written else None

    def head(self, user_id: str) -> Stamped | None:
        """The user's newest entry (its frame empty), ``None`` if none is kept."""
        history = self._users.get(user_id)
        if history is None or not history.entries:
            return None
        kid, n, *_ = history.entries[-1]
        return Stamped(str(kid), n, b"")

    def lease(self, user_id: str, holder: Hashable, now: float,
              alive: Callable[[Hashable], bool]) -> list[Stamped]:
        """The user's entries not written to any of their connections and within ``max_age``,
        oldest first, leased to ``holder`` until it :meth:`settle` s; ``[]`` if a live holder
        (``alive(holder)``) has the lease already. They stay kept."""
        history = self._users.get(user_id)
        if history is None:
            return []
        current = history.lease
        if current is not None and current is not _VOID and current != holder and alive(current):
            return []
        out = self._after(history, history.written, now)
        history.lease = holder if out else None
        history.leased = int(out[-1].id) if out else 0
        if not out:
            self._check_written(user_id, history)  # a void lease ended: maybe nothing waits
        return out

    def settle(self, user_id: str, holder: Hashable, upto: str | None) -> bool:
        """``holder`` wrote the leased entries up to id ``upto`` (``None``: none of them):
        acknowledged, and the lease ends. If it wrote only some of them, the rest stay the
        next lease's: until then no other connection's acknowledgement of a newer entry moves
        the mark past them (that connection never had them). A holder whose lease was voided
        meanwhile changes nothing (what it wrote is acknowledged all the same: :meth:`ack`).
        Whether it held it."""
        history = self._users.get(user_id)
        if history is None or history.lease is None or history.lease != holder:
            if upto is not None:
                self.ack(user_id, upto)
            return False
        kid = 0 if upto is None else id_key(upto)[0]
        if max(history.written, kid) >= history.leased:
            history.lease, history.leased = None, 0
        else:
            history.lease = _VOID
        self._mark(user_id, history, kid)
        return True

    def ack(self, user_id: str, upto: str | int) -> None:
        """A connection of the user wrote the entries up to id ``upto`` (as :meth:`add` gave it,
        or as a string): the written mark moves forward (never back), but never past entries
        leased to a new connection and not settled (:meth:`settle`): a connection acknowledges
        an entry newer than the lease only because it got it live, without the leased ones."""
        history = self._users.get(user_id)
        if history is None:
            return
        kid = upto if isinstance(upto, int) else id_key(upto)[0]
        if history.lease is not None and kid > history.leased:
            return
        if kid > history.written and not history.charged:  # the common case, inline
            history.written = kid
            if not history.droppable and history.lease is None and history.entries[-1][0] <= kid:
                self._droppable(user_id, history)
            return
        self._mark(user_id, history, kid)

    def take(self, user_id: str, now: float) -> list[bytes]:
        """Every entry not written yet, oldest first, acknowledged at once (read and
        acknowledged in one step: for callers with nothing to lose)."""
        kept = self.lease(user_id, _TAKER, now, lambda holder: False)
        self.settle(user_id, _TAKER, kept[-1].id if kept else None)
        return [entry.frame for entry in kept]

    def expire(self, now: float) -> None:
        """Forget users whose every entry is older than ``max_age`` (:meth:`add` does it as it
        goes, visiting only the users it forgets)."""
        cutoff = now - self.limits.max_age
        users = self._users
        while users:
            first = next(iter(users))
            history = users[first]
            if history.entries and history.entries[-1][2] > cutoff:
                return
            del users[first]
            self._forget(first, history)


def _uncount(books: dict[str, list[int]], key: str, size: int) -> None:
    """One message of ``size`` bytes counted for ``key`` (a sender, an address) no longer waits:
    out of its counts, and the counts out of ``books`` once nothing is left."""
    held = books[key]
    if held[0] == 1:
        del books[key]
    else:
        held[0] -= 1
        held[1] -= size


_TAKER = object()
_NOTHING = [0, 0]  # the counts of a sender (or an address) with nothing waiting: read only
_VOID = object()  # a lease whose holder ended before writing every entry it leased


class BusRefusals:
    """What a process knows of the bus's refusals to keep messages (its outbox's bounds live on
    the bus, checked in the step that appends): a sender over its quota, or the outbox as a
    whole full, for as long as the bus said (Redis: at most 2 s, since room comes back as users
    read). A send charged to a sender (or from an address) refused here is not offered to the
    bus's outbox at all (delivered only, and the caller told at once), so asking never costs a
    round trip; the first message past a bound is refused by the bus itself, a round trip later,
    and counted there. Bounded by ``max_senders`` senders, and as many addresses (beyond, the
    one refused first is forgotten: its next message asks the bus again). The caller passes the
    clock."""

    def __init__(self, max_senders: int = 10_000) -> None:
        self.max_senders = max_senders
        self._senders: dict[str, float] = {}  # sender -> refused until
        self._addresses: dict[str, float] = {}  # address -> refused until
        self._full_until = 0.0
        # (sender, user) -> refused until: the sender's share of that one user's history.
        self._histories: dict[tuple[str, str], float] = {}

    def __len__(self) -> int:
        return len(self._senders) + len(self._addresses)

    def refuse(self, sender: str | None, full: bool, until: float) -> None:
        """The bus refused a message: ``sender``'s quota (``full=False``) or the outbox as a whole
        (``full=True``) is exhausted until ``until``."""
        if full:
            self._full_until = max(self._full_until, until)
            return
        if sender is not None:
            self._remember(self._senders, sender, until)

    def refuse_address(self, address: str | None, until: float) -> None:
        """The bus refused a message because the senders of ``address`` hold their share
        together, until ``until``."""
        if address is not None:
            self._remember(self._addresses, address, until)

    def refuse_history(self, sender: str | None, user_id: str, until: float) -> None:
        """The bus refused ``sender``'s message to ``user_id`` (its share of that user's
        history, or the history full of messages waiting) until ``until``; its messages to
        other users are still offered. Server code's (``None``) are never refused so."""
        if sender is None:
            return
        histories = self._histories
        key = (sender, user_id)
        histories.pop(key, None)
        histories[key] = until
        if len(histories) > self.max_senders:
            del histories[next(iter(histories))]

    def _remember(self, refused: dict[str, float], key: str, until: float) -> None:
        refused.pop(key, None)
        refused[key] = until
        if len(refused) > self.max_senders:
            del refused[next(iter(refused))]

    def keeps(self, sender: str | None, now: float, address: str | None = None,
              user_id: str | None = None) -> bool:
        """Whether a message charged to ``sender`` from ``address`` (for ``user_id``, if known)
        may be offered to the bus's outbox now."""
        if self._full_until and now < self._full_until:
            return False
        if sender is None:
            return True
        if self._histories and user_id is not None:
            until = self._histories.get((sender, user_id))
            if until is not None:
                if now < until:
                    return False
                del self._histories[sender, user_id]
        if self._senders and not self._still(self._senders, sender, now):
            return False
        return address is None or not self._addresses or self._still(self._addresses, address, now)

    @staticmethod
    def _still(refused: dict[str, float], key: str, now: float) -> bool:
        """Whether ``key`` is not refused (any more: then forgotten)."""
        until = refused.get(key)
        if until is None:
            return True
        if now < until:
            return False
        del refused[key]
        return True


class DeliveryCursors:
    """Per user with a channel on this process: the last history entry handed to the user's
    channels here (id and sequence number). Decides what a live delivery or a recovery after a
    gap hands over: each entry once, in order. Bounded by ``max_users`` (the least recently
    used is forgotten: its next recovery reads the whole window, deduplicated only by what
    arrives after it)."""

    def __init__(self, max_users: int = 100_000, max_own: int = 256) -> None:
        self.max_users = max_users
        self.max_own = max_own
        self._last: dict[str, tuple[tuple[int, int], str, int]] = {}
        # Entries this process's own sends delivered here (its channels got them before the
        # bus numbered them; they never come back live): user -> id -> n, the newest max_own.
        self._own: dict[str, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._last

    def last(self, user_id: str) -> str | None:
        """The id of the last entry handed to the user's channels here, if known."""
        entry = self._last.get(user_id)
        return None if entry is None else entry[1]

    def seen(self, user_id: str) -> int | None:
        """The number of the last entry handed to the user's channels here, if known."""
        entry = self._last.get(user_id)
        return None if entry is None else entry[2]

    def own(self, user_id: str, entry_id: str, n: int) -> None:
        """This process delivered entry ``entry_id`` (number ``n``) to the user's channels
        itself (a send from here): a recovery must not hand it over again, and its number is
        no gap."""
        ids = self._own.setdefault(user_id, {})
        ids[entry_id] = n
        if len(ids) > self.max_own:
            del ids[next(iter(ids))]
        while len(self._own) > self.max_users:
            del self._own[next(iter(self._own))]

    def missing(self, user_id: str, entry_id: str, n: int) -> int:
        """How many entries of the user came between the last one handed over here and this
        live one, and never arrived (their numbers were skipped, not by this process's own
        sends): a gap noticed without an outage (a directory entry that expired, a message
        lost on the way). 0 if none, or nothing is known."""
        entry = self._last.get(user_id)
        if entry is None or n <= entry[2] + 1 or id_key(entry_id) <= entry[0]:
            return 0
        seen = entry[2]
        own = sum(1 for m in self._own.get(user_id, {}).values() if seen < m < n)
        return max(0, n - seen - 1 - own)

    def skips(self, user_id: str, entries: Iterable[Stamped]) -> bool:
        """Whether live ``entries`` of the user (in arrival order), handed over one after the
        other, would skip a number that is not one of this process's own sends: :meth:`missing`
        asked again once the bus has numbered the sends still on their way when it was first
        asked (they may be the numbers skipped). Changes nothing."""
        entry = self._last.get(user_id)
        if entry is None:
            return False
        key, _, seen = entry
        own = self._own.get(user_id, {}).values()
        for item in entries:
            item_key = id_key(item.id)
            if item_key <= key:
                continue
            if item.n > seen + 1 and item.n - seen - 1 > sum(1 for m in own if seen < m < item.n):
                return True
            key, seen = item_key, item.n
        return False

    def fresh(self, user_id: str, entry_id: str, n: int) -> bool:
        """Whether a live entry is new for the user here (then it becomes the last one)."""
        key = id_key(entry_id)
        entry = self._last.get(user_id)
        if entry is not None and key <= entry[0]:
            return False
        self._set(user_id, key, entry_id, n)
        return True

    def advance(self, user_id: str, entry_id: str, n: int) -> None:
        """The user's channels here have everything up to ``entry_id`` (a new channel's
        lease): move forward, never back."""
        key = id_key(entry_id)
        entry = self._last.get(user_id)
        if entry is None or key > entry[0]:
            self._set(user_id, key, entry_id, n)

    def recover(self, user_id: str, entries: Sequence[Stamped], head: int,
                ) -> tuple[list[Stamped], int]:
        """After a gap: of the user's history ``entries`` (oldest first) and ``head`` (the last
        sequence number the user was given), what to hand over now (what came after the last
        entry handed over here) and how many a bound dropped before they could be (``n``
        jumps; 0 when nothing is known of this user, or the bus lost its count)."""
        entry = self._last.get(user_id)
        own = self._own.get(user_id, {})
        if entry is None:
            out = [e for e in entries if e.id not in own]
            if entries:
                last = entries[-1]
                self._set(user_id, id_key(last.id), last.id, last.n)
            return out, 0
        key, _, seen = entry
        after = [e for e in entries if id_key(e.id) > key]
        lost = 0
        # This process's own sends in the jump reached the user's channels here before the bus
        # numbered them: a bound dropping them from the history loses nothing (as in missing).
        if after:
            if after[0].n > seen:
                lost = after[0].n - seen - 1 - sum(1 for m in own.values() if seen < m < after[0].n)
            self._set(user_id, id_key(after[-1].id), after[-1].id, after[-1].n)
        elif head > seen:
            lost = head - seen - sum(1 for m in own.values() if seen < m <= head)
            self._set(user_id, key, entry[1], head)  # counted once
        return [e for e in after if e.id not in own], max(0, lost)

    def forget(self, user_id: str) -> None:
        self._last.pop(user_id, None)
        self._own.pop(user_id, None)

    def _set(self, user_id: str, key: tuple[int, int], entry_id: str, n: int) -> None:
        self._last.pop(user_id, None)  # re-inserted: the most recently used last
        self._last[user_id] = (key, entry_id, n)
        if len(self._last) > self.max_users:
            del self._last[next(iter(self._last))]


def _order(entry_id: str | int) -> tuple[int, int]:
    return (entry_id, 0) if isinstance(entry_id, int) else id_key(entry_id)


# How many entries past a gap one connection's run remembers (WrittenRun): beyond, they are not
# acknowledged by it (the user's next connection gets them again, never loses them).
_MAX_AHEAD = 1024


class WrittenRun:
    """What one connection has written of its user's history on the bus, *contiguously* from
    where it began (the user's newest entry when it was admitted: what came before, its lease
    covers). The written mark may only pass entries the connection wrote: a process's own send
    reaches its connections before the bus numbers it, so one may be written, and numbered,
    after another process's send the connection has not been given yet (both spooled through
    an outage, or simply racing). Numbers are contiguous per user (``n``), so the gap shows:
    an entry past it waits in ``ahead`` until the missing ones are written (or known dropped
    by a bound, :meth:`cover`), and only then may be acknowledged.

    A user's history that expired (``outbox_age`` without a message) starts again at 1: an
    entry numbered at or below the run's, yet newer, or newer by more than the age than the
    newest seen, starts the run again from 0 (at worst an entry is acknowledged later, never
    one passed that was not written). Pure; one per connection of a user, bounded to 1,024
    entries ahead."""

    __slots__ = ("ahead", "id", "key", "last", "n")

    def __init__(self, n: int, key: tuple[int, int]) -> None:
        self.n = n  # every entry up to this number was written (or is covered by the lease)
        self.key = key  # the order of the last of them
        self.id: str | None = None  # its id, once this connection wrote one
        self.last = key[0]  # the newest entry's time seen (ms, the bus's clock)
        # first number -> (last number, the id and order of that last one, None for numbers
        # known gone): written past a gap.
        self.ahead: dict[int, tuple[int, str | None, tuple[int, int]]] | None = None

    def add(self, n: int, entry_id: str, age_ms: int,
            key: tuple[int, int] | None = None) -> str | None:
        """The connection wrote entry ``entry_id`` (number ``n``; ``key``: its order, if the
        caller has it): what may be acknowledged now for it (``None``: nothing more than
        before; :attr:`key` is the order of anything else than ``entry_id`` itself)."""
        if key is None:
            key = id_key(entry_id)
        if key <= self.key:
            return entry_id  # at or before where the run stands: its lease covers it
        ms, last = key[0], self.last
        if n <= self.n or ms - last >= age_ms:
            self.n, self.ahead = 0, None  # numbered from 1 again (the history expired)
        if ms > last:
            self.last = ms
        if n == self.n + 1:  # the common case: the next one
            self.n, self.id, self.key = n, entry_id, key
            return entry_id if self.ahead is None else self._absorb()
        ahead = self.ahead
        if ahead is None:
            ahead = self.ahead = {}
        if len(ahead) < _MAX_AHEAD:
            ahead[n] = (n, entry_id, key)
        return None

    def cover(self, first: int, last: int) -> str | None:
        """Numbers ``first`` to ``last`` were dropped from the history by a bound before this
        connection could get them: nobody can write them, so they no longer hold the run."""
        if first > self.n + 1:
            ahead = self.ahead
            if ahead is None:
                ahead = self.ahead = {}
            if len(ahead) < _MAX_AHEAD:
                ahead[first] = (last, None, self.key)
            return None
        self.n = max(self.n, last)
        return self._absorb()

    def _absorb(self) -> str | None:
        ahead = self.ahead
        while ahead:
            item = ahead.pop(self.n + 1, None)
            if item is None:
                break
            last, entry_id, key = item
            self.n = max(self.n, last)
            if entry_id is not None:
                self.id, self.key = entry_id, key
        if not ahead:
            self.ahead = None  # back to the common case
        return self.id


class WriteLog:
    """Which per-user entries each connection of this process has queued, by frame number
    (:attr:`~dara_ws_core.handler.WebSocketHandler.accepted`), so that what its transport has
    written (``flushed``) can be acknowledged, user by user, and what it had not written when it
    closed is not. Bounded by ``max_entries`` (beyond, the oldest are forgotten: delivered again
    to a next connection rather than lost). Entry ids are strings (the bus's) or the integers
    of :meth:`UserOutbox.add`; the acknowledgements give them back as recorded.

    A connection admitted on the bus has a :class:`WrittenRun` (:meth:`begin`): what it wrote
    is acknowledged only as far as it wrote every entry, with no gap."""

    def __init__(self, max_entries: int = 100_000, age_ms: int = 300_000) -> None:
        self.max_entries = max_entries
        self.age_ms = age_ms
        self._entries: dict[str, deque[tuple[int, str, str | int, int]]] = {}
        self._runs: dict[str, WrittenRun] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def begin(self, channel_id: str, n: int, key: tuple[int, int]) -> None:
        """``channel_id`` was admitted on the bus when the user's newest entry was number ``n``
        (order ``key``; 0 and (0, 0) for none): it acknowledges only the entries after it that
        it wrote without a gap."""
        self._runs[channel_id] = WrittenRun(n, key)

    def cover(self, channel_id: str, first: int, last: int) -> str | None:
        """Numbers ``first`` to ``last`` of the channel's user are gone (:meth:`WrittenRun.cover`):
        what may be acknowledged now, if anything."""
        run = self._runs.get(channel_id)
        return None if run is None else run.cover(first, last)

    def record(self, channel_id: str, position: int, user_id: str, entry_id: str | int,
               n: int = 0) -> None:
        """Frame number ``position`` of ``channel_id`` is the user's entry ``entry_id``
        (number ``n``)."""
        entries = self._entries.get(channel_id)
        if entries is None:
            entries = self._entries[channel_id] = deque()
        entries.append((position, user_id, entry_id, n))
        self._count += 1
        if self._count > self.max_entries:
            oldest = next(iter(self._entries))
            self._entries[oldest].popleft()
            self._count -= 1
            if not self._entries[oldest]:
                del self._entries[oldest]

    def written(self, flushed: Mapping[str, int] | Callable[[str], int | None],
                channels: Iterable[str] | None = None) -> dict[str, str | int]:
        """Forget the entries written by now (``flushed``: channel -> frames written, ``None``
        or absent for a channel that is gone, whose unwritten entries are forgotten unacked);
        the last entry written per user (for a channel with a run, the last written without a
        gap). Looks at ``channels`` only (default: all)."""
        look = flushed.get if isinstance(flushed, Mapping) else flushed
        acks: dict[str, tuple[tuple[int, int], str | int]] = {}
        runs = self._runs
        for channel_id in list(self._entries) if channels is None else channels:
            entries = self._entries.get(channel_id)
            if entries is None:
                continue
            done = look(channel_id)
            run = runs.get(channel_id) if runs else None
            if done is None and run is not None:
                del runs[channel_id]
            while entries and (done is None or entries[0][0] <= done):
                _, user_id, entry_id, n = entries.popleft()
                self._count -= 1
                if done is None:
                    continue
                key = _order(entry_id)
                if run is not None and n and isinstance(entry_id, str):  # (inline: per send)
                    upto = run.add(n, entry_id, self.age_ms, key)
                    if upto is None:
                        continue
                    if upto is not entry_id:
                        entry_id, key = upto, run.key
                if user_id not in acks or key > acks[user_id][0]:
                    acks[user_id] = (key, entry_id)
            if not entries:
                del self._entries[channel_id]
        return {user: entry_id for user, (_, entry_id) in acks.items()}

    def close(self, channel_id: str, flushed: int) -> dict[str, str | int]:
        """A connection closed having written ``flushed`` frames: what it wrote (to
        acknowledge), its unwritten entries forgotten. Its run stays for :meth:`end`."""
        entries = self._entries.pop(channel_id, None)
        if not entries:
            return {}
        # Its entries are not in frame order (a number the bus gave late is recorded at the
        # frame that carried it): the written ones, then as the acknowledgement pass does.
        written = deque(entry for entry in entries if entry[0] <= flushed)
        self._count -= len(entries) - len(written)
        self._entries[channel_id] = written
        return self.written({channel_id: flushed}, (channel_id,))

    def end(self, channel_id: str) -> WrittenRun | None:
        """Forget a closed channel's run, and hand it over (to :class:`ClosedWrites`)."""
        return self._runs.pop(channel_id, None)

    def channels(self) -> Iterable[str]:
        return self._entries.keys()

    def first(self, channel_id: str) -> int | None:
        """The frame number of the channel's first entry not known written, if any."""
        entries = self._entries.get(channel_id)
        return entries[0][0] if entries else None


class ClosedWrites:
    """How many frames each connection of this process had written when it closed, kept a
    while for the bus's late answers. A per-user send from here reaches the user's connections
    here at once and is numbered by the bus a round trip later: a connection that closed
    meanwhile (the client closed or vanished, the library closed it, or the server's close did
    not wait that long) had its part of the history settled without that entry. When the number
    comes, :meth:`wrote` tells whether the closed connection had written the frame: then it is
    acknowledged as if the connection were still there (as far as the connection's run allows:
    not past an entry it never got); otherwise (queued, never written) it is left to the user's
    next connection.

    Bounded by ``max_channels`` and ``max_age`` seconds (the caller passes the clock): a channel
    forgotten earlier only makes its late entries reach the user's next connection again (a
    duplicate, never a loss)."""

    def __init__(self, max_channels: int = 10_000, max_age: float = 30.0,
                 age_ms: int = 300_000) -> None:
        self.max_channels = max_channels
        self.max_age = max_age
        self.age_ms = age_ms
        # channel -> (frames written, when it closed, its run); and the closes, oldest first (a
        # deque: forgetting the oldest of a dict by ``next(iter())`` walks the slots deleted
        # before).
        self._closed: dict[str, tuple[int, float, WrittenRun | None]] = {}
        self._order: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._closed)

    def close(self, channel_id: str, flushed: int, now: float,
              run: WrittenRun | None = None) -> None:
        """``channel_id`` closed having written ``flushed`` frames (``run``: what it wrote
        without a gap, see :class:`WriteLog`)."""
        self._expire(now)
        self._closed[channel_id] = (flushed, now, run)
        order = self._order
        order.append((now, channel_id))
        while len(order) > self.max_channels:
            self._forget(*order.popleft())

    def wrote(self, channel_id: str, position: int, now: float) -> bool:
        """Whether the closed channel had written its frame number ``position`` (``False``
        for a channel unknown or forgotten)."""
        self._expire(now)
        entry = self._closed.get(channel_id)
        return entry is not None and position <= entry[0]

    def acknowledges(self, channel_id: str, position: int, entry: Stamped,
                     now: float) -> str | None:
        """The closed channel's frame number ``position`` was numbered ``entry``: what may be
        acknowledged for it now (``None``: nothing, it had not written the frame, or an entry
        before it that it never got)."""
        self._expire(now)
        closed = self._closed.get(channel_id)
        if closed is None or position > closed[0]:
            return None
        run = closed[2]
        return entry.id if run is None else run.add(entry.n, entry.id, self.age_ms)

    def _expire(self, now: float) -> None:
        order, oldest = self._order, now - self.max_age
        while order and order[0][0] <= oldest:
            self._forget(*order.popleft())

    def _forget(self, when: float, channel_id: str) -> None:
        entry = self._closed.get(channel_id)
        if entry is not None and entry[1] == when:  # not closed again since (a reused id)
            del self._closed[channel_id]


class QueuedMarks:
    """:class:`WriteLog` for the one case where both orders hold: a process without a backplane
    records a user's entry on each of the user's connections as it queues it, so per connection
    the frame numbers and the entry ids both increase. What a transport wrote is then found by
    bisection, and forgotten a slice at a time, instead of entry by entry: the send path appends
    two integers per connection. Each connection belongs to one user. Bounded by
    ``max_entries`` (beyond, a connection's oldest are forgotten: delivered again to a next
    connection rather than lost)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        # channel -> (its user, frame numbers, entry ids), both increasing.
        self._channels: dict[str, tuple[str, list[int], list[int]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def record(self, channel_id: str, position: int, user_id: str, entry_id: int) -> None:
        """Frame number ``position`` of ``channel_id`` (above any recorded before for it) is
        the user's entry ``entry_id`` (above any recorded before for it)."""
        marks = self._channels.get(channel_id)
        if marks is None:
            marks = self._channels[channel_id] = (user_id, [], [])
        marks[1].append(position)
        marks[2].append(entry_id)
        self._count += 1
        if self._count > self.max_entries:
            del marks[1][0], marks[2][0]
            self._count -= 1

    def written(self, flushed: Callable[[str], int | None],
                channels: Iterable[str] | None = None) -> dict[str, int]:
        """Forget the entries written by now (``flushed(channel)``: frames written, ``None``
        for a channel that is gone, whose entries are forgotten unacked); the last entry
        written per user. Looks at ``channels`` only (default: all)."""
        acks: dict[str, int] = {}
        for channel_id in list(self._channels) if channels is None else channels:
            marks = self._channels.get(channel_id)
            if marks is None:
                continue
            user_id, positions, ids = marks
            done = flushed(channel_id)
            if done is None:
                upto = len(positions)
            else:
                upto = bisect.bisect_right(positions, done)
                if upto and ids[upto - 1] > acks.get(user_id, 0):
                    acks[user_id] = ids[upto - 1]
            if upto:
                del positions[:upto], ids[:upto]
                self._count -= upto
            if not positions:
                del self._channels[channel_id]
        return acks

    def close(self, channel_id: str, flushed: int) -> tuple[str, int] | None:
        """A connection closed having written ``flushed`` frames: the last entry it wrote (to
        acknowledge) and its user, if any; its unwritten entries forgotten."""
        marks = self._channels.pop(channel_id, None)
        if marks is None:
            return None
        user_id, positions, ids = marks
        self._count -= len(positions)
        upto = bisect.bisect_right(positions, flushed)
        return (user_id, ids[upto - 1]) if upto else None

    def first(self, channel_id: str) -> int | None:
        """The frame number of the channel's first entry not known written, if any."""
        marks = self._channels.get(channel_id)
        return marks[1][0] if marks is not None and marks[1] else None
