"""Kept per-user messages (the outbox) reach the user exactly once, whatever closes a connection.

Each test sends a numbered stream to one user with ``send_message_to_user`` while something ends
the user's connection: the library itself (a protocol error from the peer), the server
(``close_channel``, or the slow-consumer policy), or a history longer than the new connection's
queue. The user then reconnects. Every number must have arrived once, on one connection or the
other. Real servers on 127.0.0.1, raw-socket clients (:mod:`tests.hostile`), every transport.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from dara_ws_core import ServerConfig, SlowConsumerPolicy

from .helpers import eventually
from .hostile import CLOSE, TEXT, HostileClient, encode_frame
from .stacks import running_stack

pytestmark = pytest.mark.timeout(90)

SERVED = ["websockets", "aiohttp", "asgi", "picows"]
USER_PATH = "/api/core/ws?token=bob:s1"


async def connect(port: int | None, *, rcvbuf: int | None = None) -> HostileClient:
    assert port is not None  # a served transport
    client = await HostileClient.open(port, rcvbuf=rcvbuf)
    assert (await client.handshake(USER_PATH)).status == 101
    first = await client.read_frame()
    assert json.loads(first.text)["type"] == "init"
    return client


async def read_numbers(client: HostileClient, seen: list[int], quiet: float) -> int | None:
    """Read numbered messages until the close frame (its code), the end, or ``quiet`` seconds
    without a frame (``None``)."""
    for _ in range(100_000):
        try:
            frame = await client.read_frame(timeout=quiet)
        except (TimeoutError, EOFError):
            return None
        if frame.opcode == CLOSE:
            return frame.close_code
        if frame.opcode == TEXT:
            seen.append(json.loads(frame.text)["message"]["n"])
    raise AssertionError("more frames than the test sent")


def assert_once_each(count: int, got: list[int]) -> None:
    assert sorted(got) == list(range(count)), (
        f"missing {sorted(set(range(count)) - set(got))[:10]}, "
        f"twice {sorted({n for n in got if got.count(n) > 1})[:10]}")


@pytest.mark.parametrize("transport", SERVED)
@pytest.mark.parametrize("after", [20, 33])
async def test_a_kept_message_is_not_lost_when_the_library_closes_the_connection(
    transport: str, after: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The peer's frame with an RSV bit makes the library close with 1002 by itself, in the
    # middle of the stream: a kept frame corked for that connection was dropped by the library
    # yet counted as written, and acknowledged.
    count = 300
    config = ServerConfig(ping_interval=None, close_timeout=1.0, outbox_messages=1000,
                          outbox_bytes=10**7)
    async with running_stack(transport, config=config) as stack:
        manager = stack.manager
        first = await connect(stack.port)

        async def stream() -> None:
            for n in range(count):
                await manager.send_message_to_user("bob", {"n": n})
                await asyncio.sleep(0)  # one per loop iteration, as a live feed sends

        sending = asyncio.create_task(stream())
        seen_first: list[int] = []
        for _ in range(after):
            seen_first.append(json.loads((await first.read_frame()).text)["message"]["n"])
        first.write(encode_frame(TEXT, '{"type":"ping"}', rsv=4))  # RSV1, no extension: 1002
        assert await read_numbers(first, seen_first, 3.0) == 1002
        first.abort()
        await sending
        await eventually(lambda: not manager.handlers, "the first connection is gone")
        second = await connect(stack.port)
        seen_second: list[int] = []
        await read_numbers(second, seen_second, 1.0)
        second.abort()
    assert_once_each(count, seen_first + seen_second)
    # A peer's protocol error is the peer's: no error logged, no traceback (ASGI's send on a
    # connection uvicorn had closed was logged as "send failed").
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize("transport", SERVED)
@pytest.mark.parametrize("closed_by", ["close_channel", "slow_consumer"])
async def test_kept_messages_written_before_a_server_close_are_not_sent_again(
    transport: str, closed_by: str
) -> None:
    # The server closes a connection with kept frames queued: they go out before the close
    # frame. Settled at the close, they counted as unwritten and went to the next connection too.
    count, blob = 400, "x" * 16_000
    config = ServerConfig(
        ping_interval=None, close_timeout=5.0, outbox_messages=1000, outbox_bytes=10**8,
        max_queue_messages=1000 if closed_by == "close_channel" else 50, max_queue_bytes=10**8,
        slow_consumer_policy=SlowConsumerPolicy.DISCONNECT)
    async with running_stack(transport, config=config) as stack:
        manager = stack.manager
        first = await connect(stack.port, rcvbuf=4096)
        (channel,) = manager.get_user_channels("bob")
        first.stop_reading()
        for n in range(count):
            await manager.send_message_to_user("bob", {"n": n, "blob": blob})
        if closed_by == "close_channel":
            assert len(manager.handlers[channel].queue) > 10  # a backlog the close must write
            manager.close_channel(channel, 1000, "bye")
        else:
            assert channel not in manager.handlers  # 1013: disconnected with a backlog
        first.resume_reading()
        seen_first: list[int] = []
        code = await read_numbers(first, seen_first, 3.0)
        assert code == (1000 if closed_by == "close_channel" else 1013)
        first.abort()
        await eventually(lambda: not manager._writing, "the closed connection is settled")
        second = await connect(stack.port)
        seen_second: list[int] = []
        await read_numbers(second, seen_second, 1.0)
        second.abort()
    assert_once_each(count, seen_first + seen_second)


@pytest.mark.parametrize("transport", SERVED)
@pytest.mark.parametrize("policy", [SlowConsumerPolicy.DISCONNECT, SlowConsumerPolicy.WAIT])
async def test_a_history_longer_than_the_queue_reaches_the_next_connection_whole(
    transport: str, policy: SlowConsumerPolicy
) -> None:
    # outbox_messages above max_queue_messages: the replay overflowed the queue while the
    # connection was being created (before its driver held it), crashed it, and left a ghost
    # holding the user's history; with max_connections_per_user=1 the user was locked out.
    kept = 120
    config = ServerConfig(ping_interval=None, close_timeout=1.0, outbox_messages=200,
                          max_queue_messages=50, slow_consumer_policy=policy,
                          max_connections_per_user=1)
    async with running_stack(transport, config=config) as stack:
        manager = stack.manager
        for n in range(kept):  # bob is connected nowhere: every message is kept
            await manager.send_message_to_user("bob", {"n": n})
        first = await connect(stack.port)
        seen: list[int] = []
        assert await read_numbers(first, seen, 1.0) is None  # no close: not a slow consumer
        assert seen == list(range(kept))
        first.abort()
        await eventually(lambda: not manager.handlers, "the connection is gone")
        second = await connect(stack.port)  # not refused: no ghost holds bob's only slot
        again: list[int] = []
        await read_numbers(second, again, 0.5)
        second.abort()
    assert again == []  # the first connection wrote the whole history: nothing twice
