"""A ``send_and_wait`` request that ``DROP_OLDEST`` discards from a full queue (review 9, item 7):
its caller learns at once (``SlowConsumer``), while the other frames, and a request the policy
keeps, follow the policy as before. On every socket transport, with a raw client that stops
reading, so that the server's queue fills for real."""

from __future__ import annotations

import asyncio
import json

import pytest

from dara_ws_core import ServerConfig, SlowConsumer, SlowConsumerPolicy, WebSocketHandler

from .hostile import HostileClient, open_channel
from .stacks import TRANSPORTS, Stack, running_stack

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
CONFIG = ServerConfig(slow_consumer_policy=SlowConsumerPolicy.DROP_OLDEST, max_queue_messages=8,
                      ping_interval=None)
PAD = {"pad": "x" * 20_000}
BOUND = 10.0  # a correctness bound for "at once" (against a 60 s request timeout), not a speed


async def _stalled(stack: Stack) -> tuple[HostileClient, str, WebSocketHandler]:
    """A client that reads nothing, and its handler once frames wait in its queue (the kernel's
    buffers and the transport's are full)."""
    assert stack.port is not None
    client, channel = await open_channel(stack.port, rcvbuf=4096)
    client.stop_reading()
    handler = stack.manager.handlers[channel]
    for _ in range(2000):  # bounded: a few hundred kB fill the buffers
        if len(handler.queue):
            return client, channel, handler
        await stack.manager.broadcast(PAD)
        await asyncio.sleep(0)
    raise AssertionError("the queue never filled")


async def _push_out(stack: Stack, handler: WebSocketHandler) -> None:
    """Broadcast until every frame queued now has been dropped by the policy."""
    for _ in range(handler.config.max_queue_messages):
        await stack.manager.broadcast(PAD)


@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_request_dropped_by_drop_oldest_fails_at_once_and_the_channel_stays(transport: str) -> None:
    async with running_stack(transport, CONFIG) as stack:
        client, channel, handler = await _stalled(stack)
        dropped = handler.dropped
        request = asyncio.ensure_future(stack.manager.send_and_wait(channel, {"q": 1}, timeout=60))
        await asyncio.sleep(0)  # the request is encoded and queued behind the others
        assert not request.done()
        await _push_out(stack, handler)
        with pytest.raises(SlowConsumer, match="dropped unsent"):
            await asyncio.wait_for(request, BOUND)
        # The policy itself is unchanged: frames dropped, queue bounded, the channel kept.
        assert handler.dropped > dropped
        assert len(handler.queue) <= CONFIG.max_queue_messages
        assert channel in stack.manager.handlers and not handler.closed
        assert handler.pending_count == 0  # its entry is gone with it
        client.abort()


@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_queued_request_the_policy_keeps_is_answered_once_the_client_reads(transport: str) -> None:
    async with running_stack(transport, CONFIG) as stack:
        client, channel, _ = await _stalled(stack)
        request = asyncio.ensure_future(stack.manager.send_and_wait(channel, {"q": 2}, timeout=60))
        await asyncio.sleep(0)
        await stack.manager.broadcast(PAD)  # one frame behind it: the request is not dropped
        client.resume_reading()
        for _ in range(10_000):  # bounded: the frames written or queued before the answer
            message = json.loads((await client.read_frame()).text)["message"]
            if isinstance(message, dict) and "__rchan" in message:
                break
        else:
            raise AssertionError("the request never reached the client")
        assert message["q"] == 2
        client.send_text(json.dumps({"type": "message", "channel": message["__rchan"], "message": "yes"}))
        assert await asyncio.wait_for(request, BOUND) == "yes"
        client.abort()
