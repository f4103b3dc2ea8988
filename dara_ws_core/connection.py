"""One connection's protocol as a pure state machine (protocol.md sections 2 to 6).

:class:`ServerConnection` does no I/O and knows no event loop, in the manner of h11's
``Connection`` and websockets' ``Protocol``: it is fed inbound frames (``str`` for a text frame,
``bytes`` for a binary one) and local intents (answer this request, open a server request, close),
each with the time as an input, and answers with immutable **events** for its driver to carry
out: a frame to send, a connection to close, a custom message to dispatch, a server request
answered or failed. It owns what the protocol decides:

* decoding and every bad-input outcome of section 6 (1003, 1007, 1009, dropped objects);
* the inbound rate limit, the idle timeout and identity expiry, all against the ``now`` given;
* pings answered with pongs (section 2);
* the correlation table and chunk reassembly of server requests (section 4);
* how a custom request is answered: the reply, or an ``__error`` reply for an unknown kind, a
  failing or timed-out handler, or too many handlers running (section 3, **[ext]**);
* what every input gets once the connection is closing or closed.

The asyncio layer (:mod:`~dara_ws_core.handler`, :mod:`~dara_ws_core.endpoint`) drives it: it
reads frames, runs handlers, queues frames and closes transports, and makes no protocol decision
of its own. Applications property-test their protocol logic against this class directly (see
:mod:`dara_ws_core.testing`).
"""

from __future__ import annotations

__all__ = [
    "HANDLING_ADDRESS_SHARES",
    "HANDLING_SHARES",
    "PROCESS_HANDLING",
    "AnswerIgnored",
    "CloseConnection",
    "CustomReceived",
    "Event",
    "FrameDropped",
    "HandlingTally",
    "RequestCompleted",
    "RequestFailed",
    "SendFrame",
    "ServerConnection",
    "State",
]

import enum
import sys
from collections.abc import Container, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pydantic_core

from .auth import Holder
from .codec import PONG_FRAME, decode_client_input, dumps
from .config import ServerConfig
from .correlation import Completed, Failed, Ignored, Partial, PendingRequests
from .exceptions import (
    CloseCode,
    ConnectionClosed,
    InvalidMessage,
    ProtocolError,
)

if TYPE_CHECKING:
    from .messages import ClientMessage

W = TypeVar("W")


class State(enum.Enum):
    """Where a connection is. Only ``OPEN`` exchanges messages."""

    OPEN = "open"
    #: A close was decided (by us, or the peer's bad input); frames still read are dropped.
    CLOSING = "closing"
    #: The transport is gone; every pending request has failed.
    CLOSED = "closed"


