"""The push hand-over (``SupportsPush``) of the websockets and picows adapters, on real sockets.

A text message that arrives while the receive loop waits with nothing buffered is handled in the
library's callback (websockets: the connection's ``data_received``); on websockets everything
else (binary, fragmented, invalid UTF-8, a burst past the limit, the end of the connection) goes
through its ``recv()`` with its own outcomes, in order."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

import dara_ws_websockets
from dara_ws_core import ConnectionClosed, ServerConfig, current_channel
from dara_ws_core.driver import _YIELD_EVERY
from dara_ws_core.transport import SupportsPush
from dara_ws_picows import PicowsTransport
from dara_ws_websockets import WebsocketsTransport
from tests.helpers import eventually
from tests.hostile import BINARY, CONTINUATION, PING, TEXT, HostileClient, encode_frame, open_channel
from tests.stacks import running_stack


async def _opened(port: int) -> HostileClient:
    client, _ = await open_channel(port)
    return client


def _custom(kind: str, data: Any, rchan: str | None = None) -> bytes:
    message: dict[str, Any] = {"kind": kind, "data": data}
    if rchan is not None:
        message["__rchan"] = rchan
    return encode_frame(TEXT, json.dumps({"type": "custom", "message": message}))


#: The push hand-over of websockets is used on the releases it is checked against only.
CHECKED = pytest.mark.skipif(not dara_ws_websockets._PUSHES, reason=(
    "the installed websockets is not in dara_ws_websockets.PUSH_RELEASES: no hand-over to test"))
TRANSPORTS = pytest.mark.parametrize("transport", [pytest.param("websockets", marks=CHECKED), "picows"])


def test_both_socket_transports_can_push() -> None:
    assert issubclass(WebsocketsTransport, SupportsPush)
    assert issubclass(PicowsTransport, SupportsPush)


@TRANSPORTS
async def test_a_message_is_handled_in_the_librarys_callback_in_the_connection_context(transport: str) -> None:
    # No receive loop wakeup: the handler runs in the callback that read the frame (no task),
    # yet sees the connection's context variables as it would in the receive loop.
    seen: list[tuple[bool, str | None, Any]] = []
    async with running_stack(transport) as stack:
        stack.manager.add_ws_handler(
            "where", lambda c, d: seen.append((asyncio.current_task() is None, current_channel.get(None), d)))
        client = await stack.client()
        await client.send_custom("where", 1)
        await eventually(lambda: len(seen) == 1, "the message handled")
        assert seen == [(True, client.channel, 1)]


@TRANSPORTS
async def test_a_burst_is_pushed_at_most_yield_every_at_a_time_and_keeps_its_order(transport: str) -> None:
    # A client that sends many frames at once: at most _YIELD_EVERY are handled in the callback
    # in a row, the rest wait in the (bounded) buffer for the receive loop, in order.
    seen: list[tuple[bool, int]] = []
    async with running_stack(transport, ServerConfig(ping_interval=None)) as stack:
        stack.manager.add_ws_handler("n", lambda c, d: seen.append((asyncio.current_task() is None, d)))
        assert stack.port is not None
        client = await _opened(stack.port)
        count = 200
        client.write(b"".join(_custom("n", i) for i in range(count)))
        await eventually(lambda: len(seen) == count, "every message handled")
        assert [n for _, n in seen] == list(range(count))
        runs, run = [], 0
        for pushed, _ in seen:
            run = run + 1 if pushed else 0
            runs.append(run)
        assert max(runs) == _YIELD_EVERY  # pushed, up to the limit
        assert not all(pushed for pushed, _ in seen)  # and the rest read by the receive loop
        client.abort()


@TRANSPORTS
async def test_a_server_request_is_answered_from_the_callback(transport: str) -> None:
    async with running_stack(transport, ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        client = await _opened(stack.port)
        (channel,) = stack.manager.handlers
        for n in range(3):
            asked = asyncio.ensure_future(stack.manager.send_and_wait(channel, {"n": n}, timeout=5))
            request = json.loads((await client.read_frame()).text)["message"]
            client.write(encode_frame(TEXT, json.dumps(
                {"type": "message", "channel": request["__rchan"], "chunk_count": None, "message": n * 10})))
            assert await asyncio.wait_for(asked, 5) == n * 10
        assert stack.manager.counters.requests_answered == 3
        client.abort()


async def test_fragments_and_pings_while_pushing_go_through_recv_in_order() -> None:
    seen: list[Any] = []
    async with running_stack("websockets", ServerConfig(ping_interval=None)) as stack:
        stack.manager.add_ws_handler("n", lambda c, d: seen.append(d))
        assert stack.port is not None
        client = await _opened(stack.port)
        text = json.dumps({"type": "custom", "message": {"kind": "n", "data": "h\u00e9llo" * 10}},
                          ensure_ascii=False).encode()
        cut = text.index(b"\xc3") + 1  # inside a two-byte character
        client.write(_custom("n", 1) + encode_frame(TEXT, text[:cut], fin=False) + encode_frame(PING, b"hi")
                     + encode_frame(CONTINUATION, text[cut:]) + _custom("n", 2))
        pong = await client.read_frame()
        assert (pong.opcode, pong.payload) == (0xA, b"hi")
        await eventually(lambda: len(seen) == 3, "every message handled")
        assert seen == [1, "h\u00e9llo" * 10, 2]
        # Pushing resumes once the buffer is empty again.
        client.write(_custom("n", 3))
        await eventually(lambda: len(seen) == 4, "the last message handled")
        client.abort()


@TRANSPORTS
@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([encode_frame(TEXT, b"\xff\xfe")], 1007),
        ([encode_frame(TEXT, b'{"a": "\xc3', fin=False), encode_frame(CONTINUATION, b'x"}')], 1007),
        ([encode_frame(CONTINUATION, b"{}")], 1002),
        ([encode_frame(TEXT, b"{", fin=False), encode_frame(TEXT, b"}")], 1002),
        ([encode_frame(BINARY, b"\x00", fin=False), encode_frame(CONTINUATION, b"\x01")], 1003),
        ([encode_frame(BINARY, b"{}")], 1003),
        ([encode_frame(TEXT, b"x" * 600, fin=False), encode_frame(CONTINUATION, b"x" * 600)], 1009),
        ([encode_frame(TEXT, b"x" * 2000)], 1009),
        ([encode_frame(TEXT, b"{}", rsv=4)], 1002),
        ([encode_frame(TEXT, b'{"type":"custom","message":{"kind":"n","data":1e400}}')], 1007),
    ],
    ids=["bad-utf8", "bad-utf8-across-fragments", "stray-continuation", "text-inside-text",
         "fragmented-binary", "binary", "fragments-over-the-limit", "too-big", "rsv-bit", "overflowing-number"],
)
async def test_bad_frames_while_pushing_close_with_the_same_codes_on_both(
    transport: str, frames: list[bytes], code: int
) -> None:
    # The connection waits in receive_pushed (nothing buffered) when the bad frames arrive.
    async with running_stack(transport, ServerConfig(ping_interval=None, max_message_size=1024)) as stack:
        assert stack.port is not None
        client = await _opened(stack.port)
        client.write(b"".join(frames))
        assert await client.read_close(5) == code
        await eventually(lambda: not stack.manager.handlers, "the channel removed")
        client.abort()


async def test_a_connection_lost_while_pushing_ends_the_channel() -> None:
    async with running_stack("websockets", ServerConfig(ping_interval=None)) as stack:
        assert stack.port is not None
        client = await _opened(stack.port)
        (channel,) = stack.manager.handlers
        asked = asyncio.ensure_future(stack.manager.send_and_wait(channel, {"q": 1}, timeout=5))
        await client.read_frame()
        client.abort()
        await eventually(lambda: not stack.manager.handlers, "the channel removed")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(asked, 5)


async def test_a_client_connection_receives_as_before() -> None:
    # Only connections serve() created hand messages over; a client's receive_pushed is receive().
    async with running_stack("websockets") as stack:
        transport = await stack.connect()
        assert isinstance(transport, WebsocketsTransport)
        try:
            frame = await asyncio.wait_for(transport.receive_pushed(lambda m: True, 4), 5)
            assert json.loads(frame)["type"] == "init"  # type: ignore[arg-type]
        finally:
            await transport.close()


@pytest.mark.parametrize("pushes", [pytest.param(True, marks=CHECKED), False])
async def test_a_websockets_release_not_checked_gets_every_message_through_recv(
    pushes: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hand-over relies on websockets' internals: only the releases it is checked against
    # (PUSH_RELEASES) use it; on another, the receive loop waits in recv() and nothing changes.
    monkeypatch.setattr(dara_ws_websockets, "_PUSHES", pushes)
    async with running_stack("websockets", ServerConfig(ping_interval=None)) as stack:
        client = await stack.client()
        client.on_request(lambda request: request.payload)
        handler = stack.manager.handlers[client.channel]
        transport: Any = handler._sink.transport  # type: ignore[union-attr]
        for k in range(3):
            assert await stack.manager.send_and_wait(client.channel, {"q": k}) == {"q": k}
        # Back to waiting for the next message: handed over, or in recv().
        await eventually(lambda: (transport._waiter is not None) is pushes, "the receive loop waiting")
