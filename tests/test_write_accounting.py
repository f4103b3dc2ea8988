"""Frame numbering on every transport: what a connection took and what its transport wrote.

The per-user history acknowledges an entry once its connection's transport has written the frame
that carried it (``handler.flushed >= position``, positions counted by ``handler.accepted``). The
two counts must therefore stay in step whatever the slow-consumer policy does: a frame that
waited for room is numbered like any other, and frames the ``drop_oldest`` policy throws away
count as done, so the frames behind them keep their numbers. Before, a waiting send left
``flushed`` ahead of ``accepted`` (every later entry acknowledged while still queued) and a drop
left it behind for good (entries of frames never written acknowledged in place of written ones).
"""

from __future__ import annotations

import asyncio
from typing import Any

from dara_ws_core import ServerConfig, SlowConsumerPolicy
from dara_ws_core.transport import Transport

from .helpers import eventually

PAD = "z" * 16 * 1024
#: Small queues, so a client that does not read fills its queue after the kernel's buffers.
SMALL: dict[str, Any] = {"max_queue_messages": 8, "max_queue_bytes": 256 * 1024, "close_timeout": 2.0}
MAX_SENDS = 2000
TIMEOUT = 10.0


async def read_frames(transport: Transport, count: int) -> None:
    for _ in range(count):
        await asyncio.wait_for(transport.receive(), TIMEOUT)


async def test_a_send_that_waited_for_room_is_numbered_like_any_other(make_stack: Any) -> None:
    config = ServerConfig(slow_consumer_policy=SlowConsumerPolicy.WAIT, send_timeout=30.0, **SMALL)
    async with make_stack(config=config) as stack:
        manager = stack.manager
        peer = await stack.connect("dave:s")  # reads nothing until sends wait for room
        await eventually(lambda: len(manager.handlers) == 1)
        channel, handler = next(iter(manager.handlers.items()))
        full = config.max_queue_messages
        sent = waited = 0

        async def produce() -> None:
            nonlocal sent, waited
            while sent < MAX_SENDS and waited < 20:
                if len(handler.queue) >= full:
                    waited += 1  # the queue is full: this send goes through the policy's wait
                await manager.send_message(channel, {"i": sent, "pad": PAD})
                sent += 1

        producer = asyncio.create_task(produce())
        try:
            await eventually(lambda: waited > 0 or producer.done(), timeout=TIMEOUT)
            received = 0
            while received < 1 + MAX_SENDS and not (producer.done() and received == 1 + sent):
                await asyncio.wait_for(peer.receive(), TIMEOUT)  # a frame left queued times out
                received += 1
            await producer
        finally:
            producer.cancel()
        await eventually(lambda: handler.flushed == handler.accepted, timeout=TIMEOUT)
        assert waited == 20, "the queue never filled: no send waited"
        assert handler.accepted == 1 + sent  # the init frame, then every send
        await peer.close()


async def test_frames_dropped_by_drop_oldest_count_as_done(make_stack: Any) -> None:
    config = ServerConfig(slow_consumer_policy=SlowConsumerPolicy.DROP_OLDEST, **SMALL)
    async with make_stack(config=config) as stack:
        manager = stack.manager
        peer = await stack.connect("erin:s")  # never reads until frames were dropped
        await eventually(lambda: len(manager.handlers) == 1)
        handler = next(iter(manager.handlers.values()))
        sent = 0
        while sent < MAX_SENDS and handler.dropped == 0:
            await manager.send_message_to_user("erin", {"i": sent, "pad": PAD})
            sent += 1
            if sent % 8 == 0:
                await eventually(lambda: True)  # one loop turn: let the transport write
        assert handler.dropped > 0, "nothing was dropped"
        assert handler.flushed <= handler.accepted
        await read_frames(peer, 1 + sent - handler.dropped)  # the init frame and what was kept
        await eventually(lambda: handler.flushed == handler.accepted, timeout=TIMEOUT)
        assert handler.accepted == 1 + sent
        await peer.close()
