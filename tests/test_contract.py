"""The contract suite: every behaviour the core promises, on every transport (real sockets on
127.0.0.1 for websockets, aiohttp and ASGI; the in-memory pair as well).

Each test runs once per entry of ``tests.stacks.TRANSPORTS``; adding a transport adds a fixture
there, nothing here.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from dara_ws_core import (
    Chunked,
    ChunkError,
    ConnectionClosed,
    CustomServerMessage,
    DaraClient,
    DaraServerMessage,
    RemoteError,
    RequestTimeout,
    ServerConfig,
    SlowConsumerPolicy,
    Transport,
    UnknownChannel,
    VariableRequestMessage,
    allow_anonymous,
)
from dara_ws_core.queue import BURST

from .helpers import eventually
from .stacks import HandshakeRejected, Stack

TIMEOUT = 5.0


async def recv_json(transport: Transport, timeout: float = TIMEOUT) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        frame = await transport.receive()
    assert isinstance(frame, str), f"expected a text frame, got {type(frame).__name__}"
    data = json.loads(frame)
    assert isinstance(data, dict)
    return data


async def send_json(transport: Transport, data: Any) -> None:
    await transport.send(json.dumps(data).encode())


async def wait_closed(transport: Transport, timeout: float = TIMEOUT) -> int:
    """Read until the connection closes; return the close code."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                await transport.receive()
            except ConnectionClosed as exc:
                return exc.code


async def next_payload(client: DaraClient) -> dict[str, Any]:
    """The application payload (extra keys) of the client's next pushed ``message`` frame."""
    message = await client.receive(TIMEOUT)
    assert isinstance(message, DaraServerMessage), message
    return dict(message.message.model_extra or {})


# ---------------------------------------------------------------------------- lifecycle


async def test_init_is_the_first_frame_with_a_new_channel_per_connection(stack: Stack) -> None:
    first, second = await stack.connect(), await stack.connect()
    init1, init2 = await recv_json(first), await recv_json(second)
    assert init1["type"] == init2["type"] == "init"
    channel1, channel2 = init1["message"]["channel"], init2["message"]["channel"]
    assert uuid.UUID(channel1).version == 4 and channel1 != channel2
    assert set(stack.manager.handlers) == {channel1, channel2}
    await first.close()
    await second.close()


async def test_ping_gets_pong_with_or_without_message(stack: Stack) -> None:
    ws = await stack.connect()
    await recv_json(ws)
    await send_json(ws, {"type": "ping", "message": None})
    assert await recv_json(ws) == {"type": "pong", "message": None}
    await send_json(ws, {"type": "ping"})
    assert await recv_json(ws) == {"type": "pong", "message": None}
    await ws.close()


async def test_cookie_and_query_tokens_register_channel_session_and_user(stack: Stack) -> None:
    by_cookie = await stack.client("bob:s1")
    by_query = await stack.client("bob:s2")
    assert stack.manager.get_user_channels("bob") == {by_cookie.channel, by_query.channel}
    raw = await stack.connect("carol:s9", cookie=True)
    channel = (await recv_json(raw))["message"]["channel"]
    assert stack.manager.registry.user_of(channel) == "carol"
    await raw.close()


async def test_rejected_handshake_is_403_and_creates_nothing(stack: Stack) -> None:
    for token in ("bad", None):
        with pytest.raises(HandshakeRejected) as info:
            await stack.connect(token)
        assert info.value.status == 403
    assert stack.manager.handlers == {}
    assert stack.manager.registry.counts() == (0, 0, 0)


async def test_closing_removes_every_trace_of_the_channel(stack: Stack) -> None:
    clients = [await stack.client(f"u{i % 2}:s{i % 3}") for i in range(6)]
    assert len(stack.manager.handlers) == 6
    for client in clients:
        await client.close()
    await eventually(lambda: not stack.manager.handlers)
    assert stack.manager.registry.counts() == (0, 0, 0)
    assert stack.endpoint.connection_count == 0


async def test_idle_connection_is_closed(make_stack: Any) -> None:
    async with make_stack(config=ServerConfig(idle_timeout=0.3)) as stack:
        ws = await stack.connect()
        await recv_json(ws)
        assert await wait_closed(ws) == 1001
        await eventually(lambda: not stack.manager.handlers)


