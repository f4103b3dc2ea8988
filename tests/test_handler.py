"""The per-connection handler, without a transport: what one peer can make it do."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import pytest

from dara_ws_core import ConnectionClosed, RequestTimeout, ServerConfig, SlowConsumerPolicy, WebsocketManager
from dara_ws_core.codec import decode_client_frame
from dara_ws_core.handler import WebSocketHandler

from .helpers import eventually


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


def _request_rchan(handler: WebSocketHandler) -> str:
    """The ``__rchan`` of the request frame the handler queued last (no transport drains it)."""
    frames = []
    while (frame := handler.queue.get_nowait()) is not None:
        frames.append(json.loads(frame))
    rchan: str = frames[-1]["message"]["__rchan"]
    return rchan


def _answer(rchan: str, value: object) -> str:
    return json.dumps({"type": "message", "channel": rchan, "chunk_count": None, "message": value})


def _live_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]


async def test_a_request_answered_in_time_returns_the_answer_and_leaves_no_timer_holding_it() -> None:
    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    loop = asyncio.get_running_loop()
    for timeout in (30.0, None):
        task = asyncio.ensure_future(handler.send_and_wait({"q": 1}, timeout=timeout))
        await eventually(lambda: handler.pending_count == 1)
        handler.receive_frame(_answer(_request_rchan(handler), {"v": timeout}), loop.time())
        assert await task == {"v": timeout}
        assert handler.pending_count == 0
    assert manager.counters.requests_answered == 2
    assert manager.counters.requests_timeout == 0
    # The connection's one request timer may stay armed for the 30 s deadline (re-arming per
    # request is what it saves), but it holds no request: its table of deadlines is empty.
    deadlines = handler._deadlines
    assert deadlines is not None and deadlines.pending == {}
    late = [h for h in _live_timers(loop) if h.when() > loop.time() + 20]
    assert all(getattr(h._callback, "__self__", None) is deadlines for h in late), late  # type: ignore[attr-defined]
    # Once the connection is gone, nothing of it is left to run.
    handler.shutdown(ConnectionClosed(1000, "bye"))
    assert all(h.when() < loop.time() + 20 for h in _live_timers(loop))


async def test_requests_with_different_timeouts_expire_in_the_order_of_their_deadlines() -> None:
    # One timer per connection, armed for the nearest deadline: a nearer one re-arms it earlier,
    # and when it fires it re-arms for the nearest left, including after an answered request.
    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    loop = asyncio.get_running_loop()
    ended: list[float] = []

    async def ask(timeout: float) -> None:
        with pytest.raises(RequestTimeout):
            await handler.send_and_wait({"q": timeout}, timeout=timeout)
        ended.append(timeout)

    await asyncio.wait_for(asyncio.gather(ask(0.4), ask(0.1), ask(0.25)), 10)
    assert ended == [0.1, 0.25, 0.4]
    # The timer, armed for an answered request, fires for nothing and re-arms for the next.
    answered = asyncio.ensure_future(handler.send_and_wait({"q": 0}, timeout=0.05))
    await eventually(lambda: handler.pending_count == 1)
    handler.receive_frame(_answer(_request_rchan(handler), "on time"), loop.time())
    assert await answered == "on time"
    await asyncio.wait_for(ask(0.2), 10)
    assert ended[-1] == 0.2
    assert handler.pending_count == 0
    assert manager.counters.requests_timeout == 4
    assert manager.counters.requests_answered == 1
    assert handler._deadlines is not None and handler._deadlines.pending == {}


async def test_an_answer_after_the_timeout_is_ignored() -> None:
    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeout):
        await handler.send_and_wait({"q": 1}, timeout=0.05)
    assert loop.time() - started < 5
    assert handler.pending_count == 0
    assert manager.counters.requests_timeout == 1
    assert handler.receive_frame(_answer(_request_rchan(handler), "late"), loop.time()) is None
    assert manager.counters.requests_answered == 0


async def test_a_request_behind_a_full_queue_times_out_within_its_own_timeout() -> None:
    # WAIT would wait send_timeout (60 s) for room; the request's timeout (0.1 s) bounds it.
    config = ServerConfig(max_queue_messages=1, slow_consumer_policy=SlowConsumerPolicy.WAIT,
                          send_timeout=60)
    manager = WebsocketManager(config)
    handler = manager.create_handler("c1")  # its init frame fills the queue: nobody drains it
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RequestTimeout):
        await handler.send_and_wait({"q": 1}, timeout=0.1)
    assert loop.time() - started < 5
    assert handler.pending_count == 0
    assert manager.counters.requests_timeout == 1
    assert not handler.closed  # timed out, not disconnected as a slow consumer


async def test_a_request_is_a_coroutine_that_does_nothing_until_awaited() -> None:
    # send_and_wait returns the request's own coroutine (no async def around it): still nothing
    # is encoded, opened or sent before it runs, and its errors come when it is awaited.
    from dara_ws_core import UnknownChannel

    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    assert json.loads(handler.queue.get_nowait() or b"")["type"] == "init"
    unknown = manager.send_and_wait("nobody", {"q": 1})
    bad = handler.send_and_wait(["not", "a", "dict"])  # type: ignore[arg-type]
    pending = manager.send_and_wait("c1", {"q": 1}, timeout=5)
    assert handler.pending_count == 0 and handler.queue.get_nowait() is None
    with pytest.raises(UnknownChannel):
        await unknown
    with pytest.raises(TypeError):
        await bad
    assert handler.pending_count == 0
    task = asyncio.ensure_future(pending)
    await eventually(lambda: handler.pending_count == 1)
    handler.receive_frame(_answer(_request_rchan(handler), "yes"), asyncio.get_running_loop().time())
    assert await task == "yes"


async def test_a_cancelled_or_closed_request_leaves_no_entry_and_an_answered_one_none_either() -> None:
    manager = WebsocketManager()
    handler = manager.create_handler("c1")
    loop = asyncio.get_running_loop()
    # Cancelled, with a deadline and without one: both entries go.
    tasks = [asyncio.ensure_future(handler.send_and_wait({"q": 1}, timeout=t)) for t in (30.0, None)]
    await eventually(lambda: handler.pending_count == 2)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert handler.pending_count == 0
    answered = asyncio.ensure_future(handler.send_and_wait({"q": 2}, timeout=30))
    await eventually(lambda: handler.pending_count == 1)
    rchan = _request_rchan(handler)
    handler.receive_frame(_answer(rchan, 2), loop.time())
    assert await answered == 2
    assert handler.pending_count == 0
    handler.receive_frame(_answer(rchan, 3), loop.time())  # a second answer: nothing to complete
    assert manager.counters.requests_answered == 1
    closed = asyncio.ensure_future(handler.send_and_wait({"q": 3}, timeout=30))
    await eventually(lambda: handler.pending_count == 1)
    handler.close(1000, "bye")
    with pytest.raises(ConnectionClosed):
        await closed
    assert handler.pending_count == 0


class _ShiftedClockLoop(asyncio.SelectorEventLoop):
    """A loop whose clock is not time.monotonic(): its own time() must be the one used."""

    def time(self) -> float:
        return super().time() + 1000.0


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, _ShiftedClockLoop])
def test_request_deadlines_run_on_the_loops_own_clock(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # asyncio's own loops get time.monotonic and Future(loop=...) called directly; any other
    # loop keeps its own time() and create_future(). A deadline on the wrong clock would expire
    # at once (or 1000 s late) here.
    async def scenario() -> None:
        manager = WebsocketManager()
        handler = manager.create_handler("c1")
        loop = asyncio.get_running_loop()
        answered = asyncio.ensure_future(handler.send_and_wait({"q": 1}, timeout=5))
        await eventually(lambda: handler.pending_count == 1)
        await asyncio.sleep(0.05)  # the deadline is 5 s away: nothing expires
        assert handler.pending_count == 1 and not answered.done()
        handler.receive_frame(_answer(_request_rchan(handler), "late but in time"), loop.time())
        assert await answered == "late but in time"
        assert asyncio.isfuture(answered)
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(handler.send_and_wait({"q": 2}, timeout=0.05), 10)
        deadlines = handler._deadlines
        assert deadlines is not None
        own = type(loop) is not _ShiftedClockLoop
        assert (deadlines.now is time.monotonic) is own
        handler.shutdown(ConnectionClosed(1000, "bye"))

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())
