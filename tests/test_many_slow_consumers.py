"""Many connections that read nothing, each within its own bounds (review 11): together they must
not make the process queue without bound, and a healthy client beside them is not harmed.

Each attacker is a raw socket with a tiny receive window that never reads, flooding ``echo``
requests of seeded random sizes: every reply stays queued for it. One such connection holds at
most ``max_queue_bytes``; before ``max_queued_total_bytes``, N of them held N times that (20 on
websockets with the defaults: about 400 MiB more RSS). The server's queues together must stay
within ``max_queued_total_bytes`` plus, for each connection, its floor (a 256th of it) and one
reply; meanwhile the healthy client gets every broadcast tick within ``PUSH_BOUND`` and every
echo answered (``tests.helpers.Healthy``).

The seed is printed in every failure and can be replayed with ``DARA_HOSTILE_SEED=<seed>``;
every attack is bounded in count (frames) and time (``ATTACK`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time

import pytest

from dara_ws_core import ServerConfig
from dara_ws_core.queue import TOTAL_SHARES

from .helpers import Healthy, ticker
from .hostile import TEXT, HostileClient, encode_frame
from .stacks import TRANSPORTS, running_stack

SOCKETS = sorted(t for t in TRANSPORTS if t != "memory")
KiB, MiB = 1024, 1024 * 1024
ATTACKERS = 8
#: The largest echo request an attacker sends (its reply is as large, and a few bytes more).
MAX_FRAME = 96 * KiB
ATTACK = 2.0
CONFIG = dict(max_queue_bytes=2 * MiB, max_queued_total_bytes=4 * MiB, ping_interval=None)
SEED = int(os.environ.get("DARA_HOSTILE_SEED", random.randrange(2**32)))


def _echo(channel_id: str, data: object) -> object:
    return data


def _requests(rng: random.Random, attacker: int) -> list[bytes]:
    """A few echo request frames of random sizes (1 KiB to ``MAX_FRAME``)."""
    frames = []
    for n in range(4):
        size = rng.randrange(KiB, MAX_FRAME)
        text = json.dumps({"type": "custom", "message": {
            "kind": "echo", "data": "x" * size, "__rchan": f"a{attacker}-{n}"}})
        frames.append(encode_frame(TEXT, text))
    return frames


async def _flood(port: int, index: int, frames: list[bytes], clients: list[HostileClient]) -> int:
    client = await HostileClient.open(port, rcvbuf=4096)
    clients.append(client)
    response = await client.handshake(f"/api/core/ws?token=slow{index}:s")
    assert response.status == 101, response
    client.stop_reading()
    sent = 0
    deadline = time.monotonic() + ATTACK
    while (left := deadline - time.monotonic()) > 0 and not client.lost:
        for frame in frames:
            sent += await client.flood(frame, count=16, duration=min(left, 0.25))
    return sent


@pytest.mark.parametrize("transport", SOCKETS)
async def test_connections_that_read_nothing_cannot_together_queue_past_the_process_bound(
        transport: str) -> None:
    rng = random.Random(f"{SEED}-{transport}")
    config = ServerConfig(**CONFIG)  # type: ignore[arg-type]
    async with running_stack(transport, config) as stack:
        manager = stack.manager
        manager.add_ws_handler("echo", _echo)
        tick = asyncio.get_running_loop().create_task(ticker(
            lambda payload: manager.broadcast(payload, custom=True), "tick"))
        healthy = Healthy(lambda: stack.connect("healthy:s1"), ("tick",))
        clients: list[HostileClient] = []
        peak = 0
        try:
            await healthy.start()
            assert stack.port is not None
            attack = asyncio.gather(*(_flood(stack.port, i, _requests(rng, i), clients)
                                      for i in range(ATTACKERS)))
            while not attack.done():  # sampled every 10 ms while the attack lasts
                peak = max(peak, manager.stats().queued_bytes)
                await asyncio.wait((attack,), timeout=0.01)
            sent = attack.result()
            figures = await healthy.stop()
        finally:
            tick.cancel()
            for client in clients:
                client.abort()
            with contextlib.suppress(asyncio.CancelledError):
                await tick
    floor = config.max_queued_total_bytes // TOTAL_SHARES
    bound = config.max_queued_total_bytes + (ATTACKERS + 2) * (floor + MAX_FRAME + KiB)
    seen = f"seed {SEED} ({transport}): {sum(sent)} requests sent, queued at most {peak} bytes"
    # The attack must have been able to fill the queues past the bound: else it proves nothing.
    assert ATTACKERS * config.max_queue_bytes > 2 * bound
    assert peak <= bound, f"{seen}, over {bound}"
    assert not healthy.violations(figures), f"{seen}: {healthy.violations(figures)} {figures}"


async def test_one_address_that_reads_nothing_cannot_make_another_clients_pushes_dropped() -> None:
    """Connections of one client address (127.0.0.1) that read nothing filled
    ``max_queued_total_bytes`` on their own: every other client's queue was then full past a
    256th of it, and under ``drop_oldest`` a client on another address (127.0.0.2) that had
    fallen a little behind (pushes of 512 KiB in all, a quarter of its own ``max_queue_bytes``)
    lost frames to that backlog. One address's queues now hold at most a quarter of the total
    before each of them is held to its 256th: the bystander keeps every frame."""
    config = ServerConfig(**CONFIG, slow_consumer_policy="drop_oldest")  # type: ignore[arg-type]
    rng = random.Random(f"{SEED}-bystander")
    async with running_stack("websockets", config) as stack:
        manager = stack.manager
        manager.add_ws_handler("echo", _echo)
        assert stack.port is not None
        bystander = await HostileClient.open(stack.port, rcvbuf=4096, local="127.0.0.2")
        clients: list[HostileClient] = [bystander]
        try:
            response = await bystander.handshake("/api/core/ws?token=bystander:s")
            assert response.status == 101, response
            channel = json.loads((await bystander.read_frame()).text)["message"]["channel"]
            bystander.stop_reading()  # behind for a moment, as a reader on a slow link is
            attack = asyncio.gather(*(_flood(stack.port, i, _requests(rng, i), clients)
                                      for i in range(ATTACKERS)))
            peak = 0
            while not attack.done():  # sampled every 10 ms while the attack lasts
                peak = max(peak, manager.stats().queued_bytes)
                await asyncio.wait((attack,), timeout=0.01)
            attack.result()
            pushes = 32
            for n in range(pushes):
                await manager.send_message(channel, {"n": n, "pad": "p" * (16 * KiB)})
            handler = manager.handlers[channel]
            dropped = handler.dropped
            bystander.resume_reading()
            got: list[int] = []
            async with asyncio.timeout(10):
                while len(got) < pushes - dropped:
                    got.append(json.loads((await bystander.read_frame(timeout=10)).text)["message"]["n"])
        finally:
            for client in clients:
                client.abort()
    seen = f"seed {SEED}: queued at most {peak} bytes, the bystander's queue dropped {dropped}"
    assert dropped == 0, seen
    assert got == list(range(pushes)), seen
