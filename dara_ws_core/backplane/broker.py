"""The routing logic of a backplane over any publish/subscribe bus with a key-value directory.

:class:`BrokerBackplane` implements :class:`~dara_ws_core.backplane.contract.Backplane` on a
:class:`~dara_ws_core.backplane.node.BusNode`; a bus library implements the primitives
(``dara_ws_redis.RedisBackplane``, :class:`~dara_ws_core.backplane.memory.MemoryBackplane`). It
reaches the manager only through :class:`~dara_ws_core.backplane.contract.BackplaneHost`.
"""

from __future__ import annotations

__all__ = ["BrokerBackplane"]

import abc
import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Unpack

import pydantic_core

from dara_ws_core.codec import build_frame, dumps
from dara_ws_core.config import _check_number
from dara_ws_core.exceptions import (
    BackplaneError,
    CloseCode,
    ConnectionClosed,
    DaraWSError,
    RequestTimeout,
)
from dara_ws_core.logs import _is_power_of_ten
from dara_ws_core.outbox import BusRefusals, Stamped, id_key

from .contract import Attachment, BackplaneHost, Failure, Gap, error_of, failure_of
from .node import BusNode, BusOptions, Entry, Publication, cancel_task, wait_event
from .wire import (
    BroadcastDelivery,
    BusMessage,
    ChannelDelivery,
    Control,
    RemoteCancel,
    RemoteReply,
    RemoteRequest,
    SequenceTracker,
    UserDelivery,
    decode_bus_message,
    encode_bus_message,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from dara_ws_core.auth import Identity
    from dara_ws_core.messages import LoosePayload
    from dara_ws_core.outbox import OutboxLimits

logger = logging.getLogger("dara_ws_core.backplane")

_from_json = pydantic_core.from_json


#: What a call that needs the bus raises before :meth:`BrokerBackplane.start`.
_NOT_STARTED = ("the backplane is not started: await backplane.start(manager) first, once the "
                "manager is made (and await backplane.stop() at shutdown)")


class BrokerBackplane(BusNode):
    """The routing logic of a backplane over a publish/subscribe bus with a key-value directory.

    Subclasses implement the bus primitives (``_bus_session``, ``_publish_batch``, the directory
    methods) and translate their library's errors into ``BackplaneError``; this class does the
    routing, the request/reply correlation, the directory upkeep and the fault handling.

    ``heartbeat_interval``: how often this node refreshes its directory entries;
    ``expiry`` (default 3 x the interval): how long entries outlive a node that stopped refreshing
    them; ``revoke_ttl``: how long a revocation stays recorded on the bus for the processes that
    missed it (each checks its connections against the records once it is back on the bus
    after losing its subscription, so a process cut off for up to that long still closes what
    was revoked meanwhile); the other options are :class:`~dara_ws_core.backplane.node.BusNode`'s
    (``node_id``, ``namespace``, ``connect_timeout``, ``backoff_initial``, ``backoff_max``,
    ``max_outbox``, ``max_outbox_bytes``, ``max_bus_message``, ``publish_window``,
    ``max_spool``, ``max_spool_bytes``, ``stop_drain``).
    """

    def __init__(
        self,
        *,
        heartbeat_interval: float = 5.0,
        expiry: float | None = None,
        revoke_ttl: float = 3600.0,
        **options: Unpack[BusOptions],
    ) -> None:
        owner = type(self).__name__
        _check_number("heartbeat_interval", heartbeat_interval, float, 0, optional=False, above=True,
                      owner=owner)
        _check_number("expiry", expiry, float, 0, optional=True, above=True, owner=owner)
        _check_number("revoke_ttl", revoke_ttl, float, 0, optional=False, above=True, owner=owner)
        expiry = 3 * heartbeat_interval if expiry is None else expiry
        if expiry <= heartbeat_interval:
            raise ValueError("expiry must be longer than heartbeat_interval")
        if revoke_ttl <= expiry:
            raise ValueError("revoke_ttl must be longer than expiry")
        super().__init__(**options)
        #: The bus's refusals to keep messages, as far as this process has heard.
        self.refusals = BusRefusals()
        self.heartbeat_interval = heartbeat_interval
        self.expiry = expiry
        self.revoke_ttl = revoke_ttl
        # This process's channels: channel -> (when added, on the bus's clock in ms at the
        # earliest, as measured then; user; session), checked against the revocations recorded
        # on the bus (see _check_revoked). Taken once: a later measurement, off by more under
        # load, never turns a connection surely opened after a revocation into a doubtful one.
        self._opened: dict[str, tuple[int, str | None, str | None]] = {}
        # The bus's clock minus our wall clock, in ms, and how far off that may be (half the
        # round trip that measured it): revocations are timed on the bus's clock (see
        # _measure_clock). None: not measured yet (our wall clock stands in).
        self._clock_offset: int | None = None
        self._clock_error = 0
        # Whether this process may have missed a revocation (its subscription was lost): its
        # connections are then checked against the records on the bus, once (see _check_revoked).
        self._revoke_unchecked = True
        self._revoke_task: asyncio.Task[None] | None = None
        self._manager: BackplaneHost | None = None
        self._running = False
        self._wake = asyncio.Event()
        self._written_cond = asyncio.Condition()
        # Directory changes not written yet: channel -> (user, present). Later changes of the
        # same channel replace earlier ones, so a connect + disconnect in one batch coalesce.
        self._changes: dict[str, tuple[str | None, bool]] = {}
        self._version = 0
        self._written = 0
        self._refresh = True
        #: Requests this node asked: request id (also their ``__rchan``) -> (future, channel id).
        self._waiting: dict[str, tuple[asyncio.Future[Any], str]] = {}
        # Of those, the ones routed: request id -> the node holding the channel; and the ones
        # whose channel was gone at the last check (see _check_asked).
        self._asked: dict[str, str] = {}
        self._unheard: set[str] = set()
        #: Requests this node serves for others: request id -> task.
        self._serving: dict[str, asyncio.Task[None]] = {}
        self._writer_task: asyncio.Task[None] | None = None
        # Gaps (see :meth:`_recover`): broadcasts are numbered per publisher; after a lost
        # subscription the next full directory write is followed by a recovery.
        self._broadcast_seq = 0
        self._sequences = SequenceTracker()
        self._recovering = False
        self._gap_down = 0.0
        self._recover_task: asyncio.Task[None] | None = None
        # Per-user recoveries of a gap noticed in a user's entries: user -> task.
        self._resyncing: dict[str, asyncio.Task[None]] = {}
        # Acknowledgements that could not be sent (the bus was down): user -> entry id.
        self._unsent_acks: dict[str, str] = {}
        # Acknowledgements being published (one per user at a time, so that a slow bus cannot
        # pile one up per user per tick in the publish queue), and the newest that came
        # meanwhile, posted once the one in flight is done (the latest wins).
        self._acks_in_flight: dict[str, str] = {}
        self._acks_next: dict[str, str] = {}

    @property
    def manager(self) -> BackplaneHost:
        """The manager this backplane serves; raises ``RuntimeError`` before :meth:`start`."""
        if self._manager is None:
            raise RuntimeError(_NOT_STARTED)
        return self._manager

    def __repr__(self) -> str:
        if self._manager is None:
            state = "not started"
        elif not self._running:
            state = "stopped"
        else:
            state = "connected" if self._connected.is_set() else "disconnected"
        where = self._where()
        return f"<{type(self).__name__} {where + ' ' if where else ''}node={self.node_id} {state}>"

    def _where(self) -> str:
        """What the repr says of the bus (never a password): nothing by default."""
        return ""

    def check_started(self) -> None:
        """Raise ``RuntimeError`` before :meth:`start`. Every call that publishes or asks the
        bus checks it first: without it, one would drop its message with a warning that the bus
        is unavailable, another raise ``BackplaneError``, a kept message wait for a start that may
        never come, and :meth:`flush` wait for ever (stopped is another matter: those calls
        then fail as documented). The manager checks it too, before it delivers anything to its
        own connections, so that a broadcast or a per-user send that raises for it delivered
        nothing."""
        if self._manager is None:
            raise RuntimeError(_NOT_STARTED)

    # ------------------------------------------------------------------ directory primitives

    @abc.abstractmethod
    async def _user_entries(self, user_id: str) -> dict[str, str]:
        """The user's live channels: channel -> node."""

    @abc.abstractmethod
    async def _write_directory(self, present: Sequence[Entry], absent: Sequence[Entry]) -> None:
        """Register ``present`` as held by this node (refreshing their expiry); unregister
        ``absent``."""

    @abc.abstractmethod
    async def _attach(self, channel_id: str, user_id: str, limit: int | None,
                      keep: OutboxLimits | None) -> tuple[bool, list[Kept], Kept | None]:
        """In one atomic step: refuse if the user has ``limit`` live channels (pruning dead
        entries), else register the channel as held by this node and, with ``keep``, lease the
        user's history after their written mark to it (``(id, n, bus message)``, oldest first,
        those younger than ``keep.max_age``; nothing if a live channel holds the lease: see
        :mod:`dara_ws_core.outbox`), and give the user's newest entry (its message empty)."""

    @abc.abstractmethod
    async def _history(self, user_id: str, after: str | None,
                       keep: OutboxLimits) -> tuple[list[Kept], int]:
        """The user's history after entry ``after`` (``None``: after the user's written mark,
        what no connection of theirs wrote; all of it without a mark), oldest first,
        at most ``keep.max_messages`` younger than ``keep.max_age``, and the last sequence number
        the user was given (0: none). The recovery after a gap."""

    @abc.abstractmethod
    async def _settle_outbox(self, user_id: str, channel_id: str, upto: str | None) -> None:
        """Move the user's written mark to ``upto`` (if set and ahead); if ``channel_id`` holds
        the lease of the user's history, end it."""

    @abc.abstractmethod
    async def _held_by(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """For each ``(channel, node)``: whether the channel is still registered as held by
        that node and the node listens on its topic."""

    @abc.abstractmethod
    async def _revocations(self, targets: Sequence[str]) -> tuple[list[Revocation | None], int]:
        """The revocations recorded for ``targets`` (``scope:target``, as
        :attr:`Publication.revoke`), each ``(when, code, reason)`` or ``None``, and the bus's
        clock now (``when``, the moment the application asked for the revocation, and now in
        ms on the bus's clock, which need not be ours)."""

    async def _bus_clock(self) -> int:
        """The bus's clock now, in ms (the clock revocations are timed with). A bus without a
        clock of its own uses this process's wall clock."""
        return _wall_ms()

    @abc.abstractmethod
    async def _take_missed(self) -> dict[str, int]:
        """Read and reset this node's gap ledger: user -> messages the bus found no listener
        for on this node (and could not keep), since the last call."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self, manager: BackplaneHost, *, wait: bool = True) -> None:
        """Connect, subscribe and register the manager's channels (see :class:`Backplane`).

        With ``wait=False``, return at once whether or not the bus answers: the backplane goes
        on connecting with backoff, as after an outage (local delivery meanwhile; kept messages
        wait in the spool; connections are admitted on the local count), for a process that must
        serve its own clients through an outage it starts in (a worker started again)."""
        if self._running:
            raise RuntimeError("the backplane is already started")
        if manager.backplane is None:
            manager.backplane = self
        elif manager.backplane is not self:
            raise ValueError("the manager has another backplane")
        self._manager = manager
        self._running, self._stopping = True, False
        self._revoke_unchecked = True  # channels opened before the start: checked once
        self._start_bus()
        self._writer_task = asyncio.get_running_loop().create_task(
            self._maintain(), name=f"backplane-dir-{self.node_id}")
        if not wait:
            logger.info("backplane starting: connecting in the background",
                        extra={"node": self.node_id})
            return
        self._first_wait = False
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._connected.wait()
                self._first_wait = None
                await self.flush()
        except TimeoutError:
            self._first_wait = None
            await self.stop()
            raise BackplaneError(
                f"could not reach the backplane within {self.connect_timeout} s"
            ) from None
        logger.info("backplane started", extra={"node": self.node_id})

    async def stop(self) -> None:
        """Unregister this node's channels (best effort, bounded), let replies being served
        finish briefly, let the spool drain (up to ``stop_drain`` seconds, if the bus answers
        meanwhile: what is left is counted in ``stats.spool_dropped`` and logged at ERROR), fail
        waiting requests with ``BackplaneError`` and disconnect.

        Call it after the endpoint's ``shutdown``, so that clients are closed first.
        """
        if not self._running:
            return
        self._stopping = True
        await cancel_task(self._writer_task)
        if self._serving:
            await asyncio.wait(list(self._serving.values()), timeout=1.0)
        if self._connected.is_set():
            absent = [(c, u) for c, (u, there) in self._changes.items() if not there]
            absent += self.manager.local_channels()
            try:
                async with asyncio.timeout(2.0):
                    await self._write_directory((), absent)
            except (BackplaneError, TimeoutError) as exc:
                logger.warning("backplane: could not unregister channels at stop (%s); "
                               "they expire in %.1f s", exc, self.expiry)
        for task in list(self._serving.values()):
            task.cancel()
        await cancel_task(self._recover_task)
        for resync in list(self._resyncing.values()):
            await cancel_task(resync)
        await cancel_task(self._revoke_task)
        await self._stop_bus()
        await asyncio.gather(*self._serving.values(), return_exceptions=True)
        self._fail_waiting(BackplaneError("the backplane stopped"))
        self._running = False

    async def flush(self) -> None:
        """Wait until every channel change made so far is written to the directory and every
        queued message has left (published, failed and counted, or refused by the bus and
        waiting in the spool for its next try, with the user's later kept messages behind it).
        Wrap it in ``asyncio.timeout``: while the bus is unreachable, or after a round trip
        that failed, it waits until the bus answers again."""
        self.check_started()
        target = self._version
        async with self._written_cond:
            await self._written_cond.wait_for(lambda: self._written >= target)
        await self._outbox_idle.wait()

    # ------------------------------------------------------------------ manager hooks

    def channel_added(self, channel_id: str, identity: Identity | None) -> None:
        opened = _wall_ms() + (self._clock_offset or 0) - self._clock_error
        self._opened[channel_id] = (opened, *((identity.user_id, identity.session_id)
                                              if identity is not None else (None, None)))
        self._change(channel_id, identity, True)

    def channel_removed(self, channel_id: str, identity: Identity | None) -> None:
        self._opened.pop(channel_id, None)
        self._change(channel_id, identity, False)

    def _change(self, channel_id: str, identity: Identity | None, present: bool) -> None:
        self._changes[channel_id] = (identity.user_id if identity is not None else None, present)
        self._version += 1
        self._wake.set()

    async def send_to_channel(self, channel_id: str, frame: bytes) -> None:
        self.check_started()
        data = encode_bus_message(ChannelDelivery(channel_id, frame, _wall_ms()))
        await self._route(channel_id, data, "message")

    async def broadcast(self, frame: bytes, ignore_channel: str | None) -> None:
        self.check_started()
        self._broadcast_seq += 1
        data = encode_bus_message(BroadcastDelivery(self.node_id, ignore_channel, frame,
                                                    self._broadcast_seq, _wall_ms()))
        await self._post(Publication(data, topic=self.broadcast_topic), "broadcast")

    async def send_to_user(self, user_id: str, frame: bytes, ignore_channel: str | None,
                           keep: OutboxLimits | None = None,
                           stamped: Callable[[Stamped], None] | None = None, *,
                           sender: str | None = None, address: str | None = None) -> bool:
        self.check_started()
        data = encode_bus_message(UserDelivery(user_id, ignore_channel, frame, sent=_wall_ms()))
        if keep is None:
            await self._post(Publication(data, user_id=user_id), "message to a user")
            return True
        # Kept: if the bus fails it, it waits in the spool and is sent again (with the same id,
        # so the bus keeps it once); refused when the spool (with every kept message not yet
        # answered) would be full, or the sender's share of it while the spool is in use or
        # nearly full (in count or in bytes: False, as keeps() answers), or once stopped.
        if await self._post(Publication(data, user_id=user_id, keep=keep, sender=sender,
                                        address=address, stamped=stamped,
                                        durable=next(self._kids)),
                            "message to a user"):
            return True
        if sender is not None and not self._bus_stopped and self._spool_refuses(sender, len(data)):
            return False
        raise BackplaneError(f"{self._durable_refusal(sender, len(data))}: the message to the "
                             f"user was not kept")

    def keeps(self, sender: str | None, address: str | None = None, user_id: str | None = None) -> bool:
        # While the spool is in use (the bus down or refusing) or nearly full, the bus's last
        # answer is not the whole story: the sender's share of the spool decides too (a sender
        # holding its share is not offered, as send_to_user would not keep it). The rule of
        # _spool_refuses, by count only, written out: this runs for every kept send.
        return self.refusals.keeps(sender, time.monotonic(), address, user_id) and (
            sender is None or (not self._spooling
                               and self._durable_queued + self._durable_flying < self._spool_near)
            or self._spool_keeps(sender))

    def _outbox_refused(self, sender: str | None, bound: str, wait_ms: int,
                        address: str | None = None, user_id: str | None = None) -> None:
        """The bus refused to keep a message for ``wait_ms`` more, by a bound of its outbox
        (``bound``): ``"sender"``, the sender's share (its messages, their bytes, or more than
        a little of either once only the outbox's kept last share is left: its next messages are
        not offered until then); ``"address"``, the share of the senders of its ``address``
        (none of their next messages is offered until then); ``"bytes"``, the outbox's bytes (no
        message is offered until then); ``"users"``,
        its count of histories (only a message to a user with no history is refused, which
        this process cannot tell: nothing is remembered); ``"history"``, the sender's share of
        that one user's history, or that history full of messages still waiting (its next
        messages to that user are not offered until then; to other users they are). Counted,
        and logged the first ten times, then at each power of ten."""
        if bound == "address":
            self.refusals.refuse_address(address, time.monotonic() + wait_ms / 1000)
        elif bound == "history":
            if user_id is not None:
                self.refusals.refuse_history(sender, user_id, time.monotonic() + wait_ms / 1000)
        elif bound != "users":
            self.refusals.refuse(sender, bound == "bytes", time.monotonic() + wait_ms / 1000)
        self.stats.outbox_refused += 1
        count = self.stats.outbox_refused
        if count <= 10 or _is_power_of_ten(count):
            setting = {"sender": "the sender's share, outbox_per_sender", "bytes": "outbox_total_bytes",
                       "address": "the share of the senders of one address",
                       "history": "the sender's share of the user's history, outbox_messages and "
                                  "outbox_bytes"}.get(bound, "outbox_users")
            logger.warning("backplane: the bus's outbox refused to keep a message (%s): it was "
                           "delivered live only (%d so far)", setting, count,
                           extra={"node": self.node_id})

    def ack(self, user_id: str, upto: str) -> None:
        if not self._connected.is_set():
            self._keep_ack(user_id, upto)  # sent once the bus is back (see _recover)
            return
        if user_id in self._acks_in_flight:
            later = self._acks_next.get(user_id)
            if later is None or id_key(upto) > id_key(later):
                self._acks_next[user_id] = upto
            return
        self._acks_in_flight[user_id] = upto
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: self._acked(f, user_id, upto))
        self._post_nowait(Publication(b"", user_id=user_id, ack=upto), "acknowledgement", done)

    def ack_closing(self, user_id: str, upto: str | None) -> asyncio.Future[Any]:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        for later in (self._acks_in_flight.get(user_id), self._acks_next.get(user_id)):
            if later is not None and (upto is None or id_key(later) > id_key(upto)):
                upto = later
        if upto is None:
            done.set_result(None)
            return done
        if not self._connected.is_set():
            self._keep_ack(user_id, upto)
            done.set_result(None)
            return done
        mark = upto
        done.add_done_callback(lambda f: self._closing_acked(f, user_id, mark))
        self._post_nowait(Publication(b"", user_id=user_id, ack=upto), "acknowledgement", done)
        return done

    def _closing_acked(self, done: asyncio.Future[Any], user_id: str, upto: str) -> None:
        if done.cancelled() or done.exception() is not None:
            self._keep_ack(user_id, upto)

    async def answered(self, timeout: float) -> bool:
        done = await self._published(timeout)
        await asyncio.sleep(0)  # the callbacks of the futures answered run first
        return done

    def resync(self, user_id: str) -> None:
        if user_id in self._resyncing or len(self._resyncing) >= _MAX_RESYNCS:
            return  # one at a time per user; beyond the bound, the manager's hold times out
        task = asyncio.get_running_loop().create_task(self._resync(user_id))
        self._resyncing[user_id] = task
        task.add_done_callback(lambda _: self._resyncing.pop(user_id, None))

    async def _resync(self, user_id: str) -> None:
        """A gap noticed in one user's entries: recover what is missing from their history.

        This process's own sends still on their way to the bus may be the numbers skipped (its
        channels here had them before the bus numbered them): once the bus has answered every
        send queued before, the gap is looked at again, and one they explain ends without a
        read (nothing was missed). Read before they are answered, the history would hand those
        sends over a second time."""
        manager = self.manager
        keep = manager.outbox_limits
        entries: list[Stamped] = []
        head = 0
        deadline = time.monotonic() + _BARRIER_TIMEOUT
        missing: bool | None = None
        while missing is None and await self.answered(deadline - time.monotonic()):
            missing = manager.still_missing(user_id)
        if missing is False:
            manager.recover(user_id, (), 0)
            return
        if keep is not None:
            try:
                kept, head = await self._history(user_id, manager.delivered_upto(user_id), keep)
                entries = self._entries_of(kept)
            except Exception as exc:
                logger.warning("backplane: could not read the history of a user to fill a gap "
                               "(%s)", exc, extra={"node": self.node_id, "user": user_id})
        got, lost = manager.recover(user_id, entries, head)
        self.stats.recovered += got
        self._report({user_id: Gap(lost=lost, recovered=got)}, lost, got)

    def _keep_ack(self, user_id: str, upto: str) -> None:
        current = self._unsent_acks.get(user_id)
        if current is None or id_key(upto) > id_key(current):
            self._unsent_acks[user_id] = upto
        while len(self._unsent_acks) > _MAX_UNSENT_ACKS:  # bounded: delivered again, not lost
            del self._unsent_acks[next(iter(self._unsent_acks))]

    def _acked(self, done: asyncio.Future[Any], user_id: str, upto: str) -> None:
        self._acks_in_flight.pop(user_id, None)
        later = self._acks_next.pop(user_id, None)
        if done.cancelled() or done.exception() is not None:
            self._keep_ack(user_id, upto)
            if later is not None:
                self._keep_ack(user_id, later)
        elif later is not None:
            self.ack(user_id, later)

    def disconnect(self, scope: str, target: str, code: int, reason: str) -> asyncio.Future[Any]:
        self.check_started()
        # The broadcast topic, not the directory: a channel registered a moment ago may not be
        # in the directory yet, and revocation must not miss it.
        # Recorded on the bus too, in the same step (a process not subscribed at that moment
        # finds it once it is back), and spooled if the bus fails it. Timed now, once, on the
        # bus's clock (the latest it may be): sent again or late, it still closes only what was
        # opened before the application asked for it.
        when = _wall_ms() + (self._clock_offset or 0) + self._clock_error
        data = encode_bus_message(Control(self.node_id, scope, target, code, reason, when))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieve)  # a caller that does not wait: counted and logged
        self._post_nowait(Publication(data, topic=self.broadcast_topic,
                                      durable=(f"{scope}:{target}", int(code), reason, when)),
                          "disconnect", done)
        return done

    def _opened_since(self, when: int) -> Callable[[str], bool]:
        """Whether a local channel was surely opened at or after ``when`` (the bus's clock, ms):
        the earliest the bus's clock can have read when it opened, as this process measured its
        clock then, is not before it (a channel this process does not know the opening of is
        not)."""
        opened = self._opened

        def spare(channel_id: str) -> bool:
            entry = opened.get(channel_id)
            return entry is not None and entry[0] >= when

        return spare

    async def _measure_clock(self) -> None:
        """Measure the bus's clock against ours (a heartbeat's one round trip; off by at most
        half of it): what revocations are timed with."""
        before = _wall_ms()
        try:
            now = await self._bus_clock()
        except Exception as exc:  # measured again at the next heartbeat
            logger.debug("backplane: could not read the bus's clock (%s)", exc,
                         extra={"node": self.node_id})
            return
        self._set_clock(before, now, _wall_ms())

    def _set_clock(self, before: int, now: int, after: int) -> None:
        half = (after - before + 1) // 2
        self._clock_offset = now - (before + half)
        self._clock_error = half + 1  # the bus's clock is read to the ms

    def _check_revoked_soon(self) -> None:
        """Once the directory is written (after the subscription is back): if this process may
        have missed revocations, check its connections against the records, in a task of its
        own (never holding up the heartbeat)."""
        if self._revoke_unchecked and (self._revoke_task is None or self._revoke_task.done()):
            self._revoke_unchecked = False
            self._revoke_task = asyncio.get_running_loop().create_task(
                self._check_revoked(), name=f"backplane-revoked-{self.node_id}")

    async def _check_revoked(self) -> None:
        """Close this process's connections revoked while it did not hear it (its subscription
        down): those of a user, session or channel whose revocation is recorded on the bus and
        was asked for after they were opened. Run once the subscription is back after it was
        lost (a process subscribed hears every revocation live), over the connections open
        then, :data:`_CHECK_CHUNK` at a time (one read each: the event loop is never held for
        more than a chunk); a check that fails is made again at the next heartbeat."""
        channels = list(self._opened)
        closed = 0
        for start in range(0, len(channels), _CHECK_CHUNK):
            try:
                closed += await self._check_chunk(channels[start:start + _CHECK_CHUNK])
                await asyncio.sleep(0)  # the loop's turn, whether or not the bus read yielded
            except Exception as exc:
                logger.warning("backplane: could not check revocations (%s)", exc,
                               extra={"node": self.node_id})
                self._revoke_unchecked = True
                break
        if closed:
            logger.warning("backplane: closed %d connection(s) revoked while this process did "
                           "not hear it", closed, extra={"node": self.node_id})

    async def _check_chunk(self, channels: Sequence[str]) -> int:
        """:meth:`_check_revoked` for some channels; how many it closed."""
        opened = self._opened
        targets: dict[str, list[str]] = {}
        for channel_id in channels:
            entry = opened.get(channel_id)
            if entry is None:  # closed meanwhile
                continue
            _, user_id, session_id = entry
            targets.setdefault(f"channel:{channel_id}", []).append(channel_id)
            if user_id is not None:
                targets.setdefault(f"user:{user_id}", []).append(channel_id)
            if session_id is not None:
                targets.setdefault(f"session:{session_id}", []).append(channel_id)
        if not targets:
            return 0
        keys = list(targets)
        before = _wall_ms()
        found, now = await self._revocations(keys)
        self._set_clock(before, now, _wall_ms())
        closed = 0
        for key, revocation in zip(keys, found, strict=True):
            if revocation is None:
                continue
            when, code, reason = revocation
            spare = self._opened_since(when)
            for channel_id in targets[key]:
                if not spare(channel_id):
                    closed += self.manager.close_local("channel", channel_id, code, reason)
        return closed

    async def attach(self, channel_id: str, user_id: str, limit: int | None,
                     keep: OutboxLimits | None) -> Attachment:
        if not self._connected.is_set():
            raise BackplaneError("the backplane is disconnected")
        admitted, kept, head = await self._attach(channel_id, user_id, limit, keep)
        if not admitted:
            self.stats.refused += 1
            return Attachment(False)
        entries = self._entries_of(kept)
        self.stats.replayed += len(entries)
        if kept and not entries:  # leased, but nothing deliverable: end the lease
            await self.settle(user_id, channel_id, kept[-1][0])
        return Attachment(True, tuple(entries),
                          None if head is None else Stamped(head[0], head[1], b""))

    def _entries_of(self, kept: Sequence[Kept]) -> list[Stamped]:
        entries = []
        for kid, n, data in kept:
            try:
                message = decode_bus_message(data)
            except BackplaneError as exc:
                logger.warning("backplane: dropped a kept message: %s", exc)
                continue
            if isinstance(message, UserDelivery):
                entries.append(Stamped(kid, n, message.frame))
        return entries

    async def settle(self, user_id: str, channel_id: str, upto: str | None) -> None:
        try:
            await self._settle_outbox(user_id, channel_id, upto)
        except Exception as exc:  # the lease expires or is voided: delivered again, not lost
            logger.warning("backplane: could not acknowledge the outbox of a user (%s); it is "
                           "leased again by the user's next connection", exc,
                           extra={"node": self.node_id, "user": user_id})

    async def request(
        self,
        channel_id: str,
        message: LoosePayload | BaseModel,
        custom: bool,
        timeout: float | None,
    ) -> Any:
        self.check_started()
        # Encoded once, here, with its __rchan (a uuid4 like a local one), and relayed as it is:
        # the caller's errors surface here, and the owner never decodes and re-encodes it.
        request_id = str(uuid.uuid4())
        frame = build_frame(message, custom=custom, rchan=request_id)
        scope = asyncio.timeout(timeout)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        owner: str | None = None
        try:
            async with scope:
                self._waiting[request_id] = (waiter, channel_id)
                data = encode_bus_message(RemoteRequest(
                    request_id, self.node_id, channel_id, custom, timeout, frame))
                owner = await self._route(channel_id, data, "request")
                self._asked[request_id] = owner
                return await waiter
        except TimeoutError:
            if scope.expired():
                raise RequestTimeout(
                    f"no answer from channel {channel_id} within {timeout} s"
                ) from None
            raise
        finally:
            self._waiting.pop(request_id, None)
            self._asked.pop(request_id, None)
            self._unheard.discard(request_id)
            if owner is not None and (not waiter.done() or waiter.cancelled()):
                waiter.cancel()
                # Timed out or cancelled here: the owner stops waiting for its client too.
                self._post_nowait(Publication(encode_bus_message(RemoteCancel(request_id)),
                                              topic=self.topic_of(owner)), "cancel")

    async def user_channels(self, user_id: str) -> set[str]:
        self.check_started()
        local = self.manager.get_user_channels(user_id)
        if not self._connected.is_set():
            raise BackplaneError("the backplane is disconnected")
        entries = await self._user_entries(user_id)
        # This node's own entries may lag behind (a removal not written yet): trust the manager.
        return local | {c for c, node in entries.items() if node != self.node_id}

    # ------------------------------------------------------------------ receiving

    def _on_bus_message(self, data: bytes) -> None:
        """Handle one message from the bus. Never blocks (deliveries are queue offers) and never
        raises: one bad message must not cost the subscription."""
        try:
            message = decode_bus_message(data)
        except BackplaneError as exc:
            logger.warning("backplane: dropped a message: %s", exc, extra={"node": self.node_id})
            return
        try:
            self._dispatch(message, len(data))
        except Exception:
            logger.exception("backplane: handling a message failed", extra={"node": self.node_id})

    def _dispatch(self, message: BusMessage, size: int) -> None:
        """Handle one decoded message of ``size`` bytes."""
        manager = self._manager
        if manager is None:
            return
        if isinstance(message, BroadcastDelivery):
            if message.origin == self.node_id:
                # Our own broadcast, already delivered locally by the manager: heard back
                # (publish_window; inline, as it comes back for every broadcast).
                unechoed = self._unechoed - size
                self._unechoed = unechoed if unechoed > 0 else 0
                if self._echo_waiting and unechoed < self.publish_window:
                    self._echo_room.set()
                return
            self.stats.received += 1
            self._lagged(manager, message.sent)
            missed = self._sequences.observe(message.origin, message.seq)
            if missed:
                self._report({u: Gap(lost=missed, broadcasts=missed)
                              for u in self._local_users()}, missed, 0)
            self.stats.delivered += manager.deliver_to_all(message.frame, message.ignore)
            return
        if isinstance(message, Control):
            if message.origin == self.node_id:  # the origin closed its own connections already
                self._echoed(size)
            else:
                self.stats.received += 1
                # Timed: only what was opened before it (it may come late, from a spool).
                spare = None if not message.when else self._opened_since(message.when)
                closed = manager.close_local(message.scope, message.target, message.code,
                                             message.reason, spare)
                if closed:
                    logger.info("backplane: closed %d connection(s) of %s %s", closed,
                                message.scope, message.target, extra={"node": self.node_id})
            return
        self.stats.received += 1
        if isinstance(message, ChannelDelivery | UserDelivery):
            self._lagged(manager, message.sent)
        # Deliveries never wait (see BackplaneHost): a slow client never holds up the bus reader.
        if isinstance(message, ChannelDelivery):
            if manager.deliver_to_channel(message.channel_id, message.frame):
                self.stats.delivered += 1
            else:
                self.stats.undeliverable += 1
                logger.debug("backplane: message for a channel that is gone",
                             extra={"channel": message.channel_id})
        elif isinstance(message, UserDelivery):
            entry = None if message.sid is None else Stamped(message.sid, message.n, b"")
            self.stats.delivered += manager.deliver_to_user(
                message.user_id, message.frame, message.ignore, entry)
        elif isinstance(message, RemoteRequest):
            task = asyncio.get_running_loop().create_task(self._serve(message))
            self._serving[message.request_id] = task
        elif isinstance(message, RemoteReply):
            self._settle(message)
        elif isinstance(message, RemoteCancel):
            serving = self._serving.get(message.request_id)
            if serving is not None:
                serving.cancel()

    def _lagged(self, manager: BackplaneHost, sent: int) -> None:
        """Record the lag of a delivery published at ``sent`` (publisher's wall clock, ms)."""
        if not sent:
            return
        ms = max(0, _wall_ms() - sent)
        self.stats.lag(ms, time.monotonic())
        # The manager's OpenTelemetry hooks, when on (a host without counters has none).
        telemetry = getattr(getattr(manager, "counters", None), "telemetry", None)
        if telemetry is not None:
            telemetry.backplane_lag(ms / 1000)

    async def _serve(self, request: RemoteRequest) -> None:
        """Run a remote ``send_and_wait`` on the local channel and publish its outcome."""
        try:
            try:
                # The frame goes to the client as the asker encoded it: its __rchan is the
                # request id, so the client's answer settles this very request.
                result = await self.manager.serve_relayed_request(
                    request.channel_id, request.frame, request.request_id, request.timeout)
                reply = RemoteReply(request.request_id, result=dumps(result))
            except DaraWSError as exc:
                reply = RemoteReply(request.request_id, failure=failure_of(exc))
            except Exception as exc:
                logger.exception("backplane: serving a remote request failed",
                                 extra={"channel": request.channel_id})
                reply = RemoteReply(request.request_id, failure=failure_of(exc))
        finally:
            self._serving.pop(request.request_id, None)
        data = encode_bus_message(reply)
        if len(data) > self.max_bus_message:  # the asker gets a ChunkError, not a cut-off bus
            data = encode_bus_message(RemoteReply(request.request_id, failure=Failure(
                "chunk", f"the answer is too large for the backplane: {len(data)} bytes "
                f"(max_bus_message = {self.max_bus_message})")))
        self._post_nowait(Publication(data, topic=self.topic_of(request.reply_to)), "reply")

    def _settle(self, reply: RemoteReply) -> None:
        entry = self._waiting.get(reply.request_id)
        if entry is None or entry[0].done():
            logger.debug("backplane: reply for an unknown or settled request",
                         extra={"request": reply.request_id})
            return
        waiter, channel_id = entry
        if reply.failure is not None:
            waiter.set_exception(error_of(reply.failure, channel_id))
            return
        try:
            waiter.set_result(_from_json(reply.result, cache_strings=False))  # codec._NO_STRING_CACHE
        except ValueError:
            waiter.set_exception(BackplaneError("malformed reply from the owning process"))

    def _fail_waiting(self, exc: BackplaneError) -> None:
        for waiter, _ in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(exc)

    # ------------------------------------------------------------------ upkeep

    def _bus_up(self) -> None:
        if self._down_since is not None and self._manager is not None:
            # A gap: hold back per-user deliveries to our users until what the bus kept for
            # them meanwhile is recovered (after the directory is written again).
            self._gap_down = time.monotonic() - self._down_since
            if self._gap_down > self.revoke_ttl:
                logger.warning("backplane: cut off for %.0f s, longer than revoke_ttl: "
                               "revocations made meanwhile may not reach this process's "
                               "connections", self._gap_down, extra={"node": self.node_id})
            self._manager.hold_users()
            self._recovering = True
            self._revoke_unchecked = True  # revocations published meanwhile were not heard
        self._refresh = True  # the bus may have lost the directory (a restart): write it all
        self._version += 1
        self._wake.set()
        super()._bus_up()

    def _bus_down(self, reason: str) -> None:
        super()._bus_down(reason)
        # Answers published while we are not subscribed are lost: fail their waits now.
        self._fail_waiting(BackplaneError("the backplane connection was lost"))

    async def _maintain(self) -> None:
        """Write directory changes in batches, and refresh every entry each heartbeat."""
        loop = asyncio.get_running_loop()
        next_refresh = loop.time()
        while True:
            if not self._connected.is_set():
                await self._connected.wait()
            delay = next_refresh - loop.time()
            if not self._refresh and not self._changes and delay > 0:
                await wait_event(self._wake, delay)
            self._wake.clear()
            if not self._connected.is_set():
                continue
            full = self._refresh or loop.time() >= next_refresh
            self._refresh = False
            changes, self._changes = self._changes, {}
            version = self._version
            present, absent = self._plan(changes, full)
            try:
                await self._write_directory(present, absent)
            except Exception as exc:
                if isinstance(exc, BackplaneError):
                    logger.warning("backplane: directory write failed (%s); retrying", exc,
                                   extra={"node": self.node_id})
                else:  # a bug: log it, keep the directory alive
                    logger.exception("backplane: directory write failed",
                                     extra={"node": self.node_id})
                for channel_id, change in changes.items():
                    self._changes.setdefault(channel_id, change)
                self._refresh = self._refresh or full
                await asyncio.sleep(min(self.heartbeat_interval, 1.0))  # retry delay
                continue
            if full:
                next_refresh = loop.time() + self.heartbeat_interval
                self._retry_spool()
                await self._measure_clock()
                self._check_revoked_soon()
            if full and self._asked:
                await self._check_asked()
            if self._recovering and full:
                self._recovering = False
                if self._recover_task is None or self._recover_task.done():
                    self._recover_task = loop.create_task(self._recover())
            async with self._written_cond:
                self._written = max(self._written, version)
                self._written_cond.notify_all()

    async def _check_asked(self) -> None:
        """Fail the requests to channels of other nodes that are gone: no longer registered as
        held by that node, or that node no longer listening (killed), at two checks in a row (a
        heartbeat apart: a reply on its way, or a link that blinked, settles it meanwhile).
        Without it a request with no timeout to a node that died would wait for ever."""
        asked = list(itertools.islice(self._asked.items(), _MAX_CHECKED))
        pairs = []
        for request_id, owner in asked:
            entry = self._waiting.get(request_id)
            pairs.append(("" if entry is None else entry[1], owner))
        try:
            alive = await self._held_by(pairs)
        except Exception as exc:  # checked again at the next heartbeat
            logger.debug("backplane: could not check the channels of waiting requests (%s)",
                         exc, extra={"node": self.node_id})
            return
        for (request_id, _), live in zip(asked, alive, strict=True):
            entry = self._waiting.get(request_id)
            if entry is None or entry[0].done():
                continue
            if live:
                self._unheard.discard(request_id)
            elif request_id not in self._unheard:
                self._unheard.add(request_id)
            else:
                entry[0].set_exception(ConnectionClosed(
                    CloseCode.ABNORMAL, "the channel's process is gone"))

    def _local_users(self) -> dict[str, str]:
        """Every user with a channel here -> one of those channels."""
        users: dict[str, str] = {}
        for channel_id, user_id in self.manager.local_channels():
            if user_id is not None:
                users.setdefault(user_id, channel_id)
        return users

    async def _recover(self) -> None:
        """After a gap: hand every local user what they missed meanwhile, read from their
        history after the last entry handed to them here (in order, before the deliveries held
        back since the bus came back), and report what could not be: entries a bound dropped
        first, the gap ledger (with the outbox off: messages for this node nobody heard) and,
        later, broadcasts missed (sequence numbers). Acknowledgements that could not be sent
        meanwhile are sent now."""
        manager = self.manager
        for user_id, upto in list(self._unsent_acks.items()):
            del self._unsent_acks[user_id]
            self.ack(user_id, upto)
        users = self._local_users()
        held = set(manager.hold_users())  # any user that arrived since _bus_up
        gaps: dict[str, Gap] = {}
        recovered = lost = 0
        try:
            missed = await self._take_missed()
        except Exception as exc:
            logger.warning("backplane: could not read the gap ledger (%s)", exc,
                           extra={"node": self.node_id})
            missed = {}
        keep = manager.outbox_limits
        # Sends of this process queued since the bus came back are appended to the histories
        # read below: known as its own (not handed over twice) once the bus has answered them.
        await self.answered(_BARRIER_TIMEOUT)
        for user_id in held | set(users):
            entries: list[Stamped] = []
            head = 0
            if keep is not None and user_id in users:
                try:
                    kept, head = await self._history(user_id, manager.delivered_upto(user_id),
                                                     keep)
                    entries = self._entries_of(kept)
                except Exception as exc:
                    logger.warning("backplane: could not read the history of a user after a "
                                   "gap (%s)", exc, extra={"node": self.node_id, "user": user_id})
            got, dropped = manager.recover(user_id, entries, head)
            user_lost = dropped + missed.get(user_id, 0)
            recovered += got
            lost += user_lost
            if user_id in users:
                gaps[user_id] = Gap(lost=user_lost, recovered=got, down=self._gap_down)
        self.stats.gaps += 1
        self.stats.recovered += recovered
        self._report(gaps, lost, recovered)

    def _report(self, gaps: dict[str, Gap], lost: int, recovered: int) -> None:
        self.stats.lost += lost
        # A WARNING only for a loss: the outage itself was logged as one (disconnected,
        # reconnected), and a gap that lost nothing is the backplane doing its job.
        logger.log(
            logging.WARNING if lost else logging.INFO,
            "backplane: gap for %d local user(s): %d message(s) recovered from the outbox, %d "
            "known lost (stats.lost = %d)", len(gaps), recovered, lost, self.stats.lost,
            extra={"node": self.node_id, "lost": lost, "recovered": recovered})
        if gaps:
            self.manager.users_gapped(gaps)

    def _plan(
        self, changes: dict[str, tuple[str | None, bool]], full: bool
    ) -> tuple[list[Entry], list[Entry]]:
        absent = [(c, u) for c, (u, there) in changes.items() if not there]
        if full:
            present = list(self.manager.local_channels())
        else:
            # The latest change of a channel wins: one still marked present has not been removed
            # (a removal would have replaced it), so it is still held here.
            present = [(c, u) for c, (u, there) in changes.items() if there]
        return present, absent


#: One entry of a user's history as the bus gives it: (id, n, bus message).
Kept = tuple[str, int, bytes]
#: A revocation recorded on the bus: (when, in ms on the bus's clock; close code; reason).
Revocation = tuple[int, int, str]

_MAX_UNSENT_ACKS = 100_000


def _wall_ms() -> int:
    """The wall clock in milliseconds: what a delivery's lag is measured with (see the wire)."""
    return time.time_ns() // 1_000_000

_MAX_RESYNCS = 1000

#: Most waiting requests whose channel one heartbeat checks (one round trip).
_MAX_CHECKED = 10_000

#: Channels checked against the revocations recorded on the bus per read (up to 3 keys each:
#: channel, user, session), after the subscription was lost.
_CHECK_CHUNK = 1000

#: Seconds a recovery waits for the bus to answer this process's earlier sends before reading a
#: user's history (beyond, it reads anyway: a send answered later may be handed over twice).
_BARRIER_TIMEOUT = 5.0


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # already counted and logged by the outbox
