"""``dara-ws serve --workers N``: N server processes on one port, one per core.

Each worker is a plain ``dara-ws serve`` process that listens with ``SO_REUSEPORT``, so the kernel
spreads new connections over them; each builds its own manager and endpoint, and ``--redis-url``
makes them one cluster (a broadcast or a per-user send reaches clients on every worker). This
supervisor starts them, forwards their output, and passes SIGTERM and SIGINT on to all of them
(each closes its clients with 1001). Each worker holds a pipe from the supervisor on its stdin
and stops the same way once that pipe ends: a supervisor that dies (SIGKILL, the out-of-memory
killer) leaves no worker serving the port on its own. A worker that dies on its own is started again, after a
delay that doubles with each death in a row (:class:`RestartPolicy`); one that dies
``MAX_DEATHS`` times within ``DEATH_WINDOW`` seconds is a crash loop: the supervisor stops the
others and exits non-zero, as it does when a worker fails before it first listens (a wrong
option, a port taken).
"""

from __future__ import annotations

__all__ = ["RestartPolicy", "supervise", "worker_argv"]

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable

from dara_ws_core import DEFAULT_PATH

#: How long a worker may take to start listening, and to stop after SIGTERM, before it is killed.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: A worker that died is started again after FIRST_DELAY seconds, twice that after a second
#: death in a row, and so on up to MAX_DELAY; MAX_DEATHS deaths within DEATH_WINDOW seconds
#: are a crash loop, which stops the supervisor.
FIRST_DELAY = 0.5
MAX_DELAY = 30.0
MAX_DEATHS = 5
DEATH_WINDOW = 60.0


class RestartPolicy:
    """When to start one worker again after it died: pure, the caller gives the time."""

    __slots__ = ("_deaths",)

    def __init__(self) -> None:
        self._deaths: deque[float] = deque(maxlen=MAX_DEATHS)

    def died(self, now: float) -> float | None:
        """Seconds to wait before starting the worker again after a death at ``now``, or
        ``None``: a crash loop (``MAX_DEATHS`` within ``DEATH_WINDOW``), give up."""
        deaths = self._deaths
        while deaths and now - deaths[0] > DEATH_WINDOW:
            deaths.popleft()
        deaths.append(now)
        if len(deaths) >= MAX_DEATHS:
            return None
        return min(MAX_DELAY, FIRST_DELAY * (1 << (len(deaths) - 1)))


def worker_argv(args: argparse.Namespace, port: int, index: int = 0, again: bool = False) -> list[str]:
    """The ``dara-ws`` arguments of worker ``index``: the supervisor's own, on ``port``, one
    process; its metrics (``--metrics-port P``) on ``P + index``, the same port each time it is
    started again, so that a scrape target names one worker for good (``0``: any free port).
    Started ``again`` (after it died), it listens whether or not Redis answers yet, as the
    others serve through an outage: waiting for Redis there made an outage a crash loop."""
    argv = ["serve", "--host", args.host, "--port", str(port), "--transport", args.transport,
            "--clock", str(args.clock), "--stats-interval", str(args.stats_interval),
            "--loop", args.loop, "--reuse-port", "--supervised"]
    if args.redis_url:
        argv += ["--redis-url", args.redis_url]
        if again:
            argv.append("--bus-optional")
    if args.metrics_port is not None:
        argv += ["--metrics-port", str(args.metrics_port + index if args.metrics_port else 0)]
    if args.max_connections is not None:
        argv += ["--max-connections", str(args.max_connections)]
    if args.max_connections_per_address is not None:
        argv += ["--max-connections-per-address", str(args.max_connections_per_address)]
    if args.forwarded_allow_ips is not None:
        argv += ["--forwarded-allow-ips", args.forwarded_allow_ips]
    return argv


