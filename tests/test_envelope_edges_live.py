"""Envelope edge cases on every transport (review 11), seeded: what a client's text may hold that
strict JSON parsers and UTF-8 encoders disagree on, echoed back to it and broadcast to others.

A raw attacker sends ``echo`` and ``chat`` requests (``chat`` broadcasts its data to every other
connection) whose data is drawn from a seeded generator: lone UTF-16 surrogate escapes (what
``JSON.stringify`` writes for a lone surrogate of a browser string) in strings and keys, valid
escaped pairs, NUL and line separators, duplicate keys, integers of up to ``MAX_NUMBER_DIGITS``
digits, nesting up to ``MAX_NESTING_DEPTH``. Each must come back, and reach a watching client,
as the protocol says (docs/protocol.md, decoding): a lone surrogate as U+FFFD, the last of
duplicate keys, numbers exact; every frame any client receives is strict JSON in valid UTF-8.
Past the limits (one digit more, one level deeper) the attacker is closed with 1009 and no one
else notices. A healthy client (``tests.helpers.Healthy``) gets every broadcast tick and echo
meanwhile.

The seed is printed in every failure; replay it with ``DARA_HOSTILE_SEED=<seed>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
from typing import Any

import pytest

from dara_ws_core import CustomServerMessage, DaraClient, ServerConfig, WebsocketManager, current_channel
from dara_ws_core.codec import MAX_NESTING_DEPTH, MAX_NUMBER_DIGITS

from .helpers import Healthy, strict_loads, ticker
from .hostile import TEXT, HostileClient, open_channel
from .stacks import TRANSPORTS, running_stack

SEED = int(os.environ.get("DARA_HOSTILE_SEED", random.randrange(2**32)))
REQUESTS = 40
#: Characters drawn into strings: ASCII, escapes JSON needs, a NUL, a line separator, a letter
#: beyond ASCII, an emoji (a surrogate pair once escaped) and both halves of one alone.
ALPHABET = ["a", "Z", " ", '"', "\\", "\x00", "\n", "\u2028", "\u00e9", "\U0001f600", "\ud83d",
            "\ude00", "\udbff", "\udc00"]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 24)))


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 4 else 3)
    if kind == 0:
        return _text(rng)
    if kind == 1:
        digits = rng.choice([1, 19, 20, 40, 400, MAX_NUMBER_DIGITS])
        return rng.choice([1, -1]) * int("9" * digits)
    if kind == 2:
        return rng.choice([None, True, False, 0.5, -0.0, 5e-324, 1.7976931348623157e308])
    if kind == 3:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 4:
        return {_text(rng): _value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}
    return _nested(rng.randrange(1, MAX_NESTING_DEPTH - 4))  # the envelope takes 3 levels


def _nested(levels: int) -> Any:
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _as_received(value: Any) -> Any:
    """What the server makes of ``value`` sent as JSON: every lone surrogate becomes U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_as_received(item) for item in value]
    if isinstance(value, dict):
        return {_as_received(key): _as_received(item) for key, item in value.items()}
    return value


def _request(kind: str, data_json: str, rchan: str) -> str:
    return f'{{"type":"custom","message":{{"kind":"{kind}","data":{data_json},"__rchan":"{rchan}"}}}}'


def _sys_int_digits() -> None:
    # The test itself converts numbers of MAX_NUMBER_DIGITS digits; CPython's default limit
    # (4300) is that bound, so nothing is raised here unless it changes.
    import sys

    assert sys.get_int_max_str_digits() in (0, MAX_NUMBER_DIGITS)


def _serve_demo(manager: WebsocketManager) -> None:
    def echo(channel_id: str, data: Any) -> Any:
        return data

    async def chat(channel_id: str, data: Any) -> dict[str, bool]:
        await manager.broadcast({"kind": "chat", "data": data}, custom=True,
                                ignore_channel=current_channel.get())
        return {"delivered": True}

    manager.add_ws_handler("echo", echo)
    manager.add_ws_handler("chat", chat)