async def test_pings_keep_a_connection_alive_past_the_idle_timeout(make_stack: Any) -> None:
    async with make_stack(config=ServerConfig(idle_timeout=0.4)) as stack:
        # The client's own idle_timeout (twice ping_interval by default) is widened: this test
        # is about the server's, and a loaded machine may delay one pong by 0.1 s.
        client = await stack.client(ping_interval=0.1, idle_timeout=2.0)
        await asyncio.sleep(1.0)
        assert client.connected and client.pongs >= 5


async def test_anonymous_access_is_an_explicit_choice(make_stack: Any) -> None:
    async with make_stack(authenticator=allow_anonymous()) as stack:
        client = await stack.client(None)
        user = stack.manager.registry.user_of(client.channel)
        assert user is not None and user.startswith("anonymous-")


# ---------------------------------------------------------------------------- server -> client


async def test_send_and_wait_returns_the_answer(stack: Stack) -> None:
    client = await stack.client()
    seen: list[Any] = []

    def respond(request: Any) -> Any:
        seen.append(request)
        return {"answer": request.payload["question"] * 2}

    client.on_request(respond)
    assert await stack.manager.send_and_wait(client.channel, {"question": 21}) == {"answer": 42}
    assert not seen[0].custom
    answer = await stack.manager.send_and_wait(
        client.channel, {"kind": "ask", "data": 1, "question": 2}, custom=True
    )
    assert answer == {"answer": 4} and seen[1].custom
    typed = VariableRequestMessage(variable={"uid": "v"})
    client.on_request(lambda r: (r.typename, r.payload["variable"]))
    assert await stack.manager.send_and_wait(client.channel, typed) == [
        "VariableRequestMessage", {"uid": "v"}
    ]
    handler = stack.manager.handlers[client.channel]
    assert handler.pending_count == 0


async def test_send_and_wait_answers_are_matched_to_their_request(stack: Stack) -> None:
    client = await stack.client()

    async def respond(request: Any) -> Any:
        await asyncio.sleep(0.05 * (5 - request.payload["i"]))  # answer in reverse order
        return request.payload["i"]

    client.on_request(respond)
    results = await asyncio.gather(
        *(stack.manager.send_and_wait(client.channel, {"i": i}) for i in range(5))
    )
    assert results == list(range(5))


async def test_chunked_answers_are_reassembled(stack: Stack) -> None:
    client = await stack.client()
    parts = [f"part{i}" for i in range(7)]
    client.on_request(lambda r: Chunked(parts))
    assert await stack.manager.send_and_wait(client.channel, {"q": 1}) == parts
    client.on_request(lambda r: Chunked(parts, indexed=True, shuffle=True))
    assert await stack.manager.send_and_wait(client.channel, {"q": 2}) == parts


async def test_invalid_chunks_fail_the_request_and_keep_the_connection(stack: Stack) -> None:
    client = await stack.client()
    ws = stack.manager.handlers[client.channel]

    async def answer_badly(rchan: str) -> None:
        await client.send_raw(json.dumps(
            {"type": "message", "channel": rchan, "chunk_count": 3, "message": "a"}))
        await client.send_raw(json.dumps(
            {"type": "message", "channel": rchan, "chunk_count": 2, "message": "b"}))

    task = asyncio.ensure_future(stack.manager.send_and_wait(client.channel, {"q": 1}))
    await eventually(lambda: ws.pending_count == 1)
    rchan = next(iter(ws.pending_responses))
    await answer_badly(rchan)
    with pytest.raises(ChunkError):
        await task
    assert ws.pending_count == 0
    client.on_request(lambda r: "fine")
    assert await stack.manager.send_and_wait(client.channel, {"q": 2}) == "fine"


async def test_send_and_wait_times_out_and_forgets_the_request(stack: Stack) -> None:
    client = await stack.client()
    with pytest.raises(RequestTimeout):
        await stack.manager.send_and_wait(client.channel, {"q": 1}, timeout=0.2)
    assert stack.manager.handlers[client.channel].pending_count == 0