#: The members looked up once: on Python 3.11 ``State.OPEN`` goes through the enum metaclass's
#: ``__getattr__`` hook (about 800 instructions, callgrind), once per frame received.
_OPEN, _CLOSING, _CLOSED = State.OPEN, State.CLOSING, State.CLOSED


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Send ``frame`` (UTF-8 JSON, one text frame) to the client, after what is queued."""

    frame: bytes


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the transport with ``code`` (frames queued before it go out first)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class CustomReceived:
    """A custom message for the handler of ``kind``; ``rchan`` set means a reply is expected.

    Run the handler, then answer with :meth:`ServerConnection.reply` or
    :meth:`ServerConnection.reply_error`. The connection has counted it as running, with
    ``size``, what its frame held (see ``ServerConfig.max_handling_bytes``): call
    :meth:`ServerConnection.handler_done` with ``size`` when it ends, whatever the outcome.
    """

    kind: str
    data: Any
    rchan: str | None
    size: int = field(default=0, compare=False)


#: A holder (a user's connections; the anonymous ones of an address) whose handlers hold
#: anything already may hold at most this fraction of ``ServerConfig.max_handling_total_bytes``
#: with a request that is not small (over a 256th of it for its connection).
HANDLING_SHARES = 16
#: The connections of one client address, whatever users they name, hold at most this fraction
#: of it together (their first request is always taken): without it, a client naming a user
#: for each connection kept big requests running in a slow handler until the process's bound
#: was full, and every other client's request over a 256th of it got ``busy`` until they ended.
HANDLING_ADDRESS_SHARES = 4


class HandlingTally:
    """What the running handlers of every connection sharing it hold (``bytes``), against
    ``ServerConfig.max_handling_total_bytes``, and by holder and client address (``holders``:
    keyed by the holder, and ``(HandlingTally, address)`` for an address, for those holding
    anything)."""

    __slots__ = ("bytes", "holders")

    def __init__(self) -> None:
        self.bytes = 0
        self.holders: dict[Hashable, int] = {}

    def add(self, keys: tuple[Hashable, ...], size: int) -> None:
        """Count ``size`` more bytes, in all and under each of ``keys``."""
        self.bytes += size
        holders = self.holders
        for key in keys:
            holders[key] = holders.get(key, 0) + size

    def remove(self, keys: tuple[Hashable, ...], size: int) -> None:
        """Give back ``size`` bytes counted with :meth:`add` under ``keys``."""
        self.bytes -= size
        holders = self.holders
        for key in keys:
            left = holders.get(key, 0) - size
            if left > 0:
                holders[key] = left
            else:
                holders.pop(key, None)


#: The process's tally, shared by every connection unless given its own.
PROCESS_HANDLING = HandlingTally()


@dataclass(frozen=True, slots=True)
class FrameDropped:
    """An object of unknown type or with invalid fields was dropped; the connection stays."""

    reason: str


#: A server request was answered: complete ``waiter`` with ``value``.
RequestCompleted = Completed
#: A server request failed (an invalid chunked answer, or the connection closed): fail ``waiter``.
RequestFailed = Failed
#: An answer for no pending request (unknown, answered or timed out): ignored.
AnswerIgnored = Ignored

Event = (SendFrame | CloseConnection | CustomReceived | FrameDropped | RequestCompleted[Any]
         | RequestFailed[Any] | AnswerIgnored)

_NO_EVENTS: list[Event] = []  # never appended to: returned where nothing happens


class ServerConnection(Generic[W]):
    """The protocol state of one connection (one channel). ``W`` is the driver's waiter type
    for server requests (an ``asyncio.Future`` in the asyncio layer, anything in tests).

    ``kinds`` answers "is there a handler for this kind"; without it every kind is dispatched.
    ``expires_at`` is the identity's expiry in wall-clock seconds (see :meth:`tick`). ``user`` is
    who shares the connection's bounds (:func:`~dara_ws_core.auth.holder_of`: the user, or the
    address of an anonymous peer): the parts of chunked answers that its connections hold are
    bounded together (see :class:`~dara_ws_core.correlation.PendingRequests`); ``address``, its
    client's address key (``current_source``), bounds them with every connection of that
    address, whatever users they name.
    """

    __slots__ = ("_close", "_handlers", "_handling", "_keys", "_kinds", "_pending", "_tally", "_window_count",
                 "_window_start", "busy", "channel_id", "config", "expires_at", "last_seen", "state")

    def __init__(
        self,
        channel_id: str,
        config: ServerConfig | None = None,
        *,
        now: float = 0.0,
        expires_at: float | None = None,
        kinds: Container[str] | None = None,
        user: Holder | None = None,
        handling: HandlingTally = PROCESS_HANDLING,
        address: str | None = None,
    ) -> None:
        self.channel_id = channel_id
        self.config = config = config or ServerConfig()
        self.state = _OPEN
        #: Time (the driver's clock) of the last inbound frame, for the idle timeout.
        self.last_seen = now
        self.expires_at = expires_at
        self._kinds = kinds
        # Positional: a class called without keywords needs no dict for them.
        self._pending: PendingRequests[W] = PendingRequests(config, user, address)
        self._window_start = now
        self._window_count = 0
        self._handlers = 0
        self._handling = 0  # what the frames of its running handlers hold (max_handling_bytes)
        self._tally = handling
        # Under which keys of the tally its handlers' bytes count too: its holder's, and its
        # client address's (a key of its own kind: never a holder's).
        self._keys: tuple[Hashable, ...] = tuple(
            key for key in (user, None if address is None else (HandlingTally, address)) if key is not None)
        #: Custom messages answered ``busy`` (``max_handler_tasks`` running): for the stats.
        self.busy = 0
        self._close: ConnectionClosed | None = None

    def __repr__(self) -> str:
        return f"<ServerConnection {self.channel_id} {self.state.value}>"

    # ------------------------------------------------------------------ state

    @property
    def init_frame(self) -> bytes:
        """The first frame of every connection: its channel id (section 5)."""
        return dumps({"type": "init", "message": {"channel": self.channel_id}})

    @property
    def close_reason(self) -> ConnectionClosed | None:
        """How the connection closed or is closing; ``None`` while open."""
        return self._close

    @property
    def pending(self) -> PendingRequests[W]:
        """The correlation table of server requests (read it; change it through this class)."""
        return self._pending

    @property
    def handlers_running(self) -> int:
        """Custom handlers dispatched and not yet reported done."""
        return self._handlers

    # ------------------------------------------------------------------ inbound

    def receive_frame(self, frame: str | bytes, now: float) -> list[Event]:
        """Feed one inbound frame read at ``now``; returns what to do (section 6 for bad input).

        Once the connection is closing or closed, frames are dropped without events.
        """
        decided = self.receive(frame, now)
        if isinstance(decided, tuple):
            return [Completed(*decided)]
        return decided

    def receive(self, frame: str | bytes, now: float) -> list[Event] | tuple[str, W, Any]:
        """:meth:`receive_frame`, but for an answer that completes its request (the one event
        a requesting server gets per request): ``(rchan, waiter, value)``, the request already
        removed, instead of ``[RequestCompleted(rchan, waiter, value)]``, without building the
        event only for the handler to unpack it."""
        if self.state is not _OPEN:
            return _NO_EVENTS
        self.last_seen = now
        config = self.config
        if config.rate_limit is not None:
            if now - self._window_start >= config.rate_window:
                self._window_start, self._window_count = now, 0
            self._window_count += 1
            if self._window_count > config.rate_limit:
                return self.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        try:
            # A plain answer, the most frequent frame of a server that sends requests, comes
            # back as (channel, message), without a model: its own path, in the same parse.
            message = decode_client_input(
                frame, config.max_message_size, max_values=config.max_message_values
            )
        except InvalidMessage as exc:
            return [FrameDropped(str(exc))]
        except ProtocolError as exc:
            return self.close(exc.close_code or CloseCode.PROTOCOL_ERROR, str(exc))
        if isinstance(message, tuple):
            rchan, value = message
            waiter = self._pending.take(rchan)
            if waiter is None:  # no request waits for it, or one with chunked parts
                return [self._pending.complete(rchan, value)]
            return rchan, waiter, value
        if message["type"] == "custom":
            body = message["message"]
            return self._dispatch(body["kind"], body["data"], body["rchan"], sys.getsizeof(frame))
        if message["type"] == "message":  # an answer's part: an answer's whole is the tuple above
            return self._answered(message["channel"], message["chunk_count"], message["chunk_index"],
                                  message["message"])
        return [SendFrame(PONG_FRAME)]

    def receive_message(self, message: ClientMessage) -> list[Event]:
        """Feed one decoded client message, a model of :mod:`~dara_ws_core.messages` (what
        :meth:`receive_frame` does after decoding; a custom message fed so counts nothing
        against ``max_handling_bytes``: its frame is not known)."""
        from .messages import ClientPing, CustomClientMessage, DaraClientMessage

        if self.state is not _OPEN:
            return _NO_EVENTS
        if isinstance(message, DaraClientMessage):
            return self._answered(message.channel, message.chunk_count, message.chunk_index,
                                  message.message)
        if type(message) is ClientPing:
            return [SendFrame(PONG_FRAME)]
        if isinstance(message, CustomClientMessage):
            return self._dispatch(message.message.kind, message.message.data,
                                  message.message.rchan)
        raise TypeError(f"not a client message: {type(message).__name__}")

    def _answered(self, channel: str, chunk_count: int | None, chunk_index: int | None,
                  message: Any) -> list[Event]:
        outcome = self._pending.receive_part(channel, chunk_count, chunk_index, message)
        if isinstance(outcome, Partial):
            return _NO_EVENTS  # a part of a chunked answer: stored
        return [outcome]

    def _dispatch(self, kind: str, data: Any, rchan: str | None, size: int = 0) -> list[Event]:
        if self._kinds is not None and kind not in self._kinds:
            return [FrameDropped("custom message of unknown kind"),
                    _error(kind, rchan, "unknown_kind", f"no handler for kind {kind[:64]!r}")]
        config = self.config
        if self._handlers >= config.max_handler_tasks:
            self.busy += 1
            return [_error(kind, rchan, "busy", "too many requests in progress")]
        held = self._handling + size
        tally = self._tally
        if size and (
            (held > config.max_handling_bytes and self._handling)  # the first is always taken
            or (held > config.max_handling_total_bytes >> 8
                and tally.bytes + size > config.max_handling_total_bytes)
            or self._over_share(size, held > config.max_handling_total_bytes >> 8)
        ):
            self.busy += 1
            return [_error(kind, rchan, "busy", "too many request bytes in progress")]
        self._handlers += 1
        self._handling = held
        if size:
            tally.add(self._keys, size)
        return [CustomReceived(kind, data, rchan, size)]

    def _over_share(self, size: int, big: bool) -> bool:
        """Whether ``size`` more bytes would take this connection's holder past its share of
        ``max_handling_total_bytes`` (only for a ``big`` request: small ones never are), or its
        client address past the address's (any request). A holder or address holding nothing
        always gets its first request."""
        holders = self._tally.holders
        total = self.config.max_handling_total_bytes
        for key in self._keys:
            mine = holders.get(key, 0)
            if not mine:
                continue
            if type(key) is tuple and key[0] is HandlingTally:
                if mine + size > total // HANDLING_ADDRESS_SHARES:
                    return True
            elif big and mine + size > total // HANDLING_SHARES:
                return True
        return False

    # ------------------------------------------------------------------ custom replies

    def handler_done(self, size: int = 0) -> None:
        """A handler dispatched by a :class:`CustomReceived` ended (any outcome); ``size`` is
        the event's."""
        if self._handlers > 0:
            self._handlers -= 1
        if size and self._handling:  # nothing once the connection is lost (connection_lost)
            self._handling -= size
            self._tally.remove(self._keys, size)

    def reply(self, kind: str, rchan: str | None, result: Any) -> SendFrame | None:
        """The answer to a custom message whose handler returned ``result`` (section 4).

        A request (``rchan``) always gets a reply so the client's promise settles; a message
        without one gets a reply only when the handler returned something. A result JSON cannot
        carry becomes a ``handler_error`` reply. ``None``: nothing to send (or not open).
        """
        try:
            return self.encode_reply(kind, rchan, result)
        except pydantic_core.PydanticSerializationError:
            return self.reply_error(kind, rchan, "handler_error",
                                    "the handler's result could not be encoded")

    def encode_reply(self, kind: str, rchan: str | None, result: Any) -> SendFrame | None:
        """:meth:`reply`, raising ``pydantic_core.PydanticSerializationError`` for a result
        JSON cannot carry (for a driver that logs it before answering with :meth:`reply_error`)."""
        if self.state is not _OPEN:
            return None
        if rchan is None:
            if result is None:
                return None
            body: dict[str, Any] = {"kind": kind, "data": result}
        else:
            body = {"kind": kind, "data": result, "__response_for": rchan}
        return SendFrame(dumps({"type": "custom", "message": body}))

    def reply_error(self, kind: str, rchan: str | None, code: str, message: str) -> SendFrame | None:
        """An ``__error`` reply **[ext]** to a custom message whose handler failed (``code``
        ``handler_error``) or timed out (``timeout``): a code and a message, never a traceback.
        ``None`` unless open."""
        if self.state is not _OPEN:
            return None
        return _error(kind, rchan, code, message)

    # ------------------------------------------------------------------ server requests

    def open_request(self, waiter: W, rchan: str | None = None) -> str:
        """Open a server request and return its ``__rchan``: ``rchan`` if given (as
        unpredictable as a uuid4: the backplane relays requests encoded elsewhere), else a
        fresh uuid4.

        Raises ``ConnectionClosed`` unless open, ``TooManyPendingRequests`` at the limit,
        ``ValueError`` for an ``rchan`` already pending.
        """
        if self._close is not None:
            raise self._close
        return self._pending.open(waiter, rchan)

    def discard_request(self, rchan: str) -> None:
        """Forget a request whose caller gave up (timeout, cancellation). Idempotent."""
        self._pending.discard(rchan)

    # ------------------------------------------------------------------ time and closing

    def tick(self, now: float, wall: float) -> list[Event]:
        """Check the timers: ``now`` on the driver's clock (idle timeout), ``wall`` in epoch
        seconds (identity expiry, 1008)."""
        if self.state is not _OPEN:
            return _NO_EVENTS
        idle = self.config.idle_timeout
        if idle is not None and now - self.last_seen >= idle:
            return self.close(CloseCode.GOING_AWAY, "idle timeout")
        if self.expires_at is not None and wall >= self.expires_at:
            return self.close(CloseCode.POLICY_VIOLATION, "identity expired")
        return _NO_EVENTS

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> list[Event]:
        """Decide to close: one :class:`CloseConnection`, then :class:`RequestFailed` for every
        pending request (the channel is dead for messaging at once). No-op unless open."""
        if self.state is not _OPEN:
            return _NO_EVENTS
        self.state = _CLOSING
        self._close = ConnectionClosed(code, reason)
        return [CloseConnection(code, reason), *self._fail_pending(self._close)]

    def connection_lost(self, exc: ConnectionClosed) -> list[Event]:
        """The transport is gone (``exc`` says how): every pending request fails with it, or
        with the close already decided. Idempotent."""
        if self.state is _CLOSED:
            return _NO_EVENTS
        self.state = _CLOSED
        if self._close is None:
            self._close = exc
        # What its handlers' requests hold is released with it: a handler task cancelled before
        # its first step (the close came in the iteration its request did), or a dispatch that
        # failed, never reports done; one that ends later reports to nothing (handler_done).
        if self._handling:
            self._tally.remove(self._keys, self._handling)
        self._handling = 0
        return self._fail_pending(self._close)

    def _fail_pending(self, exc: ConnectionClosed) -> list[Event]:
        pending = self._pending
        failed: list[Event] = [RequestFailed(rchan, pending.waiter(rchan), exc) for rchan in pending]
        pending.close()
        return failed


def _error(kind: str, rchan: str | None, code: str, message: str) -> SendFrame:
    # protocol.md section 3, error [ext]: the caller's promise settles; no traceback on the wire.
    body: dict[str, Any] = {"kind": kind, "data": None, "__error": {"code": code, "message": message}}
    if rchan is not None:
        body["__response_for"] = rchan
    return SendFrame(dumps({"type": "custom", "message": body}))
