"""OpenTelemetry metrics (the ``[otel]`` extra), read through the SDK's in-memory reader against
real connections."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

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
                found[metric.name] = {
                    frozenset((point.attributes or {}).items()): point.value  # type: ignore[union-attr]
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


def test_instrument_without_the_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"dara-ws-core\[otel\]"):
        instrument(WebsocketManager())
