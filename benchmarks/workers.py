"""One process per core (issue 14, item 4): broadcast and per-user delivery throughput of
``dara-ws serve --workers N`` for N = 1, 2, 4, as ratios to N = 1 measured in the same run.

    python -m benchmarks.workers [--workers 1,2,4] [--clients 1000] [--m 20] [--rounds 5]
                                 [--transport picows] [--loop uvloop] [--client-procs 2]

Each N runs the demo server (``python -m dara_ws_cli serve --workers N``) on one port with a private
``redis-server`` as the backplane, so the clients, spread by the kernel over the workers, form one
cluster. The load is the benchmark suite's lean clients (:mod:`benchmarks.client`, ``fanout`` mode:
they count frames carrying ``"bench"`` and report when the last one of a round arrived) and one
driver connection in this process that asks the demo for the pushes:

* broadcast: ``--m`` ``chat`` requests (each broadcast to every other connection of the cluster);
  deliveries/s = clients x M / time until the last client has the last message;
* per-user: ``--m`` rounds of one ``tell`` per user (a push to each of the user's
  ``--per-user`` connections, on whichever worker they are).

The driver's requests are handled on the worker it landed on; that worker publishes each push once
to Redis and every worker delivers to its own clients. On a machine with fewer cores than N + 1
(the clients need one too) the figures say how N processes share the cores, not how they scale:
run it on a bigger machine for that. The first round of each N is a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .leanws import open_lean
from .procs import ROOT, BenchError, Proc, raise_fd_limit
from .scenarios import round_end

#: Requests the driver keeps in flight (the demo's handler tasks per connection are bounded).
WINDOW = 32


@contextlib.asynccontextmanager
async def cluster(workers: int, redis_url: str, args: argparse.Namespace) -> AsyncIterator[int]:
    """``dara-ws serve --workers N`` on a free port; yields the port, stops it with SIGTERM."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dara_ws_cli", "serve", "--port", "0", "--workers", str(workers),
        "--clock", "0", "--transport", args.transport, "--loop", args.loop, "--redis-url", redis_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=str(ROOT),
    )
    assert process.stdout is not None
    drain: asyncio.Future[bytes] | None = None
    try:
        port = 0
        async with asyncio.timeout(60):
            while not port:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise BenchError(f"dara-ws --workers {workers} exited before it was ready")
                if line.startswith("dara-ws: " if workers > 1 else "dara-ws demo"):
                    port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
        drain = asyncio.ensure_future(process.stdout.read())  # the workers' lines, never blocking them
        yield port
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 40)
            except TimeoutError:
                process.kill()
                await process.wait()
        if drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(drain, 5)


class Driver:
    """One lean connection that sends the demo's requests with at most ``WINDOW`` in flight."""

    def __init__(self) -> None:
        self.replies = 0
        self._more = asyncio.Event()

    async def open(self, port: int) -> None:
        self.ws = await open_lean(port, "/api/core/ws?token=driver", self._on_text)

    def _on_text(self, text: bytes) -> None:
        if b"__response_for" in text:
            self.replies += 1
            self._more.set()

    async def ask(self, requests: list[tuple[str, Any]]) -> None:
        start = self.replies
        for sent, (kind, data) in enumerate(requests):
            while sent - (self.replies - start) >= WINDOW:
                self._more.clear()
                await asyncio.wait_for(self._more.wait(), 60)
            self.ws.send_text(json.dumps({"type": "custom", "message": {
                "kind": kind, "data": data, "__rchan": f"d{sent}"}}).encode())


async def measure(workers: int, redis_url: str, args: argparse.Namespace, kind: str) -> dict[str, float]:
    users = args.clients // args.per_user if kind == "per_user" else args.clients
    per_user = args.per_user if kind == "per_user" else 1
    async with cluster(workers, redis_url, args) as port, contextlib.AsyncExitStack() as stack:
        procs = max(1, min(args.client_procs, users))
        starts, first = [], 0
        for k in range(procs):
            count = users // procs + (1 if k < users % procs else 0)
            starts.append(stack.enter_async_context(Proc.start(
                f"client-workers{workers}-{kind}-{k}", "benchmarks.client", "--mode", "fanout",
                "--port", str(port), "--first", str(first), "--users", str(count),
                "--per-user", str(per_user), "--m", str(args.m), ready_timeout=120)))
            first += count
        clients = list(await asyncio.gather(*starts))
        driver = Driver()
        await driver.open(port)
        await asyncio.sleep(0.5)  # the last registrations reach Redis
        times = []
        for r in range(args.rounds + 1):
            requests: list[tuple[str, Any]]
            if kind == "broadcast":
                requests = [("chat", {"bench": r, "n": i}) for i in range(args.m)]
            else:
                requests = [("tell", {"user": f"user-{u}", "text": {"bench": r, "n": i}})
                            for i in range(args.m) for u in range(users)]
            t0 = time.monotonic()
            await driver.ask(requests)
            times.append(await round_end(clients, r) - t0)
            await asyncio.sleep(0.2)
        driver.ws.abort()
    total = statistics.median(times[1:])
    conns = users * per_user
    return {"conns": conns, "deliveries_per_s": conns * args.m / total, "round_ms": total * 1000,
            "worst_ms": max(times[1:]) * 1000}


async def run(args: argparse.Namespace, redis_url: str) -> list[dict[str, Any]]:
    rows = []
    for kind in ("broadcast", "per_user"):
        base = None
        for workers in args.workers:
            figures = await measure(workers, redis_url, args, kind)
            base = base or figures["deliveries_per_s"]
            rows.append({"scenario": kind, "workers": workers, **figures,
                         "x_one_worker": figures["deliveries_per_s"] / base})
            print(f"| {kind} | {workers} | {figures['conns']} | {figures['deliveries_per_s']:,.0f} | "
                  f"{figures['round_ms']:.1f} | {figures['worst_ms']:.1f} | "
                  f"{figures['deliveries_per_s'] / base:.2f}x |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (the first is the baseline)")
    parser.add_argument("--clients", type=int, default=1000, help="client connections")
    parser.add_argument("--per-user", type=int, default=4, help="connections per user (per-user scenario)")
    parser.add_argument("--m", type=int, default=20, help="messages per round")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (after one warm-up)")
    parser.add_argument("--transport", choices=["websockets", "picows"], default="picows")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--client-procs", type=int, default=1, help="client load processes")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    args = parser.parse_args(argv)
    args.workers = [int(n) for n in args.workers.split(",")]
    raise_fd_limit()
    sys.path.insert(0, str(ROOT))
    from tests.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="dara-ws-workers-") as tmp:
        redis = RedisServer(Path(tmp))
        redis.start()
        try:
            print(f"## dara-ws serve --workers: {args.transport} on {args.loop}, {os.cpu_count()} CPUs, "
                  f"{args.clients} clients, M={args.m}, {args.rounds} rounds\n\n"
                  "| scenario | workers | clients | deliveries_per_s | round_ms | worst_ms | x 1 worker |\n"
                  "|---|---|---|---|---|---|---|", flush=True)
            rows = asyncio.run(run(args, redis.url))
        finally:
            redis.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
