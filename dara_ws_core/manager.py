"""The manager: every connection of a server, and sending to one, a user's, or all of them.

Frames are encoded once per call, never once per recipient: a broadcast builds one ``bytes``
object and every recipient's queue holds that same object. A fan-out (broadcast, per-user send)
never waits: a recipient whose queue is full applies its slow-consumer policy at once, so one slow
client never delays the others (protocol.md section 6).

With a backplane (:mod:`dara_ws_core.backplane`) the same calls reach channels connected to other
processes. The manager holds the backplane and calls its hooks; the backplane reaches back only
through the named methods of ``BackplaneHost`` ("for the backplane" below), never the dicts.
"""

from __future__ import annotations

__all__ = ["WebsocketManager", "get_user_channels"]

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import handler as _handler
from .auth import Identity
from .codec import build_frame
from .config import ServerConfig
from .custom import CustomHandler, CustomHandlerRegistry, HandlerThreads
from .exceptions import BackplaneError, CloseCode, ConnectionClosed, UnknownChannel
from .handler import _DEFAULT, ACK_PARKED, Sink, WebSocketHandler, current_channel, current_identity
from .lifecycle import ConnectHook, ConnectionHooks, DisconnectHook
from .logs import _is_power_of_ten, current_source
from .outbox import (
    ADDRESS_SHARES,
    SENDER_SHARES,
    ClosedWrites,
    DeliveryCursors,
    OutboxLimits,
    QueuedMarks,
    Stamped,
    UserOutbox,
    WriteLog,
    address_of,
    id_key,
    sender_of,
)
from .registry import ChannelRegistry
from .stats import Counters, ServerStats, collect

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .backplane.contract import Backplane, Gap, GapCallback
    from .messages import LoosePayload

C = TypeVar("C", bound=ConnectHook)
D = TypeVar("D", bound=DisconnectHook)

logger = logging.getLogger("dara_ws_core")

#: Seconds between two acknowledgements of what the connections wrote (per-user history): what
#: a crash can deliver twice (written, not yet acknowledged) is at most this much.
ACK_INTERVAL = 0.02


class _HeldFrame:
    """A per-user delivery held back (after a gap, or for a channel being admitted); ``own``:
    a send from this process to be kept, whose entry the bus gives once it has numbered it
    (acknowledged only once really delivered; skipped by a channel whose lease had it)."""

    __slots__ = ("entry", "frame", "own")

    def __init__(self, frame: bytes, entry: Stamped | None, own: bool = False) -> None:
        self.frame = frame
        self.entry = entry
        self.own = own


class _Arriving:
    """A channel admitted on the bus whose handler does not exist yet (see :meth:`admit`)."""

    __slots__ = ("entries", "head", "meanwhile", "user_id")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.entries: list[Stamped] = []  # leased from the user's history
        self.head: Stamped | None = None  # the user's newest entry at registration
        # Per-user frames since, each with its entry (filled in once the bus numbers a send
        # from here: the lease may have had it).
        self.meanwhile: list[_HeldFrame] = []


