"""Limits against abuse, graceful shutdown, and no internals on the wire (issue 5, parts 4-6).

Each limit has a defined outcome when exceeded, on every transport: the inbound rate limit closes
with 1008, the handler-task cap answers ``busy``, the pending-request cap raises
``TooManyPendingRequests`` without sending anything, the size caps close with 1009 or fail the one
chunked answer. Shutdown closes with 1001 after a grace period for in-flight replies and leaves no
task and no warning behind. Whatever goes wrong inside the server, the client gets a code and a fixed
message; the traceback goes to the log with the channel id and the kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from dara_ws_core import (
    Chunked,
    ChunkError,
    CloseCode,
    ConnectionClosed,
    CustomHandlerRegistry,
    DaraClient,
    RemoteError,
    ServerConfig,
    TooManyPendingRequests,
    Transport,
    WebsocketManager,
)
from dara_ws_core.codec import MAX_NUMBER_DIGITS
from dara_ws_core.correlation import CHUNK_SHARES, PART_BYTES, PROCESS_CHUNKS

from .helpers import eventually
from .stacks import HandshakeRejected, Stack

MakeStack = Callable[..., AbstractAsyncContextManager[Stack]]
TIMEOUT = 5.0
SECRET = "s3cr3t-internal-detail-/srv/app/db.py-password=hunter2"


def assert_manager_empty(stack: Stack) -> None:
    assert stack.manager.handlers == {}
    assert stack.manager.registry.counts() == (0, 0, 0)
    assert stack.endpoint.connection_count == 0


async def read_until_closed(transport: Transport) -> tuple[list[str], ConnectionClosed]:
    """Every text frame the server still sends, and how the connection ended."""
    frames: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                frame = await transport.receive()
            except ConnectionClosed as exc:
                return frames, exc
            frames.append(frame if isinstance(frame, str) else frame.decode())


async def send_json(transport: Transport, value: Any) -> None:
    await transport.send(json.dumps(value).encode())


async def receive_json(transport: Transport) -> dict[str, Any]:
    frame = await asyncio.wait_for(transport.receive(), TIMEOUT)
    value = json.loads(frame)
    assert isinstance(value, dict)
    return value


async def open_raw(stack: Stack, token: str = "mallory:m1") -> Transport:
    transport = await stack.connect(token)
    assert (await receive_json(transport))["type"] == "init"
    return transport


# ----------------------------------------------------------------------------- rate limit


async def test_rate_limit_closes_a_flooding_connection_with_1008(make_stack: MakeStack) -> None:
    config = ServerConfig(rate_limit=20, rate_window=60.0)
    async with make_stack(config=config) as stack:
        neighbour = await stack.client("alice:s1")
        flood = await open_raw(stack)
        with contextlib.suppress(ConnectionClosed):  # frames after the close may be refused
            for _ in range(40):
                await send_json(flood, {"type": "ping", "message": None})
        frames, closed = await read_until_closed(flood)
        assert (closed.code, closed.reason) == (CloseCode.POLICY_VIOLATION, "rate limit exceeded")
        assert all(json.loads(f)["type"] == "pong" for f in frames)
        assert len(frames) <= 20
        await eventually(lambda: len(stack.manager.handlers) == 1)
        assert stack.manager.get_user_channels("mallory") == set()
        # The neighbour is unharmed.
        await stack.manager.send_message(neighbour.channel or "", {"n": 1})
        assert (await neighbour.receive(timeout=TIMEOUT)).message.model_dump() == {"n": 1}


async def test_rate_limit_lets_traffic_under_the_limit_through(make_stack: MakeStack) -> None:
    config = ServerConfig(rate_limit=10, rate_window=0.3)
    async with make_stack(config=config) as stack:
        transport = await open_raw(stack)
        for _ in range(3):  # three windows of exactly the limit
            for _ in range(10):
                await send_json(transport, {"type": "ping"})
            for _ in range(10):
                assert (await receive_json(transport))["type"] == "pong"
            await asyncio.sleep(0.35)
        assert len(stack.manager.handlers) == 1
        await transport.close()


# ----------------------------------------------------------------------------- handler tasks


async def test_handler_task_cap_answers_busy_and_keeps_the_connection(
    make_stack: MakeStack,
) -> None:
    release = asyncio.Event()

    async def wait(channel: str, data: Any) -> Any:
        await release.wait()
        return data

    async with make_stack(config=ServerConfig(max_handler_tasks=2)) as stack:
        stack.manager.add_ws_handler("wait", wait)
        client = await stack.client("alice:s1")
        running = [asyncio.create_task(client.request("wait", i)) for i in range(2)]
        handler = stack.manager.handlers[client.channel or ""]
        await eventually(lambda: handler.task_count == 2)
        with pytest.raises(RemoteError) as info:
            await client.request("wait", 99, timeout=TIMEOUT)
        assert info.value.code == "busy"
        # A fire-and-forget message over the cap gets the error too, without __response_for.
        await client.send_custom("wait", 100)
        pushed = await client.receive(timeout=TIMEOUT)
        assert pushed.message.model_dump(by_alias=True)["__error"]["code"] == "busy"
        release.set()
        assert await asyncio.gather(*running) == [0, 1]
        await eventually(lambda: handler.task_count == 0)
        assert await client.request("wait", 3, timeout=TIMEOUT) == 3


# ----------------------------------------------------------------------------- pending requests


async def test_pending_request_cap_raises_without_sending(make_stack: MakeStack) -> None:
    release = asyncio.Event()
    seen: list[str] = []

    async def answer(request: Any) -> Any:
        seen.append(request.rchan)
        await release.wait()
        return request.payload["n"]

    async with make_stack(config=ServerConfig(max_pending_requests=2)) as stack:
        client = await stack.client("alice:s1")
        client.on_request(answer)
        channel = client.channel or ""
        waiting = [
            asyncio.create_task(stack.manager.send_and_wait(channel, {"n": i}, timeout=TIMEOUT))
            for i in range(2)
        ]
        await eventually(lambda: len(seen) == 2)
        with pytest.raises(TooManyPendingRequests):
            await stack.manager.send_and_wait(channel, {"n": 2}, timeout=TIMEOUT)
        handler = stack.manager.handlers[channel]
        assert handler.pending_count == 2
        release.set()
        assert await asyncio.gather(*waiting) == [0, 1]
        assert handler.pending_count == 0
        assert len(seen) == 2  # the refused request never reached the client
        assert await stack.manager.send_and_wait(channel, {"n": 5}, timeout=TIMEOUT) == 5


async def test_chunk_caps_fail_only_that_answer(make_stack: MakeStack) -> None:
    config = ServerConfig(max_chunks=4, max_chunked_bytes=4096)
    async with make_stack(config=config) as stack:
        client = await stack.client("alice:s1")
        answers: list[Any] = [Chunked(list(range(5))), Chunked(["x" * 1500] * 3), Chunked([1, 2])]
        client.on_request(lambda request: answers.pop(0))
        channel = client.channel or ""
        for _ in range(2):
            with pytest.raises(ChunkError):
                await stack.manager.send_and_wait(channel, {}, timeout=TIMEOUT)
        assert await stack.manager.send_and_wait(channel, {}, timeout=TIMEOUT) == [1, 2]
        assert stack.manager.handlers[channel].pending_count == 0


async def ask(stack: Stack, channel: str, client: Transport) -> tuple[asyncio.Future[Any], str]:
    """A server request to a raw client, and the ``__rchan`` the client reads."""
    asking = asyncio.ensure_future(stack.manager.send_and_wait(channel, {}, timeout=60 * TIMEOUT))
    return asking, (await receive_json(client))["message"]["__rchan"]


async def cancel(tasks: list[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_dozen_clients_holding_their_share_of_chunked_answers_deny_no_one_a_small_one(
    make_stack: MakeStack,
) -> None:
    # Each user holds at most a 16th of the process's chunk budget, and its last 16th is for
    # small answers: 15 clients holding all they may, unfinished, leave the others their small
    # answers. Over its share a client's own answers fail (ChunkError); its connection stays.
    # Each from an address of its own (named by a trusted proxy): the users of one address
    # hold at most a quarter together.
    gc.collect()
    assert (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values) == (0, 0), "parts outlived their request"
    share = 256  # values, and a small answer's: under 4 (two parts of a word)
    config = ServerConfig(max_chunked_values=10**6, max_chunked_total_values=CHUNK_SHARES * share,
                          forwarded_allow_ips="127.0.0.1")
    async with make_stack(config=config) as stack:
        alice = await stack.client("alice:s1")
        answers: list[Any] = [Chunked(["a", "b"]), Chunked([[1, 2]] * 2), Chunked(["c", "d"])]
        alice.on_request(lambda request: answers.pop(0))
        asking: list[asyncio.Future[Any]] = []
        attackers: list[tuple[Transport, str]] = []
        try:
            for n in range(CHUNK_SHARES - 1):  # all they may hold: 2 parts of 3, 127 + 1 values each
                mallory = await stack.connect(f"mallory{n}:m", headers=[("X-Forwarded-For", f"192.0.2.{n}")])
                channel = (await receive_json(mallory))["message"]["channel"]
                attackers.append((mallory, channel))
                pending, rchan = await ask(stack, channel, mallory)
                asking.append(pending)
                for index in range(2):
                    await send_json(mallory, {"type": "message", "channel": rchan, "chunk_count": 3,
                                              "chunk_index": index, "message": list(range(126))})
            await eventually(lambda: PROCESS_CHUNKS.values == (CHUNK_SHARES - 1) * share,
                             "every attacker's parts held")

            assert await stack.manager.send_and_wait(alice.channel or "", {}, timeout=TIMEOUT) == ["a", "b"]
            with pytest.raises(ChunkError, match="only small ones are taken"):
                await stack.manager.send_and_wait(alice.channel or "", {}, timeout=TIMEOUT)

            # Over its share, from its connection or from another of the same user: refused.
            mallory, channel = attackers[0]
            tab = await stack.connect("mallory0:second-tab", headers=[("X-Forwarded-For", "192.0.2.0")])
            tab_channel = (await receive_json(tab))["message"]["channel"]
            for client, on in ((mallory, channel), (tab, tab_channel)):
                pending, rchan = await ask(stack, on, client)
                await send_json(client, {"type": "message", "channel": rchan, "chunk_count": 2,
                                         "message": "x"})
                with pytest.raises(ChunkError, match=f"for this user exceed {share} JSON values"):
                    await pending
                await send_json(client, {"type": "ping", "message": None})
                assert (await receive_json(client))["type"] == "pong", "the connection stays"
            assert not any(pending.done() for pending in asking), "what they hold is not refused"
            assert PROCESS_CHUNKS.values == (CHUNK_SHARES - 1) * share
        finally:
            await cancel(asking)
        assert (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values, PROCESS_CHUNKS.users) == (0, 0, {})
        assert await stack.manager.send_and_wait(alice.channel or "", {}, timeout=TIMEOUT) == ["c", "d"]


async def test_the_users_of_one_address_cannot_hold_the_chunk_budget_that_others_answers_need(
    make_stack: MakeStack,
) -> None:
    # One client (one address) names 15 users, each holding all a user may of unfinished
    # chunked answers: they held 15 16ths of the process's budget, and another client's
    # ordinary chunked answer failed ("only small ones are taken"). Now the users of one address
    # hold a quarter together: the fifth one's part fails, and the other client is served.
    gc.collect()
    assert (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values) == (0, 0), "parts outlived their request"
    share = 256
    config = ServerConfig(max_chunked_values=10**6, max_chunked_total_values=CHUNK_SHARES * share,
                          forwarded_allow_ips="127.0.0.1")
    async with make_stack(config=config) as stack:
        alice = DaraClient(lambda: stack.connect("alice:s1", headers=[("X-Forwarded-For", "192.0.2.77")]),
                           ping_interval=None)
        await alice.connect()
        stack.clients.append(alice)
        alice.on_request(lambda request: Chunked([list(range(50))] * 4))
        asking: list[asyncio.Future[Any]] = []
        names: list[Transport] = []  # kept: a client transport dropped closes its connection
        try:
            for n in range(CHUNK_SHARES - 1):
                mallory = await stack.connect(f"mallory{n}:m")  # all from 127.0.0.1
                names.append(mallory)
                channel = (await receive_json(mallory))["message"]["channel"]
                pending, rchan = await ask(stack, channel, mallory)
                asking.append(pending)
                for index in range(2):
                    await send_json(mallory, {"type": "message", "channel": rchan, "chunk_count": 3,
                                              "chunk_index": index, "message": list(range(126))})
            answer = await stack.manager.send_and_wait(alice.channel or "", {}, timeout=TIMEOUT)
            assert answer == [list(range(50))] * 4
            # Four users' worth of the address fits (a quarter); the others' answers failed.
            await eventually(lambda: sum(pending.done() for pending in asking) == CHUNK_SHARES - 1 - 4,
                             "every answer past the address's quarter failed")
            for pending in asking:
                if pending.done():
                    with pytest.raises(ChunkError, match="from this client address"):
                        await pending
        finally:
            await cancel(asking)
        assert (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values, PROCESS_CHUNKS.users) == (0, 0, {})


async def test_tiny_parts_announcing_many_count_what_holding_them_costs(make_stack: MakeStack) -> None:
    # One byte per part, each announcing the most parts an answer may have: the answers hold
    # one part each (no slot per announced part), each counted as what holding it costs, so
    # the channel's bound refuses the answers past it though their bytes on the wire are few.
    config = ServerConfig(max_chunked_bytes=8 * (PART_BYTES + 1), max_pending_requests=16)
    async with make_stack(config=config) as stack:
        mallory = await stack.connect("mallory:m1")
        channel = (await receive_json(mallory))["message"]["channel"]
        asking: list[asyncio.Future[Any]] = []
        try:
            for _ in range(9):
                pending, rchan = await ask(stack, channel, mallory)
                asking.append(pending)
                await send_json(mallory, {"type": "message", "channel": rchan, "chunk_index": 0,
                                          "chunk_count": config.max_chunks, "message": 0})
            with pytest.raises(ChunkError, match=f"exceed {8 * (PART_BYTES + 1)} bytes"):
                await asking[8]
            assert not any(pending.done() for pending in asking[:8])
            assert stack.manager.handlers[channel].connection.pending.held_bytes == 8 * (PART_BYTES + 1)
            await send_json(mallory, {"type": "ping", "message": None})
            assert (await receive_json(mallory))["type"] == "pong"
        finally:
            await cancel(asking)
        assert (PROCESS_CHUNKS.bytes, PROCESS_CHUNKS.values) == (0, 0)


async def test_chunk_fields_that_are_not_integers_are_dropped(make_stack: MakeStack) -> None:
    # ``true`` or ``"1"`` is no chunk count: the frame is dropped (protocol.md section 6), never
    # read as 1 (which would complete the request with it); the request waits for its answer.
    async with make_stack() as stack:
        raw = await stack.connect("mallory:m1")
        channel = (await receive_json(raw))["message"]["channel"]
        asking = asyncio.ensure_future(stack.manager.send_and_wait(channel, {}, timeout=TIMEOUT))
        rchan = (await receive_json(raw))["message"]["__rchan"]
        for fields in ({"chunk_count": True}, {"chunk_count": "1"}, {"chunk_count": 1.0},
                       {"chunk_count": 1, "chunk_index": "0"}, {"chunk_count": 1, "chunk_index": False}):
            await send_json(raw, {"type": "message", "channel": rchan, "message": "lax", **fields})
        await send_json(raw, {"type": "ping", "message": None})
        assert (await receive_json(raw))["type"] == "pong"  # every frame before it was read
        assert not asking.done()
        await send_json(raw, {"type": "message", "channel": rchan, "chunk_count": 1,
                              "chunk_index": 0, "message": "strict"})
        assert await asking == ["strict"]


async def test_a_number_of_too_many_digits_closes_with_1009_and_its_own_reason(
    make_stack: MakeStack,
) -> None:
    async with make_stack() as stack:
        neighbour = await stack.client("alice:s1")
        raw = await open_raw(stack)
        digits = "1" * (MAX_NUMBER_DIGITS + 1)
        await raw.send(('{"type":"custom","message":{"kind":"echo","data":' + digits + "}}").encode())
        _, closed = await read_until_closed(raw)
        assert (closed.code, closed.reason) == (CloseCode.MESSAGE_TOO_BIG,
                                                f"a number of more than {MAX_NUMBER_DIGITS} digits")
        await eventually(lambda: len(stack.manager.handlers) == 1)
        assert neighbour.connected


async def test_oversized_frame_closes_with_1009(make_stack: MakeStack) -> None:
    async with make_stack(config=ServerConfig(max_message_size=1024)) as stack:
        neighbour = await stack.client("alice:s1")
        big = await open_raw(stack)
        fits = json.dumps({"type": "ping", "message": "x" * 900}).encode()
        assert len(fits) <= 1024
        await big.send(fits)
        assert (await receive_json(big))["type"] == "pong"
        with contextlib.suppress(ConnectionClosed):
            await send_json(big, {"type": "ping", "message": "x" * 2000})
        _, closed = await read_until_closed(big)
        assert closed.code == CloseCode.MESSAGE_TOO_BIG
        await eventually(lambda: len(stack.manager.handlers) == 1)
        assert neighbour.connected


async def test_frames_read_after_a_server_close_start_no_handler_task(
    make_stack: MakeStack,
) -> None:
    started: list[Any] = []

    async def slow(channel: str, data: Any) -> Any:
        started.append(data)
        await asyncio.sleep(3600)

    async with make_stack() as stack:
        stack.manager.add_ws_handler("slow", slow)
        transport = await stack.connect("mallory:m1")
        channel = (await receive_json(transport))["message"]["channel"]
        for i in range(5):
            await send_json(transport, {"type": "custom",
                                        "message": {"kind": "slow", "data": i, "__rchan": str(i)}})
        # Closed by the server while those frames are still unread: the receive loop reads them
        # after the channel is gone, and must not start handler tasks nothing would cancel.
        stack.manager.close_channel(channel, CloseCode.NORMAL, "bye")
        await read_until_closed(transport)
        await eventually(lambda: not stack.manager.handlers and not stack.endpoint.connection_count)
        await asyncio.sleep(0.05)
        running = [t for t in asyncio.all_tasks()
                   if t.get_coro().__qualname__.startswith("WebSocketHandler.")]  # type: ignore[union-attr]
        assert running == [], f"{len(running)} handler tasks outlived their connection"


# ----------------------------------------------------------------------------- shutdown


async def test_shutdown_closes_with_1001_fails_pending_requests_and_leaves_nothing(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    baseline = asyncio.all_tasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with make_stack() as stack:
            serving = asyncio.all_tasks()  # the transport's own server tasks, if it has any
            clients = [await stack.client(f"user{i}:s{i}") for i in range(4)]
            pending = [
                asyncio.create_task(
                    stack.manager.send_and_wait(c.channel or "", {"q": 1}, timeout=30)
                )
                for c in clients
            ]
            await eventually(lambda: all(h.pending_count for h in stack.manager.handlers.values()))
            await stack.endpoint.shutdown(grace=1.0)
            for client in clients:
                closed = await client.wait_closed(timeout=TIMEOUT)
                assert closed is not None
                assert (closed.code, closed.reason) == (CloseCode.GOING_AWAY,
                                                        "server shutting down")
            for request in pending:
                with pytest.raises(ConnectionClosed) as info:
                    await request
                assert info.value.code == CloseCode.GOING_AWAY
            assert_manager_empty(stack)
            assert asyncio.all_tasks() - serving == set()
            # New handshakes are refused while the server stops: 503, the server going away
            # (it was 403, a refused identity), or refused as by a closed server (in memory).
            with pytest.raises((HandshakeRejected, ConnectionRefusedError)) as rejected:
                await stack.connect("late:s9")
            if isinstance(rejected.value, HandshakeRejected):
                assert rejected.value.status == 503
            else:
                assert stack.transport == "memory"
            assert_manager_empty(stack)
        await asyncio.sleep(0)
        assert asyncio.all_tasks() - baseline == set()
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_shutdown_lets_in_flight_replies_finish_within_the_grace_period(
    make_stack: MakeStack,
) -> None:
    async def slow(channel: str, data: Any) -> Any:
        await asyncio.sleep(0.2)
        return {"slow": data}

    def blocking(channel: str, data: Any) -> Any:
        time.sleep(0.2)
        return {"blocking": data}

    async def stuck(channel: str, data: Any) -> Any:
        await asyncio.sleep(3600)

    handlers = CustomHandlerRegistry()
    handlers.register("slow", slow)
    handlers.register("blocking", blocking, in_thread=True)
    handlers.register("stuck", stuck)
    manager = WebsocketManager(ServerConfig(), custom_handlers=handlers)
    async with make_stack(manager=manager) as stack:
        a, b, c = [await stack.client(f"u{i}:s{i}") for i in range(3)]
        replies = [
            asyncio.create_task(a.request("slow", 1, timeout=TIMEOUT)),
            asyncio.create_task(b.request("blocking", 2, timeout=TIMEOUT)),
            asyncio.create_task(c.request("stuck", 3, timeout=TIMEOUT)),
        ]
        await eventually(lambda: sum(h.task_count for h in manager.handlers.values()) == 3)
        started = time.perf_counter()
        await stack.endpoint.shutdown(grace=1.0)
        elapsed = time.perf_counter() - started
        assert 0.9 <= elapsed < 3.0  # the stuck handler used up the grace period, no more
        assert await replies[0] == {"slow": 1}
        assert await replies[1] == {"blocking": 2}
        with pytest.raises(ConnectionClosed) as info:
            await replies[2]
        assert info.value.code == CloseCode.GOING_AWAY
        assert_manager_empty(stack)


async def test_shutdown_without_handler_work_is_immediate(make_stack: MakeStack) -> None:
    async with make_stack() as stack:
        client = await stack.client("alice:s1")
        started = time.perf_counter()
        await stack.endpoint.shutdown(grace=10.0)
        assert time.perf_counter() - started < 2.0
        closed = await client.wait_closed(timeout=TIMEOUT)
        assert closed is not None and closed.code == CloseCode.GOING_AWAY
        await stack.endpoint.shutdown()  # idempotent


# ----------------------------------------------------------------------------- no leaks


def _leaks(frames: list[str]) -> list[str]:
    markers = (SECRET, "Traceback", "RuntimeError", "ValueError", "KeyError", 'File "')
    return [f for f in frames if any(m in f for m in markers)]


async def test_handler_failures_reach_the_client_as_codes_and_the_log_as_tracebacks(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture
) -> None:
    class Unencodable:
        def __repr__(self) -> str:
            return SECRET

    def sync_boom(channel: str, data: Any) -> Any:
        raise RuntimeError(SECRET)

    async def async_boom(channel: str, data: Any) -> Any:
        raise ValueError(SECRET)

    def thread_boom(channel: str, data: Any) -> Any:
        raise KeyError(SECRET)

    def unencodable(channel: str, data: Any) -> Any:
        return {"value": Unencodable()}

    async def too_slow(channel: str, data: Any) -> Any:
        await asyncio.sleep(3600)

    # A CancelledError of the handler's own (it awaited something cancelled): no reply at all
    # came from an async one (the client waited for its timeout), and a sync one closed the
    # connection with 1001 "server shutting down".
    async def async_cancelled(channel: str, data: Any) -> Any:
        cancelled = asyncio.ensure_future(asyncio.sleep(3600))
        cancelled.cancel()
        await cancelled

    def sync_cancelled(channel: str, data: Any) -> Any:
        raise asyncio.CancelledError(SECRET)

    # A TimeoutError of the handler's own (a send_and_wait's RequestTimeout it let through): it
    # got a "timeout" reply and a WARNING "timed out after 0.2 s", with no traceback.
    async def own_timeout(channel: str, data: Any) -> Any:
        raise TimeoutError(SECRET)

    caplog.set_level(logging.INFO, logger="dara_ws_core")
    async with make_stack(config=ServerConfig(handler_timeout=0.2)) as stack:
        stack.manager.add_ws_handler("sync_boom", sync_boom)
        stack.manager.add_ws_handler("async_boom", async_boom)
        stack.manager.add_ws_handler("thread_boom", thread_boom, in_thread=True)
        stack.manager.add_ws_handler("unencodable", unencodable)
        stack.manager.add_ws_handler("too_slow", too_slow)
        stack.manager.add_ws_handler("async_cancelled", async_cancelled)
        stack.manager.add_ws_handler("sync_cancelled", sync_cancelled)
        stack.manager.add_ws_handler("thread_cancelled", sync_cancelled, in_thread=True)
        stack.manager.add_ws_handler("own_timeout", own_timeout)
        transport = await stack.connect("alice:s1")
        init = await receive_json(transport)
        channel = init["message"]["channel"]
        expected = {
            "sync_boom": ("handler_error", "the handler failed"),
            "async_boom": ("handler_error", "the handler failed"),
            "thread_boom": ("handler_error", "the handler failed"),
            "unencodable": ("handler_error", "the handler's result could not be encoded"),
            "too_slow": ("timeout", "the handler timed out"),
            "async_cancelled": ("handler_error", "the handler failed"),
            "sync_cancelled": ("handler_error", "the handler failed"),
            "thread_cancelled": ("handler_error", "the handler failed"),
            "own_timeout": ("handler_error", "the handler failed"),
            "no_such_kind": ("unknown_kind", "no handler for kind 'no_such_kind'"),
        }
        frames: list[str] = []
        for kind, error in expected.items():
            await send_json(transport, {"type": "custom",
                                        "message": {"kind": kind, "data": SECRET, "__rchan": kind}})
            frame = await asyncio.wait_for(transport.receive(), TIMEOUT)
            assert isinstance(frame, str)
            frames.append(frame)
            reply = json.loads(frame)["message"]
            assert reply["__response_for"] == kind
            assert reply["data"] is None
            assert (reply["__error"]["code"], reply["__error"]["message"]) == error
        assert _leaks(frames) == []
        # The log carries what the wire does not, with the channel and the kind.
        for kind in ("sync_boom", "async_boom", "thread_boom", "unencodable", "async_cancelled",
                     "sync_cancelled", "thread_cancelled", "own_timeout"):
            records = [r for r in caplog.records if getattr(r, "kind", None) == kind]
            assert records, kind
            record = records[0]
            assert record.levelno == logging.ERROR
            assert getattr(record, "channel", None) == channel
            assert record.exc_info is not None
        assert SECRET in caplog.text
        timeouts = [r for r in caplog.records if getattr(r, "kind", None) == "too_slow"]
        assert timeouts and getattr(timeouts[0], "channel", None) == channel
        await transport.close()


async def test_a_plain_callable_returning_a_coroutine_is_awaited_like_an_async_handler(stack: Stack) -> None:
    # A lambda calling an async function, a decorator's plain wrapper around an async handler:
    # not coroutine functions, so they were called as sync handlers, their coroutine never ran
    # (a RuntimeWarning) and the client got "the handler's result could not be encoded".
    async def double(data: Any) -> Any:
        await asyncio.sleep(0)
        return data * 2

    def logged(func: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
        def wrapper(channel_id: str, data: Any) -> Any:
            return func(channel_id, data)
        return wrapper

    @logged
    async def triple(channel_id: str, data: Any) -> Any:
        await asyncio.sleep(0)
        return data * 3

    stack.manager.add_ws_handler("double", lambda channel_id, data: double(data))
    stack.manager.add_ws_handler("triple", triple)
    transport = await stack.connect("alice:s1")
    assert (await receive_json(transport))["type"] == "init"
    for kind, expected in (("double", 4), ("triple", 6)):
        await send_json(transport, {"type": "custom", "message": {"kind": kind, "data": 2, "__rchan": kind}})
        reply = (await asyncio.wait_for(receive_json(transport), TIMEOUT))["message"]
        assert (reply["__response_for"], reply.get("__error"), reply["data"]) == (kind, None, expected)
    await transport.close()


async def test_an_internal_error_closes_with_1011_and_a_fixed_reason(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_dispatch(self: CustomHandlerRegistry, received: Any, host: Any) -> Any:
        raise RuntimeError(SECRET)

    async with make_stack() as stack:
        stack.manager.add_ws_handler("any", lambda channel, data: data)
        neighbour = await stack.client("alice:s1")
        victim = await open_raw(stack)
        monkeypatch.setattr(CustomHandlerRegistry, "dispatch", broken_dispatch)
        await send_json(victim, {"type": "custom", "message": {"kind": "any", "data": 1}})
        frames, closed = await read_until_closed(victim)
        assert (closed.code, closed.reason) == (CloseCode.INTERNAL_ERROR, "internal error")
        assert _leaks(frames) == []
        failed = [r for r in caplog.records if r.getMessage() == "connection failed"]
        assert failed and failed[0].exc_info is not None and getattr(failed[0], "channel", None)
        assert SECRET in caplog.text
        monkeypatch.undo()
        await eventually(lambda: len(stack.manager.handlers) == 1)
        await stack.manager.send_message(neighbour.channel or "", {"n": 1})
        assert (await neighbour.receive(timeout=TIMEOUT)).message.model_dump() == {"n": 1}


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (f"not json {SECRET}", CloseCode.INVALID_PAYLOAD),
        (json.dumps([SECRET]), CloseCode.INVALID_PAYLOAD),
        (json.dumps(SECRET), CloseCode.INVALID_PAYLOAD),
    ],
)
async def test_bad_frames_are_closed_without_echoing_the_input(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture, frame: str, code: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="dara_ws_core")
    async with make_stack() as stack:
        transport = await open_raw(stack)
        await transport.send(frame.encode())
        frames, closed = await read_until_closed(transport)
        assert closed.code == code
        assert SECRET not in closed.reason and _leaks(frames) == []
        assert SECRET not in caplog.text  # peer input is never logged verbatim either


async def test_invalid_fields_are_dropped_without_echoing_the_input(
    make_stack: MakeStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dara_ws_core")
    async with make_stack() as stack:
        transport = await open_raw(stack)
        await send_json(transport, {"type": "custom", "message": {"kind": 5, "data": SECRET}})
        await send_json(transport, {"type": SECRET})
        await send_json(transport, {"type": "ping"})
        assert (await receive_json(transport))["type"] == "pong"  # still open, nothing else sent
        assert "dropped client frame" in caplog.text
        assert SECRET not in caplog.text
        await transport.close()
