"""picows: what one connection's reads and pushed messages may do to the others.

Real picows servers on 127.0.0.1, raw clients (``tests.hostile``): one read hands picows at most
``READ_LIMIT`` bytes, so a client writing megabytes of tiny frames at once cannot have them all
parsed and buffered in one callback; and every message of a connection is handled in the same
context, pushed from picows' callback or read by the receive loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
from typing import Any

import pytest

from dara_ws_core import ServerConfig
from dara_ws_picows import READ_LIMIT, PicowsTransport

from .helpers import eventually
from .hostile import TEXT, encode_frame, open_channel
from .stacks import running_stack

MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="unset")


@pytest.mark.parametrize("transport", ["websockets", "picows"])
async def test_a_context_variable_set_by_a_handler_is_seen_by_the_connections_later_messages(
    transport: str,
) -> None:
    # A sync handler runs in its connection's context: what it sets, the connection's later
    # messages see, whether picows' callback pushed them or the receive loop read them.
    seen: list[str] = []
    async with running_stack(transport, ServerConfig(ping_interval=None)) as stack:
        stack.manager.add_ws_handler("set", lambda c, d: MARK.set(d) and None)
        stack.manager.add_ws_handler("get", lambda c, d: seen.append(MARK.get()))
        assert stack.port is not None
        client, _ = await open_channel(stack.port)

        def custom(kind: str, data: Any) -> bytes:
            return encode_frame(TEXT, json.dumps({"type": "custom", "message": {"kind": kind, "data": data}}))

        client.write(custom("set", "first"))  # alone: pushed on picows
        await eventually(lambda: stack.manager.counters.frames_in == 1, "the first set handled")
        client.write(custom("get", None) * 40)  # a burst: 16 pushed, the rest read by the loop
        await eventually(lambda: len(seen) == 40, "every get handled")
        client.write(custom("set", "second") * 20)
        await eventually(lambda: stack.manager.counters.frames_in == 61, "every set handled")
        client.write(custom("get", None))
        await eventually(lambda: len(seen) == 41, "the last get handled")
        client.abort()
    runs = [(value, sum(1 for _ in group)) for value, group in itertools.groupby(seen)]
    assert seen == ["first"] * 40 + ["second"], runs


async def test_one_write_of_many_tiny_frames_is_parsed_a_bounded_read_at_a_time() -> None:
    # Pausing the reads only stops the next one, and picows' read buffer doubles whenever a read
    # fills it: without a bound per read, a megabyte of 8-byte frames landed in the inbox (its
    # bound is 16 messages) in one callback, all parsed while every other connection waited.
    async with running_stack("picows", ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        client, _ = await open_channel(stack.port)
        (handler,) = stack.manager.handlers.values()
        transport = handler._sink.transport  # type: ignore[union-attr]  # the connection's driver
        assert isinstance(transport, PicowsTransport)
        largest, stop = [0], [False]

        async def watch() -> None:  # the inbox, sampled whenever the loop runs us
            for _ in range(1_000_000):
                if stop[0]:
                    return
                largest[0] = max(largest[0], len(transport._inbox))
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        frame = encode_frame(TEXT, "{}")  # no known type: dropped and logged, the connection stays
        count = 1024 * 1024 // len(frame)
        client.write(frame * count)
        try:
            await eventually(lambda: stack.manager.counters.frames_in >= count, "every frame handled",
                             timeout=60)
        finally:
            stop[0] = True
            await watcher
        client.abort()
    assert 0 < largest[0] <= READ_LIMIT // len(frame), largest[0]
