"""What running custom handlers hold is bounded in bytes, not only in count.

``max_handler_tasks`` (64) bounds how many async handlers of one connection run at once; each
keeps its request's frame and decoded value while it runs. Without a bound in bytes, one client
reaching a slow handler (the demo's ``ask`` waits 10 s for its answer) with 64 requests of
``max_message_size`` made the process hold 64 x 16 MiB (four times that for emoji-laden text)
per connection. ``max_handling_bytes`` bounds a connection, ``max_handling_total_bytes`` the
process; past them a request gets a ``busy`` error reply, as past the count."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

from dara_ws_core import ConnectionClosed, ServerConfig
from dara_ws_core.connection import PROCESS_HANDLING, CustomReceived, Event, HandlingTally, SendFrame, ServerConnection

from . import test_hostile_transport
from .helpers import eventually
from .hostile import TEXT, HostileClient, encode_frame, open_channel

KiB = 1024
MiB = 1024 * KiB
#: The fixture ``async with socket_stack(config=...) as stack``, on every socket transport.
socket_stack = test_hostile_transport.socket_stack
EMOJI = "\U0001f600"


def request(data: Any, rchan: str, kind: str = "hold") -> str:
    return json.dumps({"type": "custom", "message": {"kind": kind, "data": data, "__rchan": rchan}},
                      ensure_ascii=False)


def outcomes(events: list[Event]) -> tuple[list[CustomReceived], list[str]]:
    """The handlers to run, and the error codes answered."""
    run = [e for e in events if isinstance(e, CustomReceived)]
    codes = [json.loads(e.frame)["message"]["__error"]["code"] for e in events if isinstance(e, SendFrame)]
    return run, codes


# ---------------------------------------------------------------------------- pure


def test_a_connections_running_handlers_hold_at_most_max_handling_bytes() -> None:
    config = ServerConfig(max_handling_bytes=300_000, ping_interval=None, idle_timeout=None)
    conn: ServerConnection[Any] = ServerConnection("c1", config, kinds={"hold"}, handling=HandlingTally())
    frame = request("x" * 100_000, "r0")
    assert 100_000 < sys.getsizeof(frame) < 150_000
    events = [e for i in range(5) for e in conn.receive_frame(request("x" * 100_000, f"r{i}"), 0.0)]
    run, codes = outcomes(events)
    assert len(run) == 2 and codes == ["busy"] * 3, (len(run), codes)
    assert run[0].size == sys.getsizeof(frame)
    conn.handler_done(run[0].size)  # one ends: room for one more
    run, codes = outcomes(conn.receive_frame(request("x" * 100_000, "r5"), 0.0))
    assert len(run) == 1 and not codes


def test_text_counts_as_it_is_held_and_the_first_request_is_always_taken() -> None:
    config = ServerConfig(max_handling_bytes=300_000, ping_interval=None, idle_timeout=None)
    conn: ServerConnection[Any] = ServerConnection("c1", config, kinds={"hold"}, handling=HandlingTally())
    # 100,004 bytes of UTF-8 with one emoji: 4 bytes a character decoded, 400 KB: over the bound
    # alone, taken since nothing runs; the next is not.
    wide = EMOJI + "x" * 100_000
    events = [e for i in range(3) for e in conn.receive_frame(request(wide, f"r{i}"), 0.0)]
    run, codes = outcomes(events)
    assert len(run) == 1 and codes == ["busy", "busy"]
    # While it runs the connection is past its bound: a small request is busy too.
    assert outcomes(conn.receive_frame(request("small", "r3"), 0.0))[1] == ["busy"]
    conn.handler_done(run[0].size)
    assert len(outcomes(conn.receive_frame(request("small", "r4"), 0.0))[0]) == 1


def test_the_process_bound_refuses_big_requests_never_small_ones() -> None:
    # A total of 2,560,000: a 256th (10,000 bytes) is what a connection may always hold.
    config = ServerConfig(max_handling_total_bytes=2_560_000, ping_interval=None, idle_timeout=None)
    tally = HandlingTally()
    hog: ServerConnection[Any] = ServerConnection("hog", config, kinds={"hold"}, handling=tally)
    other: ServerConnection[Any] = ServerConnection("other", config, kinds={"hold"}, handling=tally)
    events = [e for i in range(40) for e in hog.receive_frame(request("x" * 100_000, f"r{i}"), 0.0)]
    run, codes = outcomes(events)
    assert len(run) == 25 and codes == ["busy"] * 15, (len(run), len(codes))
    assert tally.bytes <= 2_560_000
    assert outcomes(other.receive_frame(request("x" * 100_000, "big"), 0.0))[1] == ["busy"]
    small, codes = outcomes(other.receive_frame(request("small", "small"), 0.0))
    assert len(small) == 1 and not codes
    for event in run + small:
        (hog if event in run else other).handler_done(event.size)
    assert tally.bytes == 0


def test_one_address_holds_a_quarter_of_the_process_bound_and_one_user_a_16th() -> None:
    # A total of 2,560,000: an address's quarter is 640,000, a user's 16th 160,000, and a
    # connection may hold a 256th (10,000) in small requests whatever its holder holds.
    config = ServerConfig(max_handling_total_bytes=2_560_000, ping_interval=None, idle_timeout=None)
    tally = HandlingTally()
    size = sys.getsizeof(request("x" * 100_000, "r0"))

    def conn(user: str, address: str | None) -> ServerConnection[Any]:
        return ServerConnection(user, config, kinds={"hold"}, handling=tally, user=user, address=address)

    # Ten users of one address, three requests each: each user's first is taken, its second
    # would take it past its 16th; the address's quarter stops them at six.
    hogs = [conn(f"mallory{n}", "10.0.0.1") for n in range(10)]
    taken: list[tuple[ServerConnection[Any], CustomReceived]] = []
    codes: list[str] = []
    for hog in hogs:
        for i in range(3):
            run, refused = outcomes(hog.receive_frame(request("x" * 100_000, f"r{i}"), 0.0))
            taken += [(hog, event) for event in run]
            codes += refused
    assert len(taken) == 640_000 // size == 6 and codes == ["busy"] * 24, (len(taken), codes)
    # (The first requests of its users 7 to 10 were refused too: the address's, not theirs.)
    # Another address's big requests are taken, up to its own user's 16th.
    other = conn("alice", "10.0.0.2")
    run, refused = outcomes([e for i in range(3) for e in other.receive_frame(request("x" * 100_000, f"b{i}"), 0.0)])
    assert len(run) == 1 and refused == ["busy", "busy"]
    # A user's small requests go on while its big one runs.
    small, refused = outcomes(other.receive_frame(request("small", "s"), 0.0))
    assert len(small) == 1 and not refused
    for hog, event in taken:
        hog.handler_done(event.size)
    other.handler_done(run[0].size)
    other.connection_lost(ConnectionClosed(1006, "gone"))  # its small one is given back so
    assert tally.bytes == 0 and not tally.holders


def test_a_request_decoded_elsewhere_counts_nothing() -> None:
    # receive_message has no frame to count (the in-memory paths): the count bound still holds.
    config = ServerConfig(max_handler_tasks=2, ping_interval=None, idle_timeout=None)
    conn: ServerConnection[Any] = ServerConnection("c1", config, kinds={"hold"}, handling=HandlingTally())
    from dara_ws_core.codec import decode_client_frame

    events = [e for i in range(3) for e in conn.receive_message(decode_client_frame(request("x", f"r{i}")))]
    run, codes = outcomes(events)
    assert [e.size for e in run] == [0, 0] and codes == ["busy"]


# ---------------------------------------------------------------------------- live


@contextlib.asynccontextmanager
async def holding(socket_stack: Any, config: ServerConfig) -> AsyncIterator[tuple[Any, asyncio.Event]]:
    """A stack of ``socket_stack`` with ``config`` whose handler ``hold`` waits for the event
    yielded with it (set at the end), then answers its data's length."""
    release = asyncio.Event()

    async def hold(channel_id: str, data: Any) -> Any:
        await release.wait()
        return len(data)

    async with socket_stack(config=config) as stack:
        stack.manager.add_ws_handler("hold", hold)
        try:
            yield stack, release
        finally:
            release.set()