async def test_send_and_wait_fails_promptly_when_the_client_disconnects(stack: Stack) -> None:
    client = await stack.client()
    handler = stack.manager.handlers[client.channel]
    task = asyncio.ensure_future(stack.manager.send_and_wait(client.channel, {"q": 1}, timeout=60))
    await eventually(lambda: handler.pending_count == 1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await client.close()
    with pytest.raises(ConnectionClosed):
        await task
    assert loop.time() - started < 5  # promptly: long before the 60 s timeout
    assert handler.pending_count == 0


async def test_cancelling_send_and_wait_removes_its_entry(stack: Stack) -> None:
    client = await stack.client()
    handler = stack.manager.handlers[client.channel]
    task = asyncio.ensure_future(stack.manager.send_and_wait(client.channel, {"q": 1}))
    await eventually(lambda: handler.pending_count == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handler.pending_count == 0


async def test_an_answer_on_another_connection_never_resolves_a_request(stack: Stack) -> None:
    asked, other = await stack.client(), await stack.client()
    handler = stack.manager.handlers[asked.channel]
    task = asyncio.ensure_future(stack.manager.send_and_wait(asked.channel, {"q": 1}, timeout=1))
    await eventually(lambda: handler.pending_count == 1)
    rchan = next(iter(handler.pending_responses))
    await other.answer(rchan, "stolen")
    with pytest.raises(RequestTimeout):
        await task


async def test_unknown_channel_is_a_clear_error(stack: Stack) -> None:
    with pytest.raises(UnknownChannel):
        await stack.manager.send_message("nope", {"x": 1})
    with pytest.raises(UnknownChannel):
        await stack.manager.send_and_wait("nope", {"x": 1})


# ---------------------------------------------------------------------------- client -> server


async def test_custom_request_gets_a_reply_with_the_request_kind(stack: Stack) -> None:
    stack.manager.add_ws_handler("echo", lambda channel, data: {"echo": data, "ch": channel})
    ws = await stack.connect()
    channel = (await recv_json(ws))["message"]["channel"]
    await send_json(ws, {"type": "custom", "message": {"kind": "echo", "data": 1, "__rchan": "r1"}})
    assert await recv_json(ws) == {"type": "custom", "message": {
        "kind": "echo", "data": {"echo": 1, "ch": channel}, "__response_for": "r1"}}
    await send_json(ws, {"type": "custom", "message": {"kind": "echo", "data": 2}})
    assert await recv_json(ws) == {"type": "custom", "message": {
        "kind": "echo", "data": {"echo": 2, "ch": channel}}}
    await ws.close()


async def test_handlers_sync_async_and_threaded_all_reply(stack: Stack) -> None:
    async def double(channel: str, data: int) -> int:
        await asyncio.sleep(0.01)
        return data * 2

    stack.manager.add_ws_handler("double", double)
    stack.manager.add_ws_handler("blocking", lambda c, d: d + 1, in_thread=True)
    stack.manager.add_ws_handler("nothing", lambda c, d: None)
    client = await stack.client()
    assert await client.request("double", 21) == 42
    assert await client.request("blocking", 1) == 2
    assert await client.request("nothing", 1) is None  # a request always settles


async def test_unknown_kind_and_failing_handler_get_error_replies(stack: Stack) -> None:
    def broken(channel: str, data: Any) -> Any:
        raise RuntimeError("secret internal detail")

    stack.manager.add_ws_handler("broken", broken)
    client = await stack.client()
    with pytest.raises(RemoteError) as unknown:
        await client.request("missing", 1)
    assert unknown.value.code == "unknown_kind"
    ws = await stack.connect()
    await recv_json(ws)
    await send_json(ws, {"type": "custom", "message": {"kind": "broken", "data": 1, "__rchan": "x"}})
    reply = await recv_json(ws)
    assert reply["message"]["__error"]["code"] == "handler_error"
    assert reply["message"]["__response_for"] == "x" and reply["message"]["kind"] == "broken"
    assert "secret" not in json.dumps(reply) and "Traceback" not in json.dumps(reply)
    await send_json(ws, {"type": "ping"})
    assert (await recv_json(ws))["type"] == "pong"  # the connection stays open
    await ws.close()


async def test_sync_handlers_keep_message_order(stack: Stack) -> None:
    seen: list[int] = []
    stack.manager.add_ws_handler("seq", lambda c, d: seen.append(d))
    stack.manager.add_ws_handler("seq_thread", lambda c, d: seen.append(d), in_thread=True)
    client = await stack.client()
    for i in range(50):
        await client.send_custom("seq" if i % 2 else "seq_thread", i)
    await client.request("seq", 50)
    assert seen == list(range(51))


async def test_async_handler_tasks_are_cancelled_on_disconnect(stack: Stack) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever(channel: str, data: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    stack.manager.add_ws_handler("forever", forever)
    client = await stack.client()
    await client.send_custom("forever")
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await client.close()
    await asyncio.wait_for(cancelled.wait(), TIMEOUT)


# ---------------------------------------------------------------------------- fan-out


async def test_broadcast_reaches_every_client_except_ignored(stack: Stack) -> None:
    clients = [await stack.client(f"user{i}:s{i}") for i in range(20)]
    await stack.manager.broadcast({"n": 1}, ignore_channel=clients[0].channel)
    await stack.manager.broadcast({"kind": "k", "data": 2}, custom=True)
    for i, client in enumerate(clients):
        if i:
            assert await next_payload(client) == {"n": 1}
        second = await client.receive(TIMEOUT)
        assert isinstance(second, CustomServerMessage) and second.message.data == 2
    assert all(not c.received_nowait() for c in clients)


async def test_send_message_to_user_reaches_all_their_channels(stack: Stack) -> None:
    a1, a2, a3 = [await stack.client(f"ann:s{i}") for i in (1, 1, 2)]  # two sessions, three tabs
    other = await stack.client("ben:s3")
    assert stack.manager.get_user_channels("ann") == {a1.channel, a2.channel, a3.channel}
    await stack.manager.send_message_to_user("ann", {"hi": 1}, ignore_channel=a1.channel)
    for client in (a2, a3):
        assert await next_payload(client) == {"hi": 1}
    await stack.manager.send_message(other.channel, {"only": "ben"})
    assert await next_payload(other) == {"only": "ben"}
    assert a1.received_nowait() == []
    await stack.manager.send_message_to_user("nobody", {"x": 1})  # no recipient is not an error


async def test_messages_to_one_channel_arrive_in_order(stack: Stack) -> None:
    client = await stack.client()
    for i in range(300):
        await stack.manager.send_message(client.channel, {"i": i})
    received = [(await next_payload(client))["i"] for _ in range(300)]
    assert received == list(range(300))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x00\x01binary", 1003),
        ("not json", 1007),
        ("[1, 2, 3]", 1007),
        ('"a string"', 1007),
    ],
)
async def test_bad_frames_close_with_the_right_code_and_spare_others(
    stack: Stack, frame: str | bytes, code: int
) -> None:
    healthy = await stack.client("h:h")
    bad = await stack.connect()
    await recv_json(bad)
    if isinstance(frame, bytes):
        await _send_binary(bad, frame)
    else:
        await bad.send(frame.encode())
    assert await wait_closed(bad) == code
    await stack.manager.broadcast({"still": "here"})
    assert await next_payload(healthy) == {"still": "here"}
    await eventually(lambda: len(stack.manager.handlers) == 1)


async def test_a_client_closing_after_a_request_is_seen_closing_with_its_code(stack: Stack) -> None:
    """The client's reader is waiting in a receive when it closes. Over the aiohttp client
    (the ``asgi`` stack's), the reader ended the session as it saw the close begin, before the
    close frame was written: the server saw the socket lost (1006)."""
    stack.manager.custom_handlers.register("echo", lambda channel_id, data: data)
    client = await stack.client()
    assert await client.request("echo", 1) == 1
    await client.close(1000)
    codes = stack.manager.counters.close_codes
    await eventually(lambda: sum(codes.values()) == 1, "the server saw the connection end")
    assert codes == {1000: 1}


async def test_oversized_frame_closes_with_1009(make_stack: Any) -> None:
    async with make_stack(config=ServerConfig(max_message_size=1024)) as stack:
        ws = await stack.connect()
        await recv_json(ws)
        await send_json(ws, {"type": "custom", "message": {"kind": "k", "data": "x" * 2000}})
        assert await wait_closed(ws) == 1009


async def test_the_size_limit_counts_utf8_bytes_not_characters(make_stack: Any) -> None:
    async with make_stack(config=ServerConfig(max_message_size=1024)) as stack:
        ws = await stack.connect()
        await recv_json(ws)
        text = "\u00e9" * 600  # 600 characters, 1200 bytes: over the limit on every transport
        await ws.send(json.dumps({"type": "ping", "message": text}, ensure_ascii=False).encode())
        assert await wait_closed(ws) == 1009


async def test_large_single_frame_answer_within_the_limit_is_accepted(stack: Stack) -> None:
    client = await stack.client()
    big = "x" * (3 * 1024 * 1024)  # the stock client sends multi-MiB answers in one frame
    client.on_request(lambda r: big)
    assert await stack.manager.send_and_wait(client.channel, {"q": 1}) == big


async def test_a_text_of_many_commas_is_one_json_value_both_ways(make_stack: Any) -> None:
    """A CSV file in a string (a variable's value, say) counts as one JSON value, not as one per
    comma: under ``max_message_values`` on the server and on the client. It was closed with 1009."""
    csv = "\n".join(",".join(map(str, range(row, row + 50))) for row in range(0, 5000, 50))
    async with make_stack(config=ServerConfig(max_message_values=1000)) as stack:
        stack.manager.custom_handlers.register("echo", lambda channel_id, data: data)
        client = await stack.client(max_message_values=1000)
        client.on_request(lambda request: csv)
        assert await stack.manager.send_and_wait(client.channel, {"q": 1}) == csv
        assert await client.request("echo", {"csv": csv}) == {"csv": csv}
        assert client.connected


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "nonsense", "message": 1},
        {"type": "message"},
        {"type": "custom", "message": {"data": 1}},
        {"message": "no type"},
        {"type": "message", "channel": "unknown-rchan", "chunk_count": None, "message": 1},
        {"type": "message", "channel": "x", "chunk_count": "many", "message": 1},
    ],
)
async def test_invalid_objects_are_dropped_and_the_connection_stays(
    stack: Stack, frame: dict[str, Any]
) -> None:
    ws = await stack.connect()
    await recv_json(ws)
    await send_json(ws, frame)
    await send_json(ws, {"type": "ping"})
    assert await recv_json(ws) == {"type": "pong", "message": None}
    await ws.close()


