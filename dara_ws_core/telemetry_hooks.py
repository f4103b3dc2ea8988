"""Dara's own WebSocket metrics and spans, for :func:`dara_ws_core.telemetry.instrument`.

The names, units, attributes and meaning are those of dara-core's ``dara/core/telemetry.py``
(1.30.0), so a dashboard built on a Dara application reads this library unchanged:

* ``dara.websocket.message.active`` (UpDownCounter, ``{message}``), ``.duration`` (histogram,
  ``s``) and ``.executions`` (counter, ``{message}``): one *operation* per traced inbound frame,
  outbound frame and custom handler run. Attributes ``dara.websocket.direction``,
  ``dara.websocket.message.type`` (``message``, ``custom``, ``init``, ``invalid``),
  ``dara.websocket.operation`` (``message`` or ``handler``), for handlers
  ``dara.websocket.handler.execution`` (``sync`` or ``async``; an ``in_thread`` handler is a sync
  function: ``sync``), and on the duration and executions ``dara.outcome`` (``success``,
  ``error``, ``cancelled``).
* ``dara.websocket.queue.duration`` (histogram, ``s``; ``dara.websocket.message.type``): from
  accepting an outbound frame to taking it out for the transport; ``0`` for a frame written at
  once (Dara's every message passes through its queue).
* ``dara.websocket.round_trip.duration`` (histogram, ``s``; ``dara.websocket.message.type``,
  ``dara.websocket.operation`` = ``round_trip``, ``dara.outcome``): ``send_and_wait``.
* Spans ``dara.websocket.message.inbound`` (CONSUMER) / ``.outbound`` (PRODUCER),
  ``dara.websocket.handler.execute`` and ``dara.websocket.round_trip``; the spans add
  ``dara.websocket.handler.kind`` and ``dara.websocket.message.payload.type`` (a Dara
  ``__typename`` or a custom ``kind``), which metrics leave out to keep their series bounded.

As in Dara, pings and pongs are not traced (two spans every few seconds per client). A frame's
type is read from the first bytes of the encoded envelope (``codec.build_frame`` writes ``type``
first), never by decoding it again.

How it stays off the hot paths: the handler checks ``counters.telemetry`` once per inbound frame
and once per ``send_and_wait``; outbound frames cost no check at all, because a connection
created while telemetry is on gets a :class:`TimedQueue` and a :class:`TimedSink` instead of the
plain ones. Connections opened before :func:`~dara_ws_core.telemetry.instrument` keep the plain
ones (no outbound metrics), so call it before serving. This module imports OpenTelemetry inside
:class:`DaraTelemetry` only.
"""

from __future__ import annotations

__all__ = ["DaraTelemetry", "TimedQueue", "TimedSink", "frame_type"]

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Sequence
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
from .custom import DispatchHost, HandlerSpec, deliver, execute_async, execute_sync, send_outcome
from .queue import OutboundQueue

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Meter
    from opentelemetry.trace import Span, Tracer

    from .handler import Sink, WebSocketHandler

_perf = time.perf_counter

#: dara-core's histogram buckets for ``*.duration`` (its ``_DURATION_BUCKETS_SECONDS`` view),
#: given as advice so an SDK without Dara's view aggregates the same way.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10,
                    30, 60, 120, 300, 600)

_KIND = b'"kind":"'
_TYPENAME = b'{"type":"message","__typename":"'


def frame_type(frame: bytes) -> str | None:
    """The envelope type of an encoded outbound frame: ``message``, ``custom``, ``init``;
    ``None`` for a pong (not traced)."""
    if frame.startswith(b'{"type":"message"'):
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
    message's ``__typename``; read from the first bytes of the frame, ``None`` if absent."""
    if message_type == "init":
        return "Init"
    if message_type == "custom":
        start = frame.find(_KIND, 0, 64)
        if start < 0:
            return None
        start += len(_KIND)
    elif frame.startswith(_TYPENAME):
        start = len(_TYPENAME)
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


def _outcome(error: BaseException) -> str:
    return "cancelled" if isinstance(error, asyncio.CancelledError) else "error"