class _Held(list[_HeldFrame]):
    """One user's held deliveries, and their bytes."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def add(self, frame: bytes, entry: Stamped | None, own: bool = False) -> _HeldFrame:
        held = _HeldFrame(frame, entry, own)
        self.append(held)
        self.size += len(frame)
        return held


class WebsocketManager:
    """Manages WebSocket connections to clients and communication with them.

    One per server (or per test): it holds no global state, so two managers never share
    channels, users or handlers.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        custom_handlers: CustomHandlerRegistry | None = None,
        backplane: Backplane | None = None,
        on_gap: GapCallback | None = None,
    ) -> None:
        if config is not None and not isinstance(config, ServerConfig):
            raise TypeError(f"WebsocketManager's config must be a ServerConfig, not {type(config).__name__}")
        self.config = config or ServerConfig()
        #: ``on_gap(user_id, gap)``: told when a user of this process may have missed messages
        #: while the backplane's subscription was down (see :class:`~dara_ws_core.backplane.Gap`).
        self.on_gap = on_gap
        #: channel id -> handler, for the connections of this process.
        self.handlers: dict[str, WebSocketHandler] = {}
        self.registry = ChannelRegistry()
        self.custom_handlers = custom_handlers or CustomHandlerRegistry()
        # The in_thread handlers' own pool, sized here (its threads let go by Endpoint.shutdown);
        # a registry shared by managers shares one pool and its shares, sized by the last made.
        replaced = self.custom_handlers.threads
        if replaced.size != self.config.handler_threads:
            self.custom_handlers.threads = HandlerThreads(self.config.handler_threads)
            replaced.shutdown()
        self.backplane = backplane
        #: Per-user outbox limits (``None``: off), and the outbox itself when there is no
        #: backplane (with one, it lives on the bus: see :mod:`dara_ws_core.outbox`).
        self.outbox_limits: OutboxLimits | None = None
        if self.config.outbox_messages:
            config = self.config
            self.outbox_limits = OutboxLimits(
                config.outbox_messages, config.outbox_bytes, config.outbox_age,
                config.outbox_users, config.outbox_total_bytes, config.outbox_per_sender)
        self.outbox = UserOutbox(self.outbox_limits or OutboxLimits())
        self._arriving: dict[str, _Arriving] = {}
        # One bound method for every handler's on_ack_at: binding it per connection cost each
        # idle connection 64 bytes.
        self._on_ack_at = self._channel_written
        # Users whose per-user deliveries are held back after a gap until their history is
        # recovered (:meth:`hold_users`): user -> deliveries held, bounded in count and bytes.
        self._held: dict[str, _Held] = {}
        self._hold_timer: asyncio.TimerHandle | None = None
        # The per-user history (outbox on): the last entry handed to each local user's channels
        # (recovery, dedup), which entries each connection queued (acknowledged once written),
        # and, per new channel, the user's newest entry when it was registered (what arrives
        # live up to it, it had from the history).
        self._cursors = DeliveryCursors()
        age_ms = int(self.outbox_limits.max_age * 1000) if self.outbox_limits is not None else 300_000
        self._writes = WriteLog(age_ms=age_ms)
        # What the connections that closed had written, for the bus's numbers that come after
        # their part of the history was settled (see ClosedWrites).
        self._closed_writes = ClosedWrites(age_ms=age_ms)
        self._marks = QueuedMarks()  # the same, for per-user sends without a backplane
        self._floors: dict[str, tuple[int, int]] = {}
        # The same newest entry's id ("": none) per channel admitted on the bus, kept while it
        # lives (the id the bus gave: no object of its own), and how many admissions began: a
        # send from here that the bus numbers after a channel of its user was admitted hands
        # the entry to it if its lease did not have it.
        self._heads: dict[str, str] = {}
        self._admissions = 0
        # Channels admitted without their user's history (the bus unreachable or slow at the
        # handshake): what they write is never acknowledged, since entries they never had may
        # come before it (kept for the user's next connection; a duplicate, never a loss).
        self._blind: set[str] = set()
        # Channels whose transport wrote a recorded entry since the last acknowledgement pass,
        # the only ones it looks at (a connection that stopped reading costs it nothing).
        self._dirty: set[str] = set()
        # Connections removed while they still write their backlog before the close frame,
        # settled once written (remove_handler's ``writing``): at most one per closing connection.
        self._writing: dict[str, WebSocketHandler] = {}
        self._ack_timer: asyncio.TimerHandle | None = None
        # Outbox replays waiting for their frames to be written, to end their lease.
        self._settling: set[asyncio.Task[None]] = set()
        #: Running totals of this server (see :meth:`stats`).
        self.counters = Counters()
        #: The ``on_connect`` / ``on_disconnect`` hooks, made by the first one registered.
        self.hooks: ConnectionHooks | None = None

    # ------------------------------------------------------------------ handlers

    def __repr__(self) -> str:
        _, _, users = self.registry.counts()
        backplane = self.backplane
        kind = "none" if backplane is None else _kind_of(backplane)
        return (f"<WebsocketManager {_plural(len(self.handlers), 'connection')}, "
                f"{_plural(users, 'user')}, backplane={kind}>")

    def add_ws_handler(self, kind: str, handler: CustomHandler, *, in_thread: bool = False) -> None:
        """Register a custom message handler ``handler(channel_id, data)`` (Dara's name).

        ``in_thread=True`` runs a blocking sync handler on a worker thread of this manager's own
        pool (``ServerConfig.handler_threads``, 32), one at a time per connection. A user (an
        anonymous connection: its address) holds at most an eighth of the pool, counting
        handlers still running after their request got its ``timeout`` reply, since a thread
        cannot be stopped, and the last eighth is kept for users holding none; a request that
        finds no thread it may take gets a ``busy`` error reply at once, never waits for one.
        An ``in_thread`` handler that returns a coroutine (a sync wrapper of an async function)
        fails that request (``handler_error``; a ``TypeError`` logged, the coroutine closed).
        Raises ``ValueError`` if the kind is taken, or for ``in_thread`` with an async handler;
        ``TypeError`` if ``kind`` is not a string or ``handler`` not callable.
        """
        self.custom_handlers.register(kind, handler, in_thread=in_thread)

    def on_connect(self, func: C) -> C:
        """Register ``func(channel_id, identity)``, sync or async, to run as each connection
        opens; returns ``func``, so it can decorate it. Hooks run in the order registered, once
        the channel is reachable and its ``init`` (and its user's kept messages) are queued: what
        a hook sends follows them. They run in the connection's context
        (:data:`current_channel`, :data:`current_identity`), before its first frame is handled;
        from the first async hook on, the rest run in a task the connection tracks (it never
        holds up the connection's frames, and is cancelled when the connection closes), each
        within ``handler_timeout``. A hook that fails is logged with its traceback and counted
        (``stats().hooks``): the connection stays open (refusing one is the authenticator's
        job). With a backplane, the hooks of the process holding the connection run. Hooks
        registered later run for connections opened later. Raises ``TypeError`` for a
        non-callable, a generator function, or a callable that cannot take the two arguments
        (checked at registration; ``mypy`` checks it too).
        """
        self._hooks().add("connect", func)
        return func

    def on_disconnect(self, func: D) -> D:
        """Register ``func(channel_id, identity, closed)`` (``closed``: the
        :class:`~dara_ws_core.exceptions.ConnectionClosed` with the close code and reason), sync
        or async, to run once each connection :meth:`on_connect` ran for has
        ended, whatever ended it (the client, the server, a lost socket, a revocation, a
        shutdown); returns ``func``. The channel is gone by then (a send to it raises
        ``UnknownChannel``); its user's other channels are not. Hooks run in the order
        registered, in one task per ended connection, each within ``handler_timeout``, once
        the connection's ``on_connect`` task (cancelled with it) has unwound, in a
        context whose :data:`current_channel` is the ended channel; :meth:`Endpoint.shutdown`
        waits for those of its own connections (within its grace, then cancels them). Failures are logged and counted
        as :meth:`on_connect`'s. Raises ``TypeError`` as :meth:`on_connect` does (for the three
        arguments).
        """
        self._hooks().add("disconnect", func)
        return func

    def _hooks(self) -> ConnectionHooks:
        hooks = self.hooks
        if hooks is None:
            self.hooks = hooks = ConnectionHooks()
        return hooks

    def create_handler(
        self,
        channel_id: str,
        identity: Identity | None = None,
        *,
        sink: Sink | None = None,
        now: float = 0.0,
        transport: str = "unknown",
        start: bool = True,
    ) -> WebSocketHandler:
        """Create and register the handler of a new connection; its first frame is ``init``.

        ``sink`` is where its frames go (the connection's driver; without one they stay queued),
        ``now`` the driver's clock at the start. Raises ``ValueError`` if the channel id is
        taken. Without an identity the channel is reachable by id and by broadcast, but belongs
        to no user. ``transport`` names the transport in stats and logs.

        The user's kept messages (the outbox) follow ``init`` at once; with ``start=False`` they
        wait for :meth:`start_handler`, for a sink that must hold the handler first: what
        follows ``init`` may already close the connection (a frame kept meanwhile that overflows
        its queue).
        """
        if channel_id in self.handlers:
            raise ValueError(f"channel {channel_id!r} already has a handler")
        handler = WebSocketHandler(
            channel_id, identity=identity, config=self.config, custom_handlers=self.custom_handlers,
            sink=sink, now=now, counters=self.counters, transport=transport,
        )
        handler.on_ack_at = self._on_ack_at
        self.handlers[channel_id] = handler
        self.counters.connections_opened += 1
        if identity is not None:
            self.registry.add(channel_id, identity.session_id, identity.user_id)
        if self.backplane is not None:
            self.backplane.channel_added(channel_id, identity)
        if start:
            self.start_handler(handler)
        return handler

    def start_handler(self, handler: WebSocketHandler) -> None:
        """Queue the user's kept messages behind ``init`` (once per handler, see
        :meth:`create_handler`)."""
        channel_id, identity = handler.channel_id, handler.identity
        if self.handlers.get(channel_id) is not handler:
            return  # removed meanwhile
        arriving = self._arriving.pop(channel_id, None)
        if arriving is not None:
            user_id, head = arriving.user_id, arriving.head
            self._heads[channel_id] = "" if head is None else head.id
            floor = (0, 0)
            if head is not None:
                self._floors[channel_id] = floor = id_key(head.id)
                if not self.registry.user_channels(user_id) - {channel_id}:
                    self._cursors.advance(user_id, head.id, head.n)
            elif (not (self._blind and channel_id in self._blind)
                  and not self.registry.user_channels(user_id) - {channel_id}
                  and user_id not in self._cursors):
                # The bus said the history was empty at admission (not a blind admission, which
                # read nothing): the user's numbering starts after 0 (a history and its count
                # expire together), so what a bound drops before anything is handed over here
                # is counted at a gap (a jump from 0), as it is after a first entry.
                self._cursors.advance(user_id, "0", 0)
            if self.outbox_limits is not None and not (self._blind and channel_id in self._blind):
                # What it writes is acknowledged only as far as it wrote every entry after
                # the user's newest at its admission (what came before, its lease covers).
                self._writes.begin(channel_id, 0 if head is None else head.n, floor)
            self._replay_to([handler], user_id, arriving.entries, channel_id)
            for item in arriving.meanwhile:  # after the kept ones, before anything live
                entry = item.entry
                if entry is None or head is None or id_key(entry.id) > floor:
                    self._deliver_entry([handler], user_id, item.frame, entry)
                    if entry is not None:  # handed over here: its number is no gap later
                        self._cursors.advance(user_id, entry.id, entry.n)
        elif identity is not None and self.backplane is None and self.outbox_limits is not None:
            user_id = identity.user_id
            leased = self.outbox.lease(user_id, channel_id, time.monotonic(),
                                       lambda holder: holder in self.handlers)
            self._replay_to([handler], user_id, leased, channel_id)

    def _replay_to(self, handlers: list[WebSocketHandler], user_id: str,
                   entries: Sequence[Stamped], holder: str | None) -> None:
        """Queue entries of the user's history for ``handlers`` (each acknowledged once written),
        then end ``holder``'s lease once they are written: read, then acknowledge, so a
        connection or process that dies first loses nothing. The history may be longer than a
        connection's queue (``outbox_*`` against ``max_queue_*``): it is queued whole
        (:meth:`WebSocketHandler.replay`), bounded by the history's own bounds, never taken for
        a slow consumer."""
        if not entries:
            return
        marks = []
        for handler in handlers:
            base = handler.accepted
            for entry in entries:
                if handler.replay(entry.frame):
                    self._writes.record(handler.channel_id, handler.accepted, user_id, entry.id,
                                        entry.n)
                    self._arm(handler, handler.accepted)
            marks.append((handler, base))
        if holder is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._settle_written(marks, user_id, [e.id for e in entries], holder))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_written(self, marks: list[tuple[WebSocketHandler, int]], user_id: str,
                              ids: list[str], holder: str) -> None:
        age = self.outbox_limits.max_age if self.outbox_limits is not None else 60.0
        written = 0
        for handler, base in marks:  # bounded: each wait ends by the outbox age at the latest
            flushed = await handler.wait_flushed(base + len(ids), age)
            written = max(written, min(len(ids), flushed - base))
        upto = ids[written - 1] if written > 0 else None
        if self.backplane is not None:
            await self.backplane.settle(user_id, holder, upto)
        else:
            self.outbox.settle(user_id, holder, upto)

    def _deliver_entry(self, handlers: Sequence[WebSocketHandler], user_id: str, frame: bytes,
                       entry: Stamped | None, ignore_channel: str | None = None) -> int:
        """Deliver a per-user frame to ``handlers``; an entry of the user's history is
        recorded, to be acknowledged once written, and skipped by a channel that had it from
        the history (its floor)."""
        if entry is None:
            return self.deliver_local(handlers, frame, ignore_channel)
        floors = self._floors
        if floors:
            key = id_key(entry.id)
            keep = []
            for handler in handlers:
                floor = floors.get(handler.channel_id)
                if floor is None:
                    keep.append(handler)
                elif key > floor:
                    del floors[handler.channel_id]  # past it: live from now on
                    keep.append(handler)
            handlers = keep
        delivered = self._deliver_kept(handlers, frame, ignore_channel)
        blind = self._blind
        for handler in handlers:
            if handler.channel_id != ignore_channel and not handler.queue.closed and not (
                    blind and handler.channel_id in blind):
                self._writes.record(handler.channel_id, handler.accepted, user_id, entry.id,
                                    entry.n)
                self._arm(handler, handler.accepted)
        return delivered

    def _arm(self, handler: WebSocketHandler, position: int) -> None:
        """An entry of the user's history is the channel's frame number ``position``: the
        acknowledgement pass looks at the channel once its transport has written it."""
        at = handler.ack_at
        if at and (at <= position or at == ACK_PARKED):
            return  # it waits for an earlier frame, or is to be looked at already
        handler._through = None  # frames_done must see every frame written from now on
        if handler.flushed >= position:
            handler.ack_at = ACK_PARKED
            self._channel_written(handler.channel_id)
        else:
            handler.ack_at = position

    def _channel_written(self, channel_id: str) -> None:
        """The channel's transport wrote the entry it waited for (``handler.on_ack_at``)."""
        self._dirty.add(channel_id)
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_INTERVAL, self._ack_now)

    def _ack_now(self) -> None:
        """Acknowledge what the connections wrote since the last time (per user, the last
        entry): only channels that wrote a recorded entry meanwhile are looked at, each then
        waiting for its next one."""
        self._ack_timer = None
        handlers, writing = self.handlers, self._writing
        channels = list(self._dirty)
        self._dirty.clear()

        def flushed(channel_id: str) -> int | None:
            # A connection closing (remove_handler's ``writing``) still counts: taken for gone,
            # its records would be dropped, and the user's next connection given again what it
            # wrote.
            handler = handlers.get(channel_id) or writing.get(channel_id)
            return None if handler is None else handler.flushed

        if len(self._writes):
            for user_id, upto in self._writes.written(flushed, channels).items():
                self._ack(user_id, upto)
        if len(self._marks):
            for user_id, kid in self._marks.written(flushed, channels).items():
                self.outbox.ack(user_id, kid)
        for channel_id in channels:
            handler = handlers.get(channel_id)
            if handler is None:
                continue
            handler.ack_at = 0
            first = self._writes.first(channel_id)
            queued = self._marks.first(channel_id)
            if queued is not None and (first is None or queued < first):
                first = queued
            if first is not None:
                self._arm(handler, first)

    def _ack(self, user_id: str, upto: str | int) -> None:
        if self.backplane is not None:
            self.backplane.ack(user_id, str(upto))
        else:
            self.outbox.ack(user_id, upto)

    def remove_handler(self, channel_id: str, exc: ConnectionClosed | None = None, *,
                       writing: bool = False) -> None:
        """Remove a channel's handler: its pending requests fail with ``exc`` (by default a
        ``ConnectionClosed``), its handler tasks are cancelled, its registry entries go.

        ``writing``: the connection still writes what it had queued before its close frame; what
        of the user's history it wrote is settled by :meth:`handler_written` once it is done.
        """
        handler = self.handlers.pop(channel_id, None)
        self.registry.remove(channel_id)
        if handler is not None:
            if writing:
                self._writing[channel_id] = handler
            else:
                self._settle_channel(channel_id, handler)
            self._floors.pop(channel_id, None)
            self._heads.pop(channel_id, None)
            self._blind.discard(channel_id)
            self._dirty.discard(channel_id)
            handler.ack_at = 0
            identity = handler.identity
            if identity is not None and not self.registry.user_channels(identity.user_id):
                self._cursors.forget(identity.user_id)
            if self.backplane is not None:
                self.backplane.channel_removed(channel_id, handler.identity)
            exc = exc or ConnectionClosed(CloseCode.NORMAL, "handler removed")
            self.counters.count(self.counters.close_codes, exc.code)
            handler.shutdown(exc)
            if self.hooks is not None:
                self.hooks.disconnected(handler, exc)

    def handler_written(self, channel_id: str) -> None:
        """A connection removed while ``writing`` (:meth:`remove_handler`) wrote what it could:
        settle its part of the user's history by what it really wrote."""
        handler = self._writing.pop(channel_id, None)
        if handler is not None:
            self._settle_channel(channel_id, handler)

    async def written_before_close(self, channel_id: str, timeout: float) -> None:
        """A connection the server closes wrote what it had queued, and its close frame is
        next: settle its part of the user's history (as :meth:`handler_written`) and wait,
        at most ``timeout`` seconds, until the bus has the acknowledgement. A client that
        reconnects on another process once it has the close frame then gets nothing it read
        again. Waits for nothing without a backplane (acknowledged here at once)."""
        if channel_id not in self._writing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.backplane is not None:
            # This process's sends the connection had before the bus numbered them are recorded
            # once the bus answers: settled without them, they would go to the next connection.
            await self.backplane.answered(timeout)
        handler = self._writing.pop(channel_id, None)
        if handler is None:
            return
        published = self._settle_channel(channel_id, handler)
        if published is not None:
            await asyncio.wait((asyncio.ensure_future(published),),
                               timeout=max(0.0, deadline - loop.time()))

    def _settle_channel(self, channel_id: str,
                        handler: WebSocketHandler) -> Awaitable[Any] | None:
        # What it wrote is acknowledged; what it had queued and not written is not, so the
        # user's next connection gets it (unless another connection of theirs wrote it).
        # With a backplane, at once (not behind an acknowledgement of the user on its way): a
        # client may reconnect on another process as soon as it sees the close. The result:
        # when the bus has it.
        flushed = handler.flushed
        published = None
        written = self._writes.close(channel_id, flushed) if len(self._writes) else {}
        run = self._writes.end(channel_id)
        identity = handler.identity
        if (self.backplane is not None and identity is not None and flushed
                and self.outbox_limits is not None
                and not (self._blind and channel_id in self._blind)):
            # The bus may number sends it wrote after this settle (see ClosedWrites), as far
            # as its run allows.
            self._closed_writes.close(channel_id, flushed, time.monotonic(), run)
        for user_id, upto in written.items():
            if self.backplane is None or identity is None or user_id != identity.user_id:
                self._ack(user_id, upto)
        if self.backplane is not None and identity is not None:
            last = written.get(identity.user_id)
            published = self.backplane.ack_closing(identity.user_id,
                                                   None if last is None else str(last))
        if len(self._marks):
            mark = self._marks.close(channel_id, flushed)
            if mark is not None:
                self.outbox.ack(*mark)
        return published

    def get_user_channels(self, user_id: str) -> set[str]:
        """Connected channels of a user, on this process (see ``get_all_user_channels``)."""
        return self.registry.user_channels(user_id)

    async def get_all_user_channels(self, user_id: str) -> set[str]:
        """Connected channels of a user on every process sharing the backplane (without one,
        the same as ``get_user_channels``). Raises ``BackplaneError`` if the bus is unreachable."""
        if self.backplane is None:
            return self.registry.user_channels(user_id)
        return await self.backplane.user_channels(user_id)

    # ------------------------------------------------------------------ sending

    async def send_message(
        self, channel_id: str, message: LoosePayload | BaseModel, custom: bool = False
    ) -> None:
        """Send a message to one channel. Raises ``UnknownChannel`` if no such channel is
        connected (Dara returned ``None`` silently), ``SlowConsumer``, ``ConnectionClosed``."""
        frame = build_frame(message, custom=custom)
        handler = self.handlers.get(channel_id)
        if handler is not None:
            if not handler.offer(frame):
                await handler.enqueue_slow(frame)
            return
        if self.backplane is not None:
            await self.backplane.send_to_channel(channel_id, frame)
            return
        raise UnknownChannel(channel_id)

    async def broadcast(
        self,
        message: LoosePayload | BaseModel,
        custom: bool = False,
        ignore_channel: str | None = None,
    ) -> None:
        """Send a message to every connected client except ``ignore_channel``."""
        frame = build_frame(message, custom=custom)
        backplane = self._started_backplane()
        self.deliver_to_all(frame, ignore_channel)
        if backplane is not None:
            await backplane.broadcast(frame, ignore_channel)

    async def send_message_to_user(
        self,
        user_id: str,
        message: LoosePayload | BaseModel,
        custom: bool = False,
        ignore_channel: str | None = None,
    ) -> bool:
        """Send a message to every channel of a user except ``ignore_channel``.

        A user connected nowhere is not an error. With the outbox on
        (``ServerConfig.outbox_*``; :mod:`dara_ws_core.outbox`) the message is appended to the
        user's history (without ``ignore_channel``): a connection of the user that does not
        write it (connected nowhere, closed first, cut off from the bus) leaves it to the next
        one, on whichever process it lands.

        Returns ``False`` when the message was to be kept and was not: its sender (the user
        whose frame is being handled, or an anonymous connection's address; server code outside
        any connection is nobody's) has its share waiting (``outbox_per_sender`` messages, a
        16th of ``outbox_users`` and of ``outbox_total_bytes``; less once the outbox is nearly
        full), the outbox is full of messages waiting for their users, or the frame alone is
        over ``outbox_bytes``. The
        user's connections got it live all the same; ``True`` otherwise. Never raises for that.

        With a backplane the bounds are the bus's, checked where it appends, and the call does
        not wait for its answer: it returns ``False`` while the bus's last answer for that
        sender (or for the outbox as a whole) was a refusal. The messages already on their
        way when a bound is reached are refused by the bus after the call returned ``True``
        (counted in ``backplane.stats.outbox_refused`` and logged). A message to be kept
        that the bus fails (or that is sent while it is unreachable) waits in the backplane's
        bounded spool and is kept once the bus answers (while the spool is in use, the bus
        unreachable or refusing writes, a sender holds at most a 16th of the spool, in count and
        in bytes: beyond, ``False``, delivered live only); it raises ``BackplaneError`` only
        when the spool is full, or once the backplane's ``stop()`` ended its publishing (it
        could not be kept; the user's connections on this process got it already)."""
        frame = build_frame(message, custom=custom)
        # A send that skips a channel is not kept: who it is for depends on a live channel.
        keep = self.outbox_limits if ignore_channel is None else None
        backplane = self._started_backplane()
        if backplane is None:
            if keep is None:
                self.deliver_to_user(user_id, frame, ignore_channel)
                return True
            sender, address = self._sender()
            return self._send_kept(user_id, frame, sender, address)
        sender = address = None
        kept = True
        if keep is not None:
            sender, address = self._sender()
            if not backplane.keeps(sender, address, user_id):  # over a bound, the bus said: not offered
                keep, kept = None, False
        handlers = self.handlers
        local = [handlers[c] for c in self.registry.user_channels(user_id) if c in handlers]
        held = self._held.get(user_id) if self._held and ignore_channel is None else None
        arrival = None
        if held is not None and self._has_room(held, frame):
            # Held after a gap: recorded once really delivered (recover), not acknowledged now.
            waiting: _HeldFrame | None = held.add(frame, None, own=True)
        else:
            waiting = None
            self.deliver_local(local, frame, ignore_channel)
            if held is None and self._arriving:  # a channel of the user being admitted
                arrival = self._meanwhile(user_id, frame, None, keep is not None)
        stamped = None
        if keep is not None:  # numbered by the bus: acknowledged once it tells
            stamped = self._when_stamped(user_id, frame, local, waiting, ignore_channel,
                                         arrival=arrival)
        # False also when the sender's share had room for a message, not for this one's bytes.
        return await backplane.send_to_user(user_id, frame, ignore_channel, keep, stamped,
                                                 sender=sender, address=address) and kept

    def _started_backplane(self) -> Backplane | None:
        """The backplane, once it says it is started (its ``check_started()``, when it has one,
        raises ``RuntimeError`` before): checked before a broadcast or a per-user send delivers
        anything here, so that the call that raises delivered nothing, and a retry once the
        backplane is started sends each connection the message once."""
        backplane = self.backplane
        if backplane is not None:
            check: Callable[[], None] | None = getattr(backplane, "check_started", None)
            if check is not None:
                check()
        return backplane

    def _sender(self) -> tuple[str | None, str | None]:
        """Who a kept message is charged to, and from which address: the connection whose frame
        is being handled, by its identity and address (:func:`sender_of`, :func:`address_of`),
        from the context its tasks inherit (also once the connection is gone); ``None`` and
        ``None`` outside any connection (server code)."""
        if current_channel.get(None) is None:
            return None, None
        source = current_source.get()
        return sender_of(current_identity.get(None), source), address_of(source)

    def _when_stamped(self, user_id: str, frame: bytes, local: list[WebSocketHandler],
                      waiting: _HeldFrame | None, ignore_channel: str | None, *,
                      arrival: _HeldFrame | None = None) -> Callable[[Stamped], None]:
        """What to do once the bus has numbered a per-user send from here (``local``: the
        user's channels here, which got it; ``waiting``: it is held for them instead;
        ``arrival``: it waits for channels of the user being admitted, which skip it if their
        lease had it): record it, to be acknowledged once written, and hand it to channels of
        the user admitted meanwhile that did not get it (:meth:`_admitted_during`)."""
        admissions = self._admissions
        # Channels of the user being admitted now get the frame after their lease.
        arriving = [c for c, a in self._arriving.items() if a.user_id == user_id] if (
            self._arriving) else []
        if not local and waiting is None:  # the common case: nothing to record

            def admitted_only(entry: Stamped) -> None:
                if arrival is not None:
                    arrival.entry = entry
                if admissions != self._admissions:
                    self._admitted_during(user_id, frame, entry, set(arriving))

            return admitted_only
        handlers = self.handlers
        blind = self._blind
        marks = [] if waiting is not None else [
            (h.channel_id, h.accepted) for h in local
            if not h.queue.closed and h.channel_id != ignore_channel
            and not (blind and h.channel_id in blind)]

        def stamped(entry: Stamped) -> None:
            self._cursors.own(user_id, entry.id, entry.n)
            if arrival is not None:
                arrival.entry = entry
            if waiting is not None:
                waiting.entry = entry
                return
            for channel_id, position in marks:
                # Closing: settled once its close frame is next (written_before_close waits for
                # this answer). Gone meanwhile: its part of the history was settled without this
                # entry; acknowledged now if it had written it (and every entry before it),
                # else its next connection gets it.
                handler = handlers.get(channel_id) or self._writing.get(channel_id)
                if handler is not None:
                    self._writes.record(channel_id, position, user_id, entry.id, entry.n)
                    self._arm(handler, position)
                else:
                    upto = self._closed_writes.acknowledges(channel_id, position, entry,
                                                            time.monotonic())
                    if upto is not None:
                        self._ack(user_id, upto)
            if admissions != self._admissions:
                self._admitted_during(user_id, frame, entry,
                                      {h.channel_id for h in local}.union(arriving))

        return stamped

    def _admitted_during(self, user_id: str, frame: bytes, entry: Stamped,
                         known: set[str]) -> None:
        """A send from here was numbered by the bus after channels of its user were admitted
        (``known``: the user's channels when it was sent, which had it). The bus may have leased
        the history to a new one before appending the entry, and it never comes back to this
        process live: a channel whose newest entry at admission is older gets it now (one
        still arriving, after its lease, where its floor decides)."""
        key = id_key(entry.id)
        item = _HeldFrame(frame, entry)
        for channel_id, arriving in self._arriving.items():
            if arriving.user_id == user_id and channel_id not in known:
                arriving.meanwhile.append(item)
        handlers = self.handlers
        heads = self._heads
        late = [handlers[c] for c in self.registry.user_channels(user_id)
                if c in handlers and c not in known and c in heads
                and (not heads[c] or id_key(heads[c]) < key)]
        if late:
            self._cursors.own(user_id, entry.id, entry.n)
            self._deliver_entry(late, user_id, frame, entry)

    def _send_kept(self, user_id: str, frame: bytes, sender: str | None,
                   address: str | None) -> bool:
        """A per-user send kept in this process's outbox (no backplane), charged to ``sender``
        and ``address``:
        appended, handed to the user's channels, then acknowledged at once if one of them wrote
        it synchronously (the user has it: nothing to remember for a closing connection), else
        once written. Without a backplane no delivery is held, deduplicated or floored, so none
        of that is consulted. Whether it was kept."""
        outbox = self.outbox
        refused, by_sender = outbox.refused, outbox.refused_sender
        kid = outbox.add(user_id, frame, time.monotonic(), sender, address)
        if outbox.refused != refused:
            _refused(outbox, outbox.refused_sender != by_sender)
        handlers = self.handlers
        local = [handlers[c] for c in self.registry.user_channels(user_id) if c in handlers]
        if not local:
            return kid != 0
        if not kid:
            self.deliver_local(local, frame)
            return False
        self._deliver_kept(local, frame)
        for handler in local:
            if handler.wrote_all():
                self.outbox.ack(user_id, kid)  # written already, everything before it too
                return True
        marks = self._marks
        for handler in local:
            if not handler.queue.closed:
                marks.record(handler.channel_id, handler.accepted, user_id, kid)
                # Corked, it counts as written already: the acknowledgement pass looks at it
                # after the loop's flush, which un-counts it if the library dropped it.
                self._arm(handler, handler.accepted)
        return True

    def send_and_wait(
        self,
        channel_id: str,
        message: LoosePayload | BaseModel,
        custom: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Coroutine[Any, Any, Any]:
        """Send a request to a channel and return the client's answer.

        Raises ``UnknownChannel``, ``RequestTimeout``, ``ConnectionClosed`` (at once when the
        client disconnects), ``ChunkError``, ``TooManyPendingRequests`` (see the handler's method),
        and ``TypeError`` for a ``timeout`` that is not a number or ``None`` (nothing is sent).
        A coroutine to await, as an ``async def`` gives: for a channel of this process, the
        handler's request itself, without one more coroutine around it.
        """
        handler = self.handlers.get(channel_id)
        if handler is not None:
            # handler.send_and_wait's own test, here (one call less), unless a subclass (from
            # an overridden create_handler) may have its own send_and_wait.
            if handler.counters.telemetry is None and type(handler) is WebSocketHandler:
                return handler._request(None, "", timeout, message, custom)
            return handler.send_and_wait(message, custom=custom, timeout=timeout)
        return self._send_and_wait_elsewhere(channel_id, message, custom, timeout)

    async def _send_and_wait_elsewhere(
        self, channel_id: str, message: LoosePayload | BaseModel, custom: bool, timeout: float | None
    ) -> Any:
        handler = self.handlers.get(channel_id)  # it may have connected since the call
        if handler is not None:
            return await handler.send_and_wait(message, custom=custom, timeout=timeout)
        if self.backplane is not None:
            if timeout is _DEFAULT:
                timeout = self.config.request_timeout
            return await self.backplane.request(channel_id, message, custom, timeout)
        raise UnknownChannel(channel_id)

    def deliver_local(
        self, handlers: Collection[WebSocketHandler], frame: bytes, ignore_channel: str | None = None
    ) -> int:
        """Deliver one encoded frame to local handlers without waiting (the one fan-out that
        broadcasts, per-user sends and the backplane use); returns how many got it.

        A full queue never delays the others: its channel applies its policy at once
        (:meth:`WebSocketHandler.push`). Closed channels are skipped. Never raises.
        """
        telemetry = self.counters.telemetry
        if telemetry is not None:  # one traced operation for the whole fan-out
            return telemetry.fan_out(self._deliver, handlers, frame, ignore_channel)  # type: ignore[no-any-return]
        return self._deliver(handlers, frame, ignore_channel)

    def _deliver_kept(
        self, handlers: Collection[WebSocketHandler], frame: bytes, ignore_channel: str | None = None
    ) -> int:
        """:meth:`deliver_local` for a frame the per-user history keeps until it is written: never
        through a transport's unchecked ``writer`` (``SupportsWriter``). A library may close a
        connection before its transport can clear the writer (picows' own close frame, 10 ms
        before it tells its listener), and a frame written in that window is dropped yet counted
        as written: the history would acknowledge what the user never got. ``send_nowait``
        checks the connection's state for each frame. A frame corked and then dropped by the
        library is un-counted at the flush (``ConnectionDriver.flush``)."""
        telemetry = self.counters.telemetry
        if telemetry is not None:
            return telemetry.fan_out(self._deliver_checked, handlers, frame, ignore_channel)  # type: ignore[no-any-return]
        return self._deliver(handlers, frame, ignore_channel, False)

    def _deliver_checked(self, handlers: Collection[WebSocketHandler], frame: bytes,
                         ignore_channel: str | None) -> int:
        return self._deliver(handlers, frame, ignore_channel, False)

    def _deliver(
        self, handlers: Collection[WebSocketHandler], frame: bytes, ignore_channel: str | None,
        unchecked: bool = True,
    ) -> int:
        counters = self.counters
        delivered = 0
        fan_out = _handler.fan_out_through
        if unchecked and fan_out is not None and counters.telemetry is None:  # (with telemetry, sinks count each one)
            through = fan_out(handlers, frame,
                              None if ignore_channel is None else self.handlers.get(ignore_channel), counters)
            if through is not None:  # written through: what it did not write is offered below
                delivered, handlers = through
        full: list[WebSocketHandler] | None = None
        for handler in handlers:
            if handler.channel_id == ignore_channel:
                continue
            try:
                if handler.offer(frame):
                    delivered += 1
                    continue
            except ConnectionClosed:  # a closed channel is skipped (cheaper asked than checked)
                continue
            if full is None:
                full = [handler]
            else:
                full.append(handler)
        # After the loop: a disconnect removes the handler from the dict being iterated.
        if full is not None:
            delivered += sum(handler.push(frame) for handler in full)
        return delivered

    # ------------------------------------------------------------------ for the backplane

    def deliver_to_channel(self, channel_id: str, frame: bytes) -> bool:
        """Hand an encoded frame to one local channel without waiting; ``False`` if it is not
        connected here (or closed, or dropped by its slow-consumer policy)."""
        handler = self.handlers.get(channel_id)
        return handler is not None and self.deliver_local((handler,), frame) == 1

    def deliver_to_user(self, user_id: str, frame: bytes, ignore_channel: str | None = None,
                        entry: Stamped | None = None) -> int:
        """Hand an encoded frame to the user's local channels but ``ignore_channel``, without
        waiting; returns how many got it. ``entry``: the entry of the user's history it is
        (handed over once: one the user's channels here had already is skipped)."""
        handlers = self.handlers
        local = [handlers[c] for c in self.registry.user_channels(user_id) if c in handlers]
        held = self._held.get(user_id) if self._held else None
        if held is not None and ignore_channel is None:
            if self._has_room(held, frame):
                held.add(frame, entry)  # after a gap: once what it missed is out (recover)
                return len(local)
            # Beyond the bound: delivered now, the last entry handed over left where it was
            # (the recovery may hand it over again: a duplicate rather than a loss).
            return self._deliver_entry(local, user_id, frame, entry)
        if entry is not None and local:
            backplane = self.backplane
            if backplane is not None and self._cursors.missing(user_id, entry.id, entry.n):
                # Entries before it never came: read them from the history first (held meanwhile).
                self._hold(user_id).add(frame, entry)
                backplane.resync(user_id)
                return len(local)
            if not self._cursors.fresh(user_id, entry.id, entry.n):
                return 0  # recovered from the history already
        delivered = self._deliver_entry(local, user_id, frame, entry, ignore_channel)
        if self._arriving and self._meanwhile(user_id, frame, entry) is not None:
            delivered += 1
        return delivered

    def _meanwhile(self, user_id: str, frame: bytes, entry: Stamped | None,
                   own: bool = False) -> _HeldFrame | None:
        """Channels of the user being admitted get the frame after what they leased from the
        history (``own``: a send from here the bus will number, see :meth:`admit`); the item
        they share, ``None`` if none is being admitted."""
        item = None
        for arriving in self._arriving.values():
            if arriving.user_id == user_id:
                if item is None:
                    item = _HeldFrame(frame, entry, own)
                arriving.meanwhile.append(item)
        return item

    def _has_room(self, held: _Held, frame: bytes) -> bool:
        """Whether one more delivery may be held for a user (``max_queue_messages`` frames and
        ``max_queue_bytes`` bytes, as a connection's queue)."""
        config = self.config
        return len(held) < config.max_queue_messages and (
            held.size + len(frame) <= config.max_queue_bytes)

    def hold_users(self) -> list[str]:
        """Hold back per-user deliveries to every user with a channel here until
        :meth:`recover` (for the backplane, after a gap: what is recovered goes first). Bounded:
        ``max_queue_messages`` frames and ``max_queue_bytes`` per user (beyond, delivered at
        once) and
        ``handshake_timeout`` seconds (then released as they are)."""
        for handler in self.handlers.values():
            if handler.identity is not None:
                self._hold(handler.identity.user_id)
        return list(self._held)

    def _hold(self, user_id: str) -> _Held:
        held = self._held.get(user_id)
        if held is None:
            held = self._held[user_id] = _Held()
        if self._hold_timer is None:
            self._hold_timer = asyncio.get_running_loop().call_later(
                self.config.handshake_timeout, self._release_held)
        return held

    def _release_held(self) -> None:
        self._hold_timer = None
        for user_id in list(self._held):
            self.recover(user_id, (), 0)

    def still_missing(self, user_id: str) -> bool | None:
        """Whether the deliveries held for the user since a gap was noticed in their numbers
        still skip some, now that the bus has numbered this process's own earlier sends (for
        the backplane, before it reads the user's history); ``None`` while a send of this
        process held before one of them is not numbered yet (it may be a number skipped)."""
        held = self._held.get(user_id)
        if not held:
            return False
        entries = []
        unknown = False
        for item in held:
            if item.own:
                unknown = unknown or item.entry is None
            elif item.entry is not None:
                if unknown:
                    return None
                entries.append(item.entry)
        return self._cursors.skips(user_id, entries)

    def delivered_upto(self, user_id: str) -> str | None:
        """The last entry of the user's history handed to the user's channels here."""
        return self._cursors.last(user_id)

    def recover(self, user_id: str, entries: Sequence[Stamped], head: int) -> tuple[int, int]:
        """Hand the user's channels here the entries of their history they missed (after the
        last one handed over), then the deliveries held meanwhile (each entry once), and stop
        holding them back. Returns (entries handed over, entries a bound dropped first)."""
        held = self._held.pop(user_id, ())
        if not self._held and self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        handlers = [self.handlers[c] for c in self.registry.user_channels(user_id)
                    if c in self.handlers]
        if not handlers:
            return 0, 0
        seen = self._cursors.seen(user_id)
        missed, lost = self._cursors.recover(user_id, entries, head)
        for kept in missed:
            self._deliver_entry(handlers, user_id, kept.frame, kept)
        if lost and seen is not None:
            # Dropped by a bound before they could be handed over: no connection can write
            # them, so they no longer hold back what the user's channels here acknowledge.
            for handler in handlers:
                upto = self._writes.cover(handler.channel_id, seen + 1, seen + lost)
                if upto is not None:
                    self._ack(user_id, upto)
        for item in held:
            entry = item.entry
            # This process's own sends are not in what was recovered (own entries): handed over
            # as they are, recorded now, so acknowledged once written.
            if item.own or entry is None or self._cursors.fresh(user_id, entry.id, entry.n):
                self._deliver_entry(handlers, user_id, item.frame, entry)
        return len(missed), lost

    def users_gapped(self, gaps: dict[str, Gap]) -> None:
        """Tell ``on_gap`` (if set) which users may have missed messages."""
        callback = self.on_gap
        if callback is None:
            return
        for user_id, gap in gaps.items():
            try:
                callback(user_id, gap)
            except Exception:
                logger.exception("on_gap failed", extra={"user": user_id})

    def deliver_to_all(self, frame: bytes, ignore_channel: str | None = None) -> int:
        """Hand an encoded frame to every local channel but ``ignore_channel``, without waiting;
        returns how many got it."""
        return self.deliver_local(self.handlers.values(), frame, ignore_channel)

    async def serve_relayed_request(
        self, channel_id: str, frame: bytes, rchan: str, timeout: float | None
    ) -> Any:
        """Send a request another process encoded (``frame``, its ``__rchan`` being ``rchan``)
        to a local channel byte for byte, and return the client's answer. Raises
        ``UnknownChannel`` if the channel is not here, else what ``send_and_wait`` raises."""
        handler = self.handlers.get(channel_id)
        if handler is None:
            raise UnknownChannel(channel_id)
        return await handler.send_and_wait_frame(frame, rchan, timeout)

    def close_local(self, scope: str, target: str, code: int, reason: str,
                    spare: Callable[[str], bool] | None = None) -> int:
        """Close this process's connections of a user, a session or one channel, but those
        ``spare`` answers ``True`` for (by channel id); how many. Never publishes (the backplane
        calls it for another process's command)."""
        if scope == "channel":
            channels = {target}
        elif scope == "user":
            channels = self.registry.user_channels(target)
        else:
            channels = self.registry.session_channels(target)
        closed = 0
        for channel_id in channels:
            handler = self.handlers.get(channel_id)
            if handler is not None and (spare is None or not spare(channel_id)):
                handler.close(code, reason)
                closed += 1
        return closed

    async def admit(self, channel_id: str, identity: Identity) -> bool:
        """Admit a new channel of ``identity`` before its handler is created (the endpoint calls
        it). With a backplane, one atomic step on the bus refuses it if the user has
        ``max_connections_per_user`` channels on all processes, else registers it and takes the
        user's outbox, which :meth:`create_handler` hands to it first (user messages arriving
        meanwhile follow). If the bus is unreachable (or slow), the channel is admitted on the
        local count only (logged), without the user's outbox: what it writes is then never
        acknowledged (entries it never had may come first), and a lease the bus still gives it
        later is released at once. Without a backplane: ``True`` at once, without awaiting."""
        backplane = self.backplane
        if backplane is None:
            return True
        limit = self.config.max_connections_per_user
        user_id = identity.user_id
        self._arriving[channel_id] = _Arriving(user_id)
        self._admissions += 1
        attach = asyncio.ensure_future(backplane.attach(channel_id, user_id, limit,
                                                        self.outbox_limits))
        try:
            async with asyncio.timeout(max(1.0, self.config.handshake_timeout / 2)):
                attachment = await asyncio.shield(attach)
        except (BackplaneError, TimeoutError) as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # (Python 3.11: see wait_event)
                self._arriving.pop(channel_id, None)
                attach.add_done_callback(lambda done: self._attached_late(done, channel_id, user_id))
                raise asyncio.CancelledError from None
            logger.warning("backplane unreachable at connect (%s): channel admitted on the "
                           "local count only, its user's outbox not read", exc or "timeout",
                           extra={"channel": channel_id, "user": user_id})
            self._blind.add(channel_id)
            attach.add_done_callback(lambda done: self._attached_late(done, channel_id, user_id))
            return True
        except BaseException:
            self._arriving.pop(channel_id, None)
            attach.add_done_callback(lambda done: self._attached_late(done, channel_id, user_id))
            raise
        if not attachment.admitted:
            self._arriving.pop(channel_id, None)
            return False
        arriving = self._arriving.get(channel_id)
        if arriving is not None:
            arriving.entries.extend(attachment.entries)
            arriving.head = attachment.head
            if any(item.own and item.entry is None for item in arriving.meanwhile):
                # A send from here the bus ran before this admission is in the lease too:
                # handed over before its number is known, it would reach the channel twice.
                # Sends made from now on are numbered after the admission (not leased).
                try:
                    await backplane.answered(max(1.0, self.config.handshake_timeout / 2))
                except BaseException:
                    self.abandon(channel_id, identity)
                    raise
        elif attachment.entries:  # abandoned meanwhile: the next connection gets them
            await backplane.settle(user_id, channel_id, None)
        return True

    def _attached_late(self, done: asyncio.Future[Any], channel_id: str, user_id: str) -> None:
        """The bus ran the admission of a channel that did not wait for it (timed out, or
        cancelled): a lease it took is released (nobody hands those entries to the channel),
        capped for the user's next connection (:meth:`UserOutbox.settle`)."""
        if done.cancelled() or done.exception() is not None:
            return
        attachment = done.result()
        if attachment.admitted and attachment.entries and self.backplane is not None:
            task = asyncio.get_running_loop().create_task(
                self.backplane.settle(user_id, channel_id, None))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    def abandon(self, channel_id: str, identity: Identity) -> None:
        """A channel admitted by :meth:`admit` ended (call it when its connection is over):
        if it never got a handler, its bus registration is released."""
        arriving = self._arriving.pop(channel_id, None)
        self._blind.discard(channel_id)
        if arriving is not None and self.backplane is not None:
            self.backplane.channel_removed(channel_id, identity)
            if arriving.entries:  # leased, never delivered: void once unregistered
                logger.debug("outbox leased by a channel that never opened",
                             extra={"channel": channel_id})

    def local_channels(self) -> list[tuple[str, str | None]]:
        """A snapshot of this process's channels: ``(channel id, user id or None)``."""
        return [
            (channel_id, None if handler.identity is None else handler.identity.user_id)
            for channel_id, handler in self.handlers.items()
        ]

    # ------------------------------------------------------------------ observing

    def stats(self) -> ServerStats:
        """A snapshot of this process's server: connections, handshakes, close codes, traffic,
        slow consumers, queues, requests and handler outcomes, and the backplane's counters.

        Reads the running totals and walks the live connections once (queues, pending requests):
        cheap enough to call every second. Never raises.
        """
        return collect(self.counters, self.handlers.values(), self.backplane)

    # ------------------------------------------------------------------ disconnecting

    # With a backplane these reach every process, like python-socketio's ``disconnect`` with a
    # Redis manager: a revocation that stopped at this process would be a security gap. They stay
    # synchronous (callable from sync revocation hooks), so for the other processes they can only
    # queue the command; the ``*_everywhere`` coroutines wait until it is published.

    def close_channel(self, channel_id: str, code: int = CloseCode.NORMAL, reason: str = "") -> bool:
        """Close one connection; ``True`` if it was connected here. With a backplane, a channel
        connected elsewhere is closed by its process (queued: see
        :meth:`close_channel_everywhere`)."""
        handler = self.handlers.get(channel_id)
        if handler is None:
            if self.backplane is not None:
                self.backplane.disconnect("channel", channel_id, code, reason)
            return False
        handler.close(code, reason)
        return True

    def disconnect_user(
        self, user_id: str, code: int = CloseCode.POLICY_VIOLATION, reason: str = "revoked"
    ) -> int:
        """Close every connection of a user (logout, revocation); returns how many were here.
        With a backplane, every other process closes the user's connections too (queued behind
        what this process sent before; :meth:`disconnect_user_everywhere` waits for it)."""
        closed = self.close_local("user", user_id, code, reason)
        if self.backplane is not None:
            self.backplane.disconnect("user", user_id, code, reason)
        return closed

    def disconnect_session(
        self, session_id: str, code: int = CloseCode.POLICY_VIOLATION, reason: str = "revoked"
    ) -> int:
        """Close every connection of one session (one login); returns how many were here. With
        a backplane, on every process (see :meth:`disconnect_user`)."""
        closed = self.close_local("session", session_id, code, reason)
        if self.backplane is not None:
            self.backplane.disconnect("session", session_id, code, reason)
        return closed

    async def disconnect_user_everywhere(
        self, user_id: str, code: int = CloseCode.POLICY_VIOLATION, reason: str = "revoked"
    ) -> int:
        """:meth:`disconnect_user`, returning once the bus has taken the revocation: published
        to every process listening, and recorded, so that a process whose link was down at that
        moment closes the user's connections within a heartbeat of being back. Raises
        ``BackplaneError`` if the bus is unreachable: the revocation has not reached the other
        processes yet (the local connections are closed regardless; it waits in the
        backplane's spool, in room kept messages never take, and is sent once the bus answers).
        Raises :class:`~dara_ws_core.exceptions.RevocationNotKept` (a ``BackplaneError``) if it
        could not even be spooled (that room full of other targets, or the backplane stopping):
        the other processes will not close the user's connections; revoke again later."""
        return await self._everywhere("user", user_id, code, reason)

    async def disconnect_session_everywhere(
        self, session_id: str, code: int = CloseCode.POLICY_VIOLATION, reason: str = "revoked"
    ) -> int:
        """:meth:`disconnect_session`, returning once published (see
        :meth:`disconnect_user_everywhere`)."""
        return await self._everywhere("session", session_id, code, reason)

    async def close_channel_everywhere(
        self, channel_id: str, code: int = CloseCode.NORMAL, reason: str = ""
    ) -> bool:
        """:meth:`close_channel`, returning once published; ``True`` if it was here."""
        return bool(await self._everywhere("channel", channel_id, code, reason))

    async def _everywhere(self, scope: str, target: str, code: int, reason: str) -> int:
        closed = self.close_local(scope, target, code, reason)
        if self.backplane is not None and not (scope == "channel" and closed):
            await self.backplane.disconnect(scope, target, code, reason)
        return closed


def get_user_channels(user_identifier: str, manager: WebsocketManager) -> set[str]:
    """Get connected websocket channels associated with a given user (the seed's function).

    Takes the manager explicitly: there is no module-level registry to share.
    """
    return manager.get_user_channels(user_identifier)


def _refused(outbox: UserOutbox, by_sender: bool) -> None:
    """Log a message the outbox refused (``by_sender``: its sender's share; else full of
    messages still waiting for their users): the first ten, then the 100th, 1,000th... A flood
    of sends to made-up users must not also flood the log."""
    count = outbox.refused
    if count > 10 and not _is_power_of_ten(count):
        return
    if by_sender:
        limits = outbox.limits
        logger.warning("a sender, or the senders of its address together, has its share of the "
                       "outbox waiting for their users (a sender: at most %d messages, "
                       "outbox_per_sender, and %d bytes, a %dth of outbox_total_bytes; an "
                       "address: a %dth of outbox_users and of outbox_total_bytes; less once the "
                       "outbox is nearly full): its message was delivered live but not kept (%d "
                       "refused so far)", limits.sender_messages, limits.sender_bytes,
                       SENDER_SHARES, ADDRESS_SHARES, count)
    else:
        logger.warning("the outbox is full (%d users, %d bytes, all waiting for their users): a "
                       "message was delivered live but not kept (%d so far); raise outbox_users or "
                       "outbox_total_bytes, or rate-limit who sends to users", outbox.users,
                       outbox.total_bytes, count)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _kind_of(backplane: object) -> str:
    """A backplane's kind for a repr: ``redis`` for ``RedisBackplane``, else its class name."""
    name = type(backplane).__name__
    return name.removesuffix("Backplane").lower() if name.endswith("Backplane") and name != "Backplane" else name
