"""One logger per connection: records carry ``channel``, ``user`` and ``transport`` without an
``extra`` at each call, merged with the call's own (``kind``), on real connections."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from dara_ws_core import Identity, RemoteError, WebsocketManager, logs
from dara_ws_core.logs import ConnectionLogger, PeerRecordBudget

from .stacks import HandshakeRejected, running_stack


def _records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dara_ws_core" and r.getMessage().startswith(message)]


@pytest.mark.parametrize("transport", ["memory", "websockets"])
async def test_a_failing_handler_is_logged_with_channel_user_transport_and_kind(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    manager = WebsocketManager()

    def divide(channel: str, data: Any) -> Any:
        return 1 / data

    manager.add_ws_handler("divide", divide)
    caplog.set_level(logging.INFO, "dara_ws_core")
    async with running_stack(transport, manager=manager) as stack:
        client = await stack.client("alice:s1")
        with pytest.raises(RemoteError):
            await client.request("divide", 0)
        [record] = _records(caplog, "custom handler failed")
        assert record.__dict__["channel"] == client.channel
        assert record.__dict__["user"] == "alice"
        assert record.__dict__["transport"] == transport
        assert record.__dict__["kind"] == "divide"
        assert record.exc_info is not None


async def test_a_rejected_handshake_is_logged_with_its_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dara_ws_core")
    async with running_stack("memory") as stack:
        with pytest.raises(HandshakeRejected):
            await stack.connect("bad")
    [record] = _records(caplog, "handshake rejected")
    assert record.__dict__["path"] == "/api/core/ws" and record.__dict__["user"] is None


def test_the_calls_extra_is_merged_with_the_connections_and_wins() -> None:
    log = ConnectionLogger(logging.getLogger("dara_ws_core"), {"channel": "c1", "user": "u"})
    _, kwargs = log.process("m", {"extra": {"kind": "k", "user": "v"}})
    assert kwargs["extra"] == {"channel": "c1", "user": "v", "kind": "k"}
    _, kwargs = log.process("m", {})
    assert kwargs["extra"] == {"channel": "c1", "user": "u"}


def test_a_connection_makes_its_logger_on_first_use_only() -> None:
    manager = WebsocketManager()
    handler = manager.create_handler("c1", Identity(user_id="bob", session_id="s"), transport="memory")
    assert handler._log is None
    assert handler.log is handler.log
    assert handler.log.extra == {"channel": "c1", "user": "bob", "transport": "memory"}


def test_the_process_budget_of_peer_records_allows_a_burst_then_a_rate_and_counts_the_rest() -> None:
    budget = PeerRecordBudget(burst=3, rate=2.0)
    assert [budget.take(10.0) for _ in range(5)] == [0, 0, 0, None, None]
    assert budget.take(10.25) is None  # half a record earned so far
    assert budget.take(10.5) == 3  # one earned: logged, with the three refused before it
    assert budget.take(100.0) == 0 and budget.take(100.0) == 0 and budget.take(100.0) == 0
    assert budget.take(100.0) is None  # refilled to the burst, never past it


def test_records_of_many_connections_stay_within_the_process_budget(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A count per connection alone lets a client log once per connection it opens.
    monkeypatch.setattr(logs, "PEER_RECORDS", PeerRecordBudget(burst=5, rate=0.001))
    caplog.set_level(logging.INFO, "dara_ws_core")
    for i in range(50):
        log = ConnectionLogger(logging.getLogger("dara_ws_core"), {"channel": f"c{i}"})
        log.peer_error(logging.WARNING, "dropped client frame")
    assert len(_records(caplog, "dropped client frame")) == 5


@pytest.mark.parametrize("transport", ["websockets", "aiohttp", "asgi", "picows"])
async def test_the_adapters_serve_logs_no_token_and_no_header_a_client_sent(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every record of a ``serve()`` at INFO and above, the transport library's own included, is
    free of what a client put in its query string (a ``?token=``) or its headers: aiohttp's
    access log wrote the whole request line and the ``User-Agent``."""
    caplog.set_level(logging.INFO)
    headers = [("User-Agent", "agent-of-the-peer")]
    async with running_stack(transport) as stack:
        with pytest.raises(HandshakeRejected):
            await stack.connect("bad-secret-token", headers=headers)
        client = await stack.client("alice:secret-session")
        await client.close()
    served = [r for r in caplog.records if ".client" not in r.name]  # the server's, not the test client's
    everything = "\n".join(f"{r.getMessage()} {vars(r)}" for r in served)
    if transport == "aiohttp":  # its access log is still there, a line per request
        lines = [r.getMessage() for r in served if r.name == "aiohttp.access"]
        assert lines[0] == '127.0.0.1 "GET /api/core/ws" 403', lines
    for secret in ("secret", "agent-of-the-peer"):
        assert secret not in everything
