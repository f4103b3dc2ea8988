"""Child processes that talk JSON lines: the orchestrator side and the child side.

A child prints one JSON object per line on stdout (``{"event": "ready", ...}`` first) and reads
commands, one JSON object per line, on stdin; end of stdin means "stop". Its stderr goes to a log
file whose tail is shown when something fails. Every wait here has a timeout, and every child is
killed when its ``async with`` block ends, whatever happened.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "Proc",
    "emit",
    "raise_fd_limit",
    "run_child",
    "stdin_commands",
]

import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = Path(tempfile.gettempdir()) / "dara-ws-bench-logs"


#: CPUs each kind of child is pinned to (module -> "0,1"); empty: not pinned. Set by run.py.
PIN: dict[str, str] = {}
#: The event loop each kind of child runs on (module -> "uvloop"); absent: asyncio's. Set by run.py.
LOOP: dict[str, str] = {}


def loop_factory(name: str | None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``name`` (``asyncio`` or empty: ``None``, asyncio's own)."""
    if not name or name == "asyncio":
        return None
    if name != "uvloop":
        raise ValueError(f"unknown event loop {name!r} (asyncio or uvloop)")
    import uvloop

    return uvloop.new_event_loop


class BenchError(Exception):
    """A benchmark process failed, timed out or answered something unexpected."""


# --------------------------------------------------------------------------------- child side


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (10,000 connections need more than 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def emit(obj: dict[str, Any]) -> None:
    """Write one JSON line to stdout for the orchestrator."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def stdin_commands() -> AsyncIterator[dict[str, Any]]:
    """Yield the JSON commands the orchestrator writes on stdin, until end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.strip():
            yield json.loads(line)


def run_child(amain: Callable[[Any], Awaitable[None]], args: Any) -> None:
    """Run a child's ``amain(args)`` with raised fd limits and a hard lifetime of
    ``args.max_seconds`` (no child outlives a run); a crash is reported as an ``error`` line."""

    async def guarded() -> None:
        asyncio.get_running_loop().call_later(args.max_seconds, os._exit, 3)
        await amain(args)

    raise_fd_limit()
    cpus = os.environ.get("BENCH_CPUS")
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    try:
        with asyncio.Runner(loop_factory=loop_factory(os.environ.get("BENCH_LOOP"))) as runner:
            runner.run(guarded())
    except Exception as exc:
        emit({"event": "error", "error": repr(exc)})
        raise


# ---------------------------------------------------------------------------- orchestrator side


class Proc:
    """One child process speaking JSON lines; use ``async with Proc.start(...) as proc``."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        self._next_id = 0
        self.ready: dict[str, Any] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls, name: str, module: str, *args: str, ready_timeout: float = 30.0
    ) -> AsyncIterator[Proc]:
        """Start ``python -m module args`` and wait for its ``ready`` line; kill it on exit."""
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = LOG_DIR / f"{name}-{os.getpid()}.log"
        env = dict(os.environ)
        if PIN.get(module) is not None:
            env["BENCH_CPUS"] = PIN[module]
        env["BENCH_LOOP"] = LOOP.get(module, "asyncio")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), str(ROOT / "transports"), env.get("PYTHONPATH", "")) if p
        )
        with log.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, *args,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                cwd=str(ROOT), env=env, limit=1 << 24,
            )
        proc = cls(name, process, log)
        try:
            proc.ready = await proc.expect("ready", ready_timeout)
            yield proc
        finally:
            await proc.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def _fail(self, message: str) -> BenchError:
        tail = self.log_tail()
        return BenchError(f"{self.name}: {message}" + (f"\n--- stderr tail ---\n{tail}" if tail else ""))

    async def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line; raises :class:`BenchError` on timeout or exit."""
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise self._fail(f"no output within {timeout:.0f}s") from None
        if not line:
            await asyncio.wait_for(self.process.wait(), 5)
            raise self._fail(f"exited with {self.process.returncode}")
        obj: dict[str, Any] = json.loads(line)
        if obj.get("event") == "error":
            raise self._fail(f"reported an error: {obj.get('error')}")
        return obj

    async def _read_until(
        self, wanted: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._fail(f"no {what} within {timeout:.0f}s")
            obj = await self.read(remaining)
            if wanted(obj):
                return obj

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """Read lines until one whose ``event`` is ``event`` (others are dropped)."""
        return await self._read_until(lambda obj: obj.get("event") == event, timeout, repr(event))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(obj) + "\n").encode())

    async def call(self, cmd: str, timeout: float, **params: Any) -> dict[str, Any]:
        """Send a command and wait for its ``result`` line."""
        self._next_id += 1
        cid = self._next_id
        self.send({"cmd": cmd, "id": cid, **params})
        return await self._read_until(
            lambda obj: obj.get("event") == "result" and obj.get("id") == cid, timeout,
            f"result of {cmd!r}")

    async def stop(self, timeout: float = 5.0) -> None:
        """Close stdin (the child's signal to stop), then terminate, then kill."""
        if self.process.returncode is not None:
            return
        if self.process.stdin is not None:
            with contextlib.suppress(Exception):
                self.process.stdin.close()
        for action in (None, self.process.terminate, self.process.kill):
            if action is not None:
                with contextlib.suppress(ProcessLookupError):
                    action()
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
                return
            except TimeoutError:
                continue