async def _send_binary(transport: Transport, data: bytes) -> None:
    send_binary = getattr(transport, "send_binary", None)
    if send_binary is not None:
        await send_binary(data)
        return
    ws = transport._ws  # type: ignore[attr-defined]  # websockets: send bytes as a binary frame
    await ws.send(data)


# ---------------------------------------------------------------------------- slow consumers


SLOW: dict[str, Any] = {"max_queue_messages": 16, "max_queue_bytes": 256 * 1024, "send_timeout": 0.5,
        "close_timeout": 0.5}


async def _flood(stack: Stack, count: int = 800, size: int = 16 * 1024) -> None:
    payload = "y" * size
    for i in range(count):
        await stack.manager.broadcast({"i": i, "pad": payload})
        # A producer that yields now and then, as real ones do: the healthy client keeps up,
        # only the one that never reads falls behind.
        await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    "policy", [SlowConsumerPolicy.WAIT, SlowConsumerPolicy.DISCONNECT, SlowConsumerPolicy.DROP_OLDEST]
)
async def test_slow_consumer_is_bounded_and_others_keep_receiving(
    make_stack: Any, policy: SlowConsumerPolicy
) -> None:
    config = ServerConfig(slow_consumer_policy=policy, **SLOW)
    async with make_stack(config=config) as stack:
        healthy = await stack.client("fast:f", max_queue=100_000)
        stuck = await stack.connect("slow:s")  # never reads after this
        await eventually(lambda: len(stack.manager.handlers) == 2)
        stuck_channel = next(c for c in stack.manager.handlers if c != healthy.channel)
        stuck_handler = stack.manager.handlers[stuck_channel]
        max_queued = 0

        async def watch() -> None:
            nonlocal max_queued
            while True:
                max_queued = max(max_queued, len(stuck_handler.queue))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait_for(_flood(stack), 60)
        finally:
            watcher.cancel()
        # A fan-out may queue a burst past the bounds, up to BURST times them (never past them
        # under drop_oldest).
        burst = 1 if policy is SlowConsumerPolicy.DROP_OLDEST else BURST
        assert max_queued <= burst * config.max_queue_messages
        received = [(await next_payload(healthy))["i"] for _ in range(800)]
        assert received == list(range(800))
        if policy is SlowConsumerPolicy.DROP_OLDEST:
            assert stuck_handler.dropped > 0 and stuck_channel in stack.manager.handlers
        else:
            await eventually(lambda: stuck_channel not in stack.manager.handlers)
            assert stuck_handler.closed
        await stuck.close()
