"""Dara's own WebSocket metrics and spans, for :func:`dara_ws_core.telemetry.instrument`.

The names, units, attributes and meaning are those of dara-core's ``dara/core/telemetry.py``
(1.30.0), so a dashboard built on a Dara application reads this library unchanged:

* ``dara.websocket.message.executions`` (counter, ``{message}``) and ``.active`` (up-down counter,
  ``{message}``): every inbound frame, every outbound message and every custom handler run, exactly
  counted. Attributes ``dara.websocket.direction``, ``dara.websocket.message.type`` (``message``,
  ``custom``, ``init``, ``invalid``), ``dara.websocket.operation`` (``message`` or ``handler``), for
  handlers ``dara.websocket.handler.execution`` (``sync`` or ``async``; an ``in_thread`` handler
  is a sync function: ``sync``), and on the executions ``dara.outcome`` (``success``, ``error``,
  ``cancelled``). An outbound message is counted once per recipient when it is accepted for
  sending (written at once or queued), as Dara counts one send per handler.
* ``dara.websocket.message.duration`` (histogram, ``s``, same attributes as the executions):
  the time of a *sampled* operation (see below).
* ``dara.websocket.queue.duration`` (histogram, ``s``; ``dara.websocket.message.type``): from
  accepting an outbound frame to taking it out for the transport, ``0`` for a frame written at
  once (Dara's every message passes through its queue); sampled.
* ``dara.websocket.round_trip.duration`` (histogram, ``s``; ``dara.websocket.message.type``,
  ``dara.websocket.operation`` = ``round_trip``, ``dara.outcome``): ``send_and_wait``, sampled.
* ``dara_ws.backplane.lag`` (histogram, ``s``; this library's, not Dara's): from a backplane
  delivery's publication (the publisher's wall clock) to its receipt here, sampled.
* Spans ``dara.websocket.message.inbound`` (CONSUMER) / ``.outbound`` (PRODUCER),
  ``dara.websocket.handler.execute`` and ``dara.websocket.round_trip``; the spans add
  ``dara.websocket.handler.kind`` and ``dara.websocket.message.payload.type`` (a Dara
  ``__typename`` or a custom ``kind``), which metrics leave out to keep their series bounded.

**What it costs, and why sampling.** One call into the OpenTelemetry SDK (a histogram record, a
counter add, a span) costs several microseconds, about what this library spends delivering a
whole frame; doing it per frame made a broadcast 4-8 times slower. So the counts are plain ints
read by observable instruments when the SDK collects, and the costly parts run for one operation
in ``sample_every`` (default 64) per kind (inbound frames, outbound messages, queue waits,
round trips): its span and its duration. Quantiles and means of the histograms stay right; their
``_count`` is the number of samples (the exact counts are the executions, and for round trips
``dara_ws.requests`` by outcome). A traced operation traces what it causes: the reply a traced
inbound frame sends, the handler it starts, the request frame of a traced round trip. A fan-out
(broadcast, per-user send, a backplane delivery) is *one* outbound operation, for sampling, spans
and durations, with ``dara.websocket.recipients`` on its span, and one execution per recipient;
a recipient costs a wrapper call and a flag, nothing more. ``sample_every=1`` traces and times
everything, as Dara does, at that cost (docs/how-to/telemetry.md has the figures).

As in Dara, pings and pongs are not traced (two spans every few seconds per client). A frame's
type is read from the first bytes of the encoded envelope (``codec.build_frame`` writes ``type``
first), never by decoding it again.

How it stays off the hot paths when off: the handler checks ``counters.telemetry`` once per
inbound frame and once per ``send_and_wait``, the manager once per fan-out; outbound frames cost
no check at all, because a connection created while telemetry is on gets a :class:`TimedQueue`
and a :class:`TimedSink` instead of the plain ones. Connections opened before
:func:`~dara_ws_core.telemetry.instrument` keep the plain ones (no outbound metrics), so call it
before serving.

What an unsampled operation costs when on (the measure of issue 13's bound is a round trip):
a ``send_and_wait`` one decrement of ``trip_budget`` in the handler, which calls
:meth:`DaraTelemetry.round_trip` only for a sampled one; an answer to a server request nothing
(the handler decodes it, counts the countdown down, and its ``requests_answered`` is the count,
read when the SDK collects); any other inbound frame one call
(:meth:`DaraTelemetry.inbound_events`: one lookup of its first event's kind, one count);
a frame written at once one call (:meth:`TimedSink.write_now`, which counts a message inline;
``frames_queued`` and ``close`` are the driver's own bound methods); a queued frame one call
when it is appended and none when it is taken out, unless the queue holds a stamp. A sampled
operation makes as few SDK calls as it can: a span that nothing runs inside (an outbound frame's,
an inbound answer's, a round trip's) is created once it has ended, with its start and end times,
its parent and every attribute, outcome included, since each later ``set_attribute`` costs the
SDK a lock and a validation; and that work, with the durations, is done in batches
(``_BATCH``, ``_DELAY``), so that the SDK's code runs warm: run once per ``sample_every``
operations, it ran cold, at nearly twice the CPU.

This module imports OpenTelemetry inside :class:`DaraTelemetry` only.
"""

