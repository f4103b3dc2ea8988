"""OpenTelemetry metrics (the ``[otel]`` extra), read through the SDK's in-memory reader against
real connections."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from dara_ws_core import WebsocketManager
from dara_ws_core.telemetry import instrument

from .helpers import eventually
from .stacks import HandshakeRejected, running_stack


def points(reader: InMemoryMetricReader) -> dict[str, dict[frozenset[tuple[str, Any]], Any]]:
    """metric name -> {attributes: value} from one collection."""
    found: dict[str, dict[frozenset[tuple[str, Any]], Any]] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = {  # a number, or a histogram's data point
                    frozenset((point.attributes or {}).items()): getattr(point, "value", point)
                    for point in metric.data.data_points
                }
    return found


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_operator_metrics_follow_real_connections(transport: str) -> None:
    reader = InMemoryMetricReader()
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel, data: data)
    instrument(manager, MeterProvider(metric_readers=[reader]))
    async with running_stack(transport, manager=manager) as stack:
        with pytest.raises(HandshakeRejected):
            await stack.connect("bad")
        client = await stack.client()
        assert await client.request("echo", 1) == 1
        found = points(reader)
        assert found["dara_ws.connections"] == {frozenset({("dara_ws.transport", transport)}): 1}
        assert found["dara_ws.handshakes"] == {
            frozenset({("dara_ws.outcome", "accepted")}): 1,
            frozenset({("dara_ws.outcome", "rejected"), ("dara_ws.reason", "auth")}): 1,
        }
        assert found["dara_ws.frames"][frozenset({("dara_ws.direction", "inbound")})] == 1
        assert found["dara_ws.frames"][frozenset({("dara_ws.direction", "outbound")})] == 2
        assert found["dara_ws.handler.outcomes"][frozenset({("dara_ws.outcome", "ok")})] == 1
        await client.close()
        await eventually(lambda: not manager.handlers, "the channel removed")
    later = InMemoryMetricReader()  # a fresh provider: no snapshot reused from the first
    instrument(manager, MeterProvider(metric_readers=[later]))
    found = points(later)
    assert found["dara_ws.closes"] == {frozenset({("dara_ws.close_code", "1000")}): 1}
    assert found.get("dara_ws.connections", {}) == {}


async def test_hook_outcomes_are_exported_by_hook_and_outcome() -> None:
    reader = InMemoryMetricReader()
    manager = WebsocketManager()
    manager.on_connect(lambda channel_id, identity: None)

    @manager.on_disconnect
    def broken(channel_id: str, identity: object, closed: object) -> None:
        raise ValueError("cleanup failed")

    instrument(manager, MeterProvider(metric_readers=[reader]))
    async with running_stack("memory", manager=manager) as stack:
        client = await stack.client()
        await client.close()
        await eventually(lambda: manager.stats().hooks["disconnect_error"] == 1, "the hook ran")
    found = points(reader)["dara_ws.hook.outcomes"]
    assert found[frozenset({("dara_ws.hook", "connect"), ("dara_ws.outcome", "ok")})] == 1
    assert found[frozenset({("dara_ws.hook", "disconnect"), ("dara_ws.outcome", "error")})] == 1
    assert found[frozenset({("dara_ws.hook", "connect"), ("dara_ws.outcome", "timeout")})] == 0


def test_instrument_without_the_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"dara-ws-core\[otel\]"):
        instrument(WebsocketManager())


# ---------------------------------------------------------------------- Dara's own names

D, T, OP, OUT = ("dara.websocket.direction", "dara.websocket.message.type", "dara.websocket.operation",
                 "dara.outcome")
EXEC = "dara.websocket.handler.execution"


def key(**attributes: str) -> frozenset[tuple[str, str]]:
    names = {"direction": D, "type": T, "operation": OP, "outcome": OUT, "execution": EXEC}
    return frozenset((names[k], v) for k, v in attributes.items())


@pytest.fixture
def otel() -> Iterator[tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider]]:
    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield reader, exporter, MeterProvider(metric_readers=[reader]), tracer_provider
    tracer_provider.shutdown()


async def test_a_sync_handler_returning_an_awaitable_is_one_execution_the_async_one(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    """A plain function returning a coroutine (a lambda calling an async function) runs as an
    async handler: one execution, counted and timed as async. It was counted twice, as a sync
    execution that succeeded at once, and again as the async one."""
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()

    async def later(channel: str, data: Any) -> Any:
        await asyncio.sleep(0)
        return data

    manager.add_ws_handler("later", lambda channel, data: later(channel, data))  # noqa: PLW0108 - the point
    instrument(manager, meter_provider, tracer_provider, sample_every=1)
    async with running_stack("websockets", manager=manager) as stack:
        client = await stack.client()
        assert await client.request("later", 2) == 2
        await eventually(lambda: len([s for s in exporter.get_finished_spans()
                                      if s.name == "dara.websocket.message.outbound"]) == 2,
                         "init and the reply traced")
        found = points(reader)
    handler_runs = {k: v for k, v in found["dara.websocket.message.executions"].items()
                    if (OP, "handler") in k}
    assert handler_runs == {key(direction="inbound", type="custom", operation="handler", execution="async",
                                outcome="success"): 1}
    assert [(s.attributes or {}).get(EXEC) for s in exporter.get_finished_spans()
            if s.name == "dara.websocket.handler.execute"] == ["async"]


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_dara_metric_and_span_names_follow_custom_requests(
    transport: str, otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel, data: data)

    async def later(channel: str, data: Any) -> Any:
        return data

    def boom(channel: str, data: Any) -> Any:
        raise RuntimeError("boom")

    manager.add_ws_handler("later", later)
    manager.add_ws_handler("boom", boom)
    instrument(manager, meter_provider, tracer_provider, sample_every=1)
    async with running_stack(transport, manager=manager) as stack:
        client = await stack.client()
        assert await client.request("echo", 1) == 1
        assert await client.request("later", 2) == 2
        with pytest.raises(Exception, match="handler"):
            await client.request("boom", 3)
        await eventually(lambda: len([s for s in exporter.get_finished_spans()
                                      if s.name == "dara.websocket.message.outbound"]) == 4,
                         "init and three replies traced")
        found = points(reader)
    executions = found["dara.websocket.message.executions"]
    assert executions[key(direction="inbound", type="custom", operation="message", outcome="success")] == 2
    assert executions[key(direction="inbound", type="custom", operation="message", outcome="error")] == 1
    assert executions[key(direction="inbound", type="custom", operation="handler", execution="sync",
                          outcome="success")] == 1
    assert executions[key(direction="inbound", type="custom", operation="handler", execution="async",
                          outcome="success")] == 1
    assert executions[key(direction="inbound", type="custom", operation="handler", execution="sync",
                          outcome="error")] == 1
    assert executions[key(direction="outbound", type="init", operation="message", outcome="success")] == 1
    assert executions[key(direction="outbound", type="custom", operation="message", outcome="success")] == 3
    durations = found["dara.websocket.message.duration"]
    assert durations[key(direction="inbound", type="custom", operation="message", outcome="success")].count == 2
    assert next(iter(durations.values())).explicit_bounds[:2] == (0.005, 0.01)  # Dara's buckets
    queued = found["dara.websocket.queue.duration"]
    assert sum(point.count for point in queued.values()) == 4  # init and the three replies
    assert set(queued) == {frozenset({(T, "init")}), frozenset({(T, "custom")})}
    active = found["dara.websocket.message.active"]
    assert set(active.values()) == {0}  # nothing in flight, and the series exist

    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    handlers = [span for span in spans if span.name == "dara.websocket.handler.execute"]
    assert sorted(str(span.attributes["dara.websocket.handler.kind"]) for span in handlers) == [  # type: ignore[index]
        "boom", "echo", "later"]
    for span in handlers:  # every handler runs inside the span of the frame that asked for it
        assert span.parent is not None
        assert by_id[span.parent.span_id].name == "dara.websocket.message.inbound"
    failed = next(span for span in handlers if span.attributes["dara.websocket.handler.kind"] == "boom")  # type: ignore[index]
    assert failed.attributes[OUT] == "error"  # type: ignore[index]
    outbound = [span for span in spans if span.name == "dara.websocket.message.outbound"]
    assert sorted(str(span.attributes["dara.websocket.message.payload.type"]) for span in outbound) == [  # type: ignore[index]
        "Init", "boom", "echo", "later"]
    assert {span.kind for span in outbound} == {SpanKind.PRODUCER}
    assert all(span.name != "dara.websocket.message.inbound" or span.kind is SpanKind.CONSUMER for span in spans)


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_round_trips_are_timed_and_pings_are_not_traced(
    transport: str, otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=1)
    async with running_stack(transport, manager=manager) as stack:
        client = await stack.client()
        client.on_request(lambda request: "pong!")
        await client.send_raw(b'{"type":"ping","message":null}')
        answer = await manager.send_and_wait(client.channel, {"__typename": "Q", "q": 1})
        assert answer == "pong!"
        with pytest.raises(Exception, match="no answer"):
            client.on_request(lambda request: asyncio.sleep(5))
            await manager.send_and_wait(client.channel, {"q": 2}, timeout=0.05)
        found = points(reader)
    trips = found["dara.websocket.round_trip.duration"]
    base = {(T, "message"), (OP, "round_trip")}
    assert trips[frozenset({*base, (OUT, "success")})].count == 1
    assert trips[frozenset({*base, (OUT, "error")})].count == 1
    spans = exporter.get_finished_spans()
    trip = [span for span in spans if span.name == "dara.websocket.round_trip"]
    assert len(trip) == 2
    # The request frame is sent inside the round trip: its outbound span is the child.
    requests = [span for span in spans if span.name == "dara.websocket.message.outbound"
                and span.parent is not None and span.parent.span_id == trip[0].context.span_id]
    assert len(requests) == 1
    executions = found["dara.websocket.message.executions"]
    inbound = {k: v for k, v in executions.items() if (D, "inbound") in k}
    # The answer is traced; the ping and its pong are not (as in Dara).
    assert inbound == {key(direction="inbound", type="message", operation="message", outcome="success"): 1}
    assert (key(direction="outbound", type="message", operation="message", outcome="success")
            in executions)
    assert not any(span.attributes and span.attributes.get(T) == "pong" for span in spans)
    # The answer's own span and duration, whole although it is created once the answer is handled.
    answers = [span for span in spans if span.name == "dara.websocket.message.inbound"]
    assert [(span.kind, dict(span.attributes or {})) for span in answers] == [(SpanKind.CONSUMER, {
        D: "inbound", T: "message", OP: "message", OUT: "success"})]
    assert answers[0].start_time is not None and answers[0].end_time is not None
    assert answers[0].start_time < answers[0].end_time
    durations = found["dara.websocket.message.duration"]
    assert durations[key(direction="inbound", type="message", operation="message", outcome="success")].count == 1


async def test_telemetry_off_leaves_plain_queues_and_sinks() -> None:
    from dara_ws_core.queue import OutboundQueue

    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    assert type(handler.queue) is OutboundQueue
    assert manager.counters.telemetry is None


# ---------------------------------------------------------------------- what recording costs


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_a_broadcast_is_one_outbound_span_and_one_execution_per_recipient(
    transport: str, otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=1)
    async with running_stack(transport, manager=manager) as stack:
        clients = [await stack.client(f"u{k}:s{k}") for k in range(3)]
        await manager.broadcast({"__typename": "Tick", "n": 1})
        for client in clients:
            assert (await client.receive(timeout=5)).message.model_dump() == {"__typename": "Tick", "n": 1}
        found = points(reader)
    executions = found["dara.websocket.message.executions"]
    assert executions[key(direction="outbound", type="message", operation="message", outcome="success")] == 3
    assert executions[key(direction="outbound", type="init", operation="message", outcome="success")] == 3
    spans = [span for span in exporter.get_finished_spans()
             if span.name == "dara.websocket.message.outbound"
             and span.attributes and span.attributes.get(T) == "message"]
    assert len(spans) == 1  # not one per recipient
    assert spans[0].attributes["dara.websocket.recipients"] == 3  # type: ignore[index]
    assert spans[0].attributes["dara.websocket.message.payload.type"] == "Tick"  # type: ignore[index]
    durations = found["dara.websocket.message.duration"]
    assert durations[key(direction="outbound", type="message", operation="message",
                         outcome="success")].count == 1


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_sampling_counts_every_message_and_traces_one_in_n(
    transport: str, otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel, data: data)
    instrument(manager, meter_provider, tracer_provider, sample_every=4)
    async with running_stack(transport, manager=manager) as stack:
        client = await stack.client()
        for k in range(8):
            assert await client.request("echo", k) == k
        await eventually(lambda: manager.counters.telemetry.sent["custom"] == 8, "eight replies counted")
        found = points(reader)
    executions = found["dara.websocket.message.executions"]
    inbound = key(direction="inbound", type="custom", operation="message", outcome="success")
    handler = key(direction="inbound", type="custom", operation="handler", execution="sync", outcome="success")
    assert executions[inbound] == 8
    assert executions[handler] == 8
    assert executions[key(direction="outbound", type="custom", operation="message", outcome="success")] == 8
    durations = found["dara.websocket.message.duration"]
    assert durations[inbound].count == 2  # the 1st and the 5th
    assert durations[handler].count == 2  # the handlers of the traced frames
    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    traced = [span for span in spans if span.name == "dara.websocket.message.inbound"]
    assert len(traced) == 2
    for span in spans:
        if span.name == "dara.websocket.handler.execute":
            assert span.parent is not None
            assert by_id[span.parent.span_id].name == "dara.websocket.message.inbound"
    queued = found["dara.websocket.queue.duration"]
    assert sum(point.count for point in queued.values()) == 9 // 4 + 1  # init + 8 replies, 1 in 4


async def test_one_round_trip_in_n_is_timed_and_traced_and_every_one_counted(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=4)
    async with running_stack("websockets", manager=manager) as stack:
        client = await stack.client()
        client.on_request(lambda request: request.payload)
        for k in range(5):
            assert await manager.send_and_wait(client.channel, {"q": k}) == {"q": k}
        found = points(reader)
    trips = found["dara.websocket.round_trip.duration"]
    assert trips[frozenset({(T, "message"), (OP, "round_trip"), (OUT, "success")})].count == 2
    assert found["dara_ws.requests"][frozenset({("dara_ws.outcome", "answered")})] == 5
    spans = exporter.get_finished_spans()
    trip_ids = {span.context.span_id for span in spans if span.name == "dara.websocket.round_trip"}
    assert len(trip_ids) == 2  # the 1st and the 5th
    requests = [span for span in spans if span.name == "dara.websocket.message.outbound"
                and span.parent is not None and span.parent.span_id in trip_ids]
    assert len(requests) == 2  # a traced round trip traces its request frame
    executions = found["dara.websocket.message.executions"]
    assert executions[key(direction="inbound", type="message", operation="message", outcome="success")] == 5


async def test_answers_are_counted_by_the_handler_from_instrument_on(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    """An unsampled answer skips the telemetry: Dara's count of inbound messages reads the
    handler's ``requests_answered`` when the SDK collects, from the value it had when
    ``instrument`` was called; an answer that comes too late is counted by the telemetry."""
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    async with running_stack("websockets", manager=manager) as stack:
        client = await stack.client()
        client.on_request(lambda request: request.payload)
        for k in range(3):  # before instrument(): not counted
            assert await manager.send_and_wait(client.channel, {"q": k}) == {"q": k}
        instrument(manager, meter_provider, tracer_provider, sample_every=3)
        for k in range(7):  # the 1st, 4th and 7th answers sampled, the others not
            assert await manager.send_and_wait(client.channel, {"q": k}) == {"q": k}
        release = asyncio.Event()

        async def late(request: Any) -> int:
            await release.wait()
            return 1

        client.on_request(late)
        with pytest.raises(Exception, match="no answer"):
            await manager.send_and_wait(client.channel, {"q": "late"}, timeout=0.05)
        release.set()
        success = key(direction="inbound", type="message", operation="message", outcome="success")
        await eventually(lambda: points(reader)["dara.websocket.message.executions"].get(success) == 8,
                         "7 answers and a late one counted")
        found = points(reader)
    assert found["dara.websocket.message.executions"][success] == 8
    assert found["dara_ws.requests"][frozenset({("dara_ws.outcome", "answered")})] == 10
    answers = [span for span in exporter.get_finished_spans() if span.name == "dara.websocket.message.inbound"]
    assert len(answers) == 3
    assert found["dara.websocket.message.duration"][success].count == 3


async def test_sampled_spans_are_made_in_bounded_batches_with_their_own_times_and_parents(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    """The SDK work of ended sampled operations is done in batches (warm), bounded in count
    and in time, and what it makes is what the operations were: times and parents."""
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=1)

    def named(name: str) -> list[Any]:
        return [span for span in exporter.get_finished_spans() if span.name == name]

    async with running_stack("websockets", manager=manager) as stack:
        client = await stack.client()
        client.on_request(lambda request: request.payload)
        for k in range(40):
            assert await manager.send_and_wait(client.channel, {"q": k}) == {"q": k}
        # A full batch was made without waiting for anything: a batch is bounded in count.
        assert 0 < len(named("dara.websocket.round_trip")) < 40
        # The rest follows without a collection, bounded in time.
        await eventually(lambda: len(named("dara.websocket.round_trip")) == 40, "every round trip's span")
    trips = {span.context.span_id: span for span in named("dara.websocket.round_trip")}
    requests = [span for span in named("dara.websocket.message.outbound")
                if span.parent is not None and span.parent.span_id in trips]
    assert len(requests) == 40
    for request in requests:
        assert request.parent is not None
        trip = trips[request.parent.span_id]
        assert trip.start_time is not None and trip.end_time is not None
        assert request.start_time is not None and request.end_time is not None
        assert trip.start_time <= request.start_time <= request.end_time <= trip.end_time
        assert (trip.attributes or {}).get(OUT) == "success"
    answers = named("dara.websocket.message.inbound")
    assert len(answers) == 40
    assert all(a.start_time is not None and a.end_time is not None and a.start_time <= a.end_time
               for a in answers)
    found = points(reader)
    assert found["dara.websocket.round_trip.duration"][
        frozenset({(T, "message"), (OP, "round_trip"), (OUT, "success")})].count == 40
    assert found["dara.websocket.queue.duration"][frozenset({(T, "message")})].count == 40


async def test_the_endpoint_shutdown_records_the_deferred_spans(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    """Sampled spans wait up to half a second for their batch: a server that stops meanwhile
    records them when it shuts down, not never."""
    _, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=1)
    async with running_stack("websockets", manager=manager) as stack:
        client = await stack.client()
        client.on_request(lambda request: request.payload)
        assert await manager.send_and_wait(client.channel, {"q": 1}) == {"q": 1}
        assert not [s for s in exporter.get_finished_spans() if s.name == "dara.websocket.round_trip"]
        await stack.endpoint.shutdown()
        trips = [s for s in exporter.get_finished_spans() if s.name == "dara.websocket.round_trip"]
    assert len(trips) == 1


def test_sample_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        instrument(WebsocketManager(), MeterProvider(), TracerProvider(), sample_every=0)


@pytest.mark.parametrize("sample_every", [2.5, float("nan"), 64.0, True])
def test_sample_every_must_be_an_int(sample_every: object) -> None:
    """A float was taken: 2.5 traced one operation in 3, NaN none at all (its budget never
    reached 1), silently."""
    manager = WebsocketManager()
    with pytest.raises(TypeError, match="sample_every must be an int"):
        instrument(manager, MeterProvider(), TracerProvider(), sample_every=sample_every)  # type: ignore[arg-type]
    assert manager.counters.telemetry is None


async def test_a_backplane_outage_shows_in_the_connected_gauge_and_the_reconnects() -> None:
    from dara_ws_core.backplane import MemoryBackplane, MemoryBroker

    broker = MemoryBroker()
    backplane = MemoryBackplane(broker, node_id="n0", heartbeat_interval=0.2, backoff_initial=0.01,
                                backoff_max=0.05, connect_timeout=2.0)
    manager = WebsocketManager(backplane=backplane)
    reader = InMemoryMetricReader()
    instrument(manager, MeterProvider(metric_readers=[reader]))

    def gauge() -> Any:
        return points(reader).get("dara_ws.backplane.connected")

    assert gauge() == {frozenset(): 0}  # not started yet: down
    try:
        async with running_stack("memory", manager=manager) as stack:
            await backplane.start(manager)
            await eventually(lambda: gauge() == {frozenset(): 1}, "the bus up")
            client = await stack.client()
            await manager.broadcast({"n": 1})
            assert (await client.receive(timeout=5)).message.model_dump() == {"n": 1}
            broker.fail()
            await eventually(lambda: gauge() == {frozenset(): 0}, "the outage seen")
            broker.recover()
            await eventually(lambda: gauge() == {frozenset(): 1}, "the bus back")

            def events() -> dict[frozenset[tuple[str, Any]], Any]:
                return points(reader)["dara_ws.backplane.messages"]

            # Counters come from a snapshot reused for half a second: wait for the next one.
            reconnects = frozenset({("dara_ws.backplane.event", "reconnects")})
            await eventually(lambda: events()[reconnects] == 1, "the reconnect counted")
            assert events()[frozenset({("dara_ws.backplane.event", "published")})] >= 1
    finally:
        await backplane.stop()


async def test_the_backplane_lag_is_measured_from_the_publishers_clock() -> None:
    import time

    from dara_ws_core import Identity, build_frame
    from dara_ws_core.backplane import MemoryBackplane, MemoryBroker
    from dara_ws_core.backplane.wire import UserDelivery, encode_bus_message

    broker = MemoryBroker()
    here, there = MemoryBackplane(broker, node_id="here"), MemoryBackplane(broker, node_id="there")
    manager, sender = WebsocketManager(backplane=here), WebsocketManager(backplane=there)
    reader = InMemoryMetricReader()
    instrument(manager, MeterProvider(metric_readers=[reader]), sample_every=1)
    await here.start(manager)
    await there.start(sender)
    try:
        handler = manager.create_handler("c1", Identity(user_id="alice", session_id="s"))
        await here.flush()
        await sender.send_message_to_user("alice", {"i": 1})  # through the bus: lag ~ 0
        await eventually(lambda: len(handler.queue) == 2, "delivered")
        stats = manager.stats().backplane
        assert stats is not None and 0 <= stats["lag_ms_last"] <= stats["lag_ms_max"] < 3000
        # A delivery its publisher sent 3 s ago by its clock: 3 s of lag.
        sent = time.time_ns() // 1_000_000 - 3000
        broker.publish(here.node_topic, encode_bus_message(
            UserDelivery("alice", None, build_frame({"i": 2}), sent=sent)))
        await eventually(lambda: len(handler.queue) == 3, "delivered")
        stats = manager.stats().backplane
        assert stats is not None and 3000 <= stats["lag_ms_last"] == stats["lag_ms_max"] < 60_000
        lag = points(reader)["dara_ws.backplane.lag"][frozenset()]
        assert lag.count == 2 and 3.0 <= lag.sum < 60.0
        events = points(reader)["dara_ws.backplane.messages"]
        assert not [key for key in events if ("dara_ws.backplane.event", "lag_ms_max") in key]
    finally:
        await here.stop()
        await there.stop()


def test_the_lag_maximum_covers_a_window_and_then_forgets() -> None:
    from dara_ws_core.backplane.contract import LAG_WINDOW, BackplaneStats

    stats = BackplaneStats()
    stats.lag(500, now=0.0)
    stats.lag(20, now=1.0)
    assert (stats.lag_ms_last, stats.lag_ms_max) == (20, 500)
    stats.lag(30, now=LAG_WINDOW + 1)  # the next window: the previous one still counts
    assert stats.lag_ms_max == 500
    stats.lag(40, now=2 * LAG_WINDOW + 1)  # two windows on: 500 is forgotten
    assert (stats.lag_ms_last, stats.lag_ms_max) == (40, 40)
    stats.lag(10, now=10 * LAG_WINDOW)  # after a silence: only what came since
    assert stats.lag_ms_max == 10
    assert "_lag_current" not in stats.as_dict() and stats.as_dict()["lag_ms_max"] == 10


def test_no_backplane_no_connected_series() -> None:
    reader = InMemoryMetricReader()
    instrument(WebsocketManager(), MeterProvider(metric_readers=[reader]))
    assert "dara_ws.backplane.connected" not in points(reader)


async def test_a_fan_out_is_one_operation_for_sampling(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=4)
    async with running_stack("websockets", manager=manager) as stack:
        clients = [await stack.client(f"u{k}:s{k}") for k in range(3)]
        for n in range(8):
            await manager.broadcast({"n": n})
        for client in clients:
            for n in range(8):
                assert (await client.receive(timeout=5)).message.model_dump() == {"n": n}
        found = points(reader)
    executions = found["dara.websocket.message.executions"]
    assert executions[key(direction="outbound", type="message", operation="message", outcome="success")] == 24
    fanouts = [span for span in exporter.get_finished_spans()
               if span.name == "dara.websocket.message.outbound" and span.attributes
               and "dara.websocket.recipients" in span.attributes]
    assert [span.attributes["dara.websocket.recipients"] for span in fanouts] == [3, 3]  # type: ignore[index]


# ---------------------------------------------------------------------- the cheap paths


async def test_queued_frames_are_counted_and_one_in_n_waits_is_timed_then_the_queue_is_plain(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    from dara_ws_core.telemetry_hooks import TimedQueue

    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=4)
    # The in-memory transport cannot write at once: every frame goes through the queue.
    async with running_stack("memory", manager=manager) as stack:
        client = await stack.client()
        for n in range(12):
            await manager.send_message(client.channel, {"__typename": "Tick", "n": n})
        for n in range(12):
            assert (await client.receive(timeout=5)).message.model_dump() == {"__typename": "Tick", "n": n}
        handler = manager.handlers[client.channel]
        await eventually(lambda: handler.flushed == 13, "init and twelve messages written")
        # Its stamped frames all taken and sent: taking frames out is plain again.
        assert type(handler.queue) is TimedQueue
        found = points(reader)
    executions = found["dara.websocket.message.executions"]
    assert executions[key(direction="outbound", type="message", operation="message", outcome="success")] == 12
    assert executions[key(direction="outbound", type="init", operation="message", outcome="success")] == 1
    queued = found["dara.websocket.queue.duration"]
    # The init frame, then the 4th, 8th and 12th message (the 5th, 9th and 13th frame).
    assert queued[frozenset({(T, "init")})].count == 1
    assert queued[frozenset({(T, "message")})].count == 3
    outbound = [span for span in exporter.get_finished_spans()
                if span.name == "dara.websocket.message.outbound"]
    assert sorted(str(span.attributes["dara.websocket.message.payload.type"])  # type: ignore[index]
                  for span in outbound) == ["Init", "Tick", "Tick", "Tick"]
    assert all(span.attributes[OUT] == "success" for span in outbound)  # type: ignore[index]


async def test_a_stamp_follows_its_frame_through_dropped_frames_and_a_waiting_consumer(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    from dara_ws_core import ServerConfig, SlowConsumerPolicy, build_frame
    from dara_ws_core.telemetry_hooks import TimedQueue

    reader, _, meter_provider, tracer_provider = otel
    manager = WebsocketManager(config=ServerConfig(
        max_queue_messages=2, slow_consumer_policy=SlowConsumerPolicy.DROP_OLDEST))
    instrument(manager, meter_provider, tracer_provider, sample_every=2)
    handler = manager.create_handler("c1")  # no transport: the frames wait for a reader
    frames = [build_frame({"__typename": "Tick", "n": n}) for n in range(4)]
    for frame in frames:
        assert handler.push(frame)  # init, n=0, then each push drops the oldest
    assert handler.dropped == 3
    # Stamped: init (dropped), n=1 (dropped), n=3 (queued behind n=2).
    assert await handler.queue.get() == frames[2]
    assert handler.queue.get_nowait() == frames[3]
    assert handler.queue.get_nowait() is None
    assert type(handler.queue) is TimedQueue
    queued = points(reader)["dara.websocket.queue.duration"]
    assert queued == {frozenset({(T, "message")}): queued[frozenset({(T, "message")})]}
    assert queued[frozenset({(T, "message")})].count == 1  # n=3's wait, and no other

    # A consumer already waiting when a stamped frame comes takes it as stamped.
    plain = build_frame({"__typename": "Tick", "n": 4})
    assert handler.push(plain)  # the 1st of 2 since the last stamp: not stamped
    assert handler.queue.get_nowait() == plain
    waiting = asyncio.ensure_future(handler.queue.get())
    await asyncio.sleep(0)
    late = build_frame({"__typename": "Tick", "n": 5})
    assert handler.push(late)  # stamped, while the consumer waits
    assert await waiting == late
    assert handler.queue.get_nowait() is None  # the reader is done with it: sent
    assert type(handler.queue) is TimedQueue
    assert points(reader)["dara.websocket.queue.duration"][frozenset({(T, "message")})].count == 2


async def test_a_round_trip_inside_a_traced_operation_is_traced_whatever_the_countdown(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()

    async def ask_twice(channel: str, data: Any) -> Any:
        return [await manager.send_and_wait(channel, {"q": k}) for k in range(2)]

    manager.add_ws_handler("ask", ask_twice)
    # Only the first operation of each kind is sampled by the countdowns.
    instrument(manager, meter_provider, tracer_provider, sample_every=1000)
    async with running_stack("websockets", manager=manager) as stack:
        client = await stack.client()
        client.on_request(lambda request: request.payload)
        # Its frame is the first inbound one: traced, and so are the handler and both requests.
        assert await client.request("ask", None) == [{"q": 0}, {"q": 1}]
        assert await manager.send_and_wait(client.channel, {"q": 2}) == {"q": 2}  # not traced
        found = points(reader)
    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    trips = [span for span in spans if span.name == "dara.websocket.round_trip"]
    assert len(trips) == 2
    for span in trips:
        assert span.parent is not None
        assert by_id[span.parent.span_id].name == "dara.websocket.handler.execute"
    assert found["dara_ws.requests"][frozenset({("dara_ws.outcome", "answered")})] == 3
    durations = found["dara.websocket.round_trip.duration"]
    assert durations[frozenset({(T, "message"), (OP, "round_trip"), (OUT, "success")})].count == 2


def test_samples_left_by_an_event_loop_that_ended_go_out_with_the_next_one(
    otel: tuple[InMemoryMetricReader, InMemorySpanExporter, MeterProvider, TracerProvider],
) -> None:
    """A batch's timer dies with its loop: the next loop that samples takes the batch over."""
    _reader, exporter, meter_provider, tracer_provider = otel
    manager = WebsocketManager()
    instrument(manager, meter_provider, tracer_provider, sample_every=1)

    async def one_round_trip() -> None:
        async with running_stack("websockets", manager=manager) as stack:
            client = await stack.client()
            client.on_request(lambda request: request.payload)
            assert await manager.send_and_wait(client.channel, {"q": 1}) == {"q": 1}

    def trips() -> int:
        return len([s for s in exporter.get_finished_spans() if s.name == "dara.websocket.round_trip"])

    asyncio.run(one_round_trip())  # its loop ends (as a rule) before the batch's timer fires

    async def second() -> None:
        await one_round_trip()
        await eventually(lambda: trips() == 2, "both round trips' spans")

    asyncio.run(second())


async def test_peers_cannot_choose_how_many_close_code_series_there_are() -> None:
    """A peer picks the code it closes with (any of 3000-4999): the metric keeps RFC 6455's codes
    as they are and folds the others into their class, so 60 peers closing with 60 different
    codes make three series, not 60."""
    from .hostile import open_channel

    reader = InMemoryMetricReader()
    manager = WebsocketManager()
    instrument(manager, MeterProvider(metric_readers=[reader]))
    codes = [*range(3000, 3030), *range(4000, 4029), 1001]
    async with running_stack("websockets", manager=manager) as stack:
        assert stack.port is not None
        for code in codes:
            client, _ = await open_channel(stack.port)
            client.send_close(code)
            await client.read_frame()  # the server's answering close frame
            client.abort()
        await eventually(lambda: sum(manager.counters.close_codes.values()) == len(codes), "every close counted")
    found = points(reader)["dara_ws.closes"]
    assert found == {frozenset({("dara_ws.close_code", "3xxx")}): 30, frozenset({("dara_ws.close_code", "4xxx")}): 29,
                     frozenset({("dara_ws.close_code", "1001")}): 1}
    assert len(manager.stats().close_codes) == len(codes)  # the stats keep each code