def _hold_port(host: str) -> socket.socket:
    """A bound, not listening, ``SO_REUSEPORT`` socket: it picks a free port for ``--port 0`` and
    keeps it reserved until the workers listen on it too (it takes no connections itself)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


async def _forward(process: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
    assert process.stdout is not None
    while line := await process.stdout.readline():
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()
        if b"dara-ws demo" in line:
            ready.set()


async def supervise(args: argparse.Namespace) -> int:
    """Run ``args.workers`` workers until SIGTERM/SIGINT (exit status 0 when every worker then
    serving stopped cleanly, whether or not one was being started again), starting again one
    that dies, until one fails before it first listens or dies in a crash loop (the others are
    stopped; exit status 1)."""
    try:
        holder = _hold_port(args.host) if args.port == 0 else None
    except OSError as exc:  # a --host that names no address of this machine
        from .main import _listen_error

        raise _listen_error(exc, args.host, args.port) from None
    port = int(holder.getsockname()[1]) if holder is not None else args.port
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    workers: list[asyncio.subprocess.Process] = []
    readiness: list[asyncio.Event] = []  # each worker's: set once it listens
    forwarders: list[asyncio.Task[None]] = []
    failed = False

    async def spawn(index: int) -> asyncio.Event:
        """Start worker ``index`` (in ``workers`` at once, for ``_stop_all``); set once it listens."""
        again = index < len(workers)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dara_ws_cli", *worker_argv(args, port, index, again),
            # stdin: a pipe nothing is written to, whose end tells the worker its supervisor is
            # gone (killed with SIGKILL, say), so that no worker serves on without it.
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "DARA_WS_WORKER": str(index)},
        )
        ready = asyncio.Event()
        if index < len(workers):
            workers[index], readiness[index] = process, ready
        else:
            workers.append(process)
            readiness.append(ready)
        # The forwarders of workers that died have ended: one per worker (and any still reading
        # a dead one's last lines), however many restarts.
        forwarders[:] = [task for task in forwarders if not task.done()]
        forwarders.append(loop.create_task(_forward(process, ready)))
        return ready

    try:
        for index in range(args.workers):
            await spawn(index)
        exits = [loop.create_task(process.wait()) for process in workers]
        starting = [loop.create_task(ready.wait()) for ready in readiness]
        stopping = loop.create_task(stop.wait())
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not all(task.done() for task in starting):
                    await asyncio.wait([*starting, *exits, stopping], return_when=asyncio.FIRST_COMPLETED)
                    if any(task.done() for task in exits) or stop.is_set():
                        break
        except TimeoutError:
            print(f"dara-ws: workers not ready within {START_TIMEOUT:.0f} s", file=sys.stderr)
            failed = True
        for task in starting:
            task.cancel()
        if holder is not None:
            holder.close()
            holder = None
        if not failed and not stop.is_set() and not any(task.done() for task in exits):
            from .main import _netloc

            print(f"dara-ws: {args.workers} workers ({args.transport}) on "
                  f"ws://{_netloc(args.host, port)}{DEFAULT_PATH}", flush=True)
            keepers = [loop.create_task(_keep(index, workers, spawn, stop)) for index in range(args.workers)]
            await asyncio.wait([*keepers, stopping], return_when=asyncio.FIRST_COMPLETED)
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            failed = not stop.is_set()
        elif not stop.is_set():
            failed = True
            dead = [p.pid for p in workers if p.returncode is not None]
            print(f"dara-ws: worker(s) {dead} ended before they listened; stopping the others",
                  file=sys.stderr)
        stopping.cancel()
    finally:
        if holder is not None:
            holder.close()
        # What the stop is judged by: the workers serving when it was sent. One that had died
        # (waiting to be started again) or was still starting is stopped, not failed.
        serving = [process for process, ready in zip(workers, readiness, strict=True)
                   if process.returncode is None and ready.is_set()]
        await _stop_all(workers)
        for forwarder in forwarders:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(forwarder, 5)
        # The workers are gone: a Ctrl-C pressed again now must not end in a traceback.
        from .main import _ignore_stop_signals

        _ignore_stop_signals(loop)
    return 1 if failed or any(process.returncode != 0 for process in serving) else 0


async def _keep(
    index: int,
    workers: list[asyncio.subprocess.Process],
    spawn: Callable[[int], Awaitable[asyncio.Event]],
    stop: asyncio.Event,
) -> None:
    """Start worker ``index`` again each time it dies, after its :class:`RestartPolicy` delay;
    return on a crash loop (or once ``stop`` is set: the caller cancels it then)."""
    loop = asyncio.get_running_loop()
    policy = RestartPolicy()
    while True:
        process = workers[index]
        code = await process.wait()
        if stop.is_set():
            return
        delay = policy.died(loop.time())
        if delay is None:
            print(f"dara-ws: worker {index} died {MAX_DEATHS} times within {DEATH_WINDOW:.0f} s "
                  f"(last: pid {process.pid}, status {code}); stopping the others", file=sys.stderr, flush=True)
            return
        print(f"dara-ws: worker {index} (pid {process.pid}) ended with status {code}; "
              f"starting it again in {delay:g} s", file=sys.stderr, flush=True)
        await asyncio.sleep(delay)
        ready = await spawn(index)
        listening = loop.create_task(ready.wait())
        ended = loop.create_task(workers[index].wait())
        try:
            await asyncio.wait([listening, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
            ended.cancel()
        if ready.is_set():
            print(f"dara-ws: worker {index} started again (pid {workers[index].pid})", flush=True)


async def _stop_all(workers: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM to every live worker (a graceful stop: 1001 to its clients), SIGKILL after
    ``STOP_TIMEOUT``."""
    for process in workers:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    waits = [asyncio.ensure_future(process.wait()) for process in workers]
    if not waits:
        return
    _, late = await asyncio.wait(waits, timeout=STOP_TIMEOUT)
    for process in workers:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    if late:
        await asyncio.wait(late, timeout=5)
