"""Chaos (issue 12 item 5): three server processes on a real ``redis-server``, users whose clients
reconnect as the stock Dara client does (a new channel after ~500 ms, to whichever process the
"load balancer" picks), and one fault per scenario while a fourth party keeps sending to the users:

* ``kill``: ``kill -9`` of the process holding every user's connection, mid-stream (once what
  was acknowledged so far arrived and its writing was acknowledged: ``quiesced``; or in the
  middle of a paced stream: ``unquiesced``);
* ``redis_restart``: ``redis-server`` restarted (its data lost: no persistence) mid-stream;
* ``delay`` / ``drop`` / ``half_open``: that process's Redis link through :class:`ChaosProxy`,
  delayed, dropped, or half-open for a bounded time.

The invariant, per user: every message whose send the bus acknowledged (appended to the user's
history, whether published to a live process or not) is delivered exactly once, all of them in the
order sent; nothing arrives twice or out of order, acknowledged or not. Pub/sub is at most once,
so what a process missed while its link was dropped or half-open comes from the user's history
when it resubscribes (after the last entry it handed over, deduplicated by id), and what a dead
process had queued and not written reaches the user's next connection (the written mark). The
one window left is measured, not asserted: ``kill_unquiesced`` may deliver again what the dead
process wrote but had not yet acknowledged.

Per scenario: users x phases x messages (``DARA_CHAOS_USERS``, ``DARA_CHAOS_MESSAGES`` per user
and phase: 3 x 10 by default, the CI size); each scenario takes a few seconds. The reconnect delay
is the stock client's 500 ms (``DARA_CHAOS_RECONNECT``). ``DARA_CHAOS_REPORT=path`` appends each
scenario's figures (sent, acknowledged, delivered, duplicated, lost, out of order, gaps reported)
to ``path`` as JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from redis.asyncio import Redis

from dara_ws_core import DaraClient, DaraServerMessage
from dara_ws_websockets import connect

from .backplane_node import NodeProcess
from .chaos_proxy import ChaosProxy
from .test_backplane_redis import Node, eventually, spawn

if TYPE_CHECKING:
    from .redis_server import RedisServer

pytest_plugins = ["tests.redis_server"]

USERS = int(os.environ.get("DARA_CHAOS_USERS", "3"))
MESSAGES = int(os.environ.get("DARA_CHAOS_MESSAGES", "10"))  # per user and phase
RECONNECT = float(os.environ.get("DARA_CHAOS_RECONNECT", "0.5"))  # the stock client's delay
FAULT = 1.5  # seconds a proxy fault lasts
SETTLE = 20.0  # at most this long for every acknowledged message to arrive


class Balancer:
    """The load balancer in front of the server processes: round robin over the live ones."""

    def __init__(self, processes: list[NodeProcess]) -> None:
        self.live = list(processes)
        self._turn = itertools.count()

    def url(self, token: str) -> str:
        live = self.live
        return live[next(self._turn) % len(live)].url(token)


@dataclass
class Subscriber:
    """One user and their reconnecting client; everything they received, in order."""

    user: str
    client: DaraClient
    received: list[int] = field(default_factory=list)
    other: int = 0  # messages that are not this test's (the fence)

    def drain(self) -> None:
        for message in self.client.received_nowait():
            assert isinstance(message, DaraServerMessage)
            body = message.message.model_dump()
            if body.get("u") == self.user:
                self.received.append(body["i"])
            else:
                self.other += 1


@dataclass
class Figures:
    scenario: str
    users: int
    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0
    duplicated: int = 0
    lost: int = 0
    out_of_order: int = 0
    lost_unreported: int = 0
    reconnects: int = 0
    gaps_reported: int = 0
    kept: int = 0  # kept in the outboxes by the sender's bus
    recovered: int = 0  # delivered from the outboxes after a reconnect or a gap
    seconds: float = 0.0

    def report(self) -> None:
        print(f"\nchaos {self.scenario}: {json.dumps(asdict(self))}")
        if path := os.environ.get("DARA_CHAOS_REPORT"):
            with open(path, "a") as out:
                out.write(json.dumps(asdict(self)) + "\n")


async def reconnect_to(balancer: Balancer, token: str) -> Any:
    """Connect through the balancer: each (re)connection is a new channel, as the stock
    client's."""
    return await connect(balancer.url(token))


@contextlib.asynccontextmanager
async def subscribers(balancer: Balancer) -> AsyncIterator[list[Subscriber]]:
    subs = []
    try:
        for _ in range(USERS):
            user = f"u-{uuid.uuid4().hex[:8]}"
            client = DaraClient(functools.partial(reconnect_to, balancer, f"{user}:s"),
                                ping_interval=None, reconnect=True, backoff_initial=RECONNECT,
                                backoff_max=RECONNECT, max_attempts=40)
            await client.connect()
            subs.append(Subscriber(user, client))
        yield subs
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.client.close()


