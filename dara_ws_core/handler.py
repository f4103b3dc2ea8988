"""The per-connection handler: the seed's ``WebSocketHandler``, asyncio side of one channel.

It carries out what the connection's pure protocol object
(:class:`~dara_ws_core.connection.ServerConnection`) decides, and owns what needs a loop: the
bounded outbound queue and its slow-consumer policy, the futures of pending ``send_and_wait``
calls, and the tasks of custom handlers. It never touches a socket: frames and close decisions go
to its :class:`Sink`, the driver of the connection (:mod:`dara_ws_core.driver`), which is given
once, when the handler is created. A handler with no sink (in tests, or the seed's bare
``create_handler``) queues frames for whoever drains :attr:`WebSocketHandler.queue`.
"""

from __future__ import annotations

__all__ = ["Sink", "WebSocketHandler", "current_channel", "current_identity"]

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Mapping
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from .auth import Identity, holder_of
from .codec import build_frame, encode
from .config import ServerConfig, SlowConsumerPolicy
from .connection import (
    AnswerIgnored,
    CloseConnection,
    CustomReceived,
    Event,
    FrameDropped,
    RequestCompleted,
    RequestFailed,
    SendFrame,
    ServerConnection,
)
from .correlation import new_rchan
from .custom import CustomHandlerRegistry
from .exceptions import ChunkError, CloseCode, ConnectionClosed, RequestTimeout, SlowConsumer
from .logs import ConnectionLogger, current_source
from .queue import OutboundQueue
from .stats import TRACING, Counters

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .messages import ClientMessage, LoosePayload

logger = logging.getLogger("dara_ws_core")

#: The channel id / identity of the connection whose frame is being handled (like Dara's
#: ``WS_CHANNEL`` and ``USER`` context variables); set for custom handlers and their tasks.
current_channel: contextvars.ContextVar[str] = contextvars.ContextVar("dara_ws_channel")
current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("dara_ws_identity")

_DEFAULT: Any = object()
#: Peer-chosen identifiers are cut to this length in log records: a 16 MiB ``channel`` must not
#: become 16 MiB of log per record.
_LOGGED_ID = 64


class Sink(Protocol):
    """Where a handler's frames and close decisions go: the driver of its connection."""

    def write_now(self, frame: bytes) -> bool:
        """Write ``frame`` to the transport at once if that is possible without waiting and
        without overtaking frames already queued or being sent; ``False`` otherwise."""
        ...

    def frames_queued(self) -> None:
        """Frames were queued: drain them into the transport (starting a send task if needed)."""
        ...

    def write_at_once(self, frame: bytes) -> bool:
        """``write_now`` for a frame whose answer is awaited (a request): written now, after
        what is corked, never left for the end of the loop iteration; ``False`` otherwise."""
        ...

    def close(self, code: int, reason: str) -> None:
        """The connection decided to close: flush what is queued, close the transport."""
        ...


#: :attr:`WebSocketHandler.ack_at` once reached: told already, nothing to wait for.
ACK_PARKED = 1 << 62

#: ``WebSocketHandler._wrote`` of a connection whose driver cannot write through (no sink, or a
#: transport without ``send_nowait``): after every loop iteration's epoch.
NEVER_THROUGH = 1 << 62

#: The fan-out written through, when a driver that can do it is loaded (``driver.fan_out_through``
#: sets itself here at import): ``fan_out(handlers, frame, skip, counters)`` writes the
#: recipients it can (never ``skip``), and returns how many and the others, or ``None``. A hook
#: rather than an import because the manager sits below the driver: the driver imports the
#: manager's module.
FanOut = Callable[[Collection["WebSocketHandler"], bytes, "WebSocketHandler | None", Counters],
                  "tuple[int, list[WebSocketHandler]] | None"]
fan_out_through: FanOut | None = None

#: Charges the connection whose message caused a fan-out (the context's ``current_channel``) for
#: a frame its fan-out queued past a recipient's bounds: ``charge_origin(recipient, frame)``. The
#: driver sets it at import (a hook for the same reason as ``fan_out_through``); it holds that
#: connection back once its share of the burst is used (``ConnectionDriver.owe``).
ChargeOrigin = Callable[["WebSocketHandler", bytes], None]
charge_origin: ChargeOrigin | None = None


#: An enum member looked up once: ``SlowConsumerPolicy.DROP_OLDEST`` costs a class attribute
#: lookup through the enum's metaclass (about 100 ns), once per request where it is checked.
_DROP_OLDEST = SlowConsumerPolicy.DROP_OLDEST

