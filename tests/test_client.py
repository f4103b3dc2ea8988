"""``DaraClient`` against hostile servers: what one server can make the client hold, and how long
a dead one goes unnoticed.

The servers are built with the real websockets library on 127.0.0.1 and misbehave on purpose: a
flood of requests, pushes nobody takes, frames costly to decode, a server that stops reading or
answering, or that closes every connection right after ``init``. The client reaches them with
each client adapter (websockets and aiohttp), since noticing a dead connection relies on the
adapter's ``abort()``. A responder that itself asks the server runs against this library's own
server, on every served transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from dara_ws_core import (
    ConnectionClosed,
    CustomServerMessage,
    DaraClient,
    Endpoint,
    FrameTooLarge,
    MemoryServer,
    PushedMessage,
    Request,
    RequestTimeout,
    Transport,
    WebsocketManager,
    allow_anonymous,
)
from dara_ws_core.client import _charge, _reconnect_delay
from dara_ws_core.codec import count_json_values
from dara_ws_core.logs import APP_RECORDS
from dara_ws_core.memory import memory_pair

from .helpers import eventually
from .stacks import Stack

Handler = Callable[[ServerConnection], Awaitable[None]]
INIT = json.dumps({"type": "init", "message": {"channel": "c"}})
#: Seeds the randomised hostile servers below; replay a failure with DARA_HOSTILE_SEED=<seed>.
SEED = int(os.environ.get("DARA_HOSTILE_SEED", random.randrange(2**32)))


@pytest.fixture(params=["websockets", "aiohttp"])
def client_adapter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def hostile(
    handler: Handler, adapter: str, close_timeout: float = 1.0
) -> AsyncIterator[Callable[[], Awaitable[Transport]]]:
    """Serve ``handler`` on a free port; yield a connector for ``DaraClient`` whose library waits
    ``close_timeout`` for the server's answer to a close (the libraries' own default is 10 s)."""
    async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        url = f"ws://127.0.0.1:{port}/"
        if adapter == "websockets":
            from dara_ws_websockets import connect as ws_connect

            yield lambda: ws_connect(url, close_timeout=close_timeout)
        else:
            import aiohttp

            from dara_ws_aiohttp import connect as aiohttp_connect

            yield lambda: aiohttp_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=close_timeout))
        server.close(close_connections=False)
        for connection in list(server.connections):
            connection.transport.abort()


async def _answer_pings(ws: ServerConnection) -> None:
    async for frame in ws:
        if json.loads(frame).get("type") == "ping":
            await ws.send('{"type":"pong","message":null}')


def _sends_then_pongs(frames: list[str]) -> Handler:
    """A server that sends ``init`` and ``frames`` at once, then only answers pings."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(INIT)
        for frame in frames:
            await ws.send(frame)
        await _answer_pings(ws)

    return handler


def _requests(count: int) -> list[str]:
    return [json.dumps({"type": "message", "message": {"__rchan": f"r{i}"}}) for i in range(count)]


# ------------------------------------------------------------------ responders


async def test_a_request_flood_runs_at_most_max_responders_and_every_request_is_answered(
    client_adapter: str,
) -> None:
    requests, cap = 300, 8
    answers: list[Any] = []

    async def flood(ws: ServerConnection) -> None:
        await ws.send(INIT)
        for i in range(requests):
            await ws.send(json.dumps({"type": "message", "message": {"__rchan": f"r{i}", "i": i}}))
        async for frame in ws:
            answers.append(json.loads(frame))

    release = asyncio.Event()
    running = peak = 0

    async def slow(request: Request) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            return request.payload["i"]
        finally:
            running -= 1

    async with hostile(flood, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_responders=cap)
        client.on_request(slow)
        await client.connect()
        try:
            await eventually(lambda: running == cap, "the client runs its responders")
            await eventually(lambda: len(client._backlog) == requests - cap, "the rest wait")
            assert peak == cap and len(client._tasks) == cap and client.requests_dropped == 0
            release.set()
            await eventually(lambda: len(answers) == requests, "every request answered")
        finally:
            await client.close()
    assert peak == cap
    assert sorted(a["message"] for a in answers) == list(range(requests))
    assert {a["channel"] for a in answers} == {f"r{i}" for i in range(requests)}


