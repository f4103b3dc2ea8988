"""Bounds count what a decoded text holds, not its UTF-8 (a hostile-client review: "UCS-4 amplification").

CPython keeps a ``str`` at 1, 2 or 4 bytes a character (PEP 393): one character past U+FFFF
(an emoji) makes the whole string 4 bytes a character, so an ASCII text with one emoji in it
takes four times its bytes on the wire once decoded. Every byte bound that holds decoded text
counts what it holds: the parts of chunked answers (``max_chunked_*``), and the messages that
wait for their connection in an adapter's queue are kept as their bytes (aiohttp, uvicorn) or
counted with ``sys.getsizeof`` (picows). Live, on every socket transport, with ``tracemalloc``
in the server's process, as ``tests/test_receiving_budget.py`` measures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
from typing import Any

from dara_ws_core import ServerConfig
from dara_ws_core.codec import dumps, held_text_bytes
from dara_ws_core.correlation import PROCESS_CHUNKS

from . import test_hostile_transport
from .helpers import eventually
from .hostile import TEXT, HostileClient, encode_frame, open_channel

KiB = 1024
MiB = 1024 * KiB
#: The fixture ``async with socket_stack(config=...) as stack``, on every socket transport.
socket_stack = test_hostile_transport.socket_stack
EMOJI = "\U0001f600"


def emoji_text(size: int) -> str:
    """A text of ``size`` UTF-8 bytes, one emoji and ASCII: 4 bytes a character decoded."""
    return EMOJI + "a" * (size - len(EMOJI.encode()))


# ---------------------------------------------------------------------------- pure


def test_held_text_bytes_counts_characters_at_the_width_cpython_keeps_them() -> None:
    assert held_text_bytes("a" * 100) == 100
    assert held_text_bytes(emoji_text(100)) >= 4 * 97, "one emoji: 4 bytes for every character"
    assert held_text_bytes({"key": ["x", {"y": None}], "n": [1, 2.5, True]}) == len("keyxyn")
    wide = emoji_text(1000)
    dumps(wide)  # encoded once, a non-ASCII string keeps its UTF-8 copy: held too
    assert held_text_bytes(wide) >= 4 * 997 + 1000


# ---------------------------------------------------------------------------- live


async def _pong(client: HostileClient, timeout: float = 10.0) -> None:
    """Every frame ``client`` sent before is handled: the server answered a ping after them."""
    client.write(encode_frame(TEXT, json.dumps({"type": "ping", "message": None})))
    async with asyncio.timeout(timeout):
        for _ in range(1000):
            frame = await client.read_frame(timeout)
            if frame.opcode == TEXT and json.loads(frame.text).get("type") == "pong":
                return
    raise AssertionError("no pong")


async def _request_of(client: HostileClient, timeout: float = 10.0) -> str:
    """The ``__rchan`` of the next server request ``client`` reads."""
    async with asyncio.timeout(timeout):
        for _ in range(1000):
            frame = await client.read_frame(timeout)
            message = json.loads(frame.text).get("message")
            if isinstance(message, dict) and "__rchan" in message:
                return str(message["__rchan"])
    raise AssertionError("no request")


def _part(rchan: str, payload: Any, index: int, count: int) -> bytes:
    return encode_frame(TEXT, json.dumps({"type": "message", "channel": rchan, "message": payload,
                                          "chunk_count": count, "chunk_index": index}, ensure_ascii=False))


async def test_emoji_laden_chunked_answers_hold_no_more_than_the_chunk_budget_and_a_bystander_completes(
    socket_stack: Any,
) -> None:
    # A process chunk budget of 8 MiB: 512 KiB a user. 16 users each answer a request in 12
    # parts of 32 KiB of UTF-8 holding one emoji (128 KiB decoded each, and its UTF-8 copy) and
    # never finish: counted as sent (384 KiB a user), all fit, and the users held 30 MiB in all;
    # counted as held, a user's fourth part goes past its share, which fails that request and
    # gives back its parts. Meanwhile a bystander's small chunked answer completes.
    total = 8 * MiB
    config = ServerConfig(max_chunked_total_bytes=total, ping_interval=None, idle_timeout=None,
                          request_timeout=60)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        manager = stack.manager
        bystander, bystander_channel = await open_channel(stack.port, path="/api/core/ws?token=bystander:s1")
        peers = [await open_channel(stack.port, path=f"/api/core/ws?token=u{i}:s1") for i in range(16)]
        asks = [asyncio.ensure_future(manager.send_and_wait(channel, {"q": 1}, timeout=60)) for _, channel in peers]
        rchans = [await _request_of(client) for client, _ in peers]
        part = emoji_text(32 * KiB - 16)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for (client, _), rchan in zip(peers, rchans, strict=True):
                for index in range(12):
                    client.write(_part(rchan, part, index, 100))
                await client.drain()
            for client, _ in peers:
                await _pong(client)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # The bystander answers in two small parts: served, whatever the others hold.
        ask = asyncio.ensure_future(manager.send_and_wait(bystander_channel, {"q": 2}, timeout=10))
        rchan = await _request_of(bystander)
        bystander.write(_part(rchan, "small", 0, 2) + _part(rchan, EMOJI, 1, 2))
        assert await ask == ["small", EMOJI]
        assert held < total + 4 * MiB, (
            f"{held / MiB:.1f} MiB held for chunked answers bounded by {total / MiB:.0f} MiB")
        assert PROCESS_CHUNKS.bytes <= total
        for task in asks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*asks, return_exceptions=True)
        for client, _ in peers:
            client.abort()
        bystander.abort()
        await eventually(lambda: PROCESS_CHUNKS.bytes == 0, "every part given back", timeout=10)


async def _settled(timeout: float = 10.0) -> int:
    """What tracemalloc traces once it stops growing (unchanged over 0.5 s; at most
    ``timeout``): the server has read what it will read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, steady = -1, 0
    while steady < 10 and loop.time() < deadline:
        await asyncio.sleep(0.05)
        now = tracemalloc.get_traced_memory()[0]
        steady = steady + 1 if abs(now - last) < 64 * KiB else 0
        last = now
    return last


