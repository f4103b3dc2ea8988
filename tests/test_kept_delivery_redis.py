"""Kept per-user messages a connection wrote are not sent again after it closed, on a real
``redis-server``, whatever closes it and whenever Redis numbers them.

A process hands a per-user send to the user's connections here at once and learns the entry it
became in the user's history a Redis round trip later; only then can what a connection wrote be
acknowledged. Here that round trip is made long (a proxy delays the link to Redis), so every
connection is closed and settled before Redis answers: the client aborts, closes, breaks the
protocol, stops answering pings, or the server closes it. The user's next connection must get
none of what the first one read. Real servers on 127.0.0.1, raw-socket clients
(:mod:`tests.hostile`), every served transport (the in-process bus version is in
``test_cluster.py``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING

import pytest

from dara_ws_core import ServerConfig, WebsocketManager
from dara_ws_redis import RedisBackplane

from .chaos_proxy import ChaosProxy
from .helpers import eventually
from .hostile import TEXT, HostileClient, encode_frame
from .stacks import running_stack
from .test_kept_delivery import SERVED, connect, read_numbers

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]
pytestmark = pytest.mark.timeout(60)

#: Redis answers each command this late (each way): every close below is settled first.
DELAY = 0.4
CLOSES = ["abort", "close", "protocol_error", "ping_timeout", "close_channel"]


async def end_connection(client: HostileClient, how: str, manager: WebsocketManager,
                         seen: list[int]) -> None:
    if how == "abort":
        client.abort()
        return
    if how == "close":
        client.send_close(1000)
    elif how == "protocol_error":
        client.write(encode_frame(TEXT, '{"type":"ping"}', rsv=4))  # RSV1, no extension: 1002
    elif how == "close_channel":
        (channel,) = manager.get_user_channels("bob")
        manager.close_channel(channel, 4000, "bye")
    # ping_timeout: nothing to do, the library gives up on pings this client never answers.
    code = await read_numbers(client, seen, 5.0)
    if how == "protocol_error":
        assert code == 1002
    elif how == "close_channel":
        assert code == 4000
    client.abort()


@pytest.mark.parametrize("transport", SERVED)
@pytest.mark.parametrize("how", CLOSES)
async def test_kept_messages_a_closed_connection_wrote_are_not_sent_again_when_redis_answers_late(
    redis_server: RedisServer, transport: str, how: str
) -> None:
    count = 20
    pings = 0.2 if how == "ping_timeout" else None
    # close_timeout / 4 (0.1 s) is what a server close waits for Redis before its close frame.
    config = ServerConfig(ping_interval=pings, ping_timeout=pings, close_timeout=0.4,
                          outbox_messages=1000)
    async with ChaosProxy(redis_server.port) as proxy:
        # A long heartbeat: the delayed link is slow, not dead.
        backplane = RedisBackplane(proxy.url, heartbeat_interval=5.0,
                                   namespace=f"late-{uuid.uuid4().hex[:6]}")
        manager = WebsocketManager(config, backplane=backplane)
        await backplane.start(manager)
        try:
            async with running_stack(transport, manager=manager) as stack:
                first = await connect(stack.port)  # admitted before the link slows down
                answered = backplane.stats.published + backplane.stats.kept
                async with proxy.fault("delay", 0.0, delay=DELAY):  # while the block runs
                    for n in range(count):
                        await manager.send_message_to_user("bob", {"n": n})
                    seen_first: list[int] = []
                    for _ in range(2 * count):  # each one read by the client (pings between)
                        frame = await first.read_frame()
                        if frame.opcode == TEXT:
                            seen_first.append(json.loads(frame.text)["message"]["n"])
                        if len(seen_first) == count:
                            break
                    await end_connection(first, how, manager, seen_first)
                    await eventually(lambda: not manager.handlers and not manager._writing,
                                     "the first connection is settled")
                    # The case under test: settled before Redis numbered what it wrote.
                    assert backplane.stats.published + backplane.stats.kept == answered
                async with asyncio.timeout(10):
                    await backplane.flush()  # the numbers are back, and what they acknowledge
                await eventually(lambda: not backplane._acks_in_flight and not backplane._acks_next,
                                 "acknowledged")
                async with asyncio.timeout(10):
                    await backplane.flush()
                second = await connect(stack.port)
                await manager.send_message_to_user("bob", {"n": "fence"})
                seen_second: list[int] = []
                for _ in range(count + 1):
                    n = json.loads((await second.read_frame()).text)["message"]["n"]
                    if n == "fence":
                        break
                    seen_second.append(n)
                second.abort()
        finally:
            await backplane.stop()
    assert seen_first == list(range(count))
    assert seen_second == []  # the first connection wrote (and its client read) every one
