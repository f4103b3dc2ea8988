"""Telemetry's sampled queue waits and outbound spans under the ``drop_oldest`` policy, on real
sockets: a client that stops reading until frames are dropped, then reads again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from dara_ws_core import ServerConfig, SlowConsumerPolicy, WebsocketManager

from .helpers import eventually
from .hostile import open_channel
from .stacks import running_stack

PAD = "z" * 16 * 1024


@pytest.fixture
def otel() -> Iterator[Any]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reader, exporter = InMemoryMetricReader(), InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield reader, exporter, MeterProvider(metric_readers=[reader]), tracer_provider
    tracer_provider.shutdown()


def queue_waits(reader: Any) -> int:
    """How many queue waits (``dara.websocket.queue.duration``) were recorded, all types."""
    data = reader.get_metrics_data()
    total = 0
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "dara.websocket.queue.duration":
                    total += sum(point.count for point in metric.data.data_points)
    return total


@pytest.mark.parametrize("transport", ["websockets", "picows"])
async def test_after_a_drop_oldest_every_queued_frame_is_still_timed_and_stamps_stay_bounded(
    transport: str, otel: Any,
) -> None:
    # sample_every=1 "traces and times everything": every frame written gets one queue wait
    # (0 when written at once). After the drop_oldest policy dropped frames, the queue's stamps
    # must still follow their frames, and stay "at most one per queued frame".
    from dara_ws_core.telemetry import instrument

    reader, exporter, meter_provider, tracer_provider = otel
    config = ServerConfig(slow_consumer_policy=SlowConsumerPolicy.DROP_OLDEST, max_queue_messages=8,
                          max_queue_bytes=256 * 1024, ping_interval=None, close_timeout=2.0)
    manager = WebsocketManager(config)
    instrument(manager, meter_provider, tracer_provider, sample_every=1)
    async with running_stack(transport, manager=manager) as stack:
        assert stack.port is not None
        client, channel = await open_channel(stack.port, rcvbuf=4096)
        handler = manager.handlers[channel]
        client.stop_reading()
        sent = 0
        while sent < 2000 and handler.dropped == 0:  # fill the kernel buffers, then the queue
            await manager.send_message(channel, {"__typename": "Tick", "i": sent, "pad": PAD})
            sent += 1
            if sent % 8 == 0:
                await asyncio.sleep(0.001)
        assert handler.dropped > 0, "nothing was dropped"

        # The client reads again; bursts of 6 frames per iteration (the 3rd and later queue behind
        # the write limit) for 40 rounds.
        client.resume_reading()
        read = 0

        async def reader_task() -> None:
            nonlocal read
            for _ in range(100_000):
                await client.read_frame(timeout=10)
                read += 1

        reading = asyncio.create_task(reader_task())
        try:
            await eventually(lambda: len(handler.queue) == 0 and handler.flushed == handler.accepted,
                             "the backlog written", timeout=20)
            max_stamps = 0
            for round_ in range(40):
                for k in range(6):
                    await manager.send_message(channel, {"__typename": "Tick", "r": round_, "k": k, "pad": PAD})
                max_stamps = max(max_stamps, len(handler.queue._stamps or ()))  # type: ignore[attr-defined]
                await eventually(lambda: len(handler.queue) == 0, "the burst written", timeout=10)
            written = handler.accepted - handler.dropped  # the init frame included
            await eventually(lambda: read == written - 1, f"{written - 1} frames read", timeout=20)
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
        stamps = len(handler.queue._stamps or ())  # type: ignore[attr-defined]
        waits = queue_waits(reader)
        spans = sum(1 for span in exporter.get_finished_spans() if span.name == "dara.websocket.message.outbound")
        client.abort()
    figures = (f"{max_stamps} stamps at most for a queue of at most 8 frames, {stamps} left with nothing "
               f"queued, {waits} queue waits and {spans} outbound spans recorded for {written} frames written")
    assert max_stamps <= config.max_queue_messages, figures
    assert stamps == 0, figures
    assert waits == written, figures
    assert spans == written, figures
