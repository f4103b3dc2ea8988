"""The Redis backplane benchmark (issue 6): cross-process figures as ratios to single-process ones
measured in the same run.

    python -m benchmarks.backplane [--clients 1000] [--rounds 40] [--burst 50] [--asks 500]
                                   [--outbox-sends 5000] [--outbox-only]
                                   [--out benchmarks/RESULTS-backplane.md]

Layouts, all with server processes from ``tests.backplane_node`` (websockets transport, one
manager each) on 127.0.0.1, a private ``redis-server`` on a free port, and the clients in this
process:

* ``1 process``: every client on one node, no backplane (the single-process baseline);
* ``1 process + Redis``: the same with the Redis backplane attached (what publishing costs when
  no other process listens);
* ``2 processes + Redis``: the clients split evenly over two nodes; the broadcast is issued on
  the first, so half of the deliveries cross Redis.

Scenarios:

* broadcast latency: one broadcast at a time, time until the *last* client has it (median and
  p90 of ``--rounds``);
* broadcast burst: ``--burst`` broadcasts back to back, deliveries per second until every client
  has them all;
* send_and_wait round trip: ``--asks`` sequential requests from node A to one client, on A
  (local) or on B (across Redis), timed inside node A.

Outbox cost (issue 12): ``send_message_to_user`` with the per-user outbox on and off in the same
run, in this process (``--outbox-only`` runs just that).

The clients are the benchmark suite's lean clients (:mod:`benchmarks.leanws`) that only count
frames (no JSON parsing), so the client side costs the same in every layout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from dara_ws_core import DaraClient
from dara_ws_websockets import connect
from tests.backplane_node import NodeProcess
from tests.redis_server import RedisServer

from .leanws import LeanWS, open_lean

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- clients


class Counters:
    """Frames received per client (after ``init``), and a wait for "everyone has ``n``"."""

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.target = 0
        self.reached = 0
        self.done = asyncio.Event()

    def expect(self, target: int) -> None:
        self.target = target
        self.reached = sum(1 for c in self.counts if c >= target)
        self.done = asyncio.Event()
        if self.reached == len(self.counts):
            self.done.set()

    def hit(self, index: int) -> None:
        count = self.counts[index] = self.counts[index] + 1
        if count == self.target:
            self.reached += 1
            if self.reached == len(self.counts):
                self.done.set()


@contextlib.asynccontextmanager
async def counting_clients(
    nodes: Sequence[NodeProcess], total: int
) -> AsyncIterator[Counters]:
    """``total`` lean clients spread evenly over ``nodes``, counting the frames they receive
    (``init`` included: every count starts at 1)."""
    counters = Counters(total)
    sockets: list[LeanWS] = []
    try:
        for i in range(total):
            node = nodes[i % len(nodes)]
            sockets.append(await open_lean(node.port, f"/api/core/ws?token=c{i}:s",
                                           functools.partial(_hit, counters, i)))
        counters.expect(1)
        async with asyncio.timeout(30):
            await counters.done.wait()
        yield counters
    finally:
        for ws in sockets:
            ws.abort()


def _hit(counters: Counters, index: int, payload: bytes) -> None:
    counters.hit(index)


async def control(node: NodeProcess, token: str = "ctl:ctl") -> DaraClient:
    client = DaraClient(lambda: connect(node.url(token)), ping_interval=None)
    await client.connect()
    return client


async def op(client: DaraClient, name: str, timeout: float = 120.0, **data: Any) -> Any:
    reply = await client.request(f"bp.{name}", data, timeout=timeout)
    if "error" in reply:
        raise RuntimeError(f"bp.{name} failed: {reply}")
    return reply["ok"]


# --------------------------------------------------------------------------- scenarios


@dataclass
class Broadcast:
    layout: str
    p50_ms: float
    p90_ms: float
    deliveries_per_s: float
    published_per_broadcast: float


@dataclass
class Ask:
    layout: str
    p50_us: float
    p90_us: float
    p99_us: float


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_broadcast(layout: str, nodes: Sequence[NodeProcess], args: argparse.Namespace,
                            ) -> Broadcast:
    async with counting_clients(nodes, args.clients) as counters:
        ctl = await control(nodes[0])
        try:
            for node in nodes:  # every client registered in Redis before the first broadcast
                flusher = await control(node, "flush:flush")
                await op(flusher, "flush")
                await flusher.close()
            before = (await op(ctl, "stats")).get("published", 0)
            received = 1
            latencies = []
            for _ in range(args.rounds + 3):
                received += 1
                counters.expect(received)
                started = time.perf_counter()
                await op(ctl, "bench_broadcast", n=1, message={"t": "x" * 64})
                async with asyncio.timeout(30):
                    await counters.done.wait()
                latencies.append(time.perf_counter() - started)
            latencies = latencies[3:]  # warm-up
            received += args.burst
            counters.expect(received)
            started = time.perf_counter()
            await op(ctl, "bench_broadcast", n=args.burst, message={"t": "x" * 64})
            async with asyncio.timeout(120):
                await counters.done.wait()
            burst = time.perf_counter() - started
            await op(ctl, "flush")  # the last publications may still be in the outbox
            stats = await op(ctl, "stats")
            if stats.get("failed"):
                raise RuntimeError(f"the backplane failed to publish: {stats}")
            published = stats.get("published", 0) - before
        finally:
            await ctl.close()
    return Broadcast(
        layout, statistics.median(latencies) * 1e3, pct(latencies, 0.9) * 1e3,
        args.clients * args.burst / burst, published / (args.rounds + 3 + args.burst),
    )


async def measure_ask(layout: str, asker: NodeProcess, owner: NodeProcess,
                      args: argparse.Namespace) -> Ask:
    responder = DaraClient(lambda: connect(owner.url("responder:s")), ping_interval=None)
    responder.on_request(lambda request: {"i": request.payload["i"]})
    await responder.connect()
    ctl = await control(asker)
    try:
        flusher = await control(owner, "flush:flush")
        await op(flusher, "flush")
        await flusher.close()
        await op(ctl, "bench_ask", channel=responder.channel, n=50)  # warm-up
        times = await op(ctl, "bench_ask", channel=responder.channel, n=args.asks)
    finally:
        await ctl.close()
        await responder.close()
    return Ask(layout, statistics.median(times) * 1e6, pct(times, 0.9) * 1e6, pct(times, 0.99) * 1e6)


@contextlib.asynccontextmanager
async def nodes_running(redis_url: str | None, count: int, logs: Path) -> AsyncIterator[
    list[NodeProcess]
]:
    nodes = [NodeProcess(redis_url, logs / f"node-{redis_url is not None}-{count}-{i}.log")
             for i in range(count)]
    try:
        for node in nodes:
            node.spawn()
        for node in nodes:
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


# --------------------------------------------------------------------------- report


# --------------------------------------------------------------------------- outbox cost


@dataclass
class OutboxCost:
    case: str
    off_us: float
    on_us: float


async def _sends_per_call(manager: Any, user: str, sends: int) -> float:
    """Microseconds per ``send_message_to_user``, the bus's acknowledgements included."""
    backplane = manager.backplane
    started = time.perf_counter()
    for i in range(sends):
        await manager.send_message_to_user(user, {"i": i, "task": "done"})
    if backplane is not None:
        await backplane.flush()
    return (time.perf_counter() - started) / sends * 1e6


