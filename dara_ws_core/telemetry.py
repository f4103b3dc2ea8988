"""OpenTelemetry metrics of a server (the ``[otel]`` extra): :func:`instrument`.

The operator's metrics are **observable** instruments read from :meth:`WebsocketManager.stats`
when the SDK collects (every 60 s by default), so they cost the hot paths nothing: the counters
behind them are the plain ints the manager keeps anyway. Nothing here is imported by the core;
``opentelemetry`` is imported inside :func:`instrument` only, so a server that never calls it
never loads it.

Metric names (unit; attributes):

* ``dara_ws.connections`` (gauge, ``{connection}``; ``dara_ws.transport``): open now.
* ``dara_ws.connections.opened`` (counter, ``{connection}``).
* ``dara_ws.handshakes`` (counter, ``{handshake}``; ``dara_ws.outcome`` = ``accepted`` or
  ``rejected``, ``dara_ws.reason`` for rejections: ``auth``, ``error``, ``limit``, ``shutdown``).
* ``dara_ws.closes`` (counter, ``{connection}``; ``dara_ws.close_code``: the code for those of
  RFC 6455 (1000-1015), else its class, ``3xxx``, ``4xxx`` or ``other``: a peer picks the code it
  closes with, and must not pick how many series there are).
* ``dara_ws.frames`` (counter, ``{frame}``) and ``dara_ws.bytes`` (counter, ``By``);
  ``dara_ws.direction`` = ``inbound`` / ``outbound``.
* ``dara_ws.frames.dropped`` (counter, ``{frame}``): discarded by ``DROP_OLDEST`` queues.
* ``dara_ws.slow_consumer.events`` (counter, ``{event}``; ``dara_ws.policy``).
* ``dara_ws.senders.paused`` (counter, ``{event}``): a connection's reading paused because the
  fan-outs its messages caused were past their readers' queue bounds.
* ``dara_ws.queue.frames``, ``dara_ws.queue.bytes``, ``dara_ws.queue.max_depth`` (gauges).
* ``dara_ws.requests.pending`` (gauge) and ``dara_ws.requests`` (counter; ``dara_ws.outcome`` =
  ``answered``, ``timeout``, ``closed``, ``chunk_error``): server requests (``send_and_wait``).
* ``dara_ws.handler.outcomes`` (counter; ``dara_ws.outcome`` = ``ok``, ``error``, ``timeout``,
  ``busy``) and ``dara_ws.handler.running`` (gauge): custom handlers.
* ``dara_ws.backplane.messages`` (counter; ``dara_ws.backplane.event`` = each field of
  :class:`~dara_ws_core.backplane.BackplaneStats` but the lag: ``published``, ``received``,
  ``delivered``, ``failed``, ``spool_dropped``, ``undeliverable``, ``reconnects``, ``kept``,
  ``replayed``, ``refused``, ``outbox_refused``, ``gaps``, ``lost``, ``recovered``) and
  ``dara_ws.backplane.connected`` (gauge: ``1`` while the bus connection is up, ``0`` during an
  outage) with a backplane, and ``dara_ws.backplane.lag`` (histogram, ``s``, sampled: from a
  delivery's publication to its receipt here, by the two hosts' wall clocks; see
  :mod:`dara_ws_core.telemetry_hooks`).
"""

from __future__ import annotations

__all__ = ["instrument"]

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import TracerProvider

    from .manager import WebsocketManager
    from .stats import ServerStats

#: Snapshots are reused for this long: one collection reads every instrument from one snapshot.
_SNAPSHOT_TTL = 0.5


def close_code_labels(close_codes: Mapping[int, int]) -> dict[str, int]:
    """Connections ended by close code, as metric labels: a code of RFC 6455's range (1000-1015)
    as itself, any other by its class (``3xxx``: registered, ``4xxx``: private, ``other``), so
    that the codes peers close with (any of 2,000 and more) make at most 19 series."""
    labels: dict[str, int] = {}
    for code, count in close_codes.items():
        if 1000 <= code <= 1015:
            label = str(code)
        elif 3000 <= code <= 4999:
            label = f"{code // 1000}xxx"
        else:
            label = "other"
        labels[label] = labels.get(label, 0) + count
    return labels


