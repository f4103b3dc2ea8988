"""The per-connection handler, without a transport: what one peer can make it do."""

from __future__ import annotations

import json
import logging

import pytest

from dara_ws_core import ServerConfig, WebsocketManager
from dara_ws_core.codec import decode_client_frame


async def test_what_a_peer_causes_is_logged_a_bounded_number_of_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A line of log is I/O on the event loop: a client flooding bad frames must not make it
    # write one per frame (nor fill the disk).
    manager = WebsocketManager(ServerConfig(max_queue_messages=10_000))
    handler = manager.create_handler("c1")  # no transport: its error replies stay queued
    unknown = decode_client_frame('{"type":"custom","message":{"kind":"nope","data":1}}')
    with caplog.at_level(logging.INFO, logger="dara_ws_core"):
        for _ in range(5000):
            assert handler.process_client_message(unknown) is None
    records = [r for r in caplog.records if "unknown kind" in r.getMessage()]
    assert len(records) == 10 + 2  # the first ten, then the 100th and the 1,000th
    assert "1000 such records" in records[-1].getMessage()
    assert all(getattr(r, "channel", None) == "c1" for r in records)


async def test_frames_reaching_a_closed_handler_never_raise() -> None:
    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    handler.close(1013, "slow consumer")
    handler.queue.close()  # as after a slow-consumer disconnect, before the handler is removed
    ping = decode_client_frame('{"type":"ping","message":null}')
    custom = decode_client_frame('{"type":"custom","message":{"kind":"nope","__rchan":"r"}}')
    assert handler.process_client_message(ping) is None
    assert handler.process_client_message(custom) is None
    assert handler.send_nowait(b"{}") is None


async def test_peer_chosen_identifiers_are_cut_short_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    huge = "r" * 100_000
    answer = decode_client_frame(json.dumps({"type": "message", "channel": huge, "message": 1}))
    with caplog.at_level(logging.INFO, logger="dara_ws_core"):
        handler.process_client_message(answer)
    [record] = [r for r in caplog.records if "ignored" in r.getMessage()]
    assert len(getattr(record, "rchan", "")) == 64
