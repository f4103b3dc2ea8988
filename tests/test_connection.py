"""The pure connection (protocol.md sections 2 to 6), with no event loop: a state machine against
a model, over any interleaving of valid, invalid and hostile frames, local sends, requests,
timeouts, handler outcomes, clock ticks and closes.

Invariants checked after every step: every server request ends exactly once (answered, failed,
or given up by its caller); nothing is sent once a close is decided; every bad input gets its
section-6 outcome; every frame sent is strict JSON; the state stays within its bounds.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from dara_ws_core.codec import PONG_FRAME
from dara_ws_core.config import ServerConfig
from dara_ws_core.connection import (
    AnswerIgnored,
    CloseConnection,
    CustomReceived,
    Event,
    FrameDropped,
    RequestCompleted,
    RequestFailed,
    SendFrame,
    ServerConnection,
    State,
)
from dara_ws_core.exceptions import ConnectionClosed, TooManyPendingRequests

from . import strategies as S

CONFIG = ServerConfig(
    max_message_size=4096,
    max_message_values=200,
    max_pending_requests=3,
    max_handler_tasks=2,
    max_chunks=3,
    rate_limit=12,
    rate_window=1.0,
    idle_timeout=10.0,
)
KINDS = frozenset({"echo", "slow"})


def strict(frame: bytes) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} sent: not JSON")

    return json.loads(frame, parse_constant=refuse)


def custom(kind: str, data: Any = None, rchan: str | None = None) -> str:
    message: dict[str, Any] = {"kind": kind, "data": data}
    if rchan is not None:
        message["__rchan"] = rchan
    return json.dumps({"type": "custom", "message": message})


def answer(rchan: str, value: Any, count: int | None = None) -> str:
    frame: dict[str, Any] = {"type": "message", "channel": rchan, "message": value}
    if count is not None:
        frame["chunk_count"] = count
    return json.dumps(frame)


#: Hostile frames and the close code protocol.md section 6 gives them (None: dropped, open).
HOSTILE: list[tuple[str | bytes, int | None]] = [
    (b"\x00binary", 1003),
    ("not json", 1007),
    ("[1, 2]", 1007),
    ('{"type":"custom","message":{"kind":"echo","data":NaN}}', 1007),
    ('{"type":"custom","message":{"kind":"echo","data":[-Infinity]}}', 1007),
    ("x" * 5000, 1009),  # over max_message_size
    ("[" * 300 + "]" * 300, 1009),  # too deep
    ('{"type":"custom","message":{"kind":"echo","data":[' + ",".join(["{}"] * 300) + "]}}", 1009),
    ('{"type":"nope"}', None),
    ('{"type":"custom","message":{"data":1}}', None),
    ('{"type":"message","message":1}', None),
]


@dataclass
class Request:
    serial: int
    rchan: str


class ConnectionMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.conn: ServerConnection[int] = ServerConnection("c1", CONFIG, now=0.0, kinds=KINDS)
        self.serials = itertools.count()
        self.pending: dict[str, int] = {}  # rchan -> serial, in the model
        self.ended: dict[int, str] = {}
        self.opened: set[int] = set()
        self.running = 0  # handlers dispatched and not done
        self.closed_code: int | None = None
        self.lost = False
        self.window_start, self.window_count = 0.0, 0
        self.last_seen = 0.0

    # ------------------------------------------------------------------ helpers

    def end(self, serial: int, how: str) -> None:
        assert serial not in self.ended, f"request {serial} ended twice"
        self.ended[serial] = how

    def check_common(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, SendFrame):
                assert self.closed_code is None, "a frame sent after the close was decided"
                strict(ev.frame)
            elif isinstance(ev, RequestCompleted):
                self.end(ev.waiter, "answered")
            elif isinstance(ev, RequestFailed):
                self.end(ev.waiter, "failed")

    def expect_close(self, events: list[Event], code: int) -> None:
        assert isinstance(events[0], CloseConnection) and events[0].code == code, events
        failed = {ev.waiter for ev in events[1:] if isinstance(ev, RequestFailed)}
        assert failed == set(self.pending.values())
        assert all(isinstance(ev.error, ConnectionClosed) and ev.error.code == code
                   for ev in events[1:] if isinstance(ev, RequestFailed))
        self.pending.clear()
        self.closed_code = code

    def feed(self, frame: str | bytes) -> list[Event] | None:
        """Feed a frame through the model's rate limit; ``None`` if that closed the connection."""
        events = self.conn.receive_frame(frame, self.now)
        if self.closed_code is not None:
            assert events == [], "frames after a close have no effect"
            return None
        self.last_seen = self.now
        if self.now - self.window_start >= CONFIG.rate_window:
            self.window_start, self.window_count = self.now, 0
        self.window_count += 1
        if self.window_count > (CONFIG.rate_limit or 0):
            self.check_common(events)
            self.expect_close(events, 1008)
            event("rate limited")
            return None
        self.check_common(events)
        return events

    # ------------------------------------------------------------------ inbound rules

    @rule()
    def ping(self) -> None:
        events = self.feed('{"type":"ping","message":null}')
        if events is not None:
            assert events == [SendFrame(PONG_FRAME)]

    @rule(frame_and_code=st.sampled_from(HOSTILE))
    def hostile(self, frame_and_code: tuple[str | bytes, int | None]) -> None:
        frame, code = frame_and_code
        was_open = self.closed_code is None
        events = self.feed(frame)
        if events is None or not was_open:
            return
        if code is None:
            assert len(events) == 1 and isinstance(events[0], FrameDropped)
        else:
            self.expect_close(events, code)
        event(f"hostile -> {code}")

    @rule(kind=st.sampled_from(["echo", "slow", "unknown"]), data=S.json_values,
          request=st.booleans())
    def custom_message(self, kind: str, data: Any, request: bool) -> None:
        rchan = "r-client" if request else None
        events = self.feed(custom(kind, data, rchan))
        if events is None:
            return
        if kind not in KINDS:
            sent = [ev for ev in events if isinstance(ev, SendFrame)]
            assert len(sent) == 1 and strict(sent[0].frame)["message"]["__error"]["code"] == "unknown_kind"
        elif self.running >= CONFIG.max_handler_tasks:
            assert len(events) == 1 and isinstance(events[0], SendFrame)
            assert strict(events[0].frame)["message"]["__error"]["code"] == "busy"
            event("busy")
        else:
            assert events == [CustomReceived(kind, data, rchan)]
            self.running += 1

    @precondition(lambda self: self.running > 0)
    @rule(outcome=st.sampled_from(["result", "none", "unencodable", "error"]),
          request=st.booleans())
    def handler_ends(self, outcome: str, request: bool) -> None:
        rchan = "r-client" if request else None
        if outcome == "error":
            sent: SendFrame | None = self.conn.reply_error("echo", rchan, "handler_error", "failed")
        else:
            result = {"x": 1} if outcome == "result" else None if outcome == "none" else object()
            sent = self.conn.reply("echo", rchan, result)
        self.conn.handler_done()
        self.running -= 1
        if self.closed_code is not None:
            assert sent is None, "nothing is sent once a close is decided"
            return
        if outcome == "none" and not request:
            assert sent is None
            return
        assert sent is not None
        self.check_common([sent])
        body = strict(sent.frame)["message"]
        assert body.get("__response_for") == rchan
        if outcome == "unencodable":
            assert body["__error"]["code"] == "handler_error"

    # ------------------------------------------------------------------ server requests

    @rule(target=requests)
    def open_request(self) -> Any:
        serial = next(self.serials)
        if self.closed_code is not None or self.lost:
            with pytest.raises(ConnectionClosed):
                self.conn.open_request(serial)
            return Request(serial, "none")
        if len(self.pending) >= CONFIG.max_pending_requests:
            with pytest.raises(TooManyPendingRequests):
                self.conn.open_request(serial)
            return Request(serial, "none")
        rchan = self.conn.open_request(serial)
        assert rchan not in self.pending
        self.pending[rchan] = serial
        self.opened.add(serial)
        return Request(serial, rchan)

    @rule(request=requests, value=S.json_values)
    def client_answers(self, request: Request, value: Any) -> None:
        was_pending = request.rchan in self.pending
        events = self.feed(answer(request.rchan, value))
        if events is None:
            return
        if was_pending:
            assert events == [RequestCompleted(request.rchan, request.serial, value)]
            del self.pending[request.rchan]
        else:
            assert events == [AnswerIgnored(request.rchan)]

    @rule(request=requests)
    def client_answers_with_a_bad_chunk_count(self, request: Request) -> None:
        was_pending = request.rchan in self.pending
        events = self.feed(answer(request.rchan, 1, count=CONFIG.max_chunks + 1))
        if events is None:
            return
        if was_pending:
            assert len(events) == 1 and isinstance(events[0], RequestFailed)
            del self.pending[request.rchan]
        else:
            assert events == [AnswerIgnored(request.rchan)]

    @rule(request=requests)
    def caller_gives_up(self, request: Request) -> None:
        self.conn.discard_request(request.rchan)
        serial = self.pending.pop(request.rchan, None)
        if serial is not None:
            self.end(serial, "timed out")

    # ------------------------------------------------------------------ time and closes

    @rule(dt=st.sampled_from([0.01, 0.5, 1.0, 4.0]))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        events = self.conn.tick(self.now, wall=0.0)
        self.check_common(events)
        if self.closed_code is None and self.now - self.last_seen >= (CONFIG.idle_timeout or 0):
            self.expect_close(events, 1001)
            event("idle timeout")
        elif self.closed_code is None:
            assert events == []

    @rule(code=st.sampled_from([1000, 1008, 1013]))
    def server_closes(self, code: int) -> None:
        events = self.conn.close(code, "bye")
        self.check_common(events)
        if self.closed_code is None:
            self.expect_close(events, code)
        else:
            assert events == []

    @rule(code=st.sampled_from([1000, 1006]))
    def transport_lost(self, code: int) -> None:
        events = self.conn.connection_lost(ConnectionClosed(code))
        self.check_common(events)
        if not self.lost:
            assert {ev.waiter for ev in events if isinstance(ev, RequestFailed)} == set(self.pending.values())
        self.pending.clear()
        self.lost = True
        if self.closed_code is None:
            self.closed_code = code

    # ------------------------------------------------------------------ invariants

    @invariant()
    def state_matches_the_model(self) -> None:
        conn = self.conn
        if self.lost:
            assert conn.state is State.CLOSED
        elif self.closed_code is not None:
            assert conn.state is State.CLOSING
        else:
            assert conn.state is State.OPEN
        assert set(conn.pending) == set(self.pending)
        assert len(conn.pending) <= CONFIG.max_pending_requests
        assert conn.handlers_running == self.running <= CONFIG.max_handler_tasks

    @invariant()
    def every_request_is_pending_or_ended_once(self) -> None:
        pending = set(self.pending.values())
        assert pending.isdisjoint(self.ended)
        assert pending | set(self.ended) == self.opened


