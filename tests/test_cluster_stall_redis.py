"""A stuck local client (policy ``wait``, ``send_timeout=2``) never delays a broadcast or a
per-user send to another process (issue 12 item 2), on a real ``redis-server``: two managers in
this process, each with its own ``RedisBackplane``. Prints the worst delay with and without the
stuck client (the figure the issue asks for)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest

from dara_ws_core import DaraServerMessage, ServerConfig, WebsocketManager
from dara_ws_redis import RedisBackplane

from .helpers import LOAD_FACTOR
from .stacks import running_stack
from .test_backplane_redis import HEARTBEAT, TIMEOUT

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

# A correctness bound (a stuck client used to cost send_timeout = 2 s), not speed: room for a
# loaded machine (tests/helpers.py), never up to the stall it is there for.
NO_STALL = min(1.0 * LOAD_FACTOR, 1.8)


def who() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- no stall (item 2)


@contextlib.asynccontextmanager
async def two_managers(url: str, config: ServerConfig) -> AsyncIterator[list[Any]]:
    async with contextlib.AsyncExitStack() as exits:
        stacks = []
        for _ in range(2):
            backplane = RedisBackplane(url, heartbeat_interval=HEARTBEAT, namespace="stall")
            manager = WebsocketManager(config, backplane=backplane)
            exits.push_async_callback(backplane.stop)
            stack = await exits.enter_async_context(running_stack("memory", manager=manager))
            await backplane.start(manager)
            stacks.append(stack)
        yield stacks


async def worst_delay(stacks: list[Any], stuck: bool, fan_out: str) -> float:
    user = who()
    sender, receiver = stacks
    blocked = await sender.connect(f"{user}:stuck") if stuck else None  # never reads
    remote = await receiver.client(f"{user}:remote", max_queue=100_000)
    for stack in stacks:
        await stack.manager.backplane.flush()
    worst = 0.0
    for i in range(100):
        started = time.monotonic()
        if fan_out == "broadcast":
            await sender.manager.broadcast({"i": i})
        else:
            await sender.manager.send_message_to_user(user, {"i": i})
        while True:  # skip other tests' traffic: only this run's frames count
            message = await remote.receive(TIMEOUT)
            assert isinstance(message, DaraServerMessage)
            if message.message.model_dump().get("i") == i:
                break
        worst = max(worst, time.monotonic() - started)
    if blocked is not None:
        await blocked.close()
    return worst


@pytest.mark.parametrize("fan_out", ["broadcast", "user"])
async def test_a_stuck_local_client_never_delays_another_process(
    redis_server: RedisServer, fan_out: str,
) -> None:
    config = ServerConfig(max_queue_messages=8, send_timeout=2.0)  # policy: wait
    async with two_managers(redis_server.url, config) as stacks, asyncio.timeout(60):
        baseline = await worst_delay(stacks, stuck=False, fan_out=fan_out)
        with_stuck = await worst_delay(stacks, stuck=True, fan_out=fan_out)
    print(f"\n{fan_out}: worst cross-process delay {baseline * 1000:.1f} ms without a stuck "
          f"client, {with_stuck * 1000:.1f} ms with one")
    assert with_stuck < NO_STALL


# --------------------------------------------------------------------------- the outbox's cost


async def test_the_outbox_cost_benchmark_measures_every_case_at_tiny_size(
    redis_server: RedisServer,
) -> None:
    from benchmarks.backplane import measure_outbox, outbox_report

    rows = await measure_outbox(redis_server.url, sends=20, repeats=1)
    assert len(rows) == 5
    assert all(row.off_us > 0 and row.on_us > 0 for row in rows)
    assert outbox_report(rows, 20).count("\n| ") == 6  # the header and five cases