from __future__ import annotations

__all__ = ["DaraTelemetry", "TimedQueue", "TimedSink", "frame_type"]

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .codec import PONG_FRAME
from .connection import (
    AnswerIgnored,
    CustomReceived,
    Event,
    FrameDropped,
    RequestCompleted,
    RequestFailed,
    SendFrame,
)
from .custom import DispatchHost, HandlerSpec, deliver, execute_async, execute_sync, run_returned, send_outcome
from .queue import OutboundQueue
from .stats import TRACING, Counters

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import CallbackOptions, Meter, Observation
    from opentelemetry.trace import Span, Tracer

    from .handler import Sink, WebSocketHandler

_perf = time.perf_counter
logger = logging.getLogger(__name__)

#: Wall-clock nanoseconds at perf_counter() zero, re-anchored once a minute: every span time is
#: derived from one perf_counter() reading through it, so a child span never starts before its
#: parent by the few microseconds the two clocks drift apart (each read on its own, they did).
_anchored_at = _perf()
_anchor_ns = time.time_ns() - int(_anchored_at * 1e9)


def _wall_ns(perf: float) -> int:
    """The wall-clock time (ns since the epoch) of a ``perf_counter()`` reading."""
    global _anchor_ns, _anchored_at
    if perf - _anchored_at > 60.0:
        _anchored_at = now = _perf()
        _anchor_ns = time.time_ns() - int(now * 1e9)
    return _anchor_ns + int(perf * 1e9)

#: The SDK work of sampled operations that ended (their spans, durations and queue waits) is
#: deferred and done in batches of this many jobs: the SDK's code then runs warm for all but the
#: first of a batch. Run one at a time, once every ``sample_every`` operations, that code runs
#: cold: a sampled round trip cost nearly twice as much CPU. A job holds no frame (at most a
#: payload type, 128 characters), so a batch is bounded in bytes as well.
_BATCH = 128
#: ... and at most this many seconds after the first of a batch, and before every collection.
_DELAY = 0.5

#: True while a sampled (traced) operation runs: what it sends and the handlers it starts are
#: traced too, so a sampled trace is whole.
_tracing = TRACING

MESSAGE_TYPES = ("message", "custom", "init")

#: An operation's key in the count tables: (direction, message type, outcome, handler execution).
Key = tuple[str, str, str, str]

#: dara-core's histogram buckets for ``*.duration`` (its ``_DURATION_BUCKETS_SECONDS`` view),
#: given as advice so an SDK without Dara's view aggregates the same way.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10,
                    30, 60, 120, 300, 600)

_KIND = b'"kind":"'
#: How every frame of the commonest envelope starts (``codec.build_frame`` writes ``type`` first).
_MESSAGE = b'{"type":"message"'
_TYPENAME = b'{"type":"message","__typename":"'
#: A plain payload's own ``__typename`` (``build_frame`` of a dict that names its type).
_PAYLOAD_TYPENAME = b'{"type":"message","message":{"__typename":"'


def frame_type(frame: bytes) -> str | None:
    """The envelope type of an encoded outbound frame: ``message``, ``custom``, ``init``;
    ``None`` for a pong (not traced)."""
    if frame.startswith(_MESSAGE):
        return "message"
    if frame.startswith(b'{"type":"custom"'):
        return "custom"
    if frame.startswith(b'{"type":"init"'):
        return "init"
    if frame == PONG_FRAME:
        return None
    return "message"  # a foreign envelope model whose first key is not "type"


def payload_type(frame: bytes, message_type: str) -> str | None:
    """What Dara calls the payload type (span only): ``Init``, a custom message's ``kind``, a
    message's ``__typename`` (the envelope's, or else its payload's); read from the first
    bytes of the frame, ``None`` if absent."""
    if message_type == "init":
        return "Init"
    if message_type == "custom":
        start = frame.find(_KIND, 0, 64)
        if start < 0:
            return None
        start += len(_KIND)
    elif frame.startswith(_TYPENAME):
        start = len(_TYPENAME)
    elif frame.startswith(_PAYLOAD_TYPENAME):
        start = len(_PAYLOAD_TYPENAME)
    else:
        return None
    end = frame.find(b'"', start, start + 128)
    return None if end < 0 else frame[start:end].decode("utf-8", "replace")


def classify(events: Sequence[Event]) -> tuple[str | None, str]:
    """The Dara message type and outcome of an inbound frame, from what the connection decided;
    ``None`` for a ping."""
    if not events:
        return "message", "success"  # a part of a chunked answer, stored
    first = events[0]
    kind = type(first)
    if kind is CustomReceived:
        return "custom", "success"
    if kind is RequestCompleted or kind is AnswerIgnored:
        return "message", "success"
    if kind is RequestFailed:
        return "message", "error"
    if isinstance(first, SendFrame):
        if first.frame is PONG_FRAME:
            return None, ""
        return "custom", "error"  # refused: too many handlers running
    if kind is FrameDropped and len(events) > 1:
        return "custom", "error"  # unknown kind, answered with an error
    return "invalid", "error"  # undecodable, or a protocol error that closes the connection


