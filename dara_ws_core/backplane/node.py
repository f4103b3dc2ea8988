"""A node on a publish/subscribe bus: its topics, its connection (kept up with backoff) and its
ordered, pipelined outbox, with fault accounting. Knows nothing of the manager or handlers:
:class:`~dara_ws_core.backplane.broker.BrokerBackplane` builds the routing on top, and a bus
library (``dara_ws_redis``, :class:`~dara_ws_core.backplane.memory.MemoryBackplane`) implements
the abstract primitives.
"""

from __future__ import annotations

__all__ = ["BatchRefused", "BusNode", "BusOptions", "Entry", "Publication", "Routed", "cancel_task",
           "wait_event"]

import abc
import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from dara_ws_core.config import _check_number
from dara_ws_core.exceptions import BackplaneError, RevocationNotKept, UnknownChannel
from dara_ws_core.logs import _is_power_of_ten
from dara_ws_core.outbox import SENDER_SHARES, Stamped

from .contract import BackplaneStats

if TYPE_CHECKING:
    from dara_ws_core.outbox import OutboxLimits

logger = logging.getLogger("dara_ws_core.backplane")

_MiB = 1024 * 1024

#: Seconds the publishing waits for its own broadcasts to come back (``publish_window``) before
#: taking them for lost (a subscription that blinked) and publishing on.
_ECHO_TIMEOUT = 5.0

#: Publications per batch (one bus round trip), at most.
_BATCH = 1000

#: Times the bus may refuse one durable publication (answer it with an error while it answers
#: the others) before it is given up: counted in ``stats.failed`` and logged. One try per
#: heartbeat or reconnection, so a publication the bus keeps refusing costs a few heartbeats.
_SPOOL_TRIES = 5

#: Seconds a stop waits before trying the spool again (doubling up to 1 s) while it drains.
_DRAIN_RETRY = 0.05

#: Revocations the spool holds on top of its kept messages (room of their own, which no burst of
#: kept messages takes), counted by ``scope:target``: a newer one replaces a spooled one of the
#: same target (the newest wins: it closes what was opened before it, the older one's too).
_SPOOL_REVOCATIONS = 1024

#: (channel id, user id or None): one directory entry.
Entry = tuple[str, str | None]
#: What publishing did: (node holding the channel or None, receivers; -1: nothing published).
#: For a message to a user appended to the user's history, the first item is ``"<id> <n>"``,
#: the entry it became (:mod:`dara_ws_core.outbox`).
Routed = tuple[str | None, int]


class BusOptions(TypedDict, total=False):
    """:class:`BusNode`'s options, passed on by the backplanes built on it."""

    node_id: str | None
    namespace: str
    connect_timeout: float
    backoff_initial: float
    backoff_max: float
    max_outbox: int
    max_outbox_bytes: int
    max_bus_message: int
    publish_window: int
    max_spool: int
    max_spool_bytes: int
    stop_drain: float


@dataclass(frozen=True, slots=True)
class Publication:
    """One message to publish (set exactly one target): to ``topic``, to the node holding
    ``channel_id``, or to every other node holding channels of ``user_id`` (with ``keep``:
    appended to the user's history too, in the same step). With ``ack`` (and ``user_id``), not a
    message: the user's connections here wrote the user's entries up to id ``ack``."""

    data: bytes
    topic: str | None = None
    channel_id: str | None = None
    user_id: str | None = None
    keep: OutboxLimits | None = None
    ack: str | None = None
    #: With ``keep``: called with the entry the message became once the bus appended it (in
    #: the publishing task, without a future per message).
    stamped: Callable[[Stamped], None] | None = None
    #: With ``keep``: who the message is charged to (``OutboxLimits.max_per_sender``), and
    #: from which address (``OutboxLimits.address_messages``).
    sender: str | None = None
    address: str | None = None
    #: Set: a failed attempt is kept in the spool and tried again, rather than counted lost
    #: (one field for both kinds: each field costs every publication). With ``keep``, an int:
    #: this process's number for the message (unique with its node's :attr:`BusNode.life`), so
    #: that the bus answers it sent again (after a round trip that failed, part of which may
    #: have run) as it did the first time (:attr:`kid`). With ``topic``, a revocation
    #: ``(scope:target, code, reason, when)`` (``when``: the moment it was asked for, in ms on
    #: the bus's clock), recorded on the bus for the processes that miss the publication, in the
    #: same step as it is published (:attr:`revoke`).
    durable: int | tuple[str, int, str, int] | None = None

    @property
    def kid(self) -> int | None:
        """A kept message's number (see :attr:`durable`)."""
        return self.durable if isinstance(self.durable, int) else None

    @property
    def revoke(self) -> tuple[str, int, str, int] | None:
        """A revocation's ``(scope:target, code, reason, when)`` (see :attr:`durable`)."""
        return self.durable if isinstance(self.durable, tuple) else None


#: A queued publication: what to publish, the future its result goes to (or None), what it is.
_Queued = tuple[Publication, "asyncio.Future[Routed] | None", str]
#: A spooled publication: what to publish, what it is, how many times the bus refused it.
_Spooled = tuple[Publication, str, int]


class BatchRefused(BackplaneError):
    """Raised by ``_publish_batch`` when the bus answered the batch but refused some of its
    publications (an error reply each, Redis's ``OOM`` or ``WRONGTYPE``): ``results`` holds
    every publication's result (any value where it was refused), ``errors`` the refused ones'
    errors by index. The others ran: they get their results, only the refused ones fail.
    ``counted``: each refusal counts as a try of a durable publication (not when the bus says
    it cannot serve anyone for now: loading, failing over)."""

    def __init__(self, results: list[Routed], errors: dict[int, BackplaneError], *,
                 counted: bool = True) -> None:
        super().__init__(f"{len(errors)} publication(s) refused: {next(iter(errors.values()))}")
        self.results = results
        self.errors = errors
        self.counted = counted


