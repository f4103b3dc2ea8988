"""What the operator sees is not chosen by a peer (review 10, item 6): the records of the
application's own failures have a budget apart from the peers' records, the first of each
(handler kind, exception type) is always written, and each source gets only a share of the
peers' budget. One client flooding bad frames from connection after connection hid every
traceback of a real bug in the application."""

from __future__ import annotations

import json
import logging

import pytest

from dara_ws_core import ServerConfig, logs
from dara_ws_core.logs import ConnectionLogger, FirstFailures, PeerRecordBudget, SourceShares

from .helpers import eventually
from .hostile import TEXT, TOKEN_PATH, encode_frame, open_channel
from .stacks import TRANSPORTS, running_stack

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")


def _messages(caplog: pytest.LogCaptureFixture, start: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "dara_ws_core" and r.getMessage().startswith(start)]


@pytest.mark.parametrize("transport", SOCKETS)
async def test_application_tracebacks_are_logged_during_a_flood_of_peer_records(
    transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "dara_ws_core")
    async with running_stack(transport, ServerConfig(ping_interval=None)) as stack:
        def buggy(channel_id: str, data: object) -> object:
            return 1 / 0  # a genuine application bug

        stack.manager.add_ws_handler("buggy", buggy)
        assert stack.port is not None
        unknown = encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": "nope", "data": 1}}))
        # Far more peer records than the whole process budget allows, from connection after
        # connection (each connection's own count lets its first ten through).
        for _ in range(30):
            attacker, _ = await open_channel(stack.port)
            attacker.write(unknown * 20)
            assert await attacker.drain()
            await attacker.close()
        await eventually(lambda: stack.manager.stats().frames_in >= 30 * 20, "the flood handled")
        peer = _messages(caplog, "dropped client frame")
        # One source gets its share of the budget (20 in a row, then 2 a second), not all of it.
        assert 1 <= len(peer) <= logs.PEER_SHARES.burst + 5, len(peer)
        # Another address still has its own share: its bad frame is logged.
        from dara_ws_websockets import connect

        other = await connect(f"ws://127.0.0.1:{stack.port}{TOKEN_PATH}", local_addr=("127.0.0.2", 0),
                              close_timeout=1)
        try:
            channel = json.loads(await other.receive())["message"]["channel"]  # init
            await other.send(json.dumps({"type": "custom", "message": {"kind": "nope", "data": 1}}).encode())
            await eventually(lambda: any(getattr(r, "channel", None) == channel
                                         for r in _messages(caplog, "dropped client frame")),
                             "the other address's record written")
        finally:
            await other.close()
        victim = await stack.client("victim:s")
        for _ in range(10):
            with pytest.raises(Exception, match="handler"):
                await victim.request("buggy", None, timeout=5)
        failed = _messages(caplog, "custom handler failed")
        assert len(failed) == 10
        assert all(r.exc_info is not None and r.exc_info[0] is ZeroDivisionError for r in failed)


def test_a_source_takes_only_its_share_of_the_peer_budget() -> None:
    shares = SourceShares(burst=3, rate=1.0, max_sources=2)
    assert [shares.take("10.0.0.1", 0.0) for _ in range(5)] == [True] * 3 + [False] * 2
    assert shares.take("10.0.0.2", 0.0)  # another source still has its own share
    assert shares.take("10.0.0.1", 1.0)  # one a second earned back
    shares.take("10.0.0.3", 1.0)  # a third source: the least recently seen is forgotten
    assert len(shares._budgets) == 2


def test_the_first_failure_of_each_kind_and_type_is_logged_whatever_the_budget(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "APP_RECORDS", PeerRecordBudget(burst=1, rate=0.0001))
    monkeypatch.setattr(logs, "FIRST_FAILURES", FirstFailures(limit=3))
    caplog.set_level(logging.INFO, "dara_ws_core")
    log = ConnectionLogger(logging.getLogger("dara_ws_core"), {"channel": "c"})
    for key in [("a", "ValueError")] * 5 + [("b", "ValueError"), ("a", "KeyError"), ("c", "X"), ("d", "Y")]:
        log.app_error(logging.ERROR, f"failed {key}", key)
    written = [r.getMessage() for r in caplog.records]
    # The first of each of the 3 remembered keys; one more within the budget (the second
    # ("a", "ValueError")); then nothing until the budget refills, a fifth key included.
    assert written[:2] == ["failed ('a', 'ValueError')", "failed ('a', 'ValueError')"]
    assert "failed ('b', 'ValueError')" in written and "failed ('a', 'KeyError')" in written
    assert len(written) == 4
    # The peers' records never use the application's budget, nor the reverse.
    logs.PEER_RECORDS.take(0.0)
    assert logs.APP_RECORDS.take(10.0) is None