async def measure_outbox(redis_url: str, sends: int, repeats: int = 3) -> list[OutboxCost]:
    """``send_message_to_user`` with the per-user outbox on and off, in this process, the two
    interleaved ``repeats`` times (best of each kept): to a user connected nowhere, on this
    process (a connection that writes nothing: its frames are queued and recorded for the
    acknowledgements) and on another process. With the outbox on, every one is appended to the
    user's history (with Redis, a Stream entry trimmed to 100, in the script that publishes)."""
    from dara_ws_core import Identity, ServerConfig, WebsocketManager
    from dara_ws_redis import RedisBackplane

    async def manager_of(outbox: bool, redis: bool, ns: str) -> Any:
        config = ServerConfig(outbox_messages=100 if outbox else 0, max_queue_messages=1_000_000,
                              max_queue_bytes=1 << 30)
        backplane = RedisBackplane(redis_url, namespace=ns) if redis else None
        manager = WebsocketManager(config, backplane=backplane)
        if backplane is not None:
            await backplane.start(manager)
        return manager

    results: dict[str, dict[bool, list[float]]] = {}
    cases = ("no backplane, user connected nowhere", "no backplane, user connected here",
             "Redis, user connected nowhere", "Redis, user connected here",
             "Redis, user connected on another process")
    for _ in range(repeats):
        for outbox in (False, True):
            ns = f"bench-{os.getpid()}-{int(outbox)}-{time.monotonic_ns()}"
            alone = await manager_of(outbox, False, ns)
            a = await manager_of(outbox, True, ns)
            b = await manager_of(outbox, True, ns)
            try:
                b.create_handler("elsewhere", Identity(user_id="there", session_id="s"))
                alone.create_handler("here", Identity(user_id="here", session_id="s"))
                a.create_handler("here", Identity(user_id="here", session_id="s"))
                await b.backplane.flush()
                await a.backplane.flush()
                timings = (await _sends_per_call(alone, "nowhere", sends),
                           await _sends_per_call(alone, "here", sends),
                           await _sends_per_call(a, "nowhere", sends),
                           await _sends_per_call(a, "here", sends),
                           await _sends_per_call(a, "there", sends))
            finally:
                b.remove_handler("elsewhere")
                alone.remove_handler("here")
                a.remove_handler("here")
                await a.backplane.stop()
                await b.backplane.stop()
            for case, value in zip(cases, timings, strict=True):
                results.setdefault(case, {False: [], True: []})[outbox].append(value)
    return [OutboxCost(case, min(r[False]), min(r[True])) for case, r in results.items()]


