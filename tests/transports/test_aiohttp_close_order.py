"""Replies accepted before aiohttp's own close go out before it, on either loop.

aiohttp fails a connection on a peer's protocol error itself (an unmasked frame: close 1002),
when its reader reaches that frame, after the messages ahead of it were handled. Their
replies were accepted then, corked for the end of the loop iteration (coalesced writes): they
must go out before aiohttp's close frame. Under uvloop they came after it, and were dropped
with the connection. (websockets, uvicorn and picows fail the connection as they parse the
read, before the messages ahead of the bad frame are handled: see test_picows's strict xfail.)
"""

from __future__ import annotations

import json

import pytest

from dara_ws_core import ServerConfig
from tests.helpers import run_on
from tests.hostile import CLOSE, PING, TEXT, close_payload, encode_frame, open_channel
from tests.stacks import running_stack

PINGS = 3
BAD: dict[str, tuple[int, bytes | str]] = {"text": (TEXT, json.dumps({"type": "ping", "message": None})),
       "ping": (PING, b"p"), "close": (CLOSE, close_payload(1000))}


async def _pongs_then_close(transport: str, bad: str) -> tuple[int, int | None]:
    async with running_stack(transport, ServerConfig(ping_interval=None, idle_timeout=None)) as stack:
        assert stack.port is not None
        client, _ = await open_channel(stack.port)
        ping = encode_frame(TEXT, json.dumps({"type": "ping", "message": None}))
        opcode, payload = BAD[bad]
        client.write(ping * PINGS + encode_frame(opcode, payload, mask=False))  # one read
        pongs = 0
        for _ in range(PINGS + 1):
            frame = await client.read_frame()
            if frame.opcode != TEXT:
                client.abort()
                return pongs, frame.close_code
            pongs += json.loads(frame.text)["type"] == "pong"
        client.abort()
        return pongs, None


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_aiohttp_writes_the_replies_to_frames_before_an_unmasked_one_before_its_1002(
    bad: str, loop: str,
) -> None:
    assert run_on(loop, _pongs_then_close("aiohttp", bad)) == (PINGS, 1002)