async def _replies(client: HostileClient, count: int, timeout: float = 20.0) -> dict[str, str | None]:
    """``count`` replies read by ``client``: request id -> error code (``None``: a result)."""
    got: dict[str, str | None] = {}
    async with asyncio.timeout(timeout):
        while len(got) < count:
            message = json.loads((await client.read_frame(timeout)).text).get("message")
            if isinstance(message, dict) and "__response_for" in message:
                error = message.get("__error")
                got[message["__response_for"]] = error["code"] if error else None
    return got


async def test_one_client_cannot_make_slow_handlers_hold_more_than_max_handling_bytes(socket_stack: Any) -> None:
    # 20 requests of 1 MiB of UTF-8 with one emoji each to a handler that waits: each frame
    # holds 5 MiB decoded (4 bytes a character, and the UTF-8 copy the JSON parser leaves in the
    # str), so two fit 11 MiB and the other 18 are busy at once; before the bound, all 20 ran.
    config = ServerConfig(max_handling_bytes=11 * MiB, ping_interval=None, idle_timeout=None)
    async with holding(socket_stack, config) as (stack, release):
        stack.manager.add_ws_handler("echo", lambda channel_id, data: data)
        assert stack.port is not None
        hostile, channel = await open_channel(stack.port)
        bystander, _ = await open_channel(stack.port, path="/api/core/ws?token=bystander:s1")
        wide = EMOJI + "x" * (MiB - 4)
        base = PROCESS_HANDLING.bytes  # the process's: other tests' handlers may still run
        try:
            for i in range(20):
                hostile.write(encode_frame(TEXT, request(wide, f"r{i}")))
            await hostile.drain()
            busy = await _replies(hostile, 18)
            assert set(busy.values()) == {"busy"}, busy
            handler = stack.manager.handlers[channel]
            assert handler.task_count == 2
            assert PROCESS_HANDLING.bytes - base <= 11 * MiB
            # Another client is served meanwhile.
            bystander.write(encode_frame(TEXT, request({"hi": 1}, "b1", kind="echo")))
            assert await _replies(bystander, 1) == {"b1": None}
            release.set()
            done = await _replies(hostile, 2)
            assert set(done.values()) == {None} and not set(done) & set(busy)
            await eventually(lambda: handler.task_count == 0 and PROCESS_HANDLING.bytes == base)
        finally:
            release.set()
            hostile.abort()
            bystander.abort()