class DaraTelemetry:
    """The instruments and tracer of one manager; what ``counters.telemetry`` holds when on.

    Created by :func:`~dara_ws_core.telemetry.instrument`; raises ``ImportError`` without
    ``opentelemetry-api``.
    """

    def __init__(self, meter: Meter, tracer: Tracer) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self._context, self._trace, self.tracer = context, trace, tracer
        self._consumer, self._producer = SpanKind.CONSUMER, SpanKind.PRODUCER
        self._error_status = Status(StatusCode.ERROR)
        self.active = meter.create_up_down_counter(
            "dara.websocket.message.active", unit="{message}",
            description="Number of Dara WebSocket message operations currently executing")
        self.duration = meter.create_histogram(
            "dara.websocket.message.duration", unit="s",
            description="Duration of Dara WebSocket message operations",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.executions = meter.create_counter(
            "dara.websocket.message.executions", unit="{message}",
            description="Number of completed Dara WebSocket message operations")
        self.queue_duration = meter.create_histogram(
            "dara.websocket.queue.duration", unit="s",
            description="Duration an outbound WebSocket message waits before sending",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.round_trip_duration = meter.create_histogram(
            "dara.websocket.round_trip.duration", unit="s",
            description="Duration from sending a WebSocket request until its response is received",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        # Attribute dicts are built once per combination: a dict per frame would cost more than
        # the recording itself.
        self._attrs: dict[tuple[str, ...], dict[str, str]] = {}
        #: The queue wait carries the message type only, as in Dara.
        self.queue_attributes = {t: {"dara.websocket.message.type": t} for t in ("message", "custom", "init")}
        for direction, message_type in (("inbound", "message"), ("inbound", "custom"),
                                        ("outbound", "message"), ("outbound", "custom")):
            self.active.add(0, self.attributes(direction, message_type))  # series exist at 0
        for execution in ("sync", "async"):
            self.active.add(0, self.attributes("inbound", "custom", execution=execution))

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

    def _done(self, attrs: dict[str, str], started: float, outcome: str, span: Span) -> None:
        span.set_attribute("dara.outcome", outcome)
        if outcome == "error":
            span.set_status(self._error_status)
        span.end()
        final = self.attributes(attrs["dara.websocket.direction"], attrs["dara.websocket.message.type"],
                                outcome, attrs.get("dara.websocket.handler.execution", ""))
        self.duration.record(_perf() - started, final)
        self.executions.add(1, final)

    # ------------------------------------------------------------------ per connection

    def queue(self, max_messages: int, max_bytes: int) -> OutboundQueue:
        """The outbound queue of a new connection: one that times its frames."""
        return TimedQueue(self, max_messages, max_bytes)

    def sink(self, sink: Sink | None) -> Sink | None:
        """The sink of a new connection, wrapped to trace the frames it writes at once."""
        return None if sink is None else TimedSink(self, sink)

    def outbound(self, frame: bytes, message_type: str, started: float, start_ns: int, *,
                 context: Context | None = None, outcome: str = "success") -> None:
        """Record one outbound frame handed to the transport (started at ``started``)."""
        span = self.tracer.start_span("dara.websocket.message.outbound", context, self._producer,
                                      start_time=start_ns)
        attrs = self.attributes("outbound", message_type)
        if span.is_recording():
            span.set_attributes(attrs)
            ptype = payload_type(frame, message_type)
            if ptype is not None:
                span.set_attribute("dara.websocket.message.payload.type", ptype)
        self._done(attrs, started, outcome, span)

    # ------------------------------------------------------------------ hooks of the handler

    def inbound(self, handler: WebSocketHandler, frame: str | bytes, now: float) -> Awaitable[None] | None:
        """``WebSocketHandler.receive_frame`` with telemetry: decode, then carry out the events
        inside the inbound span (a handler's span is its child)."""
        started, start_ns = _perf(), time.time_ns()
        events = handler.connection.receive_frame(frame, now)
        message_type, outcome = classify(events)
        if message_type is None or (not events and handler.closed):
            return handler.apply(events)
        attrs = self.attributes("inbound", message_type)
        span = self.tracer.start_span("dara.websocket.message.inbound", None, self._consumer,
                                      attributes=attrs, start_time=start_ns)
        counters = handler.counters
        errors = counters.custom_error
        token = self._context.attach(self._trace.set_span_in_context(span))
        try:
            pending = handler.apply(events)
        except BaseException as exc:
            self._done(attrs, started, _outcome(exc), span)
            raise
        finally:
            self._context.detach(token)
        if counters.custom_error != errors:
            outcome = "error"  # a sync handler failed (its own span says how)
        if pending is None:
            self._done(attrs, started, outcome, span)
            return None
        return self._inbound_rest(pending, attrs, started, outcome, span)

    async def _inbound_rest(self, pending: Awaitable[None], attrs: dict[str, str], started: float,
                            outcome: str, span: Span) -> None:
        self.active.add(1, attrs)
        try:
            await pending
        except BaseException as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self.active.add(-1, attrs)
            self._done(attrs, started, outcome, span)

    async def round_trip(self, request: Awaitable[Any], frame: bytes) -> Any:
        """``send_and_wait`` with telemetry: the round-trip span and duration around ``request``."""
        message_type = frame_type(frame) or "message"
        attrs = {"dara.websocket.message.type": message_type, "dara.websocket.operation": "round_trip"}
        started, outcome = _perf(), "success"
        with self.tracer.start_as_current_span("dara.websocket.round_trip", attributes=attrs,
                                               record_exception=False,
                                               set_status_on_exception=False) as span:
            ptype = payload_type(frame, message_type)
            if ptype is not None:
                span.set_attribute("dara.websocket.message.payload.type", ptype)
            try:
                return await request
            except BaseException as exc:
                outcome = _outcome(exc)
                if outcome == "error":
                    span.set_attribute("error.type", type(exc).__name__)
                    span.set_status(self._error_status)
                raise
            finally:
                span.set_attribute("dara.outcome", outcome)
                self.round_trip_duration.record(_perf() - started, {**attrs, "dara.outcome": outcome})

    # ------------------------------------------------------------------ hooks of custom handlers

    def _handler_span(self, spec: HandlerSpec, execution: str) -> tuple[dict[str, str], Span, object]:
        attrs = self.attributes("inbound", "custom", execution=execution)
        span = self.tracer.start_span("dara.websocket.handler.execute",
                                      attributes={**attrs, "dara.websocket.handler.kind": spec.kind})
        return attrs, span, self._context.attach(self._trace.set_span_in_context(span))

    def run_sync(self, spec: HandlerSpec, received: CustomReceived,
                 host: DispatchHost) -> Awaitable[None] | None:
        """A sync handler (``CustomHandlerRegistry.dispatch``) inside its span."""
        started, ok = _perf(), False
        attrs, span, token = self._handler_span(spec, "sync")
        try:
            frame, ok = execute_sync(spec, received, host)
            return send_outcome(host, frame)
        finally:
            self._context.detach(token)  # type: ignore[arg-type]
            self._done(attrs, started, "success" if ok else "error", span)

    async def run_task(self, spec: HandlerSpec, received: CustomReceived, host: DispatchHost) -> None:
        """An async or ``in_thread`` handler's task (``custom._run_task``) inside its span."""
        started, outcome = _perf(), "error"
        attrs, span, token = self._handler_span(spec, "sync" if spec.in_thread else "async")
        self.active.add(1, attrs)
        try:
            frame, ok = await execute_async(spec, received, host)
            await deliver(host, frame)
            outcome = "success" if ok else "error"
        except BaseException as exc:
            outcome = _outcome(exc)
            raise
        finally:
            self._context.detach(token)  # type: ignore[arg-type]
            self.active.add(-1, attrs)
            self._done(attrs, started, outcome, span)


class TimedSink:
    """A connection's sink that traces every frame it writes at once (queue wait ``0``)."""

    __slots__ = ("_sink", "_telemetry")

    def __init__(self, telemetry: DaraTelemetry, sink: Sink) -> None:
        self._telemetry, self._sink = telemetry, sink

    def write_now(self, frame: bytes) -> bool:
        message_type = frame_type(frame)
        if message_type is None:
            return self._sink.write_now(frame)
        started, start_ns = _perf(), time.time_ns()
        if not self._sink.write_now(frame):
            return False
        telemetry = self._telemetry
        telemetry.queue_duration.record(0.0, telemetry.queue_attributes[message_type])
        telemetry.outbound(frame, message_type, started, start_ns)
        return True

    def frames_queued(self) -> None:
        self._sink.frames_queued()

    def close(self, code: int, reason: str) -> None:
        self._sink.close(code, reason)


class TimedQueue(OutboundQueue):
    """An outbound queue that remembers when (and in which trace context) each frame was queued.

    Taking a frame out records its queue wait; the frame is then *being sent* until the next
    frame is taken or the queue runs empty (the driver's send loop takes the next frame once the
    transport has the previous one), which closes its outbound span and duration.
    """

    __slots__ = ("_sending", "_stamps", "_telemetry")

    def __init__(self, telemetry: DaraTelemetry, max_messages: int, max_bytes: int) -> None:
        super().__init__(max_messages, max_bytes)
        self._telemetry = telemetry
        self._stamps: deque[tuple[float, Context]] = deque()
        self._sending: tuple[bytes, str, float, int, Context] | None = None

    def _append(self, frame: bytes) -> None:
        self._stamps.append((_perf(), self._telemetry._context.get_current()))
        super()._append(frame)

    def drop_oldest_and_put(self, frame: bytes) -> int:
        dropped = super().drop_oldest_and_put(frame)
        for _ in range(dropped):  # the new frame's stamp is on the right
            self._stamps.popleft()
        return dropped

    def _taken(self, frame: bytes | None) -> None:
        sending, telemetry = self._sending, self._telemetry
        self._sending = None
        if sending is not None:
            telemetry.outbound(*sending[:4], context=sending[4])
        if frame is None or not self._stamps:
            return
        queued, context = self._stamps.popleft()
        message_type = frame_type(frame)
        if message_type is None:
            return
        now = _perf()
        telemetry.queue_duration.record(now - queued, telemetry.queue_attributes[message_type])
        self._sending = (frame, message_type, now, time.time_ns(), context)

    async def get(self) -> bytes:
        self._taken(None)
        frame = await super().get()
        self._taken(frame)
        return frame

    def get_nowait(self) -> bytes | None:
        frame = super().get_nowait()
        self._taken(frame)
        return frame

    def close(self) -> None:
        sending = self._sending
        self._sending = None
        if sending is not None:
            self._telemetry.outbound(*sending[:4], context=sending[4], outcome="error")
        self._stamps.clear()
        super().close()
