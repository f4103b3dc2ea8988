"""Valid messages in random wire shapes, on every socket transport (RFC 6455 5.4 and 5.5).

A seeded random program writes, on one raw connection, requests and JSON pings each split into
random fragments (a fragment boundary may fall inside a UTF-8 sequence: only the whole message
must be UTF-8), with control frames between the fragments (pings with payloads up to 125 bytes,
unsolicited pongs), the whole stream written in TCP segments of random sizes (one byte to a few
KiB, so frame headers split too). Every request must be answered with its own data and every
JSON ping with a pong, in the order sent; every protocol ping with a pong carrying its payload,
in order. Then an ending drawn from protocol.md section 6 and RFC 6455 gets its close code. A
well-behaved client on the same server meanwhile receives a broadcast stream and gets its own
requests answered: all of it, in order.

The seed is printed (``-s``) and can be fixed with ``DARA_WIRE_SEED``; every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest

from dara_ws_core import PushedMessage, ServerConfig

from .hostile import CLOSE, CONTINUATION, PING, PONG, TEXT, HostileClient, close_payload, encode_frame
from .hostile import open_channel as open_port_channel
from .stacks import TRANSPORTS, running_stack

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
SEED = int(os.environ.get("DARA_WIRE_SEED", random.randrange(1 << 32)))
MESSAGES = 40
MAX_MESSAGE = 64 * 1024
BINARY = 0x2
#: Close codes no close frame may carry (RFC 6455 section 7.4).
UNSENDABLE = [999, 1004, 1005, 1006, 1015, 2999, 5000]
TOO_BIG = b"a" * MAX_MESSAGE

#: Endings, and the close code each must get: a peer's valid close is echoed with its code.
ENDINGS: dict[str, tuple[Callable[[random.Random], bytes], int]] = {
    "close-1000": (lambda rng: encode_frame(CLOSE, close_payload(1000, "bye")), 1000),
    "close-4999": (lambda rng: encode_frame(CLOSE, close_payload(4999, "é" * rng.randrange(40))), 4999),
    "close-between-fragments": (lambda rng: encode_frame(TEXT, b'{"type":', fin=False)
                                + encode_frame(CLOSE, close_payload(3001)), 3001),
    "close-reserved-code": (lambda rng: encode_frame(CLOSE, close_payload(rng.choice(UNSENDABLE))), 1002),
    "close-one-byte": (lambda rng: encode_frame(CLOSE, b"\x03"), 1002),
    "close-reason-not-utf8": (lambda rng: encode_frame(CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"), 1007),
    "binary": (lambda rng: encode_frame(BINARY, b"{}"), 1003),
    "text-not-utf8": (lambda rng: _fragments(rng, b'{"type":"ping","message":"\xc3("}'), 1007),
    "not-json": (lambda rng: _fragments(rng, b'{"type":"ping"'), 1007),
    "array": (lambda rng: _fragments(rng, b"[1,2]"), 1007),
    "too-big-in-fragments": (lambda rng: _fragments(rng, b'{"type":"ping","message":"%s"}' % TOO_BIG, 200), 1009),
    "reserved-opcode": (lambda rng: encode_frame(rng.choice([3, 7, 0xB, 0xF]), b"{}"), 1002),
    "rsv-bit": (lambda rng: encode_frame(TEXT, b'{"type":"ping"}', rsv=rng.choice([1, 2, 4])), 1002),
    "continuation-first": (lambda rng: encode_frame(CONTINUATION, b'{"type":"ping"}'), 1002),
    "control-frame-fragmented": (lambda rng: encode_frame(PING, b"x", fin=False), 1002),
    "unmasked": (lambda rng: encode_frame(TEXT, b'{"type":"ping"}', mask=False), 1002),
}


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value: text with non-ASCII, escapes and control characters, numbers, nesting."""
    pick = rng.randrange(8 if depth < 4 else 5)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.randrange(-(1 << 70), 1 << 70)
    if pick == 3:
        return rng.uniform(-1e9, 1e9)
    if pick == 4:
        alphabet = 'ab "\\/\n\t\x00\x1féü€😀\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(200)))
    if pick == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {f"k{i}{rng.choice(['', 'é', '😀'])}": _value(rng, depth + 1) for i in range(rng.randrange(5))}


def _fragments(rng: random.Random, payload: bytes, pieces: int | None = None) -> bytes:
    """``payload`` as one text message in random fragments (cut anywhere, even inside a UTF-8
    sequence), with random control frames between them."""
    count = pieces if pieces is not None else rng.choice([1, 1, 2, 3, rng.randrange(1, 40)])
    cuts = sorted(rng.sample(range(1, len(payload)), min(count, len(payload)) - 1)) if len(payload) > 1 else []
    parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    out = bytearray()
    for i, part in enumerate(parts):
        out += encode_frame(TEXT if i == 0 else CONTINUATION, part, fin=i == len(parts) - 1)
    return bytes(out)


