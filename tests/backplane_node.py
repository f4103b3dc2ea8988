"""One server process of a backplane cluster, for the Redis tests and the benchmark.

    python -m tests.backplane_node --redis-url redis://127.0.0.1:6379/0 --port 0

It serves the websockets transport on 127.0.0.1 with ``user:session`` test tokens, prints
``READY <port> <node_id>`` once the backplane is up, and exits (gracefully: clients closed, channels
unregistered) when its stdin closes or on SIGTERM, so it never outlives the test that started it.

The test drives it through custom requests from any client connected to it (the protocol's own
control plane): ``bp.send``, ``bp.broadcast``, ``bp.user``, ``bp.ask`` (send_and_wait),
``bp.channels`` (all of a user's channels), ``bp.flush``, ``bp.stats``, ``bp.revoke``
(disconnect a user, a session or a channel everywhere), ``bp.user_sure`` (a per-user send and
whether the bus acknowledged it), ``bp.gaps`` (what ``on_gap`` was told), and ``bp.bench_ask``,
``bp.bench_broadcast`` for the benchmark. Every reply is ``{"ok": value}`` or
``{"error": exception name, "message": ..., "code": close code or null}``.

:class:`NodeProcess` is the parent's side: start, address, stop or kill one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dara_ws_core import (
    BackplaneError,
    DaraWSError,
    Endpoint,
    ServerConfig,
    WebsocketManager,
    token_authenticator,
)
from dara_ws_core.backplane import Gap

from .stacks import verify_token

ROOT = Path(__file__).resolve().parent.parent
Op = Callable[[dict[str, Any]], Awaitable[Any]]


def _controls(manager: WebsocketManager) -> dict[str, Op]:
    backplane: Any = manager.backplane
    gap_reports: dict[str, list[float]] = {}

    def on_gap(user_id: str, gap: Gap) -> None:
        report = gap_reports.setdefault(user_id, [0, 0, 0, 0])
        report[0] += 1
        report[1] += gap.lost
        report[2] += gap.recovered
        report[3] += gap.broadcasts

    manager.on_gap = on_gap

    async def send(d: dict[str, Any]) -> None:
        await manager.send_message(d["channel"], d["message"], custom=d.get("custom", False))

    async def broadcast(d: dict[str, Any]) -> None:
        await manager.broadcast(d["message"], custom=d.get("custom", False),
                                ignore_channel=d.get("ignore"))

    async def user(d: dict[str, Any]) -> None:
        await manager.send_message_to_user(d["user"], d["message"], ignore_channel=d.get("ignore"))

    async def ask(d: dict[str, Any]) -> Any:
        return await manager.send_and_wait(d["channel"], d["message"],
                                           custom=d.get("custom", False), timeout=d.get("timeout"))

    async def channels(d: dict[str, Any]) -> list[str]:
        return sorted(await manager.get_all_user_channels(d["user"]))

    async def flush(d: dict[str, Any]) -> None:
        if backplane is not None:
            await backplane.flush()

    async def stats(d: dict[str, Any]) -> dict[str, Any]:
        if backplane is None:
            return {"connected": False}
        return {**backplane.stats.as_dict(), "connected": backplane.connected,
                "node": backplane.node_id}

    async def bench_ask(d: dict[str, Any]) -> list[float]:
        """``n`` sequential send_and_wait round trips; their durations in seconds."""
        times = []
        for i in range(d["n"]):
            started = time.perf_counter()
            await manager.send_and_wait(d["channel"], {"i": i}, timeout=10)
            times.append(time.perf_counter() - started)
        return times

    async def bench_broadcast(d: dict[str, Any]) -> float:
        """``n`` broadcasts of ``message`` (the message carries its index as ``i``)."""
        started = time.perf_counter()
        for i in range(d["n"]):
            await manager.broadcast({**d["message"], "i": i})
        return time.perf_counter() - started

    async def user_sure(d: dict[str, Any]) -> bool:
        """``user``, then whether the bus acknowledged it (published or kept) within 2 s."""
        failed = backplane.stats.failed if backplane is not None else 0
        try:
            await manager.send_message_to_user(d["user"], d["message"])
        except BackplaneError:  # the bus is down: neither published nor kept
            return False
        if backplane is None:
            return True
        if backplane.stats.failed != failed:  # the bus is down: counted at once
            return False
        try:
            async with asyncio.timeout(2.0):
                await backplane.flush()
        except TimeoutError:
            return False
        return bool(backplane.stats.failed == failed)

    async def gaps(d: dict[str, Any]) -> dict[str, list[float]]:
        """What ``on_gap`` was told so far: user -> [calls, lost, recovered, broadcasts]."""
        return gap_reports

    async def revoke(d: dict[str, Any]) -> int:
        """``disconnect_user`` / ``disconnect_session`` / ``close_channel``, ``_everywhere``."""
        scope, target = d["scope"], d["target"]
        if scope == "user":
            return await manager.disconnect_user_everywhere(target)
        if scope == "session":
            return await manager.disconnect_session_everywhere(target)
        return int(await manager.close_channel_everywhere(target, 4000, "closed"))

    return {"send": send, "broadcast": broadcast, "user": user, "ask": ask,
            "channels": channels, "flush": flush, "stats": stats, "bench_ask": bench_ask,
            "bench_broadcast": bench_broadcast, "revoke": revoke, "user_sure": user_sure,
            "gaps": gaps}


def _register(manager: WebsocketManager) -> None:
    for name, op in _controls(manager).items():
        async def control(channel_id: str, data: Any, op: Op = op) -> dict[str, Any]:
            try:
                async with asyncio.timeout(30):
                    return {"ok": await op(data or {})}
            except DaraWSError as exc:
                return {"error": type(exc).__name__, "message": str(exc),
                        "code": getattr(exc, "code", None)}

        manager.add_ws_handler(f"bp.{name}", control)


async def _serve(args: argparse.Namespace) -> None:
    from dara_ws_redis import RedisBackplane
    from dara_ws_websockets import serve

    backplane = None
    if args.redis_url:
        backplane = RedisBackplane(
            args.redis_url, node_id=args.node_id, heartbeat_interval=args.heartbeat,
            backoff_initial=0.05, backoff_max=0.5, connect_timeout=5.0,
        )
    config = ServerConfig(max_queue_messages=100_000, max_handler_tasks=1024,
                          max_connections_per_user=args.max_per_user)
    manager = WebsocketManager(config, backplane=backplane)
    _register(manager)
    endpoint = Endpoint(manager, token_authenticator(verify_token))
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)

    def watch_stdin() -> None:
        # The parent holds our stdin: EOF means it is gone (or asks us to stop).
        sys.stdin.buffer.read()
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            loop.call_soon_threadsafe(stopping.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    async with serve(endpoint, "127.0.0.1", args.port) as server:
        if backplane is not None:
            await backplane.start(manager)
        node = backplane.node_id if backplane is not None else "-"
        print(f"READY {server.port} {node}", flush=True)
        await stopping.wait()
    if backplane is not None:
        await backplane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default=None, help="no backplane without it")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--max-per-user", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    asyncio.run(_serve(args))


class NodeProcess:
    """A node process, from the parent's side; its log goes to ``log_path``."""

    def __init__(self, redis_url: str | None, log_path: Path, *, node_id: str | None = None,
                 heartbeat: float = 5.0, max_per_user: int | None = None) -> None:
        self.redis_url = redis_url
        self.log_path = log_path
        self.node_id = node_id
        self.heartbeat = heartbeat
        self.max_per_user = max_per_user
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        """Start the process; :meth:`wait_ready` waits for it (spawn several, then wait)."""
        command = [sys.executable, "-m", "tests.backplane_node", "--port", "0",
                   "--heartbeat", str(self.heartbeat)]
        if self.redis_url:
            command += ["--redis-url", self.redis_url]
        if self.node_id:
            command += ["--node-id", self.node_id]
        if self.max_per_user is not None:
            command += ["--max-per-user", str(self.max_per_user)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, bufsize=0)

    def wait_ready(self, timeout: float = 30.0) -> None:
        from .redis_server import read_line

        assert self.process is not None
        try:
            line = read_line(self.process, lambda line: line.startswith("READY"), timeout)[-1]
        except (TimeoutError, RuntimeError) as exc:
            self.kill()
            raise RuntimeError(f"node did not start: {exc}\n{self.log()}") from None
        _, port, node = line.split()
        self.port, self.node_id = int(port), node

    def url(self, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/api/core/ws?token={token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Ask it to stop (close stdin) and wait; kill it if it does not."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(OSError):
                assert process.stdin is not None
                process.stdin.close()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self._release()

    def kill(self) -> None:
        """SIGKILL: the process dies without unregistering anything."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(5)
        self._release()

    def _release(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


if __name__ == "__main__":
    main()
