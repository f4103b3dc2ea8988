"""What telemetry costs the server, in one process: ``python -m benchmarks.overhead``.

The end-to-end scenarios (``python -m benchmarks.run --impls ours,ours-otel``) include clients,
sockets and the kernel, and on a shared machine their run-to-run spread is wider than the cost
being measured. This measures the server's own work only, with modes alternating in every
repetition so a change of load hits them alike:

Every figure is CPU time of this process (``time.process_time_ns``), not wall time: on a
machine shared with other jobs, wall time mostly measures how often the scheduler lets the
process run.

* ``fanout``: ``manager.broadcast()`` to N channels whose transport accepts every frame at once
  (a sink that only counts): CPU nanoseconds per delivery. No transport work is included, so the
  ratio is an upper bound of what a real server sees (its transport's write costs microseconds
  per frame more in every mode).
* ``round_trip``: ``manager.send_and_wait()`` to a ``DaraClient`` over the in-memory transport,
  answered at once, one at a time: CPU microseconds per request, both sides included.

Modes: ``off`` (no ``instrument()``), ``counts`` (counts only: nothing sampled), ``on``
(``instrument()`` with the default ``sample_every``, or ``--sample-every``), ``all``
(``sample_every=1``: every operation traced and timed, as Dara does). The SDK's meter
provider aggregates every instrument and its tracer provider records every span (no exporter).
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

MODES: dict[str, int | None] = {"off": None, "counts": 2**31, "on": 64, "all": 1}


class CountingSink:
    """A transport that takes every frame at once and does nothing with it."""

    def __init__(self) -> None:
        self.frames = 0

    def write_now(self, frame: bytes) -> bool:
        self.frames += 1
        return True

    def frames_queued(self) -> None:
        return None

    def write_at_once(self, frame: bytes) -> bool:
        return self.write_now(frame)

    def close(self, code: int, reason: str) -> None:
        return None


def manager_for(mode: str) -> Any:
    from dara_ws_core import WebsocketManager

    manager = WebsocketManager()
    every = MODES[mode]
    if every is not None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider

        from dara_ws_core.telemetry import instrument

        instrument(manager, MeterProvider(metric_readers=[InMemoryMetricReader()]), TracerProvider(),
                   sample_every=every)
    return manager


async def fanout(mode: str, n: int, messages: int) -> float:
    """Nanoseconds per delivery of ``messages`` broadcasts to ``n`` channels."""
    manager = manager_for(mode)
    for k in range(n):
        handler = manager.create_handler(f"c{k}", sink=CountingSink())
        while handler.queue.get_nowait() is not None:  # the init frame
            pass
    for k in range(10):  # warm-up
        await manager.broadcast({"__typename": "Tick", "n": k})
    started = time.process_time_ns()
    for k in range(messages):
        await manager.broadcast({"__typename": "Tick", "n": k})
    return (time.process_time_ns() - started) / (messages * n)


async def round_trip(mode: str, requests: int) -> float:
    """CPU microseconds per request of ``requests`` sequential ``send_and_wait`` calls."""
    from dara_ws_core import DaraClient, Endpoint, MemoryServer, allow_anonymous

    manager = manager_for(mode)
    server = MemoryServer(Endpoint(manager, allow_anonymous()))
    async with DaraClient(server.connect, ping_interval=None) as client:
        client.on_request(lambda request: 1)
        channel = client.channel
        for _ in range(50):  # warm-up
            await manager.send_and_wait(channel, {"q": 1}, timeout=5)
        started = time.process_time_ns()
        for _ in range(requests):
            await manager.send_and_wait(channel, {"q": 1}, timeout=5)
        return (time.process_time_ns() - started) / requests / 1000


async def measure(modes: Sequence[str], reps: int, n: int, messages: int,
                  requests: int) -> dict[str, dict[str, list[float]]]:
    found: dict[str, dict[str, list[float]]] = {"fanout": {}, "round_trip": {}}
    for rep in range(reps):
        order = list(modes[rep % len(modes):]) + list(modes[:rep % len(modes)])
        for mode in order:
            gc.collect()  # the previous measure's garbage is not this one's cost
            found["fanout"].setdefault(mode, []).append(await fanout(mode, n, messages))
            gc.collect()
            found["round_trip"].setdefault(mode, []).append(await round_trip(mode, requests))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="off,on,all", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (modes alternate in each)")
    parser.add_argument("--n", type=int, default=1000, help="channels of the fan-out")
    parser.add_argument("--messages", type=int, default=50, help="broadcasts per repetition")
    parser.add_argument("--requests", type=int, default=1000, help="round trips per repetition")
    parser.add_argument("--sample-every", type=int, help="sample_every of the 'on' mode")
    args = parser.parse_args(argv)
    if args.sample_every:
        MODES["on"] = args.sample_every
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    found = asyncio.run(measure(modes, args.reps, args.n, args.messages, args.requests))
    # A mode's ratio to off is taken per repetition (the two ran moments apart, under the same
    # load), then the median and spread of those ratios are shown.
    print("| measure | mode | median | spread (min-max) | x off: median | x off: spread |\n"
          "|---|---|---|---|---|---|")
    for name, unit in (("fanout", "CPU ns/delivery"), ("round_trip", "CPU us/request")):
        base = found[name].get("off")
        for mode in modes:
            values = found[name][mode]
            ratios = [v / b for v, b in zip(values, base, strict=True)] if base else []
            shown = (f"{statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f}"
                     if ratios else "n/a | n/a")
            print(f"| {name} ({unit}) | {mode} | {statistics.median(values):.1f} | "
                  f"{min(values):.1f}-{max(values):.1f} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
