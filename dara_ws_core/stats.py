"""What a server has done and holds right now, without any extra: :meth:`WebsocketManager.stats`.

:class:`Counters` are the running totals of one manager: plain ``int`` attributes (and a few small
dicts keyed by a bounded label: a close code, a rejection reason, a policy) incremented on code
paths that run anyway, with no lock (one event loop) and no allocation per message. The manager
owns one, the handlers and the endpoint count into it, and
:meth:`~dara_ws_core.manager.WebsocketManager.stats` adds what is measured from the live
connections (queues, pending requests) into an immutable :class:`ServerStats`, in time linear in
the number of connections: cheap enough to call every second. The OpenTelemetry and Prometheus
exports (:mod:`dara_ws_core.telemetry`) read the same snapshot.
"""

from __future__ import annotations

__all__ = ["Counters", "ServerStats", "collect", "transport_label"]

import contextvars
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

#: True while an operation sampled by the telemetry runs (:mod:`dara_ws_core.telemetry_hooks`):
#: what it sends and the handlers it starts are traced too, so a sampled trace is whole. Here,
#: not in the telemetry's module, so that the handler's countdown of round trips reads it without
#: importing that module.
#: (Truthy: ``True``, or the sampled round trip whose span is made later, which its request
#: frame's span names as its parent.)
TRACING: contextvars.ContextVar[object] = contextvars.ContextVar("dara_ws_tracing", default=False)


def transport_label(transport: object) -> str:
    """A short name for a transport (``websockets``, ``aiohttp``, ``asgi``, ``memory``...): its
    ``transport_name`` attribute if it has one, else the last part of its module's name without
    the ``dara_ws_`` prefix."""
    name = getattr(transport, "transport_name", None)
    if isinstance(name, str):
        return name
    module = type(transport).__module__.rpartition(".")[2]
    return module.removeprefix("dara_ws_")


class Counters:
    """Running totals of one manager (mutable; read them through :class:`ServerStats`).

    Every counter only grows. Frames and bytes are counted where the handler sees them: inbound
    when read, outbound when accepted for sending (written at once or queued); frames a
    ``DROP_OLDEST`` queue discards later, and the backlog of a connection closed as a slow
    consumer, are counted in :attr:`frames_dropped` as well. Inbound
    text frames are counted in characters as the transport delivers them (equal to bytes for
    ASCII JSON, which is what Dara's client sends for ASCII data).
    """

    __slots__ = ("bytes_in", "bytes_out", "close_codes", "connections_opened", "custom_busy",
                 "custom_error", "custom_ok", "custom_timeout", "frames_dropped", "frames_in",
                 "frames_out", "handshakes_accepted", "handshakes_rejected", "hooks", "requests_answered",
                 "requests_chunk_error", "requests_closed", "requests_timeout", "senders_paused",
                 "slow_consumer", "telemetry")

    def __init__(self) -> None:
        self.connections_opened = 0
        self.handshakes_accepted = 0
        #: Rejected handshakes by reason (``auth``, ``error``, ``full``, ``address``, ``limit``,
        #: ``shutdown``).
        self.handshakes_rejected: dict[str, int] = {}
        #: Connections that ended, by close code.
        self.close_codes: dict[int, int] = {}
        self.frames_in = 0
        self.bytes_in = 0
        self.frames_out = 0
        self.bytes_out = 0
        #: Slow-consumer events by policy (``drop_oldest``: a frame that made room by dropping
        #: older ones; ``wait`` / ``disconnect``: a channel disconnected with 1013).
        self.slow_consumer: dict[str, int] = {}
        self.frames_dropped = 0
        #: Times a connection's reading paused because its messages' fan-outs queued frames
        #: past their recipients' bounds (``driver.ORIGIN_SHARE``).
        self.senders_paused = 0
        self.requests_answered = 0
        self.requests_timeout = 0
        self.requests_closed = 0
        self.requests_chunk_error = 0
        self.custom_ok = 0
        self.custom_error = 0
        self.custom_timeout = 0
        #: ``busy`` answers of connections that are gone (live ones are summed by the snapshot).
        self.custom_busy = 0
        #: ``on_connect`` / ``on_disconnect`` hook outcomes (``connect_ok``, ``connect_error``,
        #: ``connect_timeout``, the same for ``disconnect``): see :mod:`dara_ws_core.lifecycle`.
        self.hooks: dict[str, int] = {}
        #: The OpenTelemetry instruments when enabled (:func:`dara_ws_core.telemetry.instrument`),
        #: else ``None``: the one attribute a hot path checks.
        self.telemetry: Any = None

    def count(self, table: dict[Any, int], key: Any) -> None:
        """Add one to ``table[key]`` (a close code, a rejection reason, a policy)."""
        table[key] = table.get(key, 0) + 1