#: What :func:`classify` says of the commonest first events, looked up by their class.
_INBOUND: dict[type, tuple[str, str]] = {
    CustomReceived: ("custom", "success"), AnswerIgnored: ("message", "success"),
    RequestFailed: ("message", "error")}


class _Trip:
    """A sampled round trip (:data:`~dara_ws_core.stats.TRACING` while it runs), whose span is
    made with a batch of deferred work once it has ended: the SDK work of what it traces (its
    request frame) waits here for its context until then."""

    __slots__ = ("children", "context")

    def __init__(self) -> None:
        self.context: Context | None = None
        self.children: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []


def _outcome(error: BaseException) -> str:
    return "cancelled" if isinstance(error, asyncio.CancelledError) else "error"


class DaraTelemetry:
    """The instruments, tracer and running counts of one manager; what ``counters.telemetry``
    holds when on.

    Created by :func:`~dara_ws_core.telemetry.instrument`; raises ``ImportError`` without
    ``opentelemetry-api``, ``TypeError`` for a ``sample_every`` that is not an int and
    ``ValueError`` for one below 1.
    """

    def __init__(self, meter: Meter, tracer: Tracer, sample_every: int = 64,
                 counters: Counters | None = None) -> None:
        from opentelemetry import context, trace
        from opentelemetry.metrics import Observation
        from opentelemetry.trace import SpanKind, Status, StatusCode

        # An int: a float's budget (2.5) samples one in 3, NaN's never reaches its trace.
        if isinstance(sample_every, bool) or not isinstance(sample_every, int):
            raise TypeError(f"sample_every must be an int, not {type(sample_every).__name__}")
        if sample_every < 1:
            raise ValueError(f"sample_every must be at least 1, not {sample_every}")
        #: One operation in this many per kind gets its span and duration.
        self.sample_every = sample_every
        self._context, self._trace, self.tracer = context, trace, tracer
        self._observation = Observation
        self._consumer, self._producer, self._internal = SpanKind.CONSUMER, SpanKind.PRODUCER, SpanKind.INTERNAL
        self._error_status = Status(StatusCode.ERROR)
        # Countdowns to the next sample, per kind; the first operation of each is sampled.
        self.in_budget = self.out_budget = self.queue_budget = self.trip_budget = 1
        self.lag_budget = 1
        #: Deferred SDK work (see ``_BATCH``): done on the event loop's thread only.
        self._jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        #: The manager's totals: an answer to a server request (a frame whose one event is a
        #: ``RequestCompleted``, by far the commonest inbound frame of a round trip) is counted
        #: by the handler's ``requests_answered`` (from this value on), not here: the handler
        #: skips the telemetry for an unsampled one.
        self.counters = counters
        self._answered_base = counters.requests_answered if counters is not None else 0
        #: True while a fan-out delivers (it counts and traces its recipients as one); while a
        #: sampled one does, the first recipient that queues the frame stamps it; a recipient
        #: that writes it at once says so.
        self.fanout = self.stamp_fanout = self.wrote_now = False
        #: Outbound messages accepted for sending, by message type (the hottest count).
        self.sent = dict.fromkeys(MESSAGE_TYPES, 0)
        #: Other completed operations, and the operations running now (outcome ``""``).
        self.executions: dict[Key, int] = {}
        self.running: dict[Key, int] = {}
        self.duration = meter.create_histogram(
            "dara.websocket.message.duration", unit="s",
            description="Duration of Dara WebSocket message operations",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.queue_duration = meter.create_histogram(
            "dara.websocket.queue.duration", unit="s",
            description="Duration an outbound WebSocket message waits before sending",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.round_trip_duration = meter.create_histogram(
            "dara.websocket.round_trip.duration", unit="s",
            description="Duration from sending a WebSocket request until its response is received",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.lag = meter.create_histogram(
            "dara_ws.backplane.lag", unit="s",
            description="Time from a backplane delivery's publication to its receipt (wall "
                        "clocks of two hosts: as exact as their synchronisation)",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        meter.create_observable_counter(
            "dara.websocket.message.executions", [self._observe_executions], unit="{message}",
            description="Number of completed Dara WebSocket message operations")
        meter.create_observable_up_down_counter(
            "dara.websocket.message.active", [self._observe_running], unit="{message}",
            description="Number of Dara WebSocket message operations currently executing")
        # Attribute dicts are built once per combination: a dict per frame would cost more than
        # the recording itself.
        self._attrs: dict[Key, dict[str, str]] = {}
        #: The queue wait carries the message type only, as in Dara.
        self.queue_attributes = {t: {"dara.websocket.message.type": t} for t in MESSAGE_TYPES}
        self._trip_attributes = {
            (t, outcome): {"dara.websocket.message.type": t, "dara.websocket.operation": "round_trip",
                           "dara.outcome": outcome}
            for t in MESSAGE_TYPES for outcome in ("success", "error", "cancelled")}
        for direction, message_type in (("inbound", "message"), ("inbound", "custom"),
                                        ("outbound", "message"), ("outbound", "custom")):
            self.running[(direction, message_type, "", "")] = 0  # the series exist at 0
        for execution in ("sync", "async"):
            self.running[("inbound", "custom", "", execution)] = 0

    def attributes(self, direction: str, message_type: str, outcome: str = "",
                   execution: str = "") -> dict[str, str]:
        """Dara's metric attributes (shared dicts: never mutate them)."""
        key = (direction, message_type, outcome, execution)
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = {"dara.websocket.direction": direction, "dara.websocket.message.type": message_type,
                     "dara.websocket.operation": "handler" if execution else "message"}
            if execution:
                attrs["dara.websocket.handler.execution"] = execution
            if outcome:
                attrs["dara.outcome"] = outcome
            self._attrs[key] = attrs
        return attrs

    # ------------------------------------------------------------------ collection

    def _observations(self, counts: Iterable[tuple[Key, int]]) -> Iterator[Observation]:
        # The SDK may collect from another thread (a Prometheus scrape): the tables are copied
        # with list(), which the GIL makes atomic, before they are read.
        for (direction, message_type, outcome, execution), count in counts:
            yield self._observation(count, self.attributes(direction, message_type, outcome, execution))

    def _observe_executions(self, options: CallbackOptions) -> Iterator[Observation]:
        # Collection runs the observable callbacks before it reads the histograms: the samples
        # deferred so far are in this collection (on the loop's thread; from another, the next).
        if self._jobs:
            if threading.get_ident() == self._thread:
                self.flush()
            elif self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.flush)
        sent = [(("outbound", t, "success", ""), n) for t, n in list(self.sent.items()) if n]
        executions = dict(list(self.executions.items()))
        answered = self.answered()
        if answered:
            key = ("inbound", "message", "success", "")
            executions[key] = executions.get(key, 0) + answered
        yield from self._observations(sent + list(executions.items()))

    def answered(self) -> int:
        """Inbound answers to server requests since this telemetry was created (the
        handler's count)."""
        counters = self.counters
        return 0 if counters is None else counters.requests_answered - self._answered_base

    def _observe_running(self, options: CallbackOptions) -> Iterator[Observation]:
        yield from self._observations(list(self.running.items()))

    def _count(self, table: dict[Key, int], key: Key, add: int = 1) -> None:
        table[key] = table.get(key, 0) + add

    def _defer(self, job: Callable[..., Any], *args: Any) -> None:
        """Do ``job(*args)`` (SDK work of an ended sampled operation, every time and context
        given) with the next batch."""
        jobs = self._jobs
        jobs.append((job, args))
        if len(jobs) >= _BATCH:
            self.flush()
        elif self._timer is None or self._loop is None or self._loop.is_closed():  # (a loop that
            # ended before its timer fired: the next one takes over)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # outside a loop: now
                self.flush()
                return
            self._loop, self._thread = loop, threading.get_ident()
            self._timer = loop.call_later(_DELAY, self.flush)

    def _within(self, parent: Context | _Trip, job: Callable[..., Any], *args: Any) -> None:
        """``job(*args, context)`` in ``parent``'s context, once that exists (deferred work)."""
        if type(parent) is _Trip:
            if parent.context is None:
                parent.children.append((job, args))
                return
            parent = parent.context
        job(*args, parent)

    def current(self) -> Context | _Trip:
        """Where what is sampled now belongs: the round trip being traced, or the current
        context."""
        tracing = _tracing.get()
        return tracing if type(tracing) is _Trip else self._context.get_current()

    def flush(self) -> None:
        """Do the deferred SDK work now (on the event loop's thread)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        jobs, self._jobs = self._jobs, []
        for job, args in jobs:
            try:
                job(*args)
            except Exception:  # the SDK's failure must not lose the rest of the batch
                logger.exception("telemetry: recording a sampled operation failed")

    # ------------------------------------------------------------------ sampled operations

    def _span(self, name: str, attrs: dict[str, str], kind: Any = None, start_ns: int | None = None,
              context: Context | None = None) -> Span:
        return self.tracer.start_span(name, context, kind or self._internal,
                                      attributes=attrs, start_time=start_ns)

    def _done(self, attrs: dict[str, str], started: float, outcome: str, span: Span) -> None:
        """End a sampled operation's span and record its duration."""
        span.set_attribute("dara.outcome", outcome)
        if outcome == "error":
            span.set_status(self._error_status)
        span.end()
        final = self.attributes(attrs["dara.websocket.direction"], attrs["dara.websocket.message.type"],
                                outcome, attrs.get("dara.websocket.handler.execution", ""))
        self.duration.record(_perf() - started, final)

    def outbound(self, frame: bytes, message_type: str, started: float, start_ns: int, *,
                 context: Context | _Trip | None = None, outcome: str = "success",
                 recipients: int | None = None) -> None:
        """Trace one sampled outbound operation that started at ``started`` and ends now.

        Its span is created with the next batch of deferred work, with its start and end
        times, so it is given every attribute at once: a ``set_attribute`` afterwards costs the
        SDK a lock and a validation each. Its parent is ``context``, else the current one."""
        final = self.attributes("outbound", message_type, outcome)
        attrs = {**self.attributes("outbound", message_type), "dara.outcome": outcome}
        ptype = payload_type(frame, message_type)
        if ptype is not None:
            attrs["dara.websocket.message.payload.type"] = ptype
        if recipients is not None:
            attrs["dara.websocket.recipients"] = recipients  # type: ignore[assignment]
        self._defer(self._within, self.current() if context is None else context, self._outbound_span,
                    attrs, final, (start_ns, _wall_ns(ended := _perf()), ended - started))

    def _outbound_span(self, attrs: dict[str, str], final: dict[str, str], times: tuple[int, int, float],
                       context: Context) -> None:
        start_ns, end_ns, seconds = times
        span = self._span("dara.websocket.message.outbound", attrs, self._producer, start_ns, context)
        if attrs["dara.outcome"] == "error":
            span.set_status(self._error_status)
        span.end(end_ns)
        self.duration.record(seconds, final, context)

    def backplane_lag(self, seconds: float) -> None:
        """A backplane delivery arrived ``seconds`` after it was published: 1 in
        ``sample_every`` recorded."""
        self.lag_budget -= 1
        if self.lag_budget <= 0:
            self.lag_budget = self.sample_every
            self.lag.record(seconds)

    def waited(self, frame: bytes, seconds: float) -> None:
        """Record a sampled queue wait of ``frame``."""
        self.queue_budget = self.sample_every
        message_type = frame_type(frame)
        if message_type is not None:
            self.queue_wait(message_type, seconds)

    def queue_wait(self, message_type: str, seconds: float) -> None:
        """Record a sampled queue wait (with the next batch, in the current context)."""
        self._defer(self._within, self.current(), self._queue_wait, seconds, self.queue_attributes[message_type])

    def _queue_wait(self, seconds: float, attrs: dict[str, str], context: Context) -> None:
        self.queue_duration.record(seconds, attrs, context)

    # ------------------------------------------------------------------ outbound

    def queue(self, max_messages: int, max_bytes: int, max_total: int | None = None,
              address: str | None = None) -> OutboundQueue:
        """The outbound queue of a new connection: one that counts and samples its frames."""
        return TimedQueue(self, max_messages, max_bytes, max_total, address)

    def sink(self, sink: Sink | None) -> Sink | None:
        """The sink of a new connection, wrapped to count the frames it writes at once."""
        return None if sink is None else TimedSink(self, sink)

    def written(self, frame: bytes, started: float | None) -> None:
        """A frame that is not part of a fan-out was written at once (:class:`TimedSink`):
        counted; ``started`` (when it was accepted) if it is sampled, else ``None``."""
        message_type = frame_type(frame)
        if message_type is None:  # a pong: neither counted nor traced, as in Dara
            return
        self.sent[message_type] += 1
        if started is None:
            self.out_budget -= 1
            self.queue_budget -= 1
            if self.queue_budget <= 0:
                self.waited(frame, 0.0)
            return
        self.out_budget = self.sample_every
        self.waited(frame, 0.0)
        self.outbound(frame, message_type, started, _wall_ns(started))

    def fan_out(self, deliver: Callable[[Iterable[WebSocketHandler], bytes, str | None], int],
                handlers: Iterable[WebSocketHandler], frame: bytes, ignore_channel: str | None) -> int:
        """``WebsocketManager.deliver_local`` with telemetry: one execution per recipient, and
        the fan-out is *one* outbound operation: sampled like a single message (one in
        ``sample_every``), when it is, one span, one duration and at most two queue waits: ``0``
        if a recipient was written at once, and the wait of the first recipient that queued it."""
        started = _perf()
        traced = self.out_budget <= 1 or bool(_tracing.get())
        self.fanout, self.stamp_fanout, self.wrote_now = True, traced, False
        try:
            delivered = deliver(handlers, frame, ignore_channel)
        finally:
            self.fanout = self.stamp_fanout = False
        if not delivered:
            return 0
        message_type = frame_type(frame) or "message"
        self.sent[message_type] += delivered
        if not traced:
            self.out_budget -= 1
            return delivered
        self.out_budget = self.sample_every
        if self.wrote_now:
            self.queue_wait(message_type, 0.0)
        start_ns = _wall_ns(started)
        self.outbound(frame, message_type, started, start_ns, recipients=delivered)
        return delivered

    # ------------------------------------------------------------------ hooks of the handler

    def inbound(self, handler: WebSocketHandler, frame: str | bytes, now: float) -> Awaitable[None] | None:
        """``WebSocketHandler.receive_frame`` with telemetry: decode, count, and for 1 frame in
        ``sample_every`` carry out the events inside the inbound span (a handler's span is its
        child). The handler calls it for the frame to sample (``in_budget`` down to 1) and
        decodes the others itself (see :meth:`inbound_events`)."""
        if self.in_budget <= 1:
            return self._inbound_traced(handler, frame, now)
        return self.inbound_events(handler, handler.connection.receive_frame(frame, now))

    def inbound_events(self, handler: WebSocketHandler, events: Sequence[Event]) -> Awaitable[None] | None:
        """An unsampled inbound frame, decoded into ``events``: counted, then carried out.

        An answer to a server request (one ``RequestCompleted``) is counted by the handler's
        ``requests_answered`` and read from there when the SDK collects (:meth:`answered`): the
        handler does not even call this for one. Any other frame costs one lookup of its first
        event's kind and one count: no span, no clock."""
        found = _INBOUND.get(type(events[0])) if events else None
        if found is None:  # an answer, a ping, a part of a chunked answer, an error
            if len(events) == 1 and type(events[0]) is RequestCompleted:
                self.in_budget -= 1  # counted by requests_answered
                return handler.apply(events)
            message_type, outcome = classify(events)
            if message_type is None or (not events and handler.closed):
                return handler.apply(events)
        else:
            message_type, outcome = found
        self.in_budget -= 1
        counters = handler.counters
        errors = counters.custom_error
        try:
            pending = handler.apply(events)
        except BaseException as exc:
            self._inbound_done(message_type, _outcome(exc), 0.0, None)
            raise
        if counters.custom_error != errors:
            outcome = "error"  # a sync handler failed
        if pending is not None:
            return self._inbound_rest(pending, message_type, outcome, 0.0, None)
        executions, key = self.executions, ("inbound", message_type, outcome, "")
        executions[key] = executions.get(key, 0) + 1
        return None

    def _inbound_traced(self, handler: WebSocketHandler, frame: str | bytes,
                        now: float) -> Awaitable[None] | None:
        """A sampled inbound frame: its events carried out inside its span."""
        started = _perf()
        start_ns = _wall_ns(started)
        events = handler.connection.receive_frame(frame, now)
        message_type, outcome = classify(events)
        if message_type is None or (not events and handler.closed):
            return handler.apply(events)  # a ping stays a sample to come: not traced
        self.in_budget = self.sample_every
        if len(events) == 1 and type(events[0]) is RequestCompleted:
            # An answer only settles its request's future: nothing runs inside its span, which
            # is therefore created at its end, given every attribute at once.
            handler.apply(events)  # counted by requests_answered
            final = self.attributes("inbound", message_type, outcome)
            self._defer(self._answer_span, final, start_ns, _wall_ns(ended := _perf()), ended - started,
                        self._context.get_current())
            return None
        attrs = self.attributes("inbound", message_type)
        span = self._span("dara.websocket.message.inbound", attrs, self._consumer, start_ns)
        token = self._context.attach(self._trace.set_span_in_context(span))
        tracing = _tracing.set(True)
        counters = handler.counters
        errors = counters.custom_error
        try:
            pending = handler.apply(events)
        except BaseException as exc:
            self._inbound_done(message_type, _outcome(exc), started, span)
            raise
        finally:
            _tracing.reset(tracing)
            self._context.detach(token)
        if counters.custom_error != errors:
            outcome = "error"  # a sync handler failed (its own span says how)
        if pending is None:
            self._inbound_done(message_type, outcome, started, span)
            return None
        return self._inbound_rest(pending, message_type, outcome, started, span)

    def _answer_span(self, attrs: dict[str, str], start_ns: int, end_ns: int, seconds: float,
                     context: Context) -> None:
        self._span("dara.websocket.message.inbound", attrs, self._consumer, start_ns, context).end(end_ns)
        self.duration.record(seconds, attrs, context)

    def _inbound_done(self, message_type: str, outcome: str, started: float, span: Span | None) -> None:
        self._count(self.executions, ("inbound", message_type, outcome, ""))
        if span is not None:
            self._done(self.attributes("inbound", message_type), started, outcome, span)

    async def _inbound_rest(self, pending: Awaitable[None], message_type: str, outcome: str,
                            started: float, span: Span | None) -> None:
        key = ("inbound", message_type, "", "")
        self._count(self.running, key)
        try:
            await pending
        except BaseException as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self._count(self.running, key, -1)
            self._inbound_done(message_type, outcome, started, span)

    async def round_trip(self, request: Awaitable[Any], frame: bytes) -> Any:
        """A sampled ``send_and_wait`` (1 in ``sample_every``, and any inside a traced
        operation): ``request`` inside its round-trip span and duration, with its request
        frame traced too. The handler counts the round trips down itself (``trip_budget``)
        and calls this only when it reaches 0 or :data:`~dara_ws_core.stats.TRACING` is set:
        an unsampled round trip costs one decrement."""
        self.trip_budget = self.sample_every
        message_type = frame_type(frame) or "message"
        attrs = {"dara.websocket.message.type": message_type, "dara.websocket.operation": "round_trip"}
        ptype = payload_type(frame, message_type)
        if ptype is not None:
            attrs["dara.websocket.message.payload.type"] = ptype
        parent, trip = self.current(), _Trip()
        started, outcome = _perf(), "success"
        start_ns = _wall_ns(started)
        tracing = _tracing.set(trip)
        try:
            return await request
        except BaseException as exc:
            outcome = _outcome(exc)
            if outcome == "error":
                attrs["error.type"] = type(exc).__name__
            raise
        finally:
            _tracing.reset(tracing)
            attrs["dara.outcome"] = outcome
            final = self._trip_attributes[message_type, outcome]
            self._defer(self._within, parent, self._trip_span, trip, (attrs, final),
                        (start_ns, _wall_ns(ended := _perf()), ended - started))

    def _trip_span(self, trip: _Trip, attributes: tuple[dict[str, str], dict[str, str]],
                   times: tuple[int, int, float], parent: Context) -> None:
        """Make a sampled round trip's span, then what waited for it (its request frame's)."""
        (attrs, final), (start_ns, end_ns, seconds) = attributes, times
        span = self.tracer.start_span("dara.websocket.round_trip", parent, attributes=attrs, start_time=start_ns)
        if "error.type" in attrs:
            span.set_status(self._error_status)
        span.end(end_ns)
        trip.context = context = self._trace.set_span_in_context(span, parent)
        self.round_trip_duration.record(seconds, final, context)
        children, trip.children = trip.children, []
        for job, args in children:
            job(*args, context)

    # ------------------------------------------------------------------ hooks of custom handlers

    def _handler_span(self, spec: HandlerSpec, execution: str) -> tuple[Span, object]:
        attrs = self.attributes("inbound", "custom", execution=execution)
        span = self.tracer.start_span("dara.websocket.handler.execute",
                                      attributes={**attrs, "dara.websocket.handler.kind": spec.kind})
        return span, self._context.attach(self._trace.set_span_in_context(span))

    def _handler_done(self, execution: str, outcome: str, started: float,
                      traced: tuple[Span, object] | None) -> None:
        self._count(self.executions, ("inbound", "custom", outcome, execution))
        if traced is not None:
            span, token = traced
            self._context.detach(token)  # type: ignore[arg-type]
            self._done(self.attributes("inbound", "custom", execution=execution), started, outcome, span)

    def run_sync(self, spec: HandlerSpec, received: CustomReceived,
                 host: DispatchHost) -> Awaitable[None] | None:
        """A sync handler (``CustomHandlerRegistry.dispatch``), traced when its frame is."""
        started, ok = _perf(), False
        traced = self._handler_span(spec, "sync") if _tracing.get() else None
        returned: Awaitable[Any] | None = None
        try:
            outcome = execute_sync(spec, received, host)
            if not isinstance(outcome, tuple):
                returned = outcome
                return None
            frame, ok = outcome
            return send_outcome(host, frame)
        finally:
            if returned is None:
                self._handler_done("sync", "success" if ok else "error", started, traced)
            else:
                # It returned something to await: one execution, the async one of its task
                # (started once this span is no longer current), not also a sync one. This
                # span is left unended: never exported.
                if traced is not None:
                    self._context.detach(traced[1])  # type: ignore[arg-type]
                run_returned(spec, received, host, returned)

    async def run_task(self, spec: HandlerSpec, received: CustomReceived, host: DispatchHost,
                       job: concurrent.futures.Future[Any] | Awaitable[Any] | None = None) -> None:
        """An async or ``in_thread`` handler's task (``custom._run_task``), traced when its
        frame is."""
        execution = "sync" if spec.in_thread else "async"
        started, outcome = _perf(), "error"
        traced = self._handler_span(spec, execution) if _tracing.get() else None
        key = ("inbound", "custom", "", execution)
        self._count(self.running, key)
        try:
            frame, ok = await execute_async(spec, received, host, job)
            await deliver(host, frame)
            outcome = "success" if ok else "error"
        except BaseException as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self._count(self.running, key, -1)
            self._handler_done(execution, outcome, started, traced)


class TimedSink:
    """A connection's sink that counts (and samples) every frame it writes at once.

    Only the writes are its own: ``frames_queued`` and ``close`` are the wrapped sink's bound
    methods, stored on the instance, so calling them costs nothing more."""

    __slots__ = ("_sink", "_telemetry", "close", "frames_queued")

    def __init__(self, telemetry: DaraTelemetry, sink: Sink) -> None:
        self._telemetry, self._sink = telemetry, sink
        self.frames_queued: Callable[[], None] = sink.frames_queued
        self.close: Callable[[int, str], None] = sink.close

    def write_at_once(self, frame: bytes) -> bool:
        # A request: never part of a fan-out, counted and sampled as a single write_now is.
        return self._counted(frame, self._sink.write_at_once)

    def write_now(self, frame: bytes) -> bool:
        telemetry = self._telemetry
        if telemetry.fanout:
            # A recipient of a fan-out, which counts and samples it: only say it was written at once.
            if self._sink.write_now(frame):
                telemetry.wrote_now = True
                return True
            return False
        return self._counted(frame, self._sink.write_now)

    def _counted(self, frame: bytes, write: Callable[[bytes], bool]) -> bool:
        """``write(frame)`` for one message (not a fan-out's): counted, 1 in ``sample_every``
        timed and traced."""
        telemetry = self._telemetry
        if telemetry.out_budget > 1 and not _tracing.get():
            # Unsampled (nearly every frame): a message is counted here, anything else (custom,
            # init, pong) by the telemetry; a frame that is not written is not counted (its
            # queue counts it).
            if not write(frame):
                return False
            if frame.startswith(_MESSAGE):
                telemetry.out_budget -= 1
                telemetry.sent["message"] += 1
                telemetry.queue_budget -= 1
                if telemetry.queue_budget <= 0:
                    telemetry.waited(frame, 0.0)
            else:
                telemetry.written(frame, None)
            return True
        started = _perf()
        if not write(frame):
            return False
        telemetry.written(frame, started)
        return True


class TimedQueue(OutboundQueue):
    """An outbound queue that counts the frames it accepts and times a sample of them.

    1 frame in ``sample_every`` (of a fan-out: the first queued one of a sampled fan-out) is
    stamped (its position among the frames to be taken out, the time, and unless it is part of
    a fan-out the trace context it was queued in). Taking a stamped frame out records its queue
    wait; the frame is then *being sent* until the next frame is taken or the queue runs empty
    (the driver's send loop takes the next frame once the transport has the previous one), which
    closes its outbound span and duration. Stamps are at most one per queued frame, so bounded
    like the queue.

    Taking frames out costs nothing more than in a plain queue while nothing is stamped: only
    then does the queue become a :class:`_StampingQueue` (same slots, another class), which
    watches what is taken, and it turns back once its stamps are settled.
    """

    __slots__ = ("_removed", "_sending", "_stamps", "_telemetry")

    def __init__(self, telemetry: DaraTelemetry, max_messages: int, max_bytes: int,
                 max_total: int | None = None, address: str | None = None) -> None:
        super().__init__(max_messages, max_bytes, max_total, address)
        self._telemetry = telemetry
        #: Frames removed (taken or dropped) since the queue last began stamping: a position.
        self._removed = 0
        self._stamps: deque[tuple[int, float, Context | _Trip | None]] | None = None
        self._sending: tuple[bytes, str, float, int, Context | _Trip] | None = None

    def _append(self, frame: bytes) -> None:
        OutboundQueue._append(self, frame)
        telemetry = self._telemetry
        if telemetry.fanout:  # the fan-out counts and traces it
            if telemetry.stamp_fanout:
                telemetry.stamp_fanout = False
                self._stamp(None)
            return
        message_type = "message" if frame.startswith(_MESSAGE) else frame_type(frame)
        if message_type is None:  # a pong
            return
        telemetry.sent[message_type] += 1
        telemetry.queue_budget -= 1
        if telemetry.queue_budget <= 0 or _tracing.get():
            telemetry.queue_budget = telemetry.sample_every
            self._stamp(telemetry.current())

    def _stamp(self, context: Context | _Trip | None) -> None:
        """Stamp the frame just appended: it is taken out after the others queued now."""
        if type(self) is TimedQueue:
            self._removed = 0
            self._become(_StampingQueue)
        stamps = self._stamps
        if stamps is None:
            self._stamps = stamps = deque()
        stamps.append((self._removed + len(self._frames) - 1, _perf(), context))

    def _become(self, kind: type[TimedQueue]) -> None:
        self.__class__ = kind

    def _drop_oldest(self, size: int, discarded: list[bytes] | None) -> int:
        # Before the new frame is appended (and perhaps stamped at its position): the positions
        # count the dropped frames as removed, and their stamps go with them.
        dropped = super()._drop_oldest(size, discarded)
        if dropped:
            self._removed += dropped
            stamps = self._stamps
            while stamps and stamps[0][0] < self._removed:
                stamps.popleft()
        return dropped

    def _sent(self, outcome: str = "success") -> None:
        sending = self._sending
        if sending is not None:
            self._sending = None
            self._telemetry.outbound(*sending[:4], context=sending[4], outcome=outcome)

    def _taken(self, frame: bytes) -> None:
        """``frame`` was taken out: the frame being sent before it is sent, and if it was
        stamped its wait is recorded."""
        index = self._removed
        self._removed = index + 1
        if self._sending is not None:
            self._sent()
        stamps = self._stamps
        if not stamps or stamps[0][0] != index:
            return
        _, queued, context = stamps.popleft()
        message_type = frame_type(frame)
        if message_type is None:
            return
        now = _perf()
        telemetry = self._telemetry
        telemetry.queue_wait(message_type, now - queued)
        if context is not None:
            self._sending = (frame, message_type, now, _wall_ns(now), context)

    async def get(self) -> bytes:
        # Watched in either class: a consumer waiting here may see the queue begin stamping.
        self._sent()
        frame = await super().get()
        self._taken(frame)
        self._settle()
        return frame

    def _settle(self) -> None:
        """Taking frames out is plain again once every stamp is settled."""
        if not self._stamps and self._sending is None and type(self) is not TimedQueue:
            self._become(TimedQueue)

    def close(self) -> None:
        self._sent("error")
        if self._stamps:
            self._stamps.clear()
        super().close()


class _StampingQueue(TimedQueue):
    """A :class:`TimedQueue` with stamped frames queued, or one being sent: every frame taken
    out is watched, until none is."""

    __slots__ = ()

    def get_nowait(self) -> bytes | None:
        frame = OutboundQueue.get_nowait(self)
        if frame is None:
            self._sent()
        else:
            self._taken(frame)
        if not self._stamps and self._sending is None:
            self._become(TimedQueue)  # settled (as _settle, inline: once per frame taken)
        return frame
