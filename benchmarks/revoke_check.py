"""What the revocation check costs a backplane with many connections open, in one process: the
CPU of one heartbeat with nothing missed, and of the check that follows a lost subscription
(every connection against the revocations recorded on the bus), with the longest the event loop
waited meanwhile. On the in-process bus by default, on Redis with ``--redis``.

    python -m benchmarks.revoke_check [--channels 10000 100000] [--beats 5]
        [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

__all__ = ["main", "measure"]

import argparse
import asyncio
import time
import uuid
from typing import Any

from dara_ws_core.backplane import BrokerBackplane, MemoryBackplane, MemoryBroker


async def _longest_wait(stop: asyncio.Event) -> float:
    """The longest the event loop took to come back to this task, in seconds, until ``stop``."""
    loop = asyncio.get_running_loop()
    worst, last = 0.0, loop.time()
    while not stop.is_set():
        await asyncio.sleep(0)
        now = loop.time()
        worst, last = max(worst, now - last), now
    return worst


async def _timed(work: Any) -> tuple[float, float]:
    """(CPU ms, longest event loop wait in ms) of awaiting ``work``."""
    stop = asyncio.Event()
    probe = asyncio.create_task(_longest_wait(stop))
    cpu = time.process_time_ns()
    await work
    cpu = time.process_time_ns() - cpu
    stop.set()
    return cpu / 1e6, await probe * 1000


async def measure(channels: int, beats: int, redis: str | None) -> dict[str, float]:
    """The figures for ``channels`` open channels (each of its own user and session)."""
    backplane: BrokerBackplane
    if redis is None:
        backplane = MemoryBackplane(MemoryBroker())
    else:
        from dara_ws_redis import RedisBackplane

        backplane = RedisBackplane(redis, namespace=f"bench-{uuid.uuid4().hex[:6]}")
    backplane._opened = {uuid.uuid4().hex: (0, f"u{i}", uuid.uuid4().hex)
                         for i in range(channels)}
    backplane._revoke_unchecked = False  # nothing missed

    async def heartbeats() -> None:  # what a heartbeat adds to the directory write
        for _ in range(beats):
            await backplane._measure_clock()
            backplane._check_revoked_soon()

    beat_cpu, beat_wait = await _timed(heartbeats())
    check_cpu, check_wait = await _timed(backplane._check_revoked())
    if redis is not None:
        await backplane._close_bus()
    return {"heartbeat_cpu_ms": beat_cpu / beats, "heartbeat_loop_wait_ms": beat_wait,
            "check_cpu_ms": check_cpu, "check_loop_wait_ms": check_wait}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--beats", type=int, default=5)
    parser.add_argument("--redis", default=None, help="a Redis URL (default: the in-process bus)")
    args = parser.parse_args(argv)
    for channels in args.channels:
        figures = asyncio.run(measure(channels, args.beats, args.redis))
        print(f"{channels} channels: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