async def _reply(attacker: HostileClient, rchan: str, seen: str) -> Any:
    """The reply to ``rchan``, read past the broadcasts (at most 1,000 frames); every frame is
    strict JSON in valid UTF-8."""
    for _ in range(1000):
        frame = await attacker.read_frame(10)
        assert frame.opcode == TEXT, f"{seen}: request {rchan} closed the connection: {frame}"
        value = strict_loads(frame.payload.decode("utf-8"))
        if value["message"].get("__response_for") == rchan:
            return value
    raise AssertionError(f"{seen}: no reply to {rchan} in 1,000 frames")


async def _chat(watcher: DaraClient, seen: str) -> Any:
    """The data of the next chat push the watcher gets, past the ticks (at most 1,000)."""
    for _ in range(1000):
        pushed = await watcher.receive(timeout=10)
        if isinstance(pushed, CustomServerMessage) and pushed.message.kind == "chat":
            return pushed.message.data
    raise AssertionError(f"{seen}: no chat in 1,000 pushes")


@pytest.mark.parametrize("transport", sorted(t for t in TRANSPORTS if t != "memory"))
async def test_edge_case_envelopes_come_back_and_reach_others_as_valid_strict_json(transport: str) -> None:
    _sys_int_digits()
    rng = random.Random(f"{SEED}-{transport}")
    seen = f"seed {SEED} ({transport})"
    async with running_stack(transport, ServerConfig(ping_interval=None)) as stack:
        manager = stack.manager
        _serve_demo(manager)
        tick = asyncio.get_running_loop().create_task(ticker(
            lambda payload: manager.broadcast(payload, custom=True), "tick"))
        healthy = Healthy(lambda: stack.connect("healthy:s1"), ("tick",))  # chats: strict-checked
        watcher = await stack.client("watcher:s1")
        attacker = None
        try:
            await healthy.start()
            assert stack.port is not None
            attacker, _ = await open_channel(stack.port, path="/api/core/ws?token=mallory:s1")
            chats = []
            for n in range(REQUESTS):
                value = _value(rng)
                data_json = json.dumps(value)  # ensure_ascii: lone surrogates as \\udXXX escapes
                if rng.random() < 0.2 and isinstance(value, dict) and value:
                    # A duplicate key: the last one counts, as in JSON.parse.
                    key = json.dumps(next(iter(value)))
                    data_json = f'{{{key}:"first",{data_json[1:]}' if len(data_json) > 2 else data_json
                kind = rng.choice(["echo", "chat"])
                attacker.send_text(_request(kind, data_json, f"r{n}"))
                reply = await _reply(attacker, f"r{n}", seen)
                expected = _as_received(value)
                got = reply["message"]["data"]
                if kind == "echo":
                    assert got == expected, f"{seen}: echo {n} of {data_json[:200]}"
                else:
                    assert got == {"delivered": True}, f"{seen}: chat {n}: {got}"
                    chats.append(expected)
            for n, expected in enumerate(chats):
                pushed = await _chat(watcher, seen)
                assert pushed == expected, f"{seen}: chat {n} as the watcher got it"
            # One digit more, one level deeper: the attacker alone is closed with 1009.
            for too_much in ("9" * (MAX_NUMBER_DIGITS + 1), json.dumps(_nested(MAX_NESTING_DEPTH))):
                attacker.abort()
                attacker, _ = await open_channel(stack.port, path="/api/core/ws?token=mallory:s1")
                attacker.send_text(_request("chat", too_much, "over"))
                code = await attacker.read_close(10, max_frames=1000)  # ticks may come first
                assert code == 1009, f"{seen}: {too_much[:40]}: closed with {code}"
            figures = await healthy.stop()
            assert watcher.connected, seen
        finally:
            tick.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
            if attacker is not None:
                attacker.abort()
    assert not healthy.violations(figures), f"{seen}: {healthy.violations(figures)} {figures}"