#: What a server request's waiter holds when its timer ran out before the answer came: a
#: result, not an exception, so that a caller cancelled at the same moment leaves no
#: "exception never retrieved" behind. No answer can be it (answers are decoded JSON).
_EXPIRED: Any = object()


class _Deadlines:
    """The deadlines of one connection's pending requests behind a single timer, armed for the
    nearest: a request costs a dict entry, not a timer handle created and cancelled (plus its
    churn in the loop's heap). The timer is re-armed earlier only for a nearer deadline; when it
    fires it expires what is due and re-arms for the nearest left. Bounded by the pending
    requests' limit (each request removes its entry when it ends)."""

    __slots__ = ("_at", "_timer", "loop", "new_future", "now", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # The loop's clock and futures, once per request: on asyncio's own loops, time() is
        # time.monotonic() and create_future() is Future(loop=loop), each behind a Python call
        # of its own, so they are called directly. Any other loop (uvloop) keeps its methods.
        cls = type(loop)
        self.now: Callable[[], float] = (
            time.monotonic if cls.time is asyncio.BaseEventLoop.time else loop.time)
        self.new_future: Callable[[], asyncio.Future[Any]] = (
            partial(asyncio.Future, loop=loop) if cls.create_future is asyncio.BaseEventLoop.create_future
            else loop.create_future)
        self.pending: dict[asyncio.Future[Any], float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._at = 0.0

    # A request adds its deadline itself (``pending[waiter] = at``, then arm() if it is the
    # nearest): one Python call less per request.

    def arm(self, at: float) -> None:
        """Arm the timer for ``at``, nearer than the one armed, if any."""
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = self.loop.call_at(at, self._due)

    def _due(self) -> None:
        self._timer = None
        now = self.now()
        nearest: float | None = None
        for waiter, at in self.pending.items():
            if at <= now:
                if not waiter.done():
                    waiter.set_result(_EXPIRED)
            elif nearest is None or at < nearest:
                nearest = at
        if nearest is not None:
            self._at = nearest
            self._timer = self.loop.call_at(nearest, self._due)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _Hot:
    """The slots a fan-out reads and writes for every recipient (:func:`driver.fan_out_through`:
    ``_through``, ``_wrote`` and ``accepted``), and ``_behind``, which the checked path reads
    beside them when it hands the write back (the loop itself never touches it).

    A base class's slots come first in an instance, right after the object's header (each
    class's own are laid out sorted by name, which scattered these four over 120 bytes).
    Iterating over the handlers touches the header anyway, so a write through now touches one
    cache line of the handler, two at worst. With a thousand recipients, each send in between
    evicts the lines of the last: in-process k=1 fan-out to 1,000 picows connections went from
    1.10x to 1.02x a bare picows server's CPU time per delivery."""

    __slots__ = ("_behind", "_through", "_wrote", "accepted")


class WebSocketHandler(_Hot):
    """Represents a WebSocket connection to a given client (one channel).

    Create it through :meth:`WebsocketManager.create_handler`; the manager removes it when the
    connection ends, which fails its pending requests and cancels its handler tasks.
    """

    # CPython lays slots out sorted by name: ``unsent_requests``, rarely used, sorts last and
    # moves none of the others.
    __slots__ = ("_custom", "_deadlines", "_flush_goal", "_log", "_shut", "_sink", "_tasks", "ack_at", "channel_id",
                 "config", "connection", "counters", "identity", "on_ack_at", "queue", "transport",
                 "unsent_requests")

    def __init__(
        self,
        channel_id: str,
        *,
        identity: Identity | None = None,
        config: ServerConfig | None = None,
        custom_handlers: CustomHandlerRegistry | None = None,
        sink: Sink | None = None,
        now: float = 0.0,
        counters: Counters | None = None,
        transport: str = "unknown",
    ) -> None:
        self.channel_id = channel_id
        #: The transport's short name (``websockets``, ``memory``...; see ``transport_label``).
        self.transport = transport
        #: The manager's running totals, which this connection counts into.
        self.counters = counters = counters or Counters()
        self.identity = identity
        self.config = config = config or ServerConfig()
        self._custom = custom_handlers = custom_handlers or CustomHandlerRegistry()
        #: The protocol state of this connection (pure): every decision is made there.
        self.connection: ServerConnection[asyncio.Future[Any]] = ServerConnection(
            channel_id, config, now=now, kinds=custom_handlers,
            expires_at=None if identity is None else identity.expires_at,
            # Whose share of the chunk budget it holds: its user's, or its address's when
            # anonymous (the handshake's source, which the connection's tasks inherit).
            user=holder_of(identity, source := current_source.get()),
            address=source,
        )
        telemetry = counters.telemetry
        if telemetry is not None:  # a queue and sink that time outbound frames (telemetry_hooks)
            self.queue: OutboundQueue = telemetry.queue(config.max_queue_messages, config.max_queue_bytes,
                                                        config.max_queued_total_bytes, source)
            sink = telemetry.sink(sink)
        else:
            # Counted by its client's address too: one client's queues hold at most a quarter
            # of max_queued_total_bytes before each is held to its 256th (queue.ADDRESS_SHARES).
            self.queue = OutboundQueue(config.max_queue_messages, config.max_queue_bytes,
                                       config.max_queued_total_bytes, source)
        # init is queued before the channel becomes reachable, so it is always the first frame.
        init = self.connection.init_frame
        self.queue.offer(init)
        counters.frames_out += 1
        counters.bytes_out += len(init)
        #: Frames accepted for this connection (init included), and frames its transport has
        #: written, in the same order: frame number ``n`` is written once ``flushed >= n``
        #: (what the per-user outbox waits for before acknowledging a replayed frame).
        self.accepted = 1
        #: ``accepted - flushed``: the frames accepted and not written yet. ``flushed`` is derived
        #: from it so that a frame written at once (a fan-out's write through above all) counts
        #: with one store, ``accepted``, not two.
        self._behind = 1
        self._flush_goal: tuple[int, asyncio.Event] | None = None
        #: A frame number the manager waits to see written (0: none), and whom to tell, once,
        #: with the channel id when ``flushed`` reaches it (the outbox's acknowledgements); then
        #: :data:`ACK_PARKED` until the manager looks at the channel.
        self.ack_at = 0
        self.on_ack_at: Callable[[str], None] | None = None
        self._sink = sink
        # The fan-out written through (driver.fan_out_through) reads these two and nothing else
        # of a recipient. ``_through``: its transport's write, set by the driver (write_now) only
        # while every condition of that write holds (nothing queued, corked nor being sent, not
        # closed, nobody waiting for a frame number, the transport writable), and reset to
        # ``None`` by whatever ends one of them, at that moment. ``_wrote``: the driver's flusher
        # epoch (loop iteration) of its last frame written through: a second frame in the same
        # iteration is corked instead. The iteration's first fan-out leaves it to be set when read
        # (driver._Flusher.settle); ``-epoch`` marks a recipient that fan-out did not write.
        self._through: Callable[[bytes], object] | None = None
        self._wrote = NEVER_THROUGH
        self._tasks: set[asyncio.Task[None]] | None = None  # created by the first handler task
        self._shut = False
        self._log: ConnectionLogger | None = None
        self._deadlines: _Deadlines | None = None  # created by the first request with a timeout
        #: Under DROP_OLDEST, the request frames that were queued, by id (the frame is held, so
        #: its id is not reused), with their waiters: a request the policy drops fails at once
        #: rather than at its timeout. Created by the first one; an entry per pending request,
        #: removed when it ends.
        self.unsent_requests: dict[int, tuple[bytes, asyncio.Future[Any]]] | None = None

    def __repr__(self) -> str:
        user = "anonymous" if self.identity is None else f"user={self.identity.user_id}"
        close = self.connection.close_reason
        state = "open" if close is None else f"closed ({close.code})"
        return f"<WebSocketHandler {self.channel_id} {user} {state} queued={len(self.queue)}>"

    # ------------------------------------------------------------------ state

    @property
    def log(self) -> ConnectionLogger:
        """This connection's logger: its records carry ``channel``, ``user`` (``None`` when
        anonymous) and ``transport``. Created on first use: most connections never log."""
        log = self._log
        if log is None:
            user = None if self.identity is None else self.identity.user_id
            self._log = log = ConnectionLogger(
                logger, {"channel": self.channel_id, "user": user, "transport": self.transport})
        return log

    @property
    def closed(self) -> bool:
        """The connection is closing or closed: nothing more is sent or dispatched."""
        return self.connection.close_reason is not None

    @property
    def close_reason(self) -> ConnectionClosed | None:
        """How the connection closed (code and reason), once it did."""
        return self.connection.close_reason

    @property
    def last_seen(self) -> float:
        """Event-loop time of the last inbound frame (for the idle timeout)."""
        return self.connection.last_seen

    @property
    def pending_responses(self) -> Mapping[str, asyncio.Future[Any]]:
        """Pending server requests: ``__rchan`` -> the future of the waiting ``send_and_wait``."""
        pending = self.connection.pending
        return MappingProxyType({rchan: pending.waiter(rchan) for rchan in pending})

    @property
    def pending_count(self) -> int:
        return len(self.connection.pending)

    @property
    def task_count(self) -> int:
        """Custom handler tasks (async and ``in_thread`` handlers) running for this connection."""
        return len(self._tasks) if self._tasks is not None else 0

    @property
    def flushed(self) -> int:
        """Frames its transport has written (or the ``DROP_OLDEST`` policy dropped), in the order
        they were accepted: frame number ``n`` is written once ``flushed >= n``."""
        return self.accepted - self._behind

    @flushed.setter
    def flushed(self, value: int) -> None:
        self._behind = self.accepted - value

    @property
    def dropped(self) -> int:
        """Frames discarded by the ``DROP_OLDEST`` policy."""
        return self.queue.dropped

    def log_peer_error(self, level: int, message: str, *args: Any, exc_info: bool = False,
                       **extra: Any) -> None:
        """Log something this channel's peer caused, rate-limited per connection (see
        :meth:`ConnectionLogger.peer_error`)."""
        self.log.peer_error(level, message, *args, exc_info=exc_info, **extra)

    def log_app_error(self, level: int, message: str, key: tuple[str, str], *args: Any,
                      exc_info: bool = False, **extra: Any) -> None:
        """Log a failure of the application's code on this channel, within its own budget
        (see :meth:`ConnectionLogger.app_error`)."""
        self.log.app_error(level, message, key, *args, exc_info=exc_info, **extra)

    # ------------------------------------------------------------------ events

    def apply(self, events: Iterable[Event]) -> Awaitable[None] | None:
        """Carry out what the connection decided. Returns an awaitable when the caller (the
        receive loop) must wait before the next frame: a reply that did not fit the queue, or
        a threaded handler, so that one connection's messages stay in order."""
        wait: Awaitable[None] | None = None
        for event in events:
            # An answer first: a requesting server's most frequent event (two type checks less
            # per round trip); a custom message's reply pays one more.
            if isinstance(event, RequestCompleted):
                self.counters.requests_answered += 1
                if not event.waiter.done():
                    event.waiter.set_result(event.value)
            elif isinstance(event, SendFrame):
                wait = self.send_nowait(event.frame)
            elif isinstance(event, CustomReceived):
                wait = self._custom.dispatch(event, self)
            elif isinstance(event, RequestFailed):
                if isinstance(event.error, ChunkError):
                    self.counters.requests_chunk_error += 1
                    self.log_peer_error(logging.WARNING, "invalid chunked answer: %s", event.error,
                                        rchan=event.rchan[:_LOGGED_ID])
                else:
                    self.counters.requests_closed += 1
                if not event.waiter.done():
                    event.waiter.set_exception(event.error)
            elif isinstance(event, CloseConnection):
                if self._sink is not None:
                    self._sink.close(event.code, event.reason)
            elif isinstance(event, FrameDropped):
                self.log_peer_error(logging.WARNING, "dropped client frame: %s", event.reason)
            elif isinstance(event, AnswerIgnored):
                self.log_peer_error(logging.INFO, "answer for an unknown or settled request ignored",
                                    rchan=event.rchan[:_LOGGED_ID])
        return wait

    def receive_frame(self, frame: str | bytes, now: float) -> Awaitable[None] | None:
        """Handle one inbound frame read at ``now`` (the driver's receive loop)."""
        counters = self.counters
        counters.frames_in += 1
        counters.bytes_in += len(frame)
        telemetry = counters.telemetry
        if telemetry is not None and telemetry.in_budget <= 1:  # the frame to sample (telemetry_hooks)
            return telemetry.inbound(self, frame, now)  # type: ignore[no-any-return]
        events = self.connection.receive(frame, now)
        if isinstance(events, tuple):
            # An answer that completes its request, a requesting server's most frequent frame:
            # what apply does for a RequestCompleted, here (no event built, no call of apply).
            if telemetry is not None:
                telemetry.in_budget -= 1  # counted by requests_answered
            counters.requests_answered += 1
            waiter = events[1]
            if not waiter.done():
                waiter.set_result(events[2])
            return None
        if telemetry is not None:
            if len(events) != 1 or type(events[0]) is not RequestCompleted:
                return telemetry.inbound_events(self, events)  # type: ignore[no-any-return]
            telemetry.in_budget -= 1  # an answer: counted by requests_answered
        return self.apply(events)

    def process_client_message(self, message: ClientMessage) -> Awaitable[None] | None:
        """Process a decoded client message (see :meth:`apply` for the awaitable). Messages
        reaching a closed connection are dropped."""
        return self.apply(self.connection.receive_message(message))

    def tick(self, now: float, wall: float | None = None) -> None:
        """Check the idle timeout (``now``, loop time) and identity expiry (``wall``, epoch)."""
        self.apply(self.connection.tick(now, time.time() if wall is None else wall))

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Ask the connection to close with ``code``; returns at once. Idempotent. Pending
        requests fail with ``ConnectionClosed(code)`` at once."""
        self.apply(self.connection.close(code, reason))

    # ------------------------------------------------------------------ outbound

    async def send_message(self, message: BaseModel | bytes) -> None:
        """Send a message (an envelope model, or an already encoded frame) to the client.

        Applies the slow-consumer policy; raises ``SlowConsumer`` if the client is disconnected
        for being slow and ``ConnectionClosed`` if the channel is closed.
        """
        frame = message if isinstance(message, bytes) else encode(message)
        if not self.offer(frame):
            await self.enqueue_slow(frame)

    def offer(self, frame: bytes, at_once: bool = False) -> bool:
        """Deliver ``frame`` without waiting; ``False`` if the queue is full (nothing changes then).

        With nothing queued and a transport that can write at once, the frame is written
        directly (no queue entry, no task); otherwise it is queued and the sink drains the queue.
        ``at_once``: a request, whose answer is awaited, is not corked for the end of the loop
        iteration (:meth:`Sink.write_at_once`). Raises ``ConnectionClosed`` if the channel is
        closed.
        """
        queue = self.queue
        sink = self._sink
        counters = self.counters
        # queue.idle, read in place: the property is a Python call of its own per frame.
        if sink is not None and not queue._frames and not queue._closed and (
                sink.write_at_once(frame) if at_once else sink.write_now(frame)):
            counters.frames_out += 1
            counters.bytes_out += len(frame)
            self.accepted += 1  # and written: flushed too (_behind unchanged)
            if self.ack_at or self._flush_goal is not None:
                self._written()
            return True
        if not queue.offer(frame):
            return False
        self._through = None  # queued: the frames behind it must queue too
        self.accepted += 1
        self._behind += 1
        counters.frames_out += 1
        counters.bytes_out += len(frame)
        if sink is not None:
            sink.frames_queued()
        return True

    def frame_flushed(self) -> None:
        """The transport wrote one more frame (the sink calls it, in queue order)."""
        self.frames_done(1)

    def frames_done(self, count: int) -> None:
        """``count`` more frames, in queue order, were written (or dropped by the policy)."""
        self._behind -= count
        self._written()

    def _written(self) -> None:
        """Tell whoever waits for a frame number written by now (``ack_at``, ``wait_flushed``)."""
        at = self.ack_at
        if at and self.flushed >= at:
            self.ack_at = ACK_PARKED
            self._through = None  # (already: ack_at was set)
            if self.on_ack_at is not None:
                self.on_ack_at(self.channel_id)
        goal = self._flush_goal
        if goal is not None and self.flushed >= goal[0]:
            self._flush_goal = None
            goal[1].set()

    def wrote_all(self) -> bool:
        """Every frame accepted so far was handed to the socket: none queued, none corked for
        the loop's flush (which a library that closes the connection by itself would drop)."""
        if self._behind or self.queue.closed:
            return False
        sink = self._sink
        return sink is None or not getattr(sink, "corked", 0)

    def frames_dropped(self, count: int) -> None:
        """The last ``count`` frames counted as written were dropped by the transport (its
        library closed the connection before their write): not written after all."""
        self._behind += count
        self._through = None

    async def wait_flushed(self, count: int, timeout: float) -> int:
        """Wait until the transport has written ``count`` frames (see :attr:`accepted`), the
        connection is gone, or ``timeout`` passes; returns how many it has written. One waiter
        at a time (the manager's outbox replay)."""
        if self.flushed < count and not self._shut:
            event = asyncio.Event()
            self._flush_goal = (count, event)
            self._through = None  # frames_done must see every frame written from now on
            waiter = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait((waiter,), timeout=timeout)
            finally:
                waiter.cancel()
                if self._flush_goal is not None and self._flush_goal[1] is event:
                    self._flush_goal = None
        return self.flushed

    def send_nowait(self, frame: bytes) -> Awaitable[None] | None:
        """Enqueue ``frame`` if there is room; otherwise return the coroutine that applies the
        slow-consumer policy (never raising ``SlowConsumer``). ``None`` once closed."""
        if self.queue.closed:
            return None
        if self.offer(frame):
            return None
        return self.enqueue_slow(frame, raise_slow=False)

    def push(self, frame: bytes) -> bool:
        """Deliver one frame of a fan-out (broadcast, per-user send) without ever waiting.

        A fan-out must not wait on one recipient (protocol.md section 6): when this channel's
        queue is full, ``DROP_OLDEST`` makes room; under ``WAIT`` and ``DISCONNECT`` the frame is
        queued past the bounds while the channel is within ``queue.BURST`` times them and has
        not been full for longer than ``send_timeout`` (a burst its reader takes in at its own
        pace), else the channel is disconnected with 1013 at once. Returns whether the frame was
        delivered; ``False`` for a closed channel. Never raises.
        """
        queue = self.queue
        if queue.closed:
            return False
        if self.offer(frame):
            return True
        config = self.config
        if config.slow_consumer_policy is SlowConsumerPolicy.DROP_OLDEST:
            self._drop_oldest_and_put(frame)
            return True
        if queue.take_burst(frame, config.send_timeout):
            self._queued_past_bounds(frame)
            if charge_origin is not None:
                charge_origin(self, frame)
            return True
        self._disconnect_slow()
        return False

    def replay(self, frame: bytes) -> bool:
        """Deliver one frame of the user's kept history (the outbox's replay): queued even past
        the queue's bounds, which the history's own bounds (``outbox_messages``,
        ``outbox_bytes``) replace for it. A connection is never a slow consumer for what was kept
        for it before it connected. ``False`` for a closed channel; never raises."""
        queue = self.queue
        if queue.closed:
            return False
        if self.offer(frame):
            return True
        queue.append_kept(frame)
        self._queued_past_bounds(frame)
        return True

    def _queued_past_bounds(self, frame: bytes) -> None:
        """Account for ``frame``, queued past the queue's bounds (a replay, a burst)."""
        self._through = None  # queued: the fan-out's write-through ends (see fan_out_through)
        self.accepted += 1
        self._behind += 1
        counters = self.counters
        counters.frames_out += 1
        counters.bytes_out += len(frame)
        if self._sink is not None:
            self._sink.frames_queued()

    async def enqueue_slow(self, frame: bytes, *, raise_slow: bool = True) -> None:
        """Apply the slow-consumer policy to a frame that did not fit (protocol.md section 6).

        For a sender that may wait: ``WAIT`` waits for room up to ``send_timeout``.
        """
        policy = self.config.slow_consumer_policy
        if policy is SlowConsumerPolicy.DROP_OLDEST:
            self._drop_oldest_and_put(frame)
            return
        queue = self.queue
        if policy is SlowConsumerPolicy.DISCONNECT and queue.in_burst \
                and queue.take_burst(frame, self.config.send_timeout):
            # A reader taking in a burst of fan-outs is not slow for it (see push): its own
            # replies join the burst rather than count as no room, bounded as the burst is.
            self._queued_past_bounds(frame)
            return
        if policy is SlowConsumerPolicy.WAIT:
            try:
                await self.queue.put(frame, self.config.send_timeout)
                self._through = None  # queued: the frames behind it must queue too
                self.accepted += 1  # numbered like every frame the queue takes (frame_flushed)
                self._behind += 1
                self.counters.frames_out += 1
                self.counters.bytes_out += len(frame)
                if self._sink is not None:
                    # The send task may have emptied the queue and ended while this put waited
                    # to run: without a new one the frame would sit there until the next send.
                    self._sink.frames_queued()
                return
            except TimeoutError:
                pass
        self._disconnect_slow()
        if raise_slow:
            raise SlowConsumer(f"channel {self.channel_id} is not reading; disconnected (1013)")

    def _drop_oldest_and_put(self, frame: bytes) -> None:
        queue, counters = self.queue, self.counters
        if self.unsent_requests:  # requests are queued: see whether the policy drops one
            discarded: list[bytes] = []
            dropped = queue.drop_oldest_and_put(frame, discarded)
            self._fail_dropped_requests(discarded)
        else:
            dropped = queue.drop_oldest_and_put(frame)
        self._through = None  # queued: the frames behind it must queue too
        self.accepted += 1
        self._behind += 1
        counters.frames_out += 1
        counters.bytes_out += len(frame)
        if dropped:
            # The oldest queued frames are gone for good, by this policy's choice: they count as
            # done, so that the numbers of the frames behind them still match what is written
            # (else the per-user history would take a dropped frame for a written one).
            self.frames_done(dropped)
            counters.frames_dropped += dropped
            counters.count(counters.slow_consumer, "drop_oldest")
        if dropped and queue.dropped % 1000 == 1:
            self.log.warning("slow consumer: dropping oldest frames",
                             extra={"dropped": queue.dropped})

    def _fail_dropped_requests(self, discarded: list[bytes]) -> None:
        """Fail at once the requests among the frames ``DROP_OLDEST`` just discarded: the client
        never sees them, so no answer can come (their callers would wait their whole timeout)."""
        queued = self.unsent_requests
        assert queued is not None
        for old in discarded:
            entry = queued.get(id(old))
            if entry is not None and entry[0] is old:
                del queued[id(old)]
                waiter = entry[1]
                if not waiter.done():
                    waiter.set_exception(SlowConsumer(
                        f"request to channel {self.channel_id} dropped unsent: its queue was "
                        "full (slow_consumer_policy drop_oldest)"))

    def _watch_queued_request(self, frame: bytes, waiter: asyncio.Future[Any]) -> None:
        """``frame``, a request, was queued under ``DROP_OLDEST``: remember it, so that the
        policy dropping it fails its waiter (:meth:`_fail_dropped_requests`)."""
        queued = self.unsent_requests
        if queued is None:
            self.unsent_requests = queued = {}
        queued[id(frame)] = (frame, waiter)

    def _disconnect_slow(self) -> None:
        queue, counters = self.queue, self.counters
        if queue.closed:
            return
        counters.count(counters.slow_consumer, self.config.slow_consumer_policy.value)
        self.log.warning("slow consumer: disconnecting")
        # Its backlog is dropped, not written before the close frame: the client is not taking
        # it in (that is why it is closed), and behind up to max_queue_bytes of it the 1013
        # waited until close_timeout aborted the connection, which then ended without one. Kept
        # per-user messages in it were not written: they go to the user's next connection.
        counters.frames_dropped += len(queue)
        queue.close()
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer")

    # ------------------------------------------------------------------ server -> client requests

    def send_and_wait(
        self,
        message: LoosePayload | BaseModel,
        *,
        custom: bool = False,
        timeout: float | None = _DEFAULT,
    ) -> Coroutine[Any, Any, Any]:
        """Send a request to the client and return its answer (a list of parts if chunked).

        ``timeout`` defaults to ``ServerConfig.request_timeout``. Raises ``RequestTimeout``,
        ``ConnectionClosed`` at once if the connection closes, ``ChunkError`` for an invalid
        chunked answer, ``TooManyPendingRequests`` at the channel's limit, ``SlowConsumer`` (the
        client disconnected for being slow, or, under ``DROP_OLDEST``, the request dropped unsent).
        Cancelling the call removes its pending entry.

        A coroutine to await, as an ``async def`` gives (nothing is encoded or sent before it
        runs): the request's own coroutine, without one more around it.
        """
        # WebsocketManager.send_and_wait makes the same test and the same call itself (one
        # Python call less per request): keep the two alike.
        if self.counters.telemetry is None:
            return self._request(None, "", timeout, message, custom)
        return self._send_and_wait_traced(message, custom, timeout)

    async def _send_and_wait_traced(
        self, message: LoosePayload | BaseModel, custom: bool, timeout: float | None
    ) -> Any:
        rchan = new_rchan()
        return await self.send_and_wait_frame(build_frame(message, custom=custom, rchan=rchan), rchan, timeout)

    async def send_and_wait_frame(
        self, frame: bytes, rchan: str, timeout: float | None = _DEFAULT
    ) -> Any:
        """Send a request already encoded with ``__rchan`` = ``rchan`` (as unpredictable as a
        uuid4) and return its answer, as :meth:`send_and_wait` does: the backplane relays a
        request that another process encoded this way, byte for byte.

        Raises ``ValueError`` if ``rchan`` is already pending, else what :meth:`send_and_wait`
        raises.
        """
        telemetry = self.counters.telemetry
        if telemetry is not None:  # 1 in sample_every, or inside a traced operation: traced
            telemetry.trip_budget -= 1
            if telemetry.trip_budget <= 0 or TRACING.get():
                return await telemetry.round_trip(self._request(frame, rchan, timeout), frame)
        return await self._request(frame, rchan, timeout)

    async def _request(
        self, frame: bytes | None, rchan: str, timeout: float | None,
        message: Any = None, custom: bool = False,
    ) -> Any:
        """A request's coroutine: of ``frame`` encoded with ``rchan``, or when ``frame`` is
        ``None``, of ``message`` encoded here under a fresh ``rchan``."""
        if frame is None:
            rchan = new_rchan()  # unpredictable: 122 random bits, like Dara's
            frame = build_frame(message, custom=custom, rchan=rchan)
        if timeout is _DEFAULT:
            timeout = self.config.request_timeout
        # The connection's loop, looked up once: on Python 3.11 every get_running_loop() is a
        # getpid() system call (its check for a fork), one per request otherwise.
        deadlines = self._deadlines
        if deadlines is None:
            self._deadlines = deadlines = _Deadlines(asyncio.get_running_loop())
        if timeout is not None:
            # Reckoned before anything is sent or registered: a wrong timeout fails here, with
            # nothing to undo (try costs nothing on the path that does not raise).
            try:
                at = deadlines.now() + timeout
            except TypeError:
                raise TypeError("timeout must be a number of seconds or None, not "
                                f"{type(timeout).__name__}") from None
        waiter = deadlines.new_future()
        self.connection.open_request(waiter, rchan)
        try:
            # Written now rather than corked for the end of the iteration: the client can
            # answer sooner, and the loop runs no flush pass for it.
            if not self.offer(frame, at_once=True):
                # The slow path (a full queue): the policy may wait, within the same timeout.
                return await self._request_slow(frame, waiter, timeout)
            if self.config.slow_consumer_policy is _DROP_OLDEST and len(self.queue):
                self._watch_queued_request(frame, waiter)  # queued, not written: may be dropped
            if timeout is None:
                answer = await waiter
            else:
                # The common path: the frame is out, only the answer is awaited. A deadline the
                # connection's one timer expires, not an asyncio.timeout scope (an object, two
                # coroutine calls and a task cancellation to undo) nor a timer handle per request.
                # deadlines.add(waiter, at), inlined (one Python call less per request); outside
                # the try: its cleanup removes only what was added.
                deadlines.pending[waiter] = at
                if deadlines._timer is None or at < deadlines._at:
                    deadlines.arm(at)
                try:
                    answer = await waiter
                finally:
                    del deadlines.pending[waiter]
        except BaseException:  # cancelled, closed, refused, dropped: the entry may still be pending
            self.connection.discard_request(rchan)
            raise
        finally:
            if self.unsent_requests:
                self.unsent_requests.pop(id(frame), None)
        if answer is _EXPIRED:  # no answer came: the entry is still pending
            self.connection.discard_request(rchan)
            self.counters.requests_timeout += 1
            raise RequestTimeout(f"no answer from channel {self.channel_id} within {timeout} s")
        # Answered (here or in the slow path): the table removed the entry before it completed
        # the waiter, so there is nothing left to discard.
        return answer

    async def _request_slow(
        self, frame: bytes, waiter: asyncio.Future[Any], timeout: float | None
    ) -> Any:
        try:
            async with asyncio.timeout(timeout) as scope:
                await self.enqueue_slow(frame)
                if self.config.slow_consumer_policy is _DROP_OLDEST:
                    self._watch_queued_request(frame, waiter)
                return await waiter
        except TimeoutError:
            if scope.expired():
                self.counters.requests_timeout += 1
                raise RequestTimeout(
                    f"no answer from channel {self.channel_id} within {timeout} s"
                ) from None
            raise

    # ------------------------------------------------------------------ handler tasks

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a custom handler's task: a graceful shutdown waits for it, a close cancels it."""
        tasks = self._tasks
        if tasks is None:
            self._tasks = tasks = set()
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def wait_tasks(self, timeout: float) -> None:
        """Wait up to ``timeout`` for running handler tasks (graceful shutdown)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def shutdown(self, exc: ConnectionClosed) -> None:
        """Release everything: fail pending requests with ``exc``, drop the queue, cancel tasks.

        Called once when the connection is gone (``WebsocketManager.remove_handler``).
        """
        if self._shut:
            return
        self._shut = True
        self._through = None
        if self._flush_goal is not None:  # nothing more will be written: wake its waiter
            self._flush_goal[1].set()
        self.counters.custom_busy += self.connection.busy
        self.apply(self.connection.connection_lost(exc))
        self.queue.close()
        if self._deadlines is not None:
            self._deadlines.cancel()
        for task in self._tasks or ():
            task.cancel()