async def test_peers_that_stop_reading_and_pipeline_emoji_laden_messages_have_them_held_as_bytes(
    socket_stack: Any,
) -> None:
    # 4 peers stop reading and each send 6 echo requests of 4 MiB of UTF-8 holding one emoji
    # (16 MiB each decoded). The server reads until its queue and write buffer are full and the
    # connection's receive loop waits for room; what the transport read meanwhile waits for it.
    # Each connection holds about 5 messages' bytes (its reply being written, its queue, the
    # reply waiting for room, the message waiting, the next being read), none of them decoded:
    # at most 6 messages' worth a connection (8 on picows, whose C read buffer keeps a message
    # and grows to its size: see docs/deployment.md). Waiting decoded, aiohttp's and picows'
    # held 3 times a message more a connection (140 and 171 MB instead of 90 and 121 here).
    # A bystander is served meanwhile.
    size = 4 * MiB
    config = ServerConfig(max_message_size=size, max_queue_bytes=1 * MiB, ping_interval=None,
                          idle_timeout=None, send_timeout=60)
    async with socket_stack(config=config) as stack:
        assert stack.port is not None
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        bystander, _ = await open_channel(stack.port, path="/api/core/ws?token=bystander:s1")
        peers = [(await open_channel(stack.port, path=f"/api/core/ws?token=u{i}:s1", rcvbuf=4096))[0]
                 for i in range(4)]
        head, tail = '{"type":"custom","message":{"kind":"echo","data":"', '","__rchan":"r"}}'
        frame = encode_frame(TEXT, head + emoji_text(size - 1 - len(head) - len(tail)) + tail)
        per_connection = (8 if stack.transport == "picows" else 6) * size
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for peer in peers:
                peer.stop_reading()
                for _ in range(6):
                    peer.write(frame)
            held = await _settled() - before
            await _pong(bystander)
        finally:
            tracemalloc.stop()
        assert held < len(peers) * per_connection + 8 * MiB, (
            f"{held / MiB:.1f} MiB held by {len(peers)} connections, "
            f"bound {len(peers) * per_connection / MiB:.0f} MiB and 8 MiB of slack")
        for peer in (*peers, bystander):
            peer.abort()


async def test_a_text_waiting_as_bytes_that_is_not_utf8_closes_with_1007_after_the_frames_before_it(
    socket_stack: Any,
) -> None:
    # Kept as bytes while the connection is busy, a text is decoded only when it is handled:
    # invalid UTF-8 still closes with 1007, once the frames before it are answered, as when it
    # was decoded on arrival. 20 pings first: picows hands the first 16 straight to the core,
    # the rest wait in its inbox, the bad text (over 4 KiB) among them as its bytes.
    async with socket_stack(config=ServerConfig(ping_interval=None, idle_timeout=None)) as stack:
        assert stack.port is not None
        client, _ = await open_channel(stack.port)
        ping = encode_frame(TEXT, json.dumps({"type": "ping", "message": None}))
        bad = encode_frame(TEXT, b'{"type":"ping","message":"' + b"\xff" * (8 * KiB) + b'"}')
        client.write(ping * 20 + bad)
        pongs, code = 0, None
        async with asyncio.timeout(10):
            for _ in range(100):
                frame = await client.read_frame()
                if frame.opcode == TEXT:
                    pongs += json.loads(frame.text)["type"] == "pong"
                else:
                    code = frame.close_code
                    break
        assert (pongs, code) == (20, 1007)
        client.abort()