TestConnection = ConnectionMachine.TestCase
TestConnection.settings = settings(
    max_examples=2000 if os.environ.get("CI") else 300,
    stateful_step_count=25,
    deadline=None,
)


# ------------------------------------------ answers: their own decoding path, the same outcomes


def _by_the_full_decoder(conn: ServerConnection[str], frame: str) -> list[Event]:
    """What ``receive_frame`` did before answers had a path of their own: decode to a model,
    then feed it (the reference the answer path must agree with)."""
    from dara_ws_core.codec import decode_client_frame
    from dara_ws_core.exceptions import InvalidMessage, ProtocolError

    try:
        message = decode_client_frame(frame, CONFIG.max_message_size,
                                      max_values=CONFIG.max_message_values)
    except InvalidMessage as exc:
        return [FrameDropped(str(exc))]
    except ProtocolError as exc:
        return conn.close(exc.close_code or 1002, str(exc))
    return conn.receive_message(message)


def _comparable(events: list[Event]) -> list[Any]:
    return [(type(ev), ev.rchan, ev.waiter, type(ev.error), str(ev.error)) if isinstance(ev, RequestFailed)
            else ev for ev in events]


@pytest.mark.parametrize("chunked_first", [False, True])
def test_every_frame_gets_the_same_outcome_on_the_answer_path_as_by_the_full_decoder(
    chunked_first: bool,
) -> None:
    from .test_codec import ANSWERS, NOT_ANSWERS

    for frame in [*ANSWERS, *NOT_ANSWERS, '{"type":"message","channel":"unknown","message":1}']:
        outcomes = []
        for feed in ("receive_frame", "receive", "reference"):
            conn: ServerConnection[str] = ServerConnection("c1", CONFIG)
            conn.open_request("w1", "r-1")
            conn.open_request("w2", "r-2")
            if chunked_first:  # a part of a chunked answer is held: a plain answer now fails
                part = '{"type":"message","channel":"r-1","chunk_count":2,"chunk_index":0,"message":1}'
                assert conn.receive_frame(part, 0.0) == []
            if feed == "receive":  # the handler's: an answer as (rchan, waiter, value), no event
                decided = conn.receive(frame, 0.0)
                events: list[Event] = [RequestCompleted(*decided)] if isinstance(decided, tuple) else decided
            else:
                events = (conn.receive_frame(frame, 0.0) if feed == "receive_frame"
                          else _by_the_full_decoder(conn, frame))
            outcomes.append((_comparable(events), conn.state, sorted(conn.pending)))
        assert outcomes[0] == outcomes[1] == outcomes[2], frame
    # Both kinds of outcome were met: some answers completed, some frames were refused.
    conn = ServerConnection("c1", CONFIG)
    conn.open_request("w1", "r-1")
    assert conn.receive_frame(ANSWERS[0], 0.0) == [RequestCompleted("r-1", "w1", {"a": 1})]
    conn.open_request("w2", "r-1")
    assert conn.receive(ANSWERS[0], 0.0) == ("r-1", "w2", {"a": 1})  # the handler's answer path
    assert list(conn.pending) == []