def outbox_report(rows: list[OutboxCost], sends: int) -> str:
    lines = [
        "### Outbox cost on the send path (issue 12)",
        "",
        f"`send_message_to_user` x {sends}, in one process, outbox off then on, interleaved 3 "
        "times (best of each); with Redis the time includes the bus acknowledging every "
        "message (pipelined).",
        "",
        "| case | outbox off µs/send | outbox on µs/send | ratio on/off |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row.case} | {row.off_us:.1f} | {row.on_us:.1f} "
                     f"| {row.on_us / row.off_us:.2f} |")
    return "\n".join(lines) + "\n"


def versions() -> str:
    out = [f"Python {platform.python_version()}"]
    for dist in ("websockets", "redis", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{dist} {metadata.version(dist)}")
    return ", ".join(out)


def report(broadcasts: list[Broadcast], asks: list[Ask], args: argparse.Namespace,
           redis_version: str) -> str:
    base_b, base_a = broadcasts[0], asks[0]
    lines = [
        "## Redis backplane (issue 6)",
        "",
        f"`python -m benchmarks.backplane --clients {args.clients} --rounds {args.rounds} "
        f"--burst {args.burst} --asks {args.asks}`, {time.strftime('%Y-%m-%d')}; "
        f"{platform.machine()}, {_cpus()} CPU(s); {versions()}; {redis_version}. Server "
        "processes, redis-server and the clients share the machine. Ratios are against the "
        "single-process row measured in the same run (latency: lower is better, <1 is faster; "
        "throughput: higher is better).",
        "",
        f"### Broadcast to {args.clients} clients",
        "",
        "| layout | p50 latency ms | ratio | p90 ms | burst deliveries/s | ratio "
        "| bus messages per broadcast |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in broadcasts:
        lines.append(
            f"| {b.layout} | {b.p50_ms:.2f} | {b.p50_ms / base_b.p50_ms:.2f} | {b.p90_ms:.2f} "
            f"| {b.deliveries_per_s:,.0f} | {b.deliveries_per_s / base_b.deliveries_per_s:.2f} "
            f"| {b.published_per_broadcast:.2f} |"
        )
    lines += [
        "",
        "### send_and_wait round trip (node A asks one client)",
        "",
        "| layout | p50 µs | ratio | p90 µs | p99 µs | ratio p99 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in asks:
        lines.append(
            f"| {a.layout} | {a.p50_us:.0f} | {a.p50_us / base_a.p50_us:.2f} | {a.p90_us:.0f} "
            f"| {a.p99_us:.0f} | {a.p99_us / base_a.p99_us:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


async def main(args: argparse.Namespace, redis: RedisServer, logs: Path) -> str:
    redis_version = args.redis_version
    try:
        outbox = ""
        if args.outbox_sends:
            outbox = "\n" + outbox_report(await measure_outbox(redis.url, args.outbox_sends),
                                          args.outbox_sends)
        if args.outbox_only:
            return outbox.lstrip()
        broadcasts, asks = [], []
        async with nodes_running(None, 1, logs) as (alone,):
            broadcasts.append(await measure_broadcast("1 process", [alone], args))
            asks.append(await measure_ask("1 process (local client)", alone, alone, args))
        async with nodes_running(redis.url, 1, logs) as (alone,):
            broadcasts.append(await measure_broadcast("1 process + Redis", [alone], args))
        async with nodes_running(redis.url, 2, logs) as (a, b):
            broadcasts.append(await measure_broadcast(
                f"2 processes + Redis ({args.clients // 2} + {args.clients - args.clients // 2})",
                [a, b], args))
            asks.append(await measure_ask("2 processes + Redis (client on B)", a, b, args))
        print(f"logs: {logs}", file=sys.stderr)
        return report(broadcasts, asks, args, redis_version) + outbox
    finally:
        redis.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--asks", type=int, default=500)
    parser.add_argument("--outbox-sends", type=int, default=5000,
                        help="per-user sends per case of the outbox cost scenario (0: skip it)")
    parser.add_argument("--outbox-only", action="store_true",
                        help="run only the outbox cost scenario")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the Markdown section there (e.g. benchmarks/RESULTS-backplane.md)")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="dara-ws-backplane-bench-"))
    redis = RedisServer(logs)
    args.redis_version = subprocess.run([redis.binary, "--version"], capture_output=True,
                                        text=True, check=False).stdout.split(" sha=")[0]
    redis.start()
    text = asyncio.run(main(args, redis, logs))
    print(text)
    if args.out is not None:
        args.out.write_text("# Benchmark results: Redis backplane\n\n" + text)


if __name__ == "__main__":
    cli()