@dataclass(frozen=True, slots=True)
class ServerStats:
    """A snapshot of one manager's server (one process), from :meth:`WebsocketManager.stats`.

    Totals (``*_total`` mappings, counts of frames, bytes and outcomes) grow for the life of the
    manager; the others are the current state.
    """

    #: Connections open now (channels of this process).
    connections: int
    #: Connections open now by transport (``websockets``, ``aiohttp``, ``asgi``, ``memory``;
    #: ``unknown`` for handlers created without a driver).
    connections_by_transport: Mapping[str, int]
    connections_opened: int
    handshakes_accepted: int
    #: Rejected handshakes by reason: ``auth`` (the authenticator refused), ``error`` (it
    #: crashed), ``timeout`` (it took over half of ``handshake_timeout``), ``limit``
    #: (``max_connections_per_user``), ``full`` (``max_connections``: answered 503, or closed
    #: at once), ``address`` (``max_connections_per_address``, the same), ``evicted`` (a
    #: socket still in its handshake closed to make room for a newer one), ``shutdown``.
    handshakes_rejected: Mapping[str, int]
    #: Ended connections by close code.
    close_codes: Mapping[int, int]
    frames_in: int
    bytes_in: int
    frames_out: int
    bytes_out: int
    #: Slow-consumer events by policy (``drop_oldest``, ``wait``, ``disconnect``).
    slow_consumer: Mapping[str, int]
    #: Frames discarded by ``DROP_OLDEST`` queues.
    frames_dropped: int
    #: Times a connection was held back (its reading paused) because the fan-outs its messages
    #: caused queued past their recipients' bounds faster than they read.
    senders_paused: int
    #: Frames and bytes waiting in outbound queues now, and the longest queue (frames).
    queued_frames: int
    queued_bytes: int
    max_queue_depth: int
    #: Server requests (``send_and_wait``) waiting for an answer now.
    pending_requests: int
    #: Server requests by outcome: ``answered``, ``timeout``, ``closed``, ``chunk_error``.
    requests: Mapping[str, int]
    #: Custom handler outcomes: ``ok``, ``error``, ``timeout``, ``busy`` (refused: too many
    #: handlers running on the connection, or its user's share of the ``in_thread`` threads taken).
    custom_handlers: Mapping[str, int]
    #: Custom handler tasks running now.
    handlers_running: int
    #: ``on_connect`` and ``on_disconnect`` hook runs by outcome: ``connect_ok``,
    #: ``connect_error``, ``connect_timeout``, ``disconnect_ok``, ``disconnect_error``,
    #: ``disconnect_timeout``, and ``disconnect_dropped``: ended connections whose hooks were
    #: not run, ``max_disconnect_hooks`` running (each present, at 0 until it happens).
    hooks: Mapping[str, int]
    #: The backplane's counters (``BackplaneStats.as_dict()``) when there is one that keeps them.
    backplane: Mapping[str, int] | None

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts and ints (close codes as strings), ready for ``json.dumps``."""
        data: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            data[field.name] = ({str(k): v for k, v in value.items()}
                                if isinstance(value, Mapping) else value)
        return data


#: Every key of ``ServerStats.hooks``.
_HOOK_OUTCOMES = (*(f"{event}_{outcome}" for event in ("connect", "disconnect")
                    for outcome in ("ok", "error", "timeout")), "disconnect_dropped")


def frozen(table: Mapping[Any, int]) -> Mapping[Any, int]:
    """A read-only copy of ``table`` for a snapshot."""
    return MappingProxyType(dict(table))


def collect(c: Counters, handlers: Iterable[Any], backplane: object = None) -> ServerStats:
    """A :class:`ServerStats` from a manager's running totals ``c``, its live connections'
    handlers (queues, pending requests, running handlers: one walk) and its backplane, if any."""
    by_transport: dict[str, int] = {}
    queued_frames = queued_bytes = max_depth = pending = running = busy = connections = 0
    for handler in handlers:
        connections += 1
        by_transport[handler.transport] = by_transport.get(handler.transport, 0) + 1
        queue = handler.queue
        depth = len(queue)
        queued_frames += depth
        queued_bytes += queue.nbytes
        max_depth = max(max_depth, depth)
        connection = handler.connection
        pending += len(connection.pending)
        running += connection.handlers_running
        busy += connection.busy
    backplane_stats = getattr(backplane, "stats", None)
    as_dict = getattr(backplane_stats, "as_dict", None)
    return ServerStats(
        connections=connections,
        connections_by_transport=frozen(by_transport),
        connections_opened=c.connections_opened,
        handshakes_accepted=c.handshakes_accepted,
        handshakes_rejected=frozen(c.handshakes_rejected),
        close_codes=frozen(c.close_codes),
        frames_in=c.frames_in,
        bytes_in=c.bytes_in,
        frames_out=c.frames_out,
        bytes_out=c.bytes_out,
        slow_consumer=frozen(c.slow_consumer),
        frames_dropped=c.frames_dropped,
        senders_paused=c.senders_paused,
        queued_frames=queued_frames,
        queued_bytes=queued_bytes,
        max_queue_depth=max_depth,
        pending_requests=pending,
        requests=frozen({"answered": c.requests_answered, "timeout": c.requests_timeout,
                         "closed": c.requests_closed, "chunk_error": c.requests_chunk_error}),
        custom_handlers=frozen({"ok": c.custom_ok, "error": c.custom_error,
                                "timeout": c.custom_timeout, "busy": c.custom_busy + busy}),
        handlers_running=running,
        hooks=frozen({key: c.hooks.get(key, 0) for key in _HOOK_OUTCOMES}),
        backplane=frozen(as_dict()) if callable(as_dict) else None,
    )
