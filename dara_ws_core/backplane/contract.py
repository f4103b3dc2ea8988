"""The backplane contract: what a manager asks of a backplane (:class:`Backplane`), what a
backplane may ask of the manager it serves (:class:`BackplaneHost`), its counters, and how a
remote request's failure crosses the bus (:class:`Failure`). Pure: no I/O, no event loop.

Ownership runs one way: the manager holds a backplane and calls its hooks; the backplane reaches
the manager only through :class:`BackplaneHost`'s few named methods, never through its dicts, and
this package never imports the manager.
"""

from __future__ import annotations

__all__ = [
    "Attachment",
    "Backplane",
    "BackplaneHost",
    "BackplaneStats",
    "Failure",
    "Gap",
    "GapCallback",
    "error_of",
    "failure_of",
]

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dara_ws_core.exceptions import (
    BackplaneError,
    ChunkError,
    ConnectionClosed,
    DaraWSError,
    RequestTimeout,
    SlowConsumer,
    TooManyPendingRequests,
    UnknownChannel,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from dara_ws_core.auth import Identity
    from dara_ws_core.messages import LoosePayload
    from dara_ws_core.outbox import OutboxLimits, Stamped


@dataclass(frozen=True, slots=True)
class Attachment:
    """What registering a new channel on the bus gave (:meth:`Backplane.attach`): whether the
    user's connection limit admitted it; the entries of the user's history that none of their
    connections has written, oldest first (leased to this channel, and to no other, until it
    settles them: :meth:`Backplane.settle`); and ``head``, the user's newest entry when the
    channel was registered (what arrives live up to it is not for this channel: it was in the
    history already). See :mod:`dara_ws_core.outbox`."""

    admitted: bool
    entries: tuple[Stamped, ...] = ()
    head: Stamped | None = None

    @property
    def frames(self) -> tuple[bytes, ...]:
        return tuple(entry.frame for entry in self.entries)


@dataclass(frozen=True, slots=True)
class Gap:
    """What a process knows a user of its may have missed while its bus subscription was down
    (passed to the ``on_gap`` callback). ``recovered`` counts the per-user messages it missed
    and found in the user's history, delivered now (in order, before anything newer); ``lost``
    the messages it could not recover: per-user ones a bound (count, bytes, age) dropped from
    the history first, and broadcasts (``broadcasts``, told by their sequence numbers: they are
    at most once). With the outbox off, per-user messages are not recoverable either and ``lost``
    is a floor. Treat a gap with anything lost as "resynchronise this user" (``down``: seconds
    the subscription was down, 0 if unknown)."""

    lost: int = 0
    recovered: int = 0
    broadcasts: int = 0
    down: float = 0.0


#: ``on_gap(user_id, gap)``: called once per affected local user after a gap (never raises
#: into the bus: exceptions are logged).
GapCallback = Callable[[str, Gap], None]


class Backplane(Protocol):
    """What a :class:`~dara_ws_core.manager.WebsocketManager` needs to reach other processes.

    The manager calls the hooks; the application calls :meth:`start` and :meth:`stop`. Frames are
    ``bytes`` of UTF-8 JSON already encoded once by the manager. Before :meth:`start`, the calls
    that publish or ask the bus raise ``RuntimeError`` (those of
    :class:`~dara_ws_core.backplane.BrokerBackplane` do, naming ``start``); the channel hooks and
    ``attach`` are for connections that may come first.
    """

    async def start(self, manager: BackplaneHost) -> None:
        """Connect, subscribe and register the manager's channels; attaches itself to a manager
        created without a backplane. Raises ``BackplaneError`` if the bus cannot be reached."""

    async def stop(self) -> None:
        """Unregister this process's channels, fail waiting requests, disconnect. Idempotent."""

    def channel_added(self, channel_id: str, identity: Identity | None) -> None:
        """A channel connected here. Must not block: queue the directory write."""

    def channel_removed(self, channel_id: str, identity: Identity | None) -> None:
        """A channel of this process is gone. Must not block: queue the directory write."""

    async def send_to_channel(self, channel_id: str, frame: bytes) -> None:
        """Deliver a frame to a channel held by another process. Raises ``UnknownChannel`` if no
        live process holds it, ``BackplaneError`` if the bus is unreachable."""

    async def broadcast(self, frame: bytes, ignore_channel: str | None) -> None:
        """Deliver a frame to every channel of every *other* process (the caller delivered the
        local ones). Never raises for remote failures: they are counted and logged."""

    async def send_to_user(self, user_id: str, frame: bytes, ignore_channel: str | None,
                           keep: OutboxLimits | None = None,
                           stamped: Callable[[Stamped], None] | None = None, *,
                           sender: str | None = None, address: str | None = None) -> bool:
        """Deliver a frame to the user's channels on every *other* process. With ``keep`` it is
        appended to the user's history on the bus first (in the same step), charged to
        ``sender`` (``None``: nobody) and its ``address`` (``None``: none known) within the bus's
        bounds of the outbox (a refusal is counted
        in ``stats.outbox_refused`` and remembered: :meth:`keeps`), and ``stamped`` is called with
        the entry it became once the bus has it (the caller's local deliveries are acknowledged
        by it), and ``BackplaneError`` is raised if the bus is unreachable (the message could not
        be kept). Otherwise never raises for remote failures: they are counted and logged.
        Returns ``False`` when the message was to be kept and ``sender``'s share of what waits
        for the bus had no room for it (its count or its bytes: see :meth:`keeps`), ``True``
        otherwise."""

    def keeps(self, sender: str | None, address: str | None = None, user_id: str | None = None) -> bool:
        """Whether a message charged to ``sender`` from ``address`` (for ``user_id``, if given)
        may be offered to the bus's outbox: ``False`` while the bus's last answer said that
        sender's quota (or its share of that user's history), or that address's, or the outbox
        as a whole, is exhausted (then the caller sends it without ``keep``), or, while the
        process's spool is in use (the bus down, or refusing writes), while that sender holds
        its share of it. Never waits."""

    def ack(self, user_id: str, upto: str) -> None:
        """The user's connections here wrote the user's history up to entry ``upto``: move the
        user's written mark forward. Never waits, never raises (queued, failures counted)."""

    def ack_closing(self, user_id: str, upto: str | None) -> Awaitable[Any]:
        """A connection of the user here is closing: publish at once the user's written mark
        as far as this process knows it (``upto``, or an acknowledgement still coalesced for
        the user), not behind one already on its way. Await the result (or not) to know it was
        published; it never raises (what could not be published is sent once the bus is
        back)."""

    async def answered(self, timeout: float) -> bool:
        """Wait, at most ``timeout`` seconds, until the bus has answered everything this
        process queued to publish before the call (the ``stamped`` callbacks of its sends have
        run); whether it did."""

    def resync(self, user_id: str) -> None:
        """A gap was noticed in the user's entries (their numbers skipped some): read the
        user's history after the last entry handed over here and hand over what is missing
        (:meth:`BackplaneHost.recover`). Never waits (the manager holds the user's deliveries
        meanwhile, bounded in time), never raises."""

    def disconnect(self, scope: str, target: str, code: int, reason: str) -> Awaitable[Any]:
        """Close, on every *other* process, the connections of a user (``scope="user"``), of a
        session (``"session"``) or one channel (``"channel"``). Never waits: the command is
        queued behind every message this process published before it. Await the result (or
        not) to know it was published: it raises ``BackplaneError`` (counted) if it was not.
        Timed when called: published late (after an outage), it still spares the connections
        opened after this call."""

    async def attach(self, channel_id: str, user_id: str, limit: int | None,
                     keep: OutboxLimits | None) -> Attachment:
        """Register a new channel of a user before it is served, in one atomic step: refused if
        the user already has ``limit`` live channels on all processes; else registered, and the
        frames kept for the user are taken (when ``keep`` is set). Raises ``BackplaneError``."""

    async def settle(self, user_id: str, channel_id: str, upto: str | None) -> None:
        """The channel that leased the user's entries (:meth:`attach`) has written those up to
        id ``upto`` (``None``: none): acknowledged, the lease ends. Never raises (logged)."""

    async def request(
        self,
        channel_id: str,
        message: LoosePayload | BaseModel,
        custom: bool,
        timeout: float | None,
    ) -> Any:
        """``send_and_wait`` to a channel held by another process; raises what the local call
        raises (``RequestTimeout``, ``ConnectionClosed``, ``ChunkError``...), plus
        ``UnknownChannel`` and ``BackplaneError``."""

    async def user_channels(self, user_id: str) -> set[str]:
        """Every connected channel of a user, on every process. Raises ``BackplaneError``."""


class BackplaneHost(Protocol):
    """What a backplane reaches of the manager it serves (``WebsocketManager`` implements it):
    the channels of this process, by id, by user or all, and requests run on one of them.

    The deliveries never wait and never raise: a full queue applies its channel's slow-consumer
    policy at once, so the bus reader is never held up by a slow client.
    """

    #: The backplane the manager calls; :meth:`Backplane.start` sets it if it is unset.
    backplane: Backplane | None
    #: The per-user outbox bounds (``None``: no outbox).
    outbox_limits: OutboxLimits | None

    def close_local(self, scope: str, target: str, code: int, reason: str,
                    spare: Callable[[str], bool] | None = None) -> int:
        """Close this process's connections of a user, a session or one channel (``scope`` as in
        :meth:`Backplane.disconnect`), but those ``spare`` answers ``True`` for (by channel
        id: the backplane spares those opened after a revocation published late); how many.
        Never publishes."""

    def local_channels(self) -> Iterable[tuple[str, str | None]]:
        """A snapshot of this process's channels: ``(channel id, user id or None)``."""

    def get_user_channels(self, user_id: str) -> set[str]:
        """The user's channels on this process."""

    def deliver_to_channel(self, channel_id: str, frame: bytes) -> bool:
        """Hand a frame to one local channel; ``False`` if it is not here (or closed)."""

    def deliver_to_user(self, user_id: str, frame: bytes, ignore_channel: str | None = None,
                        entry: Stamped | None = None) -> int:
        """Hand a frame to the user's local channels but ``ignore_channel``; how many got it.
        ``entry``: the entry of the user's history it is (its frame unused): handed over once,
        after what was recovered (see :meth:`recover`)."""

    def deliver_to_all(self, frame: bytes, ignore_channel: str | None = None) -> int:
        """Hand a frame to every local channel but ``ignore_channel``; how many got it."""

    def hold_users(self) -> list[str]:
        """Hold back the per-user deliveries to every user with a local channel (they queue,
        bounded, until :meth:`recover`), so what is recovered after a gap goes out first; the
        users held."""

    def delivered_upto(self, user_id: str) -> str | None:
        """The last entry of the user's history handed to the user's channels here (``None``:
        not known)."""

    def still_missing(self, user_id: str) -> bool | None:
        """Whether the deliveries held for the user since a gap was noticed in their numbers
        still skip some, once the bus has numbered this process's own earlier sends (``False``:
        nothing to read, :meth:`recover` with no entries releases them; ``None``: not known
        until the bus answers this process's sends held meanwhile)."""

    def recover(self, user_id: str, entries: Sequence[Stamped], head: int) -> tuple[int, int]:
        """After a gap: hand the user's channels here the entries of their history they missed
        (those of ``entries`` after :meth:`delivered_upto`), then the deliveries held meanwhile,
        and stop holding them back. ``head``: the last sequence number the user was given.
        Returns (entries handed over, entries a bound dropped before they could be)."""

    def users_gapped(self, gaps: dict[str, Gap]) -> None:
        """Report gaps to the ``on_gap`` callback (if any) of the users concerned."""

    async def serve_relayed_request(
        self, channel_id: str, frame: bytes, rchan: str, timeout: float | None
    ) -> Any:
        """Send a request another process encoded (``frame``, whose ``__rchan`` is ``rchan``) to
        a local channel as it is, and return the client's answer. Raises ``UnknownChannel`` if the
        channel is not here, else what ``send_and_wait`` raises."""


@dataclass(slots=True)
class BackplaneStats:
    """Counters of one node's backplane (for metrics and tests)."""

    #: Bus messages this node published.
    published: int = 0
    #: Bus messages this node received (its own broadcasts echoed back are not counted).
    received: int = 0
    #: Frames handed to local channels' queues from the bus (one per recipient).
    delivered: int = 0
    #: Messages for other processes that could not be published (bus unreachable or erroring):
    #: lost, and reported here and in the log. Kept messages and revocations are not counted
    #: here while they wait in the spool, only if its bound drops them.
    failed: int = 0
    #: Of those, kept messages and revocations the spool still held when the backplane stopped
    #: (after up to ``stop_drain`` seconds for the bus to take them): their callers were told
    #: they were kept, and they are lost (logged at ERROR).
    spool_dropped: int = 0
    #: Messages whose channel or node was gone by the time they were routed.
    undeliverable: int = 0
    #: Times the bus connection came back after being lost.
    reconnects: int = 0
    #: Messages for a user connected nowhere, kept in the bus's outbox.
    kept: int = 0
    #: Entries of the users' histories handed to new channels of this node.
    replayed: int = 0
    #: Connections refused because the user had ``max_connections_per_user`` on all processes.
    refused: int = 0
    #: Messages the bus's outbox refused to keep (``outbox_per_sender``, ``outbox_users``,
    #: ``outbox_total_bytes``): delivered live only.
    outbox_refused: int = 0
    #: Times this node's subscription came back after a gap (every one is reported).
    gaps: int = 0
    #: Messages known lost for this node's channels during gaps: per-user sends a bound dropped
    #: from the user's history before they could be recovered (or, with the outbox off, that
    #: found nobody listening), and broadcasts (per-publisher sequence numbers). See :class:`Gap`.
    lost: int = 0
    #: Per-user messages recovered from the users' histories after a gap.
    recovered: int = 0
    #: The bus's lag, in milliseconds, of the last delivery received (to a channel, a user,
    #: everyone: from the publisher's wall clock when it published to this node's when it
    #: received; as exact as the two hosts' clocks agree, 0 if this one is behind), and the
    #: largest among those received in the :data:`LAG_WINDOW` seconds (or up to twice that)
    #: before the last one.
    lag_ms_last: int = 0
    lag_ms_max: int = 0
    # The window of lag_ms_max: when the current one ends, its largest, the previous one's.
    _lag_until: float = 0.0
    _lag_current: int = 0
    _lag_previous: int = 0

    def lag(self, ms: int, now: float) -> None:
        """A delivery arrived ``ms`` milliseconds after it was published (``now``: a monotonic
        clock, for the window)."""
        self.lag_ms_last = ms
        if now >= self._lag_until:  # a new window; the one before counts only if it just ended
            recent = now < self._lag_until + LAG_WINDOW
            self._lag_previous = self._lag_current if recent else 0
            self._lag_current = 0
            self._lag_until = now + LAG_WINDOW
        self._lag_current = max(self._lag_current, ms)
        self.lag_ms_max = max(self._lag_previous, self._lag_current)

    def as_dict(self) -> dict[str, int]:
        return {key: value for key, value in asdict(self).items() if not key.startswith("_")}


#: Seconds of one window of :attr:`BackplaneStats.lag_ms_max`.
LAG_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a remote request failed: ``kind`` names the exception to raise on the asking side."""

    kind: str
    message: str
    code: int | None = None


def failure_of(exc: BaseException) -> Failure:
    """The :class:`Failure` that carries ``exc`` to the asking process (no internals leak)."""
    if isinstance(exc, RequestTimeout):
        return Failure("timeout", str(exc))
    if isinstance(exc, ConnectionClosed):
        return Failure("closed", exc.reason, exc.code)
    if isinstance(exc, ChunkError):
        return Failure("chunk", str(exc))
    if isinstance(exc, TooManyPendingRequests):
        return Failure("busy", str(exc))
    if isinstance(exc, SlowConsumer):
        return Failure("slow", str(exc))
    if isinstance(exc, UnknownChannel):
        return Failure("unknown_channel", str(exc))
    return Failure("error", "the request failed on the process holding the channel")


def error_of(failure: Failure, channel_id: str) -> DaraWSError:
    """The exception the asking side raises for a remote :class:`Failure`."""
    kind = failure.kind
    if kind == "timeout":
        return RequestTimeout(failure.message)
    if kind == "closed":
        return ConnectionClosed(failure.code if failure.code is not None else 1006, failure.message)
    if kind == "chunk":
        return ChunkError(failure.message)
    if kind == "busy":
        return TooManyPendingRequests(failure.message)
    if kind == "slow":
        return SlowConsumer(failure.message)
    if kind == "unknown_channel":
        return UnknownChannel(channel_id)
    return BackplaneError(failure.message)