async def test_a_handler_task_cancelled_before_its_first_step_releases_what_its_request_held() -> None:
    # A connection closed in the iteration its request came in cancels the handler's task
    # before the task ran at all: no ``finally`` of the handler's code runs then. What its
    # request held is released with the connection.
    from dara_ws_core import ConnectionClosed, WebsocketManager

    started: list[Any] = []

    async def slow(channel_id: str, data: Any) -> Any:
        started.append(data)
        await asyncio.sleep(10)

    manager = WebsocketManager(ServerConfig(ping_interval=None, idle_timeout=None))
    manager.add_ws_handler("slow", slow)
    handler = manager.create_handler("c1")
    before = PROCESS_HANDLING.bytes
    assert handler.receive_frame(request("x" * 10_000, "r1", kind="slow"), 0.0) is None
    assert PROCESS_HANDLING.bytes > before + 10_000 and handler.task_count == 1
    handler.shutdown(ConnectionClosed(1006, "gone"))  # cancels the task before its first step
    await eventually(lambda: handler.task_count == 0)
    assert not started
    assert PROCESS_HANDLING.bytes == before



async def _channel_from(port: int, user: str, local: str) -> tuple[HostileClient, str]:
    """A raw client of ``user`` on ``127.0.0.1:port`` from the loopback address ``local``, past
    its ``init``, with its channel id."""
    client = await HostileClient.open(port, local=local)
    response = await client.handshake(f"/api/core/ws?token={user}:s1")
    assert response.status == 101, response
    init = json.loads((await client.read_frame()).text)
    return client, init["message"]["channel"]


async def test_the_users_of_one_address_cannot_hold_the_handling_budget_that_others_requests_need(
        socket_stack: Any) -> None:
    # A client naming a user for each of its connections (free where the authenticator lets
    # anyone name themselves) keeps big requests running in a slow handler (the demo's ``ask``
    # is one any client makes slow: it waits for the client's own answer). Before the address's
    # share, its connections filled max_handling_total_bytes together, each within its own
    # max_handling_bytes, and every other client's request over a 256th of it got ``busy``
    # until they ended; now one address holds at most a quarter (one user a 16th).
    total = 32 * MiB
    config = ServerConfig(max_handling_total_bytes=total, ping_interval=None, idle_timeout=None)
    async with holding(socket_stack, config) as (stack, release):
        assert stack.port is not None
        handlers = stack.manager.handlers
        base = PROCESS_HANDLING.bytes
        opened = [await _channel_from(stack.port, f"mallory{n}", "127.0.0.1") for n in range(8)]
        attackers = [client for client, _ in opened]
        bystander, mine = await _channel_from(stack.port, "bystander", "127.0.0.2")
        big = "x" * (2 * MiB)
        try:
            for n, attacker in enumerate(attackers):  # 8 x 3 x 2 MiB: 48 MiB asked for
                for i in range(3):
                    attacker.write(encode_frame(TEXT, request(big, f"a{n}.{i}")))
            # Every request of theirs is running, or was answered busy, before the bystander asks.
            await eventually(lambda: sum(handlers[c].task_count + handlers[c].connection.busy
                                         for _, c in opened) == 24, timeout=20)
            held = PROCESS_HANDLING.bytes - base
            assert held <= total // 4 + 3 * MiB, held
            # The bystander's own big request, from another address, is taken (a busy reply
            # would come at once; a request taken waits for the release).
            bystander.write(encode_frame(TEXT, request(big, "b1")))
            await eventually(lambda: handlers[mine].task_count + handlers[mine].connection.busy == 1,
                             timeout=20)
            assert handlers[mine].connection.busy == 0, "the bystander's request got busy"
            release.set()
            assert await _replies(bystander, 1) == {"b1": None}
        finally:
            release.set()
            for client in (*attackers, bystander):
                client.abort()
        await eventually(lambda: PROCESS_HANDLING.bytes == base)