def instrument(manager: WebsocketManager, meter_provider: MeterProvider | None = None,
               tracer_provider: TracerProvider | None = None, *, sample_every: int = 64) -> None:
    """Register ``manager``'s metrics with ``meter_provider`` and its spans with
    ``tracer_provider`` (defaults: the global ones).

    Besides the operator's metrics above, this turns on Dara's own names
    (:mod:`dara_ws_core.telemetry_hooks`): ``dara.websocket.*`` metrics and spans, recorded as
    frames pass: counted exactly, and one operation in ``sample_every`` per kind traced and
    timed (``1``: all of them, at several microseconds each; see the module's "What it costs").
    Call it once per manager, before the server accepts connections (connections
    opened earlier get no outbound metrics). Raises ``ImportError`` naming the extra to install
    when ``opentelemetry-api`` is missing, ``TypeError`` for a ``sample_every`` that is not an
    int and ``ValueError`` for one below 1.
    """
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.metrics import Observation
    except ImportError as exc:  # the extra is missing: say which one to install
        raise ImportError(
            'dara_ws_core.telemetry needs OpenTelemetry: pip install "dara-ws-core[otel]"',
            name=exc.name,
        ) from exc
    from .telemetry_hooks import DaraTelemetry

    provider = meter_provider or metrics.get_meter_provider()
    meter = provider.get_meter("dara_ws_core")
    tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("dara_ws_core")
    manager.counters.telemetry = DaraTelemetry(meter, tracer, sample_every, manager.counters)
    cached: list[Any] = [0.0, None]

    def snapshot() -> ServerStats:
        now = time.monotonic()
        if cached[1] is None or now - cached[0] > _SNAPSHOT_TTL:
            cached[0], cached[1] = now, manager.stats()
        stats: ServerStats = cached[1]
        return stats

    def observe(read: Callable[[ServerStats], Iterable[tuple[int, dict[str, str]]]]) -> Any:
        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for value, attributes in read(snapshot()):
                yield Observation(value, attributes)
        return [callback]

    def table(values: Any, key: str, **fixed: str) -> list[tuple[int, dict[str, str]]]:
        return [(count, {**fixed, key: str(label)}) for label, count in values.items()]

    gauge, counter = meter.create_observable_gauge, meter.create_observable_counter
    gauge("dara_ws.connections", observe(lambda s: table(s.connections_by_transport, "dara_ws.transport")),
          unit="{connection}", description="WebSocket connections open now")
    counter("dara_ws.connections.opened", observe(lambda s: [(s.connections_opened, {})]),
            unit="{connection}", description="WebSocket connections opened")
    counter("dara_ws.handshakes", observe(lambda s: [
        (s.handshakes_accepted, {"dara_ws.outcome": "accepted"}),
        *table(s.handshakes_rejected, "dara_ws.reason", **{"dara_ws.outcome": "rejected"}),
    ]), unit="{handshake}", description="WebSocket handshakes by outcome and rejection reason")
    counter("dara_ws.closes", observe(lambda s: table(close_code_labels(s.close_codes), "dara_ws.close_code")),
            unit="{connection}", description="Ended connections by close code")
    counter("dara_ws.frames", observe(lambda s: [
        (s.frames_in, {"dara_ws.direction": "inbound"}), (s.frames_out, {"dara_ws.direction": "outbound"}),
    ]), unit="{frame}", description="Frames received and accepted for sending")
    counter("dara_ws.bytes", observe(lambda s: [
        (s.bytes_in, {"dara_ws.direction": "inbound"}), (s.bytes_out, {"dara_ws.direction": "outbound"}),
    ]), unit="By", description="Bytes of frames received and accepted for sending")
    counter("dara_ws.frames.dropped", observe(lambda s: [(s.frames_dropped, {})]),
            unit="{frame}", description="Frames discarded by DROP_OLDEST queues")
    # Every policy is reported, at 0 until it happens: a dashboard's query finds the series.
    counter("dara_ws.slow_consumer.events", observe(lambda s: table(
        {"drop_oldest": 0, "wait": 0, "disconnect": 0, **s.slow_consumer}, "dara_ws.policy")),
            unit="{event}", description="Slow-consumer events by policy")
    counter("dara_ws.senders.paused", observe(lambda s: [(s.senders_paused, {})]),
            unit="{event}", description="Senders held back for the fan-out bursts they caused")
    gauge("dara_ws.queue.frames", observe(lambda s: [(s.queued_frames, {})]),
          unit="{frame}", description="Frames waiting in outbound queues")
    gauge("dara_ws.queue.bytes", observe(lambda s: [(s.queued_bytes, {})]),
          unit="By", description="Bytes waiting in outbound queues")
    gauge("dara_ws.queue.max_depth", observe(lambda s: [(s.max_queue_depth, {})]),
          unit="{frame}", description="The longest outbound queue")
    gauge("dara_ws.requests.pending", observe(lambda s: [(s.pending_requests, {})]),
          unit="{request}", description="Server requests waiting for an answer")
    counter("dara_ws.requests", observe(lambda s: table(s.requests, "dara_ws.outcome")),
            unit="{request}", description="Server requests (send_and_wait) by outcome")
    counter("dara_ws.handler.outcomes", observe(lambda s: table(s.custom_handlers, "dara_ws.outcome")),
            unit="{execution}", description="Custom handler executions by outcome")
    counter("dara_ws.hook.outcomes", observe(lambda s: [
        (count, {"dara_ws.hook": key.partition("_")[0], "dara_ws.outcome": key.partition("_")[2]})
        for key, count in s.hooks.items()
    ]), unit="{execution}", description="on_connect and on_disconnect hook runs by outcome")
    gauge("dara_ws.handler.running", observe(lambda s: [(s.handlers_running, {})]),
          unit="{execution}", description="Custom handlers running now")
    counter("dara_ws.backplane.messages", observe(lambda s: table(
        {k: v for k, v in (s.backplane or {}).items() if not k.startswith("lag_")},
        "dara_ws.backplane.event")),
        unit="{message}", description="Backplane messages by event")

    def bus_up(options: CallbackOptions) -> Iterator[Observation]:
        connected = getattr(manager.backplane, "connected", None)
        if isinstance(connected, bool):  # no series without a backplane
            yield Observation(int(connected), {})

    gauge("dara_ws.backplane.connected", [bus_up], unit="1",
          description="1 while the backplane's bus connection is up, 0 during an outage")