async def test_close_is_prompt_while_every_responder_slot_is_busy(client_adapter: str) -> None:
    never = asyncio.Event()

    async def stuck(request: Request) -> Any:
        await never.wait()

    async with hostile(_sends_then_pongs(_requests(50)), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_responders=4)
        client.on_request(stuck)
        await client.connect()
        await eventually(lambda: client._responding == 4, "the client is at its cap")
        async with asyncio.timeout(3):
            await client.close()
        assert not client._tasks and client._responding == 0
        await client.wait_closed(1)


async def test_responders_slower_than_the_idle_timeout_do_not_make_the_server_look_dead(
    client_adapter: str,
) -> None:
    """The client keeps reading at the responder cap: the pongs come in meanwhile."""

    async def slower_than_the_idle_timeout(request: Request) -> Any:
        await asyncio.sleep(0.6)  # the scenario: twice idle_timeout (0.3 s)
        return 1

    async with hostile(_sends_then_pongs(_requests(2)), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=0.1, idle_timeout=0.3, max_responders=1)
        client.on_request(slower_than_the_idle_timeout)
        await client.connect()
        try:
            await eventually(lambda: not client._tasks and client.pongs >= 3, "answered, pings on")
            assert client.idle_closes == 0 and client.connections == 1 and client.connected
        finally:
            await client.close()


async def test_at_the_cap_replies_pushes_and_pongs_are_still_read(client_adapter: str) -> None:
    """The frames the server sends after filling every responder slot are not held behind it."""
    never = asyncio.Event()

    async def stuck(request: Request) -> Any:
        await never.wait()

    async def fill_then_serve(ws: ServerConnection) -> None:
        await ws.send(INIT)
        for request in _requests(3):
            await ws.send(request)
        await ws.send(_push(7, 1))
        async for frame in ws:
            message = json.loads(frame)
            if message["type"] == "ping":
                await ws.send('{"type":"pong","message":null}')
            elif message["type"] == "custom":
                await ws.send(json.dumps({"type": "custom", "message": {
                    "kind": "echo", "data": message["message"]["data"],
                    "__response_for": message["message"]["__rchan"]}}))

    async with hostile(fill_then_serve, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=0.05, max_responders=2)
        client.on_request(stuck)
        await client.connect()
        try:
            await eventually(lambda: client._responding == 2 and len(client._backlog) == 1,
                             "two requests running, the third waiting")
            assert _number(await client.receive(5)) == 7
            assert await client.request("echo", 42, timeout=5) == 42
            await eventually(lambda: client.pongs >= 2, "pongs read at the cap")
        finally:
            await client.close()
        assert not client._backlog and client._backlog_bytes == 0


def _hostile_rchan(rng: random.Random) -> str:
    """A request id as a hostile server may choose it: long, with newlines, escapes and a forged
    log line."""
    alphabet = "ab\n\r\t\x1b[31m\u2028\x00\u00e9"
    noise = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200)))
    return noise + "\n2026-01-01 00:00:00 ERROR forged record" + "x" * rng.randrange(0, 64 * 1024)