class Run:
    """The sending side of one scenario: a control client on the sender process."""

    def __init__(self, sender: Node, subs: list[Subscriber], figures: Figures) -> None:
        self.sender = sender
        self.subs = subs
        self.figures = figures
        self.acked: dict[str, list[int]] = {s.user: [] for s in subs}
        self._next = dict.fromkeys(self.acked, 0)

    async def phase(self, pace: float = 0.0) -> None:
        """``MESSAGES`` per user, round robin over the users."""
        for _ in range(MESSAGES):
            for sub in self.subs:
                i = self._next[sub.user]
                self._next[sub.user] = i + 1
                self.figures.sent += 1
                if await self.sender.call("user_sure", user=sub.user,
                                          message={"u": sub.user, "i": i}):
                    self.acked[sub.user].append(i)
                if pace:
                    await asyncio.sleep(pace)  # spread over the fault: pacing, not a sync point

    async def everything_arrived(self) -> bool:
        for sub in self.subs:
            sub.drain()
        return all(set(self.acked[s.user]) <= set(s.received) for s in self.subs)

    async def quiesce(self) -> None:
        """Wait until every acknowledged message so far has arrived (bounded)."""
        await eventually(self.everything_arrived, timeout=SETTLE)

    async def finish(self, gap_nodes: list[Node]) -> Figures:
        with contextlib.suppress(TimeoutError):  # measured below if it never comes
            await eventually(self.everything_arrived, timeout=SETTLE)
        # A fence through every process: whatever was still on its way has arrived behind it.
        await self.sender.call("broadcast", message={"fence": True})
        fenced = {s.user: s.other for s in self.subs}
        with contextlib.suppress(TimeoutError):
            await eventually(self._fenced(fenced), timeout=SETTLE)
        reports: dict[str, list[float]] = {}
        for node in gap_nodes:
            for user, report in (await node.call("gaps")).items():
                reports[user] = [a + b for a, b in zip(reports.get(user, [0] * 4), report,
                                                       strict=True)]
        figures = self.figures
        figures.kept = (await self.sender.call("stats"))["kept"]
        for node in gap_nodes:
            stats = await node.call("stats")
            figures.recovered += stats["replayed"] + stats["recovered"]
        for sub in self.subs:
            got = sub.received
            acked = set(self.acked[sub.user])
            figures.acknowledged += len(acked)
            figures.delivered += len(set(got))
            figures.duplicated += len(got) - len(set(got))
            first = list(dict.fromkeys(got))  # the order of first arrivals
            figures.out_of_order += sum(1 for a, b in itertools.pairwise(first) if b <= a)
            lost = len(acked - set(got))
            figures.lost += lost
            figures.reconnects += sub.client.connections - 1
            if sub.user in reports:
                figures.gaps_reported += 1
            elif lost:
                figures.lost_unreported += lost
        return figures

    def _fenced(self, before: dict[str, int]) -> Callable[[], Any]:
        async def check() -> bool:
            for sub in self.subs:
                sub.drain()
            return all(s.other > before[s.user] for s in self.subs)

        return check


def check(figures: Figures, crash: bool = False) -> None:
    """The invariant (see the module docstring): nothing acknowledged lost, nothing out of
    order, nothing twice. ``crash``: duplicates are measured, not asserted (a process killed
    between writing frames to its sockets and acknowledging them: at most the acknowledgement
    interval plus one round trip's worth, delivered again rather than lost)."""
    figures.report()
    assert figures.acknowledged > 0
    assert figures.lost == 0
    assert figures.out_of_order == 0
    if not crash:
        assert figures.duplicated == 0