class BusNode(abc.ABC):
    """A process on a publish/subscribe bus: subscribed to its own topic
    (``<namespace>:node:<node_id>``) and to one broadcast topic, reconnecting with exponential
    backoff and jitter, publishing through one ordered outbox that a single task drains in
    batches (one bus round trip per batch, not per message), so messages from one process leave
    in the order its calls made them.

    Faults are reported, never silent: a message that cannot be published is counted in
    ``stats.failed`` and logged (once when an outage starts, and with the count when it ends).
    Durable publications (kept messages to a user, revocations) whose attempt failed are not
    dropped: they wait in a bounded spool and are published again, before anything newer and
    in order, once the bus answers (the next heartbeat or reconnection). One the bus refuses
    while it runs the rest of its batch (:class:`BatchRefused`) fails alone, and is given up
    after ``_SPOOL_TRIES`` tries (counted in ``stats.failed`` and logged). The spool's bounds
    count every durable publication not answered yet, so what is accepted is never dropped for
    them; a durable publication beyond them, or once :meth:`_stop_bus` began, is refused.

    ``connect_timeout``: how long a start waits for the bus; ``backoff_initial`` /
    ``backoff_max``: reconnection delays; ``max_outbox`` / ``max_outbox_bytes``: messages, and
    their bytes, waiting to be published before senders wait for room (publications that cannot
    wait, replies, acknowledgements, cancels and revocations, may take the bytes up to twice the
    bound; beyond, queued broadcasts are dropped first, then the publication fails, counted);
    ``max_bus_message``: the largest message published, checked on every publication (a sender
    over it gets ``ValueError`` before anything is published; an answer to a relayed
    ``send_and_wait`` over it becomes a ``ChunkError`` for the asker); ``publish_window``: bytes
    of this node's broadcasts published but not yet heard back on its own subscription before
    publishing waits (so that this process never publishes faster than it reads, which would
    overflow the bus's buffer for its subscription: Redis's ``client-output-buffer-limit pubsub``).
    ``max_spool`` / ``max_spool_bytes``: kept messages the bus has not answered yet (queued, in
    flight, or waiting to be tried again; beyond, a kept send raises ``BackplaneError``); while
    the spool is in use (the bus down, or, with the link up, anything waiting in the spool or
    being tried again from it: the bus refusing writes), one sender (``Publication.sender``: a
    user, an anonymous client's address) holds at most a
    :data:`~dara_ws_core.outbox.SENDER_SHARES`-th of each, and at any time a sender past that
    share does not take the last :data:`~dara_ws_core.outbox.SENDER_SHARES`-th of either
    (beyond, by count or by bytes, its kept sends are not kept: ``send_to_user`` returns
    ``False``, and :meth:`BrokerBackplane.keeps` answers ``False`` for it at the count), so one
    client cannot refuse everyone else's; server code (no sender) is bounded by the whole spool
    only. Revocations have room of their own beside them: up to ``_SPOOL_REVOCATIONS`` targets
    (one revocation per target: a newer one replaces the spooled one) and a 16th of
    ``max_spool_bytes``. Taken while the bus is down, or sent back to the spool when the bus
    fails or refuses them (whatever the link's state), a revocation beyond that room fails with
    :class:`~dara_ws_core.exceptions.RevocationNotKept`, logged at ERROR.
    ``stop_drain``: seconds :meth:`_stop_bus` waits for the spool and the batch in flight to
    drain (the bus may answer again meanwhile; what it refused is tried again meanwhile) before
    dropping what is left, counted in ``stats.spool_dropped`` and logged at ERROR (a round trip
    cut short too: the log says the bus may have run it). The spool lives in this process's
    memory: a process killed (not stopped) loses it.

    ``node_id`` names the process on the bus (its topic, its directory entries); it is not a
    scope for deduplication: each backplane draws its own :attr:`life`, and the numbers of
    kept messages are unique within it, so the same ``node_id`` may be given again after a
    restart.
    """

    def __init__(
        self,
        *,
        node_id: str | None = None,
        namespace: str = "dara-ws",
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        max_outbox: int = 10_000,
        max_outbox_bytes: int = 64 * _MiB,
        max_bus_message: int = 8 * _MiB,
        publish_window: int = 4 * _MiB,
        max_spool: int = 10_000,
        max_spool_bytes: int = 16 * 1024 * 1024,
        stop_drain: float = 5.0,
    ) -> None:
        # Every option checked here, naming it: a zero, a negative, a NaN or a string would be
        # taken and fail later, far from its cause (a Redis "unreachable" at start, every kept
        # send refused, a reconnection loop that never waits).
        owner = type(self).__name__
        for name, count in (("max_outbox", max_outbox), ("max_outbox_bytes", max_outbox_bytes),
                            ("max_bus_message", max_bus_message), ("publish_window", publish_window),
                            ("max_spool", max_spool), ("max_spool_bytes", max_spool_bytes)):
            _check_number(name, count, int, 1, optional=False, owner=owner)
        for name, seconds in (("connect_timeout", connect_timeout), ("backoff_initial", backoff_initial),
                              ("backoff_max", backoff_max)):
            _check_number(name, seconds, float, 0, optional=False, above=True, owner=owner)
        _check_number("stop_drain", stop_drain, float, 0, optional=False, owner=owner)
        if max_bus_message > max_outbox_bytes:
            raise ValueError("max_bus_message must not exceed max_outbox_bytes")
        self.node_id = node_id or uuid.uuid4().hex
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.node_topic = self.topic_of(self.node_id)
        self.broadcast_topic = f"{namespace}:broadcast"
        self.stats = BackplaneStats()
        self._stopping = False
        #: A start() waiting for the bus's first answer (its failures are the start's to
        #: report): whether the bus's failure was logged; ``None`` when none waits.
        self._first_wait: bool | None = None
        self._connected = asyncio.Event()
        # One ordered outbox for everything this node publishes: one task drains it in batches
        # (one round trip per batch), so publishing never costs a round trip per message and
        # messages leave in the order the calls made them.
        self._outbox: deque[_Queued] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_space = asyncio.Event()
        self._outbox_space.set()
        self._room = asyncio.Lock()
        self._room_waiting = 0  # senders in or waiting for _room
        self._outbox_idle = asyncio.Event()
        self._outbox_idle.set()
        self.max_outbox = max_outbox
        self.max_outbox_bytes = max_outbox_bytes
        self.max_bus_message = max_bus_message
        self.publish_window = publish_window
        self._outbox_bytes = 0
        # Of those, the bytes on the broadcast topic (this node hears them back).
        self._outbox_echo = 0
        # Bytes of this node's broadcasts published and not heard back yet (see _echoed).
        self._unechoed = 0
        self._echo_room = asyncio.Event()
        self._echo_waiting = False
        # Durable publications whose attempt failed, oldest first, all older than the outbox's:
        # published again first once the bus answers (see _publish_loop).
        self._spool: deque[_Spooled] = deque()
        self._spool_bytes = 0
        self.max_spool = max_spool
        self.max_spool_bytes = max_spool_bytes
        # Past these, the spool's last SENDER_SHARES-th: not for a sender beyond its share.
        self._spool_near = max_spool - max_spool // SENDER_SHARES
        self._spool_near_bytes = max_spool_bytes - max_spool_bytes // SENDER_SHARES
        # Durable publications not yet answered by the bus, other than the spooled ones: queued
        # in the outbox, and in the batch in flight. The spool's bounds count them too, so that
        # one accepted (a kept send that returned) always has room in the spool if it fails.
        self._durable_queued = self._durable_queued_bytes = 0
        self._durable_flying = self._durable_flying_bytes = 0
        # The batch whose round trip a stop cancelled, and how many of it came from the outbox:
        # _drop_outbox fails it (its kept messages and revocations counted and logged).
        self._cancelled: tuple[list[_Queued], int] | None = None
        # Of those and the spooled ones (every durable publication not answered): the kept
        # messages of each sender, [count, bytes] (its share of the spool while the bus is
        # down), and the revocations, in all and by scope:target (their room of their own).
        self._senders: dict[str, list[int]] = {}
        self._revokes = self._revokes_bytes = 0
        self._revoking: dict[str, int] = {}
        self.stop_drain = stop_drain
        #: This process life's mark, with its node id the scope of its kept messages' numbers
        #: (:attr:`Publication.kid`): a process restarted with the same ``node_id`` is another
        #: life, whose messages the bus never takes for the previous life's.
        self.life = uuid.uuid4().hex[:12]
        #: The scope of this life's kept message numbers on the bus: ``<node_id>-<life>``.
        self.kid_scope = f"{self.node_id}-{self.life}"
        # Numbered from the wall clock in µs: a later life's numbers are above an earlier one's
        # (unless it sent more than a million a second), so the bus seldom searches for them.
        self._kids = itertools.count(time.time_ns() // 1000)
        self._spool_lost = 0
        self._spool_due = True
        # The spool is in use, and one sender holds its share of it only: while the bus is down
        # (set by _bus_down, and before the first connection), and from the moment a
        # publication goes into the spool (the bus failed or refused it, whatever the link's
        # state) until the bus answered a round with the spool empty (so also while what was
        # spooled is being tried again). One flag for both: kept sends read it each time.
        self._spooling = True
        # Set while the spool holds a publication the bus refused (not a round trip that
        # failed): only the next heartbeat or reconnection tries it again.
        self._spool_held = False
        # Set once the publishing stopped for good (stop()): nothing more is queued.
        self._bus_stopped = False
        # Publications queued so far, and of those, how many are done (published or failed):
        # :meth:`_published` waits for the count at its call (futures waiting, by that count).
        self._queued = 0
        self._finished = 0
        self._barriers: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._publisher_task: asyncio.Task[None] | None = None
        self._bus_task: asyncio.Task[None] | None = None
        self._session_up = False
        self._down_since: float | None = None
        self._failed_at_down = 0
        self._warned = False
        # Publications the bus refused while the link was up (an error reply: Redis at
        # maxmemory, a read-only replica): each counted, the first ten and then every power of
        # ten logged, so that the log does not grow with the message rate.
        self._refused_up = 0

    def topic_of(self, node_id: str) -> str:
        """The bus topic a node listens on."""
        return f"{self.namespace}:node:{node_id}"

    @property
    def connected(self) -> bool:
        """Whether the bus subscription is up."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until the bus subscription is up (wrap in ``asyncio.timeout``)."""
        await self._connected.wait()

    # ------------------------------------------------------------------ bus primitives

    @abc.abstractmethod
    async def _bus_session(self) -> None:
        """Connect and subscribe to ``node_topic`` and ``broadcast_topic``; call ``_bus_up()``
        once subscribed, then ``_on_bus_message(data)`` for each message, until the connection
        ends (return, or raise ``BackplaneError``). Called again, with backoff, after it ends."""

    @abc.abstractmethod
    async def _close_bus(self) -> None:
        """Release the bus connections (when stopping)."""

    @abc.abstractmethod
    async def _publish_batch(self, batch: Sequence[Publication]) -> list[Routed]:
        """Publish a batch in order, in as few round trips as the bus allows; one result per
        publication (each looks up and publishes in one step, so none costs a round trip of its
        own):

        * to a topic: ``(None, receivers)``;
        * to a channel: ``(None, -1)`` if nobody holds it, ``(node, -1)`` if this node does
          (nothing published), else ``(node, receivers)`` after publishing to its node's topic;
        * to a user: published once to each *other* node holding channels of the user,
          ``(None, receivers in all)``; entries of nodes that nobody listens for are dropped.
          With ``keep``, first appended to the user's history (bounded), in the same atomic
          step, the message published carrying the entry's id and number: ``("<id> <n>",
          receivers)``, receivers -1 if there were none (kept for the user's next connection);
        * an acknowledgement (``ack``): the user's written mark moves forward; ``(None, -1)``.
        """

    @abc.abstractmethod
    def _on_bus_message(self, data: bytes) -> None:
        """Handle one message from the bus (``_bus_session`` calls it). Must not block and must
        not raise: one bad message must not cost the subscription."""

    # ------------------------------------------------------------------ publishing

    async def _route(self, channel_id: str, data: bytes, what: str) -> str:
        """Publish to the node holding ``channel_id``; return that node. Raises
        ``UnknownChannel`` if no live node holds it, ``BackplaneError`` (counted) if the bus is
        unreachable."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Routed] = loop.create_future()
        await self._post(Publication(data, channel_id=channel_id), what, done)
        owner, receivers = await done
        if owner is None or receivers < 0:
            raise UnknownChannel(channel_id)
        if receivers == 0:  # registered, but its node is not listening: dead or cut off
            self.stats.undeliverable += 1
            raise UnknownChannel(channel_id)
        return owner

    async def _post(self, publication: Publication, what: str,
                    done: asyncio.Future[Routed] | None = None) -> bool:
        """Queue a publication (waiting for room while the outbox is full, in count or bytes);
        whether it was queued (not while the bus is unreachable). Without ``done`` a failure is
        only counted and logged; with it, ``done`` gets the result or the ``BackplaneError``
        (also counted). Raises ``ValueError`` for a message over ``max_bus_message``."""
        size = len(publication.data)
        if size > self.max_bus_message:
            self._too_large(size, what)
        outbox = self._outbox
        if self._room_waiting or (outbox and (len(outbox) >= self.max_outbox or
                                              self._outbox_bytes + size > self.max_outbox_bytes)):
            # Senders waiting for room get it in the order they came (first in, first out).
            self._room_waiting += 1
            try:
                async with self._room:
                    while outbox and self._connected.is_set() and (
                            len(outbox) >= self.max_outbox
                            or self._outbox_bytes + size > self.max_outbox_bytes):
                        self._outbox_space.clear()
                        await self._outbox_space.wait()
            finally:
                self._room_waiting -= 1
        return self._queue(publication, what, done, size)

    def _too_large(self, size: int, what: str) -> None:
        raise ValueError(f"the {what} is too large for the backplane: {size} bytes "
                         f"(max_bus_message = {self.max_bus_message})")

    def _post_nowait(self, publication: Publication, what: str,
                     done: asyncio.Future[Routed] | None = None) -> bool:
        """Queue a publication that cannot wait (a reply, an acknowledgement, a cancel, a
        revocation): it may take the outbox up to twice ``max_outbox_bytes``; beyond, queued
        broadcasts (at most once anyway) are dropped to make room, and failing that, it fails
        (counted and logged, ``done`` gets ``BackplaneError``). Raises ``ValueError`` over
        ``max_bus_message``."""
        size = len(publication.data)
        if size > self.max_bus_message:
            self._too_large(size, what)
        if (self._outbox_bytes + size > 2 * self.max_outbox_bytes and self._connected.is_set()
                and not self._drop_broadcasts(size)):
            exc = BackplaneError("the backplane's outbox is full")
            self._count_failure(what, exc)
            if done is not None:
                done.set_exception(exc)
            return False
        return self._queue(publication, what, done, size)

    def _queue(self, publication: Publication, what: str,
               done: asyncio.Future[Routed] | None, size: int) -> bool:
        if publication.durable is not None:
            # Only with room in the spool for it and every durable one not answered yet (then
            # it is never dropped for the spool's bounds), and not once stopped. Kept messages
            # and revocations have rooms of their own: a burst of kept messages never crowds
            # out a revocation (one while the bus answers is always taken: the outbox bounds
            # it, and the room applies if it comes back to the spool), and while the spool is
            # in use (see _spooling) one sender holds its share of the kept room only, as it
            # does at any time in the room's last 16th (see _spool_refuses: the same rule).
            queued, queued_bytes = self._durable_queued + 1, self._durable_queued_bytes + size
            if publication.keep is None:
                if not self._revocation_room(publication, what, done, size):
                    return False
            elif ((count := len(self._spool) + queued + self._durable_flying - self._revokes)
                  > self.max_spool
                  or (taken := self._spool_bytes + queued_bytes + self._durable_flying_bytes
                      - self._revokes_bytes) > self.max_spool_bytes or self._bus_stopped
                  or (publication.sender is not None
                      and (count > self._spool_near or taken > self._spool_near_bytes
                           or self._spooling)
                      and not self._spool_keeps(publication.sender, size))):
                self._count_failure(what, None)
                return False
            elif publication.sender is not None:
                held = self._senders.get(publication.sender)
                if held is None:
                    self._senders[publication.sender] = [1, size]
                else:
                    held[0] += 1
                    held[1] += size
            self._durable_queued, self._durable_queued_bytes = queued, queued_bytes
            if not self._connected.is_set():
                # It waits for the bus (the publish loop spools it); the caller learns it did
                # not go through yet (and that it was kept: not RevocationNotKept).
                if done is not None:
                    done.set_exception(BackplaneError("the backplane is disconnected: the "
                                                      "revocation waits in the spool"))
                done = None
        elif not self._connected.is_set() or self._bus_stopped:
            self._count_failure(what, None)
            if done is not None:
                done.set_exception(BackplaneError("the backplane stopped" if self._bus_stopped
                                                  else "the backplane is disconnected"))
            return False
        self._outbox.append((publication, done, what))
        self._outbox_bytes += size
        if publication.topic == self.broadcast_topic:
            self._outbox_echo += size
        self._queued += 1
        self._outbox_idle.clear()
        self._outbox_ready.set()
        return True

    def _spool_refuses(self, sender: str, size: int = 0) -> bool:
        """Whether a kept message from ``sender`` (of ``size`` bytes, not queued) would be over
        the sender's share of the spool where the share applies: while the spool is in use (the
        bus down, or anything waiting in the spool or being tried again from it, whatever the
        link's state), and, at any time, in the spool's last :data:`SENDER_SHARES`-th (kept for
        the senders within their share and for server code)."""
        if (not self._spooling
                and len(self._spool) + self._durable_queued + self._durable_flying
                - self._revokes < self._spool_near
                and self._spool_bytes + self._durable_queued_bytes + self._durable_flying_bytes
                - self._revokes_bytes + size <= self._spool_near_bytes):
            return False
        return not self._spool_keeps(sender, size)

    def _spool_keeps(self, sender: str, size: int = 0) -> bool:
        """Whether ``sender``'s kept messages not answered yet leave room in its share of the
        spool for one more (of ``size`` bytes): a :data:`SENDER_SHARES`-th of ``max_spool`` and
        of ``max_spool_bytes``."""
        held = self._senders.get(sender)
        if held is None:
            return size <= self.max_spool_bytes // SENDER_SHARES
        return (held[0] < max(1, self.max_spool // SENDER_SHARES)
                and held[1] + size <= self.max_spool_bytes // SENDER_SHARES)

    def _revocation_room(self, publication: Publication, what: str,
                         done: asyncio.Future[Routed] | None, size: int) -> bool:
        """Take a revocation into the room the spool keeps for them (always, while the bus
        answers: :meth:`_spool_failed` applies the room to it if it comes back to the spool).
        Whether it was taken: if not (stopped, or the room full of other targets), ``done``
        gets :class:`RevocationNotKept`, and the loss is logged at ERROR with its target."""
        revoke = publication.revoke
        key = "" if revoke is None else revoke[0]
        if self._bus_stopped or (not self._connected.is_set() and key not in self._revoking and (
                len(self._revoking) >= _SPOOL_REVOCATIONS
                or self._revokes_bytes + size > self.max_spool_bytes // SENDER_SHARES)):
            self._revocation_lost(key, "the backplane stopped" if self._bus_stopped else
                                  f"the backplane's spool holds {len(self._revoking)} other "
                                  f"revocations", done)
            return False
        self._revokes += 1
        self._revokes_bytes += size
        self._revoking[key] = self._revoking.get(key, 0) + 1
        return True

    def _revocation_lost(self, key: str, why: str, done: asyncio.Future[Routed] | None) -> None:
        """A revocation of ``key`` could not be kept (``why``): counted in ``stats.failed``,
        logged at ERROR with its target, and ``done`` (if any) gets :class:`RevocationNotKept`."""
        self.stats.failed += 1
        logger.error("backplane: revocation of %s NOT kept (%s): the other processes will not "
                     "close its connections; revoke it again once the bus takes it", key, why,
                     extra={"node": self.node_id, "target": key, "failed": self.stats.failed})
        if done is not None and not done.done():
            done.set_exception(RevocationNotKept(f"revocation of {key} not kept: {why}"))

    def _respool_revocations(self, front: list[_Spooled], back: list[_Spooled],
                             callers: dict[int, asyncio.Future[Routed]]) -> list[_Spooled]:
        """Revocations going back to the spool (``front``: they came from it, ``back``: from the
        outbox, ``callers``: the ``done`` of those of ``back`` by position) keep its room for
        revocations, whatever the link's state: one per ``scope:target`` (the newest wins: what
        an older one would close, it closes too) and at most ``_SPOOL_REVOCATIONS`` targets and a
        :data:`SENDER_SHARES`-th of ``max_spool_bytes``. What is left of ``back``, returned; a
        new target beyond the room is lost (see :meth:`_revocation_lost`), and so is a newer one
        of a target that no longer fits the bytes (the one waiting stays)."""
        room = self.max_spool_bytes // SENDER_SHARES
        waiting: dict[str, int] = {}  # the spool's revocations (one per target): their bytes
        total = 0
        for publication, _, _ in itertools.chain(front, self._spool):
            if publication.revoke is not None:
                waiting[publication.revoke[0]] = len(publication.data)
                total += len(publication.data)
        newest = {p.revoke[0]: j for j, (p, _, _) in enumerate(back) if p.revoke is not None}
        kept: list[_Spooled] = []
        replaced: set[str] = set()
        for j, item in enumerate(back):
            publication = item[0]
            if publication.revoke is None:
                kept.append(item)
                continue
            key, size = publication.revoke[0], len(publication.data)
            old = waiting.get(key)
            if newest[key] != j:  # a newer one of its target follows it in the batch
                self._release(publication)
            elif (len(waiting) < _SPOOL_REVOCATIONS and total + size <= room) if old is None else (
                    total - old + size <= room or size <= old):
                if old is not None:
                    replaced.add(key)
                waiting[key] = size
                total += size - (old or 0)
                kept.append(item)
            else:
                self._release(publication)
                self._revocation_lost(key, f"the backplane's spool holds {len(waiting)} "
                                      f"revocations, {total} bytes", callers.get(j))
        if replaced:
            stale = [q for q in front if q[0].revoke is not None and q[0].revoke[0] in replaced]
            for q in stale:
                front.remove(q)
                self._release(q[0])
            self._supersede(replaced)
        return kept

    def _supersede(self, keys: set[str]) -> None:
        """Newer revocations of ``keys`` are coming: the spooled ones of them are dropped (what
        they would close, the newer ones close too)."""
        spool = self._spool
        stale = [i for i, (p, _, _) in enumerate(spool)
                 if p.revoke is not None and p.revoke[0] in keys]
        for i in reversed(stale):
            publication = spool[i][0]
            del spool[i]
            self._spool_bytes -= len(publication.data)
            self._release(publication)

    def _release(self, publication: Publication) -> None:
        """A durable publication was answered, given up or replaced: it leaves its sender's
        share, or the revocations' room."""
        revoke = publication.revoke
        if revoke is not None:
            self._revokes -= 1
            self._revokes_bytes -= len(publication.data)
            left = self._revoking.pop(revoke[0], 1) - 1
            if left > 0:
                self._revoking[revoke[0]] = left
        elif publication.sender is not None:
            held = self._senders.get(publication.sender)
            if held is not None:
                held[0] -= 1
                held[1] -= len(publication.data)
                if held[0] <= 0:
                    del self._senders[publication.sender]

    def _drop_broadcasts(self, size: int) -> bool:
        """Drop queued broadcasts, oldest first, until ``size`` more bytes fit in twice
        ``max_outbox_bytes`` (each counted as not published); whether they do."""
        limit = 2 * self.max_outbox_bytes - size
        kept: deque[_Queued] = deque()
        dropped = 0
        while self._outbox:
            item = self._outbox.popleft()
            if self._outbox_bytes > limit and item[2] == "broadcast":
                self._outbox_bytes -= len(item[0].data)
                self._outbox_echo -= len(item[0].data)
                dropped += 1
            else:
                kept.append(item)
        self._outbox.extend(kept)
        if dropped:
            self.stats.failed += dropped
            logger.warning("backplane: %d queued broadcast(s) dropped: the outbox is full",
                           dropped, extra={"node": self.node_id, "failed": self.stats.failed})
            self._done_with(dropped)
            self._outbox_space.set()
        return self._outbox_bytes <= limit

    async def _published(self, timeout: float) -> bool:
        """Wait until every publication queued before this call is done (published or failed,
        its ``done`` set, so the callbacks of those futures run before this returns); whether
        they were within ``timeout`` seconds. A barrier: what the bus answered for this node's
        earlier sends is known here once it returns."""
        mark = self._queued
        if self._finished >= mark:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers.append((mark, waiter))
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            if not waiter.done():
                waiter.cancel()  # skipped by _done_with
        return waiter.done() and not waiter.cancelled()

    def _done_with(self, count: int) -> None:
        """``count`` more publications are done: release the barriers they reach."""
        self._finished += count
        barriers = self._barriers
        while barriers and (barriers[0][0] <= self._finished or barriers[0][1].done()):
            _, waiter = barriers.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _durable_refusal(self, sender: str | None = None, size: int = 0) -> str:
        """Why a kept message (from ``sender``, of ``size`` bytes) was refused."""
        if self._bus_stopped:
            return "the backplane stopped"
        if sender is not None and self._spool_refuses(sender, size):
            return (f"the sender's share of the backplane's spool is full (a "
                    f"{SENDER_SHARES}th of max_spool or max_spool_bytes)")
        return (f"the backplane's spool is full ({self.max_spool} publications or "
                f"{self.max_spool_bytes} bytes waiting for the bus)")

    def _spool_failed(self, batch: Sequence[_Queued], errors: Sequence[BaseException],
                      spooled: int, tries: Sequence[int], *, refused: bool = False,
                      counted: bool = True) -> None:
        """Publications failed (``errors``, one each; the first ``spooled`` came from the spool,
        refused ``tries`` times before): put the durable ones back in the spool, in order, ahead
        of anything newer (their ``done`` gets the error: the caller learns it did not go
        through yet); fail the rest. ``refused``: the bus answered with an error for each
        (rather than not at all): the spool waits for its next try (not the next batch), and
        with ``counted`` one more try is counted against each; after ``_SPOOL_TRIES`` the
        publication is given up."""
        front: list[_Spooled] = []
        back: list[_Spooled] = []
        # The callers of revocations from the outbox, by their place in back: told once the
        # revocations' room has taken them or not (RevocationNotKept).
        callers: dict[int, asyncio.Future[Routed]] = {}
        told: list[tuple[asyncio.Future[Routed], BaseException]] = []
        revocations = False
        for i, ((publication, done, what), exc) in enumerate(zip(batch, errors, strict=True)):
            tried = (tries[i] if i < spooled else 0) + (refused and counted)
            if publication.revoke is not None and i >= spooled and tried < _SPOOL_TRIES:
                revocations = True
                if done is not None:
                    callers[len(back)] = done
                    told.append((done, exc))
            elif done is not None and not done.done():
                done.set_exception(BackplaneError(str(exc)))
            if publication.durable is None:
                if i >= spooled:
                    self._count_failure(what, exc)
            elif tried >= _SPOOL_TRIES:
                self._give_up(publication, what, exc, tried)
            else:
                (front if i < spooled else back).append((publication, what, tried))
        if revocations:
            back = self._respool_revocations(front, back, callers)
            for done, exc in told:
                if not done.done():
                    done.set_exception(BackplaneError(str(exc)))
        # Those from the spool go back to its front (older than what stayed in it), the others
        # to its end (newer than anything in it: only this loop adds to it). The spool's bounds
        # counted the kept messages when they were queued (see _queue), and the revocations'
        # room is applied here: none is dropped for the bounds of the kept ones.
        self._spool.extendleft(reversed(front))
        self._spool.extend(back)
        back += front
        self._spool_bytes += sum(len(publication.data) for publication, _, _ in back)
        if self._spool:
            self._spooling = True
        self._spool_due = False  # tried again at the next heartbeat or reconnection
        self._spool_held = self._spool_held or refused

    def _give_up(self, publication: Publication, what: str, exc: BaseException,
                 tries: int) -> None:
        """The bus refused a durable publication ``tries`` times: it is dropped, counted in
        ``stats.failed`` and logged (the first ten, then every 100th)."""
        self.stats.failed += 1
        self._spool_lost += 1
        self._release(publication)
        count = self._spool_lost
        if count <= 10 or count % 100 == 0:  # the first ten, then every 100th
            logger.warning("backplane: the bus refused a %s %d times (%s): given up (%d so far)",
                           what, tries, exc, count,
                           extra={"node": self.node_id, "failed": self.stats.failed})

    def _hold_back(self, taken: list[_Queued]) -> list[_Queued]:
        """The spool waits for its next try: of the publications ``taken`` from the outbox, the
        kept messages to a user it holds one for join it, after it (a user's history keeps
        their messages in the order they were sent); the rest go now."""
        users = {p.user_id for p, _, _ in self._spool if p.keep is not None}
        if not users:
            return taken
        rest: list[_Queued] = []
        held = 0
        for item in taken:
            publication, done, what = item
            if publication.keep is None or publication.user_id not in users:
                rest.append(item)
                continue
            size = len(publication.data)
            self._durable_flying -= 1
            self._durable_flying_bytes -= size
            self._spool.append((publication, what, 0))
            self._spool_bytes += size
            if done is not None and not done.done():
                done.set_exception(BackplaneError("waiting in the spool behind a message the "
                                                  "bus refused"))
            held += 1
        self._done_with(held)
        return rest

    async def _publish_loop(self) -> None:
        outbox, spool = self._outbox, self._spool
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while outbox or (spool and self._spool_due and self._connected.is_set()):
                batch: list[_Queued] = []
                tries: list[int] = []
                if spool and self._spool_due and self._connected.is_set():  # first: it is older
                    while spool and len(batch) < _BATCH:
                        publication, what, tried = spool.popleft()
                        size = len(publication.data)
                        self._spool_bytes -= size
                        self._durable_flying += 1
                        self._durable_flying_bytes += size
                        batch.append((publication, None, what))
                        tries.append(tried)
                spooled = len(batch)
                if outbox and spooled < _BATCH:
                    if not spooled and self._unechoed >= self.publish_window:
                        await self._wait_echoes()
                    if outbox:
                        taken = self._take_batch(_BATCH - spooled)
                        # (While the bus is down the batch fails whole: spooled in order.)
                        batch += (self._hold_back(taken) if spool and self._connected.is_set()
                                  else taken)
                # Room in the outbox for the senders waiting, also when every publication taken
                # was held back in the spool (the round published nothing, they wait no more).
                self._outbox_space.set()
                if not batch:
                    continue  # all of it held back in the spool (each round takes some)
                finished = len(batch) - spooled
                try:
                    # The durable ones stay counted in flight (the spool's bounds, the drain at
                    # stop) until the bus answers or the round trip fails.
                    try:
                        if not self._connected.is_set():
                            raise BackplaneError("the backplane is disconnected")
                        results = await self._publish_batch([p for p, _, _ in batch])
                    finally:
                        self._durable_flying = self._durable_flying_bytes = 0
                except asyncio.CancelledError:  # stopped mid round trip: _drop_outbox fails it
                    self._cancelled = (batch, finished)
                    raise
                except BatchRefused as exc:  # the others ran: only the refused ones fail
                    batch, results = self._partly_refused(batch, exc, spooled, tries)
                except Exception as exc:
                    if not isinstance(exc, BackplaneError):  # a bug: log it, keep publishing
                        logger.exception("backplane: publishing failed",
                                         extra={"node": self.node_id})
                    self._spool_failed(batch, [exc] * len(batch), spooled, tries)
                    self._done_with(finished)
                    continue
                for (publication, done, _), (owner, receivers) in zip(batch, results,
                                                                         strict=True):
                    if publication.ack is not None:
                        pass
                    elif receivers >= 0:
                        self.stats.published += 1
                    elif publication.keep is not None:
                        self.stats.kept += 1
                    if publication.stamped is not None and owner:
                        _stamp(owner, publication.stamped)
                    if done is not None and not done.done():
                        done.set_result((owner, receivers))
                if self._senders or self._revokes:  # answered: out of the spool's shares
                    for publication, _, _ in batch:
                        if publication.durable is not None:
                            self._release(publication)
                self._done_with(finished)
                # The bus answers: what waits after a failed round trip goes now; what it
                # refused waits for its next try (a heartbeat or a reconnection).
                self._spool_due = not self._spool_held
                if self._spooling and not spool and self._connected.is_set():
                    self._spooling = False  # all answered: the shares are lifted
            # Idle, unless the spool waits for the bus to answer again (flush() waits for that;
            # not for the next try of what the bus refused, which may take a few heartbeats;
            # a stop does: it tries the spool again meanwhile, see _drain_spool).
            if not spool or (self._spool_held and self._connected.is_set()
                             and not self._spool_due and not self._bus_stopped):
                self._outbox_idle.set()

    def _partly_refused(self, batch: list[_Queued], refused: BatchRefused, spooled: int,
                       tries: list[int]) -> tuple[list[_Queued], list[Routed]]:
        """The bus refused some publications of ``batch`` and ran the others: the refused ones
        fail (the durable ones go back to the spool); the others and their results, returned."""
        errors = refused.errors
        failed = sorted(errors)
        self._spool_failed([batch[i] for i in failed], [errors[i] for i in failed],
                           sum(i < spooled for i in failed),
                           [tries[i] for i in failed if i < spooled], refused=True,
                           counted=refused.counted)
        return ([q for i, q in enumerate(batch) if i not in errors],
                [r for i, r in enumerate(refused.results) if i not in errors])

    def _retry_spool(self) -> None:
        """Publish the spool again (the bus is back, or a heartbeat passed since it failed)."""
        self._spool_held = False
        if self._spool:
            self._spool_due = True
            self._outbox_idle.clear()
            self._outbox_ready.set()

    def _take_batch(self, limit: int = _BATCH) -> list[_Queued]:
        """The next batch from the outbox: at most ``limit`` publications, and (beyond the first)
        no more bytes than the room left in ``publish_window``; the broadcasts in it are
        counted as waiting to come back."""
        outbox = self._outbox
        room = self.publish_window - self._unechoed
        if self._outbox_bytes <= room and len(outbox) <= limit:  # all of it (the usual case)
            batch = list(outbox)
            outbox.clear()
            self._unechoed += self._outbox_echo
            self._outbox_bytes = self._outbox_echo = 0
            if self._durable_queued:  # in flight now
                self._durable_flying += self._durable_queued
                self._durable_flying_bytes += self._durable_queued_bytes
                self._durable_queued = self._durable_queued_bytes = 0
            return batch
        batch = [outbox.popleft() for _ in range(min(len(outbox), limit))]
        sizes = [len(p.data) for p, _, _ in batch]
        size = sum(sizes)
        while size > room and len(batch) > 1:  # the rest waits for the window
            outbox.appendleft(batch.pop())
            size -= sizes.pop()
        if self._durable_queued:
            durable = [n for (p, _, _), n in zip(batch, sizes, strict=True)
                       if p.durable is not None]
            self._durable_queued -= len(durable)
            self._durable_queued_bytes -= sum(durable)
            self._durable_flying += len(durable)
            self._durable_flying_bytes += sum(durable)
        if not self._outbox_echo:
            echoed = 0
        elif self._outbox_echo == self._outbox_bytes:  # only broadcasts
            echoed = size
        else:
            topic = self.broadcast_topic
            echoed = sum(n for (p, _, _), n in zip(batch, sizes, strict=True)
                         if p.topic == topic)
        self._outbox_bytes -= size
        self._outbox_echo -= echoed
        self._unechoed += echoed
        return batch

    def _echoed(self, size: int) -> None:
        """One of this node's broadcasts, of ``size`` bytes, came back on its subscription."""
        unechoed = self._unechoed = max(0, self._unechoed - size)
        if self._echo_waiting and unechoed < self.publish_window:
            self._echo_room.set()

    async def _wait_echoes(self) -> None:
        """Wait until the broadcasts in flight are heard back below ``publish_window`` (or the
        bus is down: the batch fails at once); after ``_ECHO_TIMEOUT`` take them for lost."""
        self._echo_room.clear()
        self._echo_waiting = True
        try:
            if await wait_event(self._echo_room, _ECHO_TIMEOUT) or not self._connected.is_set():
                return
        finally:
            self._echo_waiting = False
        logger.warning("backplane: %d byte(s) of broadcasts from this process not heard back "
                       "within %.0f s; publishing on", self._unechoed, _ECHO_TIMEOUT,
                       extra={"node": self.node_id})
        self._unechoed = 0

    def _drop_outbox(self, exc: BackplaneError) -> None:
        """At stop: fail what is queued and spooled, counted in ``stats.failed``; the kept
        messages and revocations among them (acknowledged to their callers as kept) also in
        ``stats.spool_dropped``, and logged at ERROR with their count, never silently."""
        durable: list[Publication] = []
        other = unanswered = 0
        if self._cancelled is not None:  # its round trip cancelled: the bus may have run it
            batch, finished = self._cancelled
            self._cancelled = None
            other += self._fail_queued(batch, exc, durable)
            unanswered = len(durable)
            self._done_with(finished)
        queued = list(self._outbox)
        self._outbox.clear()
        other += self._fail_queued(queued, exc, durable)
        self._done_with(len(queued))
        self._outbox_bytes = self._outbox_echo = 0
        self._durable_queued = self._durable_queued_bytes = 0
        self._durable_flying = self._durable_flying_bytes = 0  # the publisher is gone
        durable += (publication for publication, _, _ in self._spool)
        self._spool.clear()
        self._spool_bytes = 0
        self._spooling = True  # disconnected now
        self._senders.clear()
        self._revoking.clear()
        self._revokes = self._revokes_bytes = 0
        self.stats.failed += other + len(durable)
        if other:
            logger.warning("backplane: %d message(s) for other processes not published: %s",
                           other, exc, extra={"node": self.node_id, "failed": self.stats.failed})
        if durable:
            self._dropped_at_stop(durable, exc, unanswered)
        self._outbox_idle.set()
        self._outbox_space.set()

    @staticmethod
    def _fail_queued(items: Iterable[_Queued], exc: BackplaneError,
                     durable: list[Publication]) -> int:
        """At stop: ``items`` fail (their ``done`` gets ``exc``); the durable ones are added to
        ``durable``; how many others there were."""
        other = 0
        for publication, done, _ in items:
            if publication.durable is None:
                other += 1
            else:
                durable.append(publication)
            if done is not None and not done.done():
                done.set_exception(exc)
        return other

    def _dropped_at_stop(self, durable: list[Publication], exc: BackplaneError,
                         unanswered: int = 0) -> None:
        """Kept messages and revocations the bus never took, dropped: counted, and logged at
        ERROR (their callers were told they were kept). The first ``unanswered`` were in a round
        trip the stop cancelled: the bus may have taken them, which the log says."""
        self.stats.spool_dropped += len(durable)
        users = {p.user_id for p in durable if p.keep is not None}
        revoked = [p.revoke[0] for p in durable if p.revoke is not None]
        kept = len(durable) - len(revoked)
        logger.error("backplane: %d kept message(s) for %d user(s) and %d revocation(s)%s "
                     "dropped (%s): the bus did not take them before this process stopped%s; "
                     "the spool lives in this process's memory only (stats.spool_dropped = %d)",
                     kept, len(users), len(revoked),
                     f" ({', '.join(revoked[:10])}{', ...' if len(revoked) > 10 else ''})"
                     if revoked else "", exc,
                     f" ({unanswered} of them in a round trip cut short, which the bus may "
                     f"have run)" if unanswered else "", self.stats.spool_dropped,
                     extra={"node": self.node_id, "failed": self.stats.failed})

    def _count_failure(self, what: str, exc: BaseException | None) -> None:
        self.stats.failed += 1
        if exc is not None and self._connected.is_set():
            self._refused_up += 1
            count = self._refused_up
            if count <= 10 or _is_power_of_ten(count):
                logger.warning("backplane: %s not published: %s (%d refused with the link up so "
                               "far, the first ten then every power of ten logged; "
                               "stats.failed = %d)", what, exc, count, self.stats.failed,
                               extra={"node": self.node_id, "failed": self.stats.failed})
        elif not self._warned:
            self._warned = True
            logger.warning("backplane unavailable: %s and further messages for other processes "
                           "are not published until it reconnects (counted in stats.failed)",
                           what, extra={"node": self.node_id, "failed": self.stats.failed})

    # ------------------------------------------------------------------ connection upkeep

    def _start_bus(self) -> None:
        """Start connecting (with backoff, for good) and publishing."""
        loop = asyncio.get_running_loop()
        self._bus_stopped = False
        self._bus_task = loop.create_task(self._run_bus(), name=f"backplane-bus-{self.node_id}")
        self._publisher_task = loop.create_task(self._publish_loop(),
                                                name=f"backplane-pub-{self.node_id}")

    async def _stop_bus(self) -> None:
        """Let queued messages leave (briefly: 1 s; the kept messages and revocations not
        answered yet up to ``stop_drain``, waiting for the bus to answer again if it is down and
        trying again what it refused, see :meth:`_drain_spool`),
        fail the rest (the durable ones logged at ERROR, see :meth:`_drop_outbox`), and
        disconnect. From here on nothing more is queued: a kept send raises ``BackplaneError``
        (no task would publish it), anything else is counted as failed."""
        self._bus_stopped = True
        if self._spool or self._durable_queued or self._durable_flying:
            await self._drain_spool()
        elif self._connected.is_set():
            await wait_event(self._outbox_idle, 1.0)
        await cancel_task(self._publisher_task)
        # Disconnected before the senders waiting for room wake up: they fail, rather than
        # queue behind a publisher that is gone.
        self._connected.clear()
        self._drop_outbox(BackplaneError("the backplane stopped"))
        await cancel_task(self._bus_task)
        with contextlib.suppress(Exception):
            await self._close_bus()

    async def _drain_spool(self) -> None:
        """At stop: wait up to ``stop_drain`` seconds for the bus to answer every durable
        publication, trying the spool again meanwhile, at once and then at growing intervals
        (from ``_DRAIN_RETRY`` up to 1 s): what the bus refused a moment ago (a replica being
        promoted, Redis at ``maxmemory`` until memory was freed) may be taken now, and the
        heartbeats that would try it again have stopped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_drain
        pause = _DRAIN_RETRY
        while True:
            self._retry_spool()
            left = deadline - loop.time()
            if left <= 0 or await wait_event(self._outbox_idle, min(left, pause)):
                return
            pause = min(2 * pause, 1.0)

    def _bus_up(self) -> None:
        """Called by ``_bus_session`` once subscribed (a subclass may extend it, calling us last:
        the connection is announced only once its own state is ready)."""
        self._session_up = True
        self._forget_echoes()
        if self._down_since is not None:
            lost = self.stats.failed - self._failed_at_down
            self.stats.reconnects += 1
            logger.warning(
                "backplane reconnected after %.1f s; %d message(s) for other processes could "
                "not be published meanwhile (stats.failed = %d)",
                time.monotonic() - self._down_since, lost, self.stats.failed,
                extra={"node": self.node_id, "lost": lost},
            )
            self._down_since = None
        if not (self._spool or self._durable_queued or self._durable_flying):
            self._spooling = False  # nothing waits for the bus: the shares no longer apply
        self._connected.set()
        self._retry_spool()

    def _bus_down(self, reason: str) -> None:
        """Called when a session ends; a subclass fails what depended on it (extend, call us)."""
        self._connected.clear()
        self._spooling = True
        self._forget_echoes()
        if self._first_wait is not None:
            # Not an outage of a serving process: start() fails after connect_timeout, and
            # "local delivery continues" would tell the operator it serves. Said once.
            if not self._first_wait:
                self._first_wait = True
                logger.info("backplane: the bus does not answer yet (%s); trying again until the "
                            "start gives up", reason, extra={"node": self.node_id})
        elif self._down_since is None and not self._stopping:
            self._down_since = time.monotonic()
            self._failed_at_down = self.stats.failed
            self._warned = False
            logger.warning("backplane disconnected (%s): local delivery continues; "
                           "reconnecting with backoff", reason, extra={"node": self.node_id})

    def _forget_echoes(self) -> None:
        """A new subscription (or none) never hears what was published before it: the broadcasts
        in flight no longer hold the publishing back."""
        self._unechoed = 0
        self._echo_room.set()

    async def _run_bus(self) -> None:
        delay = self.backoff_initial
        while True:
            self._session_up = False
            try:
                await self._bus_session()
                reason = "connection closed"
            except BackplaneError as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:
                logger.exception("backplane: bus session failed", extra={"node": self.node_id})
                reason = repr(exc)
            self._bus_down(reason)
            if self._session_up:
                delay = self.backoff_initial
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # backoff, not a sync point
            delay = min(self.backoff_max, delay * 2)


def _stamp(where: str, stamped: Callable[[Stamped], None]) -> None:
    """A message to a user was appended to their history as ``"<id> <n>"``: tell the sender
    which entry it is."""
    sid, _, n = where.partition(" ")
    try:
        stamped(Stamped(sid, int(n), b""))
    except Exception:
        logger.exception("backplane: acknowledging a local delivery failed")


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task and wait until it is done (no-op for ``None`` or a finished task).

    Cancels again every second while it runs on: a cancellation can be lost on Python 3.11 (see
    :func:`wait_event`), and a stop must never hang on it.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=1.0)
    await asyncio.gather(task, return_exceptions=True)


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` up to ``timeout`` seconds; whether it was set.

    Not ``contextlib.suppress(TimeoutError)`` around ``asyncio.timeout``: when a cancellation
    arrives just as the time runs out, Python 3.11's ``asyncio.timeout`` can report it as a
    ``TimeoutError``; suppressed, the task then never stops (a backplane whose stop() hung).
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        return False
    return True