async def test_a_responder_failing_on_a_flood_of_requests_logs_within_a_budget_and_no_id_verbatim(
    client_adapter: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A hostile server chooses what makes an application's responder fail, as often as it likes,
    # and the request ids the client would log: the records stay within the budget of
    # application failures, each on one line of bounded length.
    rng = random.Random(f"{SEED}-{client_adapter}")
    count = 600
    frames = [json.dumps({"type": "message", "message": {"__rchan": _hostile_rchan(rng)}})
              for _ in range(count)]
    calls = 0

    def responder(request: Request) -> Any:
        nonlocal calls
        calls += 1
        raise ValueError("the application cannot answer this")

    caplog.set_level(logging.ERROR, logger="dara_ws_core.client")
    started = time.monotonic()
    async with hostile(_sends_then_pongs(frames), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None)
        client.on_request(responder)
        await client.connect()
        try:
            await eventually(lambda: calls == count, "every request handed to the responder")
        finally:
            await client.close()
    elapsed = time.monotonic() - started
    records = [r for r in caplog.records if r.name == "dara_ws_core.client"]
    budget = 1 + APP_RECORDS.burst + APP_RECORDS.rate * elapsed
    seen = f"seed {SEED}: {len(records)} records for {count} failures in {elapsed:.1f} s"
    assert records, seen  # the failure is reported
    assert len(records) <= budget, f"{seen}, over {budget:.0f}"
    for record in records:
        message = record.getMessage()
        # One line (the forged one stays inside it, escaped) of bounded length.
        assert not {"\n", "\r", "\u2028"} & set(message) and len(message) < 512, (seen, message[:200])


@pytest.mark.parametrize("bound", ["count", "bytes"])
async def test_server_requests_beyond_the_backlog_are_dropped_and_counted(
    client_adapter: str, bound: str, caplog: pytest.LogCaptureFixture
) -> None:
    requests, cap = 200, 2
    frames = [json.dumps({"type": "message", "message": {"__rchan": f"r{i}", "i": i, "pad": "p" * 500}})
              for i in range(requests)]
    charge = _charge(frames[0], 0)
    options = {"max_backlog": 5} if bound == "count" else {"max_backlog_bytes": 5 * charge + charge // 2}
    answers: list[Any] = []

    async def flood(ws: ServerConnection) -> None:
        await ws.send(INIT)
        for request in frames:
            await ws.send(request)
        async for frame in ws:
            answers.append(json.loads(frame))

    release = asyncio.Event()

    async def held(request: Request) -> Any:
        await release.wait()
        return request.payload["i"]

    async with hostile(flood, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_responders=cap, **options)  # type: ignore[arg-type]
        client.on_request(held)
        await client.connect()
        try:
            await eventually(lambda: client.requests_dropped == requests - cap - 5, "the rest dropped")
            assert client._responding == cap and len(client._backlog) == 5
            assert client._backlog_bytes == 5 * charge
            release.set()
            await eventually(lambda: len(answers) == cap + 5, "the kept requests answered")
        finally:
            await client.close()
    assert sorted(a["message"] for a in answers) == list(range(cap + 5))  # the first ones, in order
    dropped_logs = [r for r in caplog.records if "server request dropped" in r.getMessage()]
    assert 1 <= len(dropped_logs) <= 12  # the first ten, then powers of ten


async def test_a_responder_may_ask_the_server_while_every_slot_is_taken(make_stack: Any) -> None:
    """More server requests than ``max_responders``, each answered after a ``request()`` of its
    own: every one is answered (the client reads its replies at the cap)."""
    asks, cap = 7, 2
    async with make_stack() as stack:
        assert isinstance(stack, Stack)
        manager = stack.manager

        async def ask(channel: str, data: Any) -> Any:
            return await manager.send_and_wait(channel, {"n": data}, timeout=10)

        manager.add_ws_handler("echo", lambda channel, data: data)
        manager.add_ws_handler("ask", ask)
        client = await stack.client(max_responders=cap)

        async def looks_up(request: Request) -> Any:
            return {"looked_up": await client.request("echo", request.payload["n"] * 10, timeout=10)}

        client.on_request(looks_up)
        async with asyncio.timeout(20):
            answers = await asyncio.gather(*(client.request("ask", i, timeout=15) for i in range(asks)))
        assert answers == [{"looked_up": i * 10} for i in range(asks)]
        assert client.requests_dropped == 0 and not client._backlog


# ------------------------------------------------------------------ one frame


def _values_bomb(values: int) -> str:
    """A push of cheap-to-send, costly-to-decode JSON: ``values`` empty lists."""
    return '{"type":"custom","message":{"kind":"bomb","data":[' + ",".join(["[]"] * values) + "]}}"


@pytest.mark.parametrize("frame", [
    pytest.param(_values_bomb(250_001), id="values"),
    pytest.param('{"type":"custom","message":{"kind":"k","data":' + "[" * 300 + "]" * 300 + "}}",
                 id="nesting"),
])
async def test_a_server_frame_too_costly_to_decode_closes_the_connection_with_1009(
    client_adapter: str, frame: str
) -> None:
    server_saw: list[int | None] = []

    async def bomb(ws: ServerConnection) -> None:
        await ws.send(INIT)
        await ws.send(frame)
        await ws.send(_push(1, 1))
        with contextlib.suppress(Exception):
            await ws.wait_closed()
        server_saw.append(ws.close_code)

    async with hostile(bomb, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None)  # the default bound, the server's
        await client.connect()
        closed = await client.wait_closed(10)
        assert closed is not None and closed.code == 1009 and client.last_close is closed
        assert not client.received_nowait()  # neither the bomb nor what came after it
        await eventually(lambda: server_saw == [1009], "the server told why")
        await client.close()


async def test_a_frame_too_costly_before_init_fails_the_connect_with_1009(client_adapter: str) -> None:
    server_saw: list[int | None] = []

    async def bomb_first(ws: ServerConnection) -> None:
        await ws.send(_values_bomb(2_000))
        await ws.send(INIT)
        with contextlib.suppress(Exception):
            await ws.wait_closed()
        server_saw.append(ws.close_code)

    async with hostile(bomb_first, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_message_values=1_000)
        with pytest.raises(FrameTooLarge):
            await client.connect()
        await eventually(lambda: server_saw == [1009], "the server told why")
        assert not client.connected


async def test_a_frame_at_max_message_values_is_decoded(client_adapter: str) -> None:
    frame = _values_bomb(1_000)
    async with hostile(_sends_then_pongs([frame]), client_adapter) as connect:
        # Counted as the server counts (an upper bound: each "[]" and each comma count).
        client = DaraClient(connect, ping_interval=None, max_message_values=count_json_values(frame))
        await client.connect()
        try:
            message = await client.receive(5)
            assert isinstance(message, CustomServerMessage) and len(message.message.data) == 1_000
            assert client.connected
        finally:
            await client.close()


async def test_the_inbox_charges_a_push_for_the_values_it_decodes_to(client_adapter: str) -> None:
    """Pushes of 20,000 values in 40 KB of text each: charged ~2.4 MB each, 2 fit in 5 MiB."""
    pushes = 10
    frames = [json.dumps({"type": "custom", "message": {"kind": "k", "data": [i] + [0] * 19_999}})
              for i in range(pushes)]
    async with hostile(_sends_then_pongs(frames), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue_bytes=5 * 1024 * 1024)
        await client.connect()
        try:
            await eventually(lambda: client.dropped == pushes - 2, "the oldest pushes dropped")
            assert client._inbox_bytes <= client.max_queue_bytes
            assert [_number(m) for m in client.received_nowait()] == [pushes - 2, pushes - 1]
        finally:
            await client.close()


async def test_a_push_of_one_long_text_of_commas_is_charged_as_one_value(client_adapter: str) -> None:
    """Pushes of a 40 KB CSV text each: one value, charged ~40 KB, not 120 bytes per comma (it
    was: ~2.4 MB, and the inbox dropped all but 2 of them)."""
    pushes = 10
    csv = ",".join(["0"] * 20_000)
    frames = [json.dumps({"type": "custom", "message": {"kind": "k", "data": [i, csv]}}) for i in range(pushes)]
    async with hostile(_sends_then_pongs(frames), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue_bytes=5 * 1024 * 1024,
                            max_message_values=1_000)
        await client.connect()
        try:
            received: list[PushedMessage] = []
            for _ in range(pushes):
                received.append(await client.receive(5))
            assert [_number(m) for m in received] == list(range(pushes))
            assert client.dropped == 0 and client.connected
        finally:
            await client.close()


# ------------------------------------------------------------------ inbox


def _push(i: int, size: int) -> str:
    return json.dumps({"type": "custom", "message": {"kind": "k", "data": [i, "p" * size]}})


def _number(message: PushedMessage) -> int:
    assert isinstance(message, CustomServerMessage)
    return int(message.message.data[0])


async def test_a_full_inbox_drops_the_oldest_pushes_to_stay_within_its_bytes(
    client_adapter: str, caplog: pytest.LogCaptureFixture
) -> None:
    pushes, size = 40, 100_000
    frame_size = _charge(_push(0, size), 0)  # its text and its values, as the inbox counts it

    pushes_nobody_takes = _sends_then_pongs([_push(i, size) for i in range(pushes)])
    async with hostile(pushes_nobody_takes, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue_bytes=3 * frame_size + 10)
        await client.connect()
        try:
            await eventually(lambda: client.dropped == pushes - 3, "the oldest pushes dropped")
            kept = client.received_nowait()
        finally:
            await client.close()
    assert [_number(m) for m in kept] == [pushes - 3, pushes - 2, pushes - 1]
    assert client._inbox_bytes == 0
    dropped_logs = [r for r in caplog.records if "dropped the oldest push" in r.getMessage()]
    assert 1 <= len(dropped_logs) <= 11  # the first ten, then powers of ten


async def test_the_inbox_charges_a_push_for_its_text_at_the_width_it_is_decoded_to(client_adapter: str) -> None:
    """An ASCII text with one emoji decodes to 4 bytes a character (PEP 393): pushes of 100 KB of
    it are charged about 500 KB each (and the UTF-8 copy decoding leaves in the frame), so 3 fit
    in 1.52 MB, not 15 (as by their UTF-8)."""
    pushes, size = 20, 100_000
    frames = [json.dumps({"type": "custom", "message": {"kind": "k", "data": [i, "\U0001f600" + "p" * size]}},
                         ensure_ascii=False) for i in range(pushes)]
    async with hostile(_sends_then_pongs(frames), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue_bytes=3 * 5 * size + 20_000)
        await client.connect()
        try:
            await eventually(lambda: client.dropped >= pushes - 3, "the oldest pushes dropped")
            assert [_number(m) for m in client.received_nowait()] == [pushes - 3, pushes - 2, pushes - 1]
        finally:
            await client.close()


async def test_a_full_inbox_drops_the_oldest_pushes_to_stay_within_its_count(
    client_adapter: str,
) -> None:
    async with hostile(_sends_then_pongs([_push(i, 1) for i in range(30)]), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue=5)
        await client.connect()
        try:
            await eventually(lambda: client.dropped == 25, "the oldest pushes dropped")
            assert [_number(await client.receive(1)) for _ in range(5)] == list(range(25, 30))
            assert client._inbox_bytes == 0
        finally:
            await client.close()


async def test_a_push_larger_than_the_byte_bound_is_kept_alone(client_adapter: str) -> None:
    one_big_after_small = _sends_then_pongs([_push(0, 10), _push(1, 50_000)])
    async with hostile(one_big_after_small, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, max_queue_bytes=10_000)
        await client.connect()
        try:
            assert _number(await client.receive(5)) == 1 and client.dropped == 1
        finally:
            await client.close()


# ------------------------------------------------------------------ reconnecting


def _closes_after_init(code: int, accepted: list[float]) -> Handler:
    """A server that sends ``init`` and closes with ``code`` at once, noting when it accepted."""

    async def handler(ws: ServerConnection) -> None:
        accepted.append(asyncio.get_running_loop().time())
        await ws.send(INIT)
        await ws.close(code, "go away")

    return handler


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


async def test_a_server_closing_1013_after_init_is_retried_ever_more_slowly_then_given_up(
    client_adapter: str,
) -> None:
    accepted: list[float] = []
    async with hostile(_closes_after_init(1013, accepted), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, reconnect=True, backoff_initial=0.05,
                            backoff_max=0.4, max_attempts=4)
        await client.connect()
        closed = await client.wait_closed(10)  # gives up: each connection ended at once
        assert closed is not None and closed.code == 1013
        assert client.connections == len(accepted) == 5  # the first, then max_attempts
        # 1013 waits at least the whole backoff, which doubles: 0.05, 0.1, 0.2, then 0.4.
        for gap, least in zip(_gaps(accepted), [0.05, 0.1, 0.2, 0.4], strict=True):
            assert gap >= least
        await client.close()


@pytest.mark.parametrize("code", [1008, 4003])
async def test_a_server_refusing_the_client_is_retried_only_after_backoff_max(
    client_adapter: str, code: int
) -> None:
    accepted: list[float] = []
    async with hostile(_closes_after_init(code, accepted), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, reconnect=True, backoff_initial=0.01,
                            backoff_max=0.3, max_attempts=2)
        await client.connect()
        closed = await client.wait_closed(10)
        assert closed is not None and closed.code == code and len(accepted) == 3
        assert min(_gaps(accepted)) >= 0.3
        await client.close()


async def test_a_connection_that_stays_up_starts_the_attempts_over(client_adapter: str) -> None:
    accepted: list[float] = []

    async def lasts_a_while_twice(ws: ServerConnection) -> None:
        accepted.append(asyncio.get_running_loop().time())
        await ws.send(INIT)
        if len(accepted) <= 2:
            await asyncio.sleep(0.3)  # the scenario: up longer than stable_after (0.2 s)
            await ws.close(1001, "restarting")
        else:
            await _answer_pings(ws)

    async with hostile(lasts_a_while_twice, client_adapter) as connect:
        # One attempt allowed after each stable connection: two losses are both survived.
        client = DaraClient(connect, ping_interval=None, reconnect=True, backoff_initial=0.01,
                            max_attempts=1, stable_after=0.2)
        await client.connect()
        try:
            await eventually(lambda: client.connections == 3 and client.connected, "reconnected twice")
        finally:
            await client.close()


def test_the_reconnect_delay_follows_the_close_code() -> None:
    def delay(code: int | None, attempts: int, jitter: float) -> float:
        return _reconnect_delay(code, attempts, 0.5, 10.0, jitter)

    assert delay(1006, 0, 0.0) == 0.25 and delay(1006, 0, 1.0) == 0.5  # half to all of it
    assert delay(1001, 3, 1.0) == 4.0 and delay(None, 10, 1.0) == 10.0  # doubles up to the max
    assert delay(1013, 0, 0.0) == 0.5 and delay(1013, 2, 1.0) == 3.0  # at least all of it
    for refusal in (1002, 1003, 1007, 1008, 1009, 1010, 4000, 4401, 4999):
        assert delay(refusal, 0, 0.0) == 10.0
    assert delay(1006, 10_000, 1.0) == 10.0  # no overflow however many attempts


# ------------------------------------------------------------------ a dead server


async def _goes_silent(ws: ServerConnection, reads: bool) -> None:
    await ws.send(INIT)
    if reads:  # reads every frame and answers none
        async for _ in ws:
            pass
    else:  # reads nothing more: the client's pings pile up unanswered
        ws.transport.pause_reading()
        await ws.wait_closed()


@pytest.mark.parametrize("reads", [True, False], ids=["never-answers", "never-reads"])
async def test_a_silent_server_is_given_up_and_the_client_reconnects(
    client_adapter: str, reads: bool
) -> None:
    accepted = 0

    async def silent_first(ws: ServerConnection) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 1:
            await _goes_silent(ws, reads)
        else:
            await ws.send(INIT)
            await _answer_pings(ws)

    async with hostile(silent_first, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=0.1, reconnect=True, backoff_initial=0.01)
        assert client.idle_timeout == pytest.approx(0.2)
        await client.connect()
        try:
            with pytest.raises(ConnectionClosed) as lost:
                await client.request("echo", 1, timeout=5)  # fails with the connection, not later
            assert lost.value.code == 1006 and "no frame from the server" in lost.value.reason
            await client.wait_connected(5)
            assert client.connections == 2 and client.idle_closes == 1
            await eventually(lambda: client.pongs >= 3, "the new connection is alive")
            assert client.idle_closes == 1  # a live server is never given up
        finally:
            await client.close()


async def test_a_silent_server_without_reconnect_stops_the_client(client_adapter: str) -> None:
    async with hostile(lambda ws: _goes_silent(ws, False), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=0.1)
        await client.connect()
        closed = await client.wait_closed(5)
        assert closed is not None and closed.code == 1006 and not client.connected
        with pytest.raises(ConnectionClosed):
            await client.receive(1)
        await client.close()


async def test_without_pings_a_quiet_server_is_never_given_up(client_adapter: str) -> None:
    async with hostile(lambda ws: _goes_silent(ws, True), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None)
        assert client.idle_timeout is None
        await client.connect()
        try:
            with pytest.raises(TimeoutError):
                await client.receive(0.5)
            assert client.connected and client.idle_closes == 0
        finally:
            await client.close()


def test_an_idle_timeout_within_one_ping_interval_is_refused() -> None:
    async def never() -> Transport:
        raise AssertionError("not connected")

    with pytest.raises(ValueError, match="idle_timeout"):
        DaraClient(never, ping_interval=1.0, idle_timeout=1.0)
    with pytest.raises(ValueError, match="max_responders"):
        DaraClient(never, max_responders=0)


# ------------------------------------------------------------------ a server that stops reading

#: A request or answer larger than what the loopback's kernel buffers take from a peer that reads
#: nothing (about 4 MiB here): its send waits for the server.
BIG = "x" * (16 << 20)


async def _stops_reading(ws: ServerConnection) -> None:
    """Sends ``init``, then reads nothing more but pushes a frame every 50 ms: the client hears
    from it all the time, so only its sends can tell that it is stuck."""
    await ws.send(INIT)
    ws.transport.pause_reading()
    with contextlib.suppress(websockets.ConnectionClosed):
        for i in range(2000):  # bounded: 100 s
            await ws.send(_push(i, 1))
            await asyncio.sleep(0.05)


def _stops_reading_first(requests: list[str]) -> Handler:
    """The first connection stops reading (after sending ``requests``), the next ones echo."""
    accepted = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal accepted
        accepted += 1
        if accepted > 1:
            await ws.send(INIT)
            async for frame in ws:
                message = json.loads(frame)
                if message["type"] == "custom":
                    await ws.send(json.dumps({"type": "custom", "message": {
                        "kind": "echo", "data": len(message["message"]["data"]),
                        "__response_for": message["message"].get("__rchan")}}))
            return
        await ws.send(INIT)
        for request in requests:
            await ws.send(request)
        await _stops_reading(ws)

    return handler


async def test_a_request_times_out_while_its_frame_waits_for_a_server_that_reads_nothing(
    client_adapter: str,
) -> None:
    async with hostile(_stops_reading, client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, send_timeout=None, close_timeout=0.5)
        await client.connect()
        try:
            async with asyncio.timeout(5):  # the scenario: the send never completes
                with pytest.raises(RequestTimeout):
                    await client.request("echo", BIG, timeout=0.3)
            # Only the request's time ran out: with no send_timeout the connection is kept.
            assert client.connected and client.send_stalls == 0
            client.received_nowait()
            await eventually(lambda: len(client.received_nowait()) > 0, "pushes still read")
        finally:
            await client.close()


@pytest.mark.parametrize("operation", ["request", "send_custom", "answer"])
async def test_a_frame_the_server_does_not_take_within_send_timeout_gives_the_connection_up(
    client_adapter: str, operation: str
) -> None:
    """The server keeps sending, so the idle watchdog never fires; the stuck send does."""
    requests = _requests(1) if operation == "answer" else []
    async with hostile(_stops_reading_first(requests), client_adapter) as connect:
        client = DaraClient(connect, ping_interval=None, send_timeout=0.3, close_timeout=0.5,
                            reconnect=True, backoff_initial=0.01)
        client.on_request(lambda request: BIG)
        await client.connect()
        try:
            async with asyncio.timeout(5):
                if operation == "request":
                    with pytest.raises(ConnectionClosed) as lost:
                        await client.request("echo", BIG, timeout=None)
                elif operation == "send_custom":
                    with pytest.raises(ConnectionClosed) as lost:
                        await client.send_custom("echo", BIG)
                await client.wait_connected()
                await eventually(lambda: client.connections == 2, "reconnected")
            closed = client.last_close
            assert closed is not None and closed.code == 1006 and "send_timeout" in closed.reason
            if operation != "answer":
                assert lost.value.code == 1006 and "send_timeout" in lost.value.reason
            assert client.send_stalls == 1 and client.idle_closes == 0
            assert not client._tasks and client._responding == 0  # the responder ended with it
            assert await client.request("echo", "abc", timeout=5) == 3  # the new connection works
        finally:
            await client.close()


@pytest.mark.parametrize("state", ["close-unanswered", "send-stuck", "send-cancelled"])
async def test_close_is_bounded_whatever_the_connection_is_doing(client_adapter: str, state: str) -> None:
    # The libraries' own close timeouts (10 s) are left as they are: close_timeout bounds it.
    async with hostile(_stops_reading, client_adapter, close_timeout=10) as connect:
        client = DaraClient(connect, ping_interval=None, send_timeout=None, close_timeout=0.3)
        await client.connect()
        stuck = None
        if state == "send-stuck":
            stuck = asyncio.create_task(client.send_custom("big", BIG))
            await asyncio.sleep(0)  # lets it start
        elif state == "send-cancelled":  # a request given up in the middle of its frame
            with pytest.raises(RequestTimeout):
                await client.request("echo", BIG, timeout=0.2)
        async with asyncio.timeout(3):
            await client.close()
        assert not client.connected
        if stuck is not None:  # ends with the connection (websockets reports no error then)
            async with asyncio.timeout(3):
                with contextlib.suppress(ConnectionClosed):
                    await stuck
        await client.wait_closed(3)


@pytest.mark.parametrize("phase", ["backoff", "opening"])
async def test_close_during_a_reconnection_is_prompt_and_leaves_nothing_open(
    client_adapter: str, phase: str
) -> None:
    """Closed while waiting out a 10-20 s backoff, or while the next connection waits for an
    ``init`` that never comes (``init_timeout``, 10 s)."""
    accepted: list[float] = []
    gone = _closes_after_init(1001, accepted)

    async def then_mute(ws: ServerConnection) -> None:
        if not accepted:
            await gone(ws)
        else:  # accepted and read, never initialised
            accepted.append(asyncio.get_running_loop().time())
            async for _ in ws:
                pass

    async with hostile(then_mute, client_adapter) as connect:
        delay = 20 if phase == "backoff" else 0.01
        client = DaraClient(connect, ping_interval=None, reconnect=True, backoff_initial=delay,
                            backoff_max=delay)
        await client.connect()
        await eventually(lambda: len(accepted) == (1 if phase == "backoff" else 2) and not client.connected,
                         "the client is between two connections")
        async with asyncio.timeout(2):
            await client.close()
        assert client._runner is not None and client._runner.done()
        with pytest.raises(ConnectionClosed):
            await client.receive(1)
        assert client.connections == 1 and not client.connected
        assert len(accepted) == (1 if phase == "backoff" else 2)  # nothing opened since


async def test_over_the_memory_transport_sends_to_an_end_that_reads_nothing_are_bounded() -> None:
    """The in-memory transport's buffer (8 frames here) plays the socket's: full, sends wait."""
    server_end, client_end = memory_pair(max_queue=8)
    await server_end.send(INIT.encode())

    async def connector() -> Transport:
        return client_end

    client = DaraClient(connector, ping_interval=None, send_timeout=0.5)
    await client.connect()
    try:
        async with asyncio.timeout(5):
            outcomes = await asyncio.gather(
                *(client.request("echo", i, timeout=0.2) for i in range(40)), return_exceptions=True
            )
        # The first 8 frames fit the buffer and wait for their answer, the rest for room: every
        # one ends with its timeout, and the connection stays (no send waited send_timeout).
        assert all(isinstance(outcome, RequestTimeout) for outcome in outcomes)
        assert client.connected and client.send_stalls == 0
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionClosed) as lost:
                await client.send_custom("more")
        assert lost.value.code == 1006 and "send_timeout" in lost.value.reason
        assert client.send_stalls == 1 and server_end.close_code == 1006
        closed = await client.wait_closed(5)
        assert closed is not None and closed.code == 1006
    finally:
        async with asyncio.timeout(3):
            await client.close()


@pytest.mark.parametrize("connector", ["websockets", "aiohttp", "custom"])
async def test_a_server_that_never_answers_the_upgrade_ends_connect_at_open_timeout(connector: str) -> None:
    """Review 17 (10): over aiohttp, ``connect()`` waited the library's own 300 s on a server
    that accepts and never answers. The client bounds any connector by its ``open_timeout``
    (here the websockets connector's own bound is off, and the custom one waits for ever), and
    the connector, cancelled, closes the socket it opened."""
    accepted = asyncio.Event()
    gone = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        try:
            async with asyncio.timeout(10):
                while await reader.read(65536):  # the request, if any, never answered
                    pass
            gone.set()  # the client closed its end
        finally:
            writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"ws://127.0.0.1:{port}/"

    async def raw() -> Transport:  # a library that waits on the server without a bound
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await asyncio.Event().wait()
        finally:
            writer.close()
        raise AssertionError("never reached")

    connect: Callable[[], Awaitable[Transport]]
    if connector == "websockets":
        from dara_ws_websockets import connect as ws_connect

        connect = functools.partial(ws_connect, url, open_timeout=None)
    elif connector == "aiohttp":
        from dara_ws_aiohttp import connect as aiohttp_connect

        connect = functools.partial(aiohttp_connect, url)
    else:
        connect = raw
    client = DaraClient(connect, ping_interval=None, open_timeout=0.3)
    attempt = asyncio.ensure_future(client.connect())
    try:
        done, _ = await asyncio.wait((attempt,), timeout=5)  # a bound of the test, not measured
        assert attempt in done and isinstance(attempt.exception(), TimeoutError)
        assert accepted.is_set() and not client.connected
        async with asyncio.timeout(5):
            await gone.wait()
    finally:
        attempt.cancel()
        await asyncio.wait((attempt,), timeout=5)
        server.close()
        await server.wait_closed()


def test_timeouts_not_above_zero_are_refused() -> None:
    async def never() -> Transport:
        raise AssertionError("not connected")

    with pytest.raises(ValueError, match="send_timeout and close_timeout"):
        DaraClient(never, send_timeout=0)
    with pytest.raises(ValueError, match="send_timeout and close_timeout"):
        DaraClient(never, close_timeout=-1.0)
    with pytest.raises(ValueError, match="open_timeout"):
        DaraClient(never, open_timeout=0)
    assert DaraClient(never, send_timeout=None).send_timeout is None  # no bound: allowed


@pytest.fixture(autouse=True)
def _client_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "dara_ws_core.client")


async def test_a_request_json_cannot_carry_raises_and_leaves_no_waiter_behind() -> None:
    """The encoding error is the caller's; the request registered nothing, so closing the client
    fails no orphan waiter (asyncio printed "Future exception was never retrieved" with a
    ConnectionClosed traceback at every such close)."""
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    manager = WebsocketManager()
    manager.add_ws_handler("echo", lambda channel, data: data)
    server = MemoryServer(Endpoint(manager, allow_anonymous()))
    try:
        async with DaraClient(server.connect, ping_interval=None) as client:
            with pytest.raises(Exception, match="serialize"):
                await client.request("echo", object(), timeout=5)
            assert await client.request("echo", 1, timeout=5) == 1
        gc.collect()
        assert unretrieved == []
    finally:
        loop.set_exception_handler(None)