@pytest.fixture
def logs(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.mark.parametrize("quiesce", [True, False], ids=["quiesced", "unquiesced"])
async def test_chaos_kill_9_of_the_process_holding_the_users(
    redis_factory: Callable[[], RedisServer], logs: Path, quiesce: bool,
) -> None:
    """``quiesced``: killed once what was acknowledged so far has arrived and the holder has
    acknowledged writing it (the users' written marks caught up), so that the one window no
    bus can cover, frames written to a socket but not yet acknowledged when the process dies,
    is left out: nothing lost, nothing twice. ``unquiesced``: killed in the middle of a paced
    stream: what the dead process had queued and not written reaches the next connection
    (nothing lost), and that window's duplicates are measured (reported in the figures)."""
    server = redis_factory()
    processes = spawn(server.url, logs, 3)
    started = time.monotonic()
    redis = Redis.from_url(server.url)
    try:
        sender, _, spare = (Node(p) for p in processes)
        balancer = Balancer([processes[1]])  # every user starts on the holder
        async with subscribers(balancer) as subs, asyncio.timeout(60):
            balancer.live = [processes[1], processes[2]]
            run = Run(sender, subs, Figures("kill" if quiesce else "kill_unquiesced", USERS))
            await run.phase()
            pace = 1.0 / (MESSAGES * USERS)
            if quiesce:
                await run.quiesce()
                await eventually(_written_marks_caught_up(redis, subs))
            else:  # a paced phase running; killed halfway through it
                stream = asyncio.ensure_future(run.phase(pace=pace))
                half = run.figures.sent + MESSAGES * USERS // 2
                await eventually(_at_least(lambda: run.figures.sent, half))
            processes[1].kill()
            balancer.live = [processes[2]]
            if quiesce:
                topic = f"dara-ws:node:{processes[1].node_id}"

                async def unheard() -> bool:  # Redis has noticed the subscription is gone
                    return (await redis.pubsub_numsub(topic))[0][1] == 0

                await eventually(unheard)
                # Over about a second: the clients reconnect (after ~500 ms) in the middle of
                # it, so the messages are kept, then handed over, then live.
                await run.phase(pace=pace)
            else:
                await stream
            await run.phase()
            figures = await run.finish([spare])
        figures.seconds = round(time.monotonic() - started, 1)
        assert figures.reconnects >= USERS  # every user came back on a new channel
        # Through the history: what was kept for nobody, and (unquiesced) what the dead process
        # had queued and not written.
        assert figures.kept > 0 and figures.recovered >= figures.kept
        check(figures, crash=not quiesce)
    finally:
        await redis.aclose()
        for process in processes:
            process.kill()


def _written_marks_caught_up(redis: Redis, subs: list[Subscriber]) -> Callable[[], Any]:
    """Whether the holder has acknowledged, for every user, the last entry of their history
    (written to their connection): the crash window (written, not yet acknowledged) is over."""
    async def caught_up() -> bool:
        for sub in subs:
            newest = await redis.xrevrange(f"dara-ws:outbox:{sub.user}", count=1)
            written = await redis.hget(f"dara-ws:outbox-meta:{sub.user}", "w")
            if not newest or written != newest[0][0]:
                return False
        return True

    return caught_up


def _at_least(value: Callable[[], int], target: int) -> Callable[[], Any]:
    async def reached() -> bool:
        return value() >= target

    return reached


async def test_chaos_redis_restart(
    redis_factory: Callable[[], RedisServer], logs: Path,
) -> None:
    server = redis_factory()
    processes = spawn(server.url, logs, 3)
    started = time.monotonic()
    try:
        sender, holder, _ = (Node(p) for p in processes)
        async with subscribers(Balancer([processes[1]])) as subs, asyncio.timeout(60):
            run = Run(sender, subs, Figures("redis_restart", USERS))
            await run.phase()
            server.restart()  # data lost (no persistence): sends fail until the bus is back
            await run.phase(pace=0.01)
            await run.phase()
            figures = await run.finish([holder])
        figures.seconds = round(time.monotonic() - started, 1)
        check(figures)
    finally:
        for process in processes:
            process.kill()


@pytest.mark.parametrize("mode", ["delay", "drop", "half_open"])
async def test_chaos_the_redis_link_of_one_process(
    redis_factory: Callable[[], RedisServer], logs: Path, mode: str,
) -> None:
    server = redis_factory()
    started = time.monotonic()
    async with ChaosProxy(server.port) as proxy:
        # Spawned from a thread: the proxy runs on this loop, which must keep serving meanwhile.
        processes = await asyncio.to_thread(spawn, server.url, logs, 3,
                                            urls=[server.url, proxy.url, server.url])
        try:
            sender, holder, _ = (Node(p) for p in processes)
            async with subscribers(Balancer([processes[1]])) as subs, asyncio.timeout(60):
                run = Run(sender, subs, Figures(mode, USERS))
                await run.phase()
                await run.quiesce()
                async with proxy.fault(mode, FAULT, delay=0.1):
                    await run.phase(pace=FAULT / (MESSAGES * USERS))
                await run.phase()
                figures = await run.finish([holder])
                stats = await holder.call("stats")
            figures.seconds = round(time.monotonic() - started, 1)
            check(figures)
            if mode != "delay":  # the link was lost, and what it missed recovered
                assert stats["gaps"] >= 1 and stats["recovered"] > 0
        finally:
            for process in processes:
                process.kill()