def _segments(rng: random.Random, data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        size = rng.choice([1, 2, 3, 7, 13, 100, 1000, 4096])
        out.append(data[i:i + size])
        i += size
    return out


async def _read_until(client: HostileClient, texts: int, pongs: int) -> tuple[list[Any], list[bytes]]:
    """The next ``texts`` text frames (parsed) and ``pongs`` pong payloads; nothing else but
    protocol pings from the server (answered) may come between."""
    got_texts: list[Any] = []
    got_pongs: list[bytes] = []
    for _ in range(10 * (texts + pongs) + 100):
        if len(got_texts) == texts and len(got_pongs) == pongs:
            break
        frame = await client.read_frame(timeout=10)
        if frame.opcode == TEXT:
            got_texts.append(json.loads(frame.text))
        elif frame.opcode == PONG:
            got_pongs.append(frame.payload)
        elif frame.opcode == PING:
            client.send_frame(PONG, frame.payload)
        else:
            raise AssertionError(f"unexpected frame {frame.opcode}: {frame.payload[:80]!r}")
    return got_texts, got_pongs


@pytest.mark.parametrize("transport", SOCKETS)
async def test_valid_messages_in_random_fragments_segments_and_control_frames_are_all_answered_in_order(
    transport: str,
) -> None:
    rng = random.Random(f"{SEED}:{transport}")
    ending = rng.choice(sorted(ENDINGS))
    print(f"DARA_WIRE_SEED={SEED} ({transport}: ending {ending})")
    config = ServerConfig(max_message_size=MAX_MESSAGE)
    async with running_stack(transport, config) as stack:
        stack.manager.add_ws_handler("echo", lambda channel, data: data)
        assert stack.port is not None
        bystander = await stack.client("bob:s2")
        client, channel = await open_port_channel(stack.port)

        stream = bytearray()
        texts: list[Any] = []
        pongs: list[bytes] = []
        for i in range(MESSAGES):
            if rng.random() < 0.3:
                message: dict[str, Any] = {"type": "ping", "message": None}
                texts.append({"type": "pong", "message": None})
            else:
                data = _value(rng)
                message = {"type": "custom", "message": {"kind": "echo", "data": data, "__rchan": f"r{i}"}}
                texts.append({"type": "custom", "message": {"kind": "echo", "data": data, "__response_for": f"r{i}"}})
            payload = json.dumps(message, ensure_ascii=rng.random() < 0.3).encode()
            assert len(payload) < MAX_MESSAGE
            frames = _fragments(rng, payload)
            # Control frames may come between any two frames, inside a fragmented message too.
            while rng.random() < 0.3:
                ping = os.urandom(rng.randrange(126))
                pongs.append(ping)
                stream += encode_frame(PING, ping)
                stream += encode_frame(PONG, os.urandom(rng.randrange(126)))  # unsolicited: ignored
            stream += frames

        async def broadcasts() -> None:
            for n in range(200):
                await stack.manager.broadcast({"seq": n, "pad": "é" * (n % 50)}, ignore_channel=channel)
                await asyncio.sleep(0)

        async def write() -> None:
            for segment in _segments(rng, bytes(stream)):
                client.write(segment)
                await asyncio.sleep(0)  # the server reads before the next segment is written
            assert await client.drain()

        async def bystander_requests() -> list[Any]:
            return [await bystander.request("echo", {"n": n}) for n in range(20)]

        _, answered, _, (got_texts, got_pongs) = await asyncio.gather(
            broadcasts(), bystander_requests(), write(), _read_until(client, len(texts), len(pongs)))
        assert got_texts == texts
        assert got_pongs == pongs

        make, code = ENDINGS[ending]
        for segment in _segments(rng, make(rng)):
            client.write(segment)
            await asyncio.sleep(0)
        assert await client.read_close(timeout=10) == code, ending

        assert answered == [{"n": n} for n in range(20)]
        received: list[PushedMessage] = []
        for _ in range(200):
            received.append(await bystander.receive(timeout=10))
        assert [m.message.model_dump() for m in received] == [{"seq": n, "pad": "é" * (n % 50)} for n in range(200)]
        await client.close()


@pytest.mark.parametrize("code", [1000, 4000])
@pytest.mark.parametrize("transport", SOCKETS)
async def test_a_close_between_the_fragments_of_a_message_is_answered_with_its_code(transport: str, code: int) -> None:
    """RFC 6455 5.4: control frames may come between the fragments of a message, a close too.
    The unfinished message is abandoned (never handled) and the close answered as any other, with
    its code (websockets failed it with 1002, aiohttp and picows answered it)."""
    async with running_stack(transport) as stack:
        assert stack.port is not None
        client, _ = await open_port_channel(stack.port)
        client.write(encode_frame(TEXT, '{"type":"ping",', fin=False)
                     + encode_frame(CONTINUATION, '"message":', fin=False)
                     + encode_frame(CLOSE, close_payload(code, "bye")))
        assert await client.read_close(timeout=10) == code
        assert await client.wait_disconnected(timeout=10)
