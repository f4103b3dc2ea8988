"""A fan-out's own cost per delivery, for an instruction counter: one server process (any
implementation of ``benchmarks.server``) with ``--n`` connections whose clients read nothing
after their upgrade (a child process holds them; the kernel buffers what is written), ``--warmup``
broadcasts, then ``--m`` measured ones, one per event-loop iteration (k=1), each run inside a
``functools.reduce`` call, so that only they are counted with::

    valgrind --tool=callgrind --toggle-collect=functools_reduce [--cache-sim=yes] \\
        python -m benchmarks.fanout_instructions --impl ours-picows --n 1000

Instructions per delivery = the collected total / (n * m). Wall time on a shared machine cannot
tell a few percent of user-space work apart; a count can (docs/performance.md). Keepalive pings
are off in every server (a client that never reads would never answer one), and so is the
idle timeout.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import asyncio
import functools
import os
import subprocess
import sys
from collections.abc import Coroutine
from typing import Any

from .procs import ROOT
from .server import DARA_PATH, IMPLS

#: The child process: opens ``n`` upgraded connections, reads nothing more, exits on a line.
HOLDER = r"""
import base64, os, socket, sys
port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path}?token=user-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"connection {i} closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"connection {i}: {head[:80]!r}")
    held.append(s)
print("ready", flush=True)
sys.stdin.readline()
"""


def _drive(_: None, coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a broadcast that completes without suspending (no backplane) to its end."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError("the broadcast suspended: nothing to count in one call")


async def run(impl_name: str, n: int, warmup: int, m: int) -> int:
    """Serve, connect the holders, broadcast; the deliveries counted (n * m when every
    connection stayed)."""
    config = {"ping_interval": None, "idle_timeout": None} if impl_name.startswith("ours") else {"auto_ping": False}
    impl = IMPLS[impl_name](config)
    port = await impl.start()
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(port), str(n), DARA_PATH, cwd=str(ROOT),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        if (await asyncio.wait_for(holder.stdout.readline(), 300)).strip() != b"ready":
            raise RuntimeError("the holder process failed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while impl.conn_count() < n:
            if loop.time() > deadline:
                raise RuntimeError(f"{impl.conn_count()} of {n} connections registered")
            await asyncio.sleep(0.02)
        for i in range(warmup):
            await impl.broadcast({"bench": 0, "n": i})
            await asyncio.sleep(0)
        for i in range(m):
            functools.reduce(_drive, [impl.broadcast({"bench": 1, "n": i})], None)
            await asyncio.sleep(0)
        counted = impl.conn_count() * m
        holder.stdin.write(b"done\n")
        await holder.stdin.drain()
        await asyncio.wait_for(holder.wait(), 30)
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await impl.stop()
    return counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=sorted(IMPLS), default="ours-picows")
    parser.add_argument("--n", type=int, default=1000, help="connections")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--m", type=int, default=100, help="measured broadcasts")
    args = parser.parse_args()
    deliveries = asyncio.run(run(args.impl, args.n, args.warmup, args.m))
    print(f"{args.impl}: {deliveries} deliveries counted (divide the collected instructions by it)")
    sys.stdout.flush()
    os._exit(0)  # the servers' teardown is not what is counted, and needs no wait


if __name__ == "__main__":
    main()
