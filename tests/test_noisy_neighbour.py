"""Noisy neighbour (issue 10): while one client attacks, a well-behaved client is not harmed.

Every case runs a fresh server with the demo application (:func:`dara_ws_cli.build_demo`:
``echo``; ``chat``, which broadcasts to every other connection; ``ask``, which asks the client
back with ``send_and_wait``) and two tickers that push every 50 ms, each push carrying its
sequence number and the time it was due: a broadcast to everyone (``tick``) and a per-user push
to the healthy client's user (``utick``). Socket transports run the server in a child process
(``python -m tests.test_noisy_neighbour``), so that its RSS can be measured with psutil and a stall
of its event loop is not hidden by the test's own; the ``half_open`` case runs ``dara-ws serve``
itself (its ``clock`` pushes instead of ticks), started with the soft file-descriptor limit of
1024 that a default shell gives it. The memory transport runs in process, for the attacks that
need no socket and no RSS figure.

Beside every attack, one *healthy* ``DaraClient`` reads everything, sends an ``echo`` request
every 20 ms (one at a time) and fires a ``chat`` request every 25 ms without waiting for the
previous one (chat waits on broadcast, so that is how a stalled broadcast turns into ``busy``).
Every raw frame it receives is parsed as strict JSON (RFC 8259: no ``NaN``, no ``Infinity``, no
number beyond a double).

**The invariant**, for every attack. The bounds are correctness bounds for a noisy 2-core
machine, not speed targets: a healthy server stays far below them (on an overloaded machine they
are multiplied by ``tests.helpers.LOAD_FACTOR``, 1 to 4).

* push delay <= ``PUSH_BOUND`` = 1.0 s: every push reaches the healthy client at most 1.0 s after
  it was due, and at most 1.0 s after the one after the previous push was due (a stalled ticker
  skips slots rather than piling them up), a push not arrived when the case ends counts as late
  by how overdue it is, and no push is lost (``tests/helpers.py`` holds the healthy client);
* no healthy request gets a ``busy`` or ``timeout`` error reply, or no answer within
  ``REQUEST_TIMEOUT`` = 2.0 s, and the healthy connection stays open;
* every frame the healthy client receives is strict JSON.

Per attack (each case's docstring says what the attacker must get), and where memory is at stake
a bound on the server's RSS growth over the attack, from a baseline taken once the healthy client
runs: ``RSS_SLACK`` = 32 MiB of allocator noise plus what the attack may legitimately cost (stated
per case as a multiple of a configured limit, never of what the attacker sent).

Attacks run one at a time, each bounded in count and time (at most 3 s of attack, then 0.5 s of
observation; the whole module takes about 90 s on 2 cores). ``DARA_NOISY_REPORT=path`` appends
every case's figures (delays, counts, RSS) to ``path`` as JSON lines, for the issue's
before/after table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import pytest

try:  # before issue 11 the CLI lived in the core: the code the "before" figures ran on
    from dara_ws_core.cli import build_demo  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from dara_ws_cli import build_demo  # type: ignore[no-redef,unused-ignore]
from dara_ws_core import (
    DEFAULT_PATH,
    ConnectionClosed,
    DaraClient,
    Endpoint,
    MemoryServer,
    MemoryTransport,
    ServerConfig,
    Transport,
    WebsocketManager,
)

from .helpers import REQUEST_TIMEOUT, TICK, Healthy, strict_loads, ticker
from .hostile import CLOSE, CONTINUATION, PING, PONG, TEXT, HostileClient, encode_frame

MiB = 1024 * 1024
RSS_SLACK = 32 * MiB
ECHO_EVERY = 0.02
CHAT_EVERY = 0.025
#: How long the healthy client goes on measuring once the attack has done its part.
OBSERVE = 0.5
#: Every attack ends within this (a longer one is a failure of the case).
ATTACK_LIMIT = 10.0
HEALTHY = "healthy"  # the demo app's token is the user id
ROOT = Path(__file__).resolve().parent.parent
SOCKETS = ("aiohttp", "asgi", "picows", "websockets")
ALL = ("memory", *SOCKETS)

# --------------------------------------------------------------------------- the server


def _tickers(manager: WebsocketManager) -> list[asyncio.Task[None]]:
    """A broadcast to everyone (``tick``) and a per-user push to the healthy client's user
    (``utick``), every ``TICK``."""

    async def broadcast(payload: dict[str, Any]) -> None:
        await asyncio.shield(manager.broadcast(payload, custom=True))

    async def to_user(payload: dict[str, Any]) -> None:
        await asyncio.shield(manager.send_message_to_user(HEALTHY, payload, custom=True))

    loop = asyncio.get_running_loop()
    return [loop.create_task(ticker(broadcast, "tick")), loop.create_task(ticker(to_user, "utick"))]


@contextlib.asynccontextmanager
async def _serve(transport: str, endpoint: Endpoint) -> AsyncIterator[int]:
    if transport == "websockets":
        from dara_ws_websockets import port_of
        from dara_ws_websockets import serve as ws_serve

        async with ws_serve(endpoint, "127.0.0.1", 0) as server:
            yield port_of(server)
    elif transport == "aiohttp":
        from dara_ws_aiohttp import serve as aio_serve

        async with aio_serve(endpoint, "127.0.0.1", 0) as aio:
            yield aio.port
    elif transport == "picows":
        from dara_ws_picows import serve as picows_serve

        async with picows_serve(endpoint, "127.0.0.1", 0) as served:
            yield served.port
    else:
        from dara_ws_asgi import serve as asgi_serve

        async with asgi_serve(endpoint, "127.0.0.1", 0) as asgi:
            yield asgi.port


async def _child(transport: str, config: dict[str, Any]) -> None:
    """The child server: serve the demo with ``config`` until stdin closes."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    manager = WebsocketManager(ServerConfig(**config))
    endpoint = build_demo(manager)
    loop = asyncio.get_running_loop()
    async with _serve(transport, endpoint) as port:
        tickers = _tickers(manager)
        print(json.dumps({"port": port}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        for task in tickers:
            task.cancel()


class Wire(Protocol):
    """One attacking connection, frame by frame: a raw socket or an in-memory transport."""

    close_reason: str

    async def send_text(self, text: str) -> None:
        """Send one text frame (waits, bounded, while the server does not read)."""

    async def flood(self, text: str, count: int, duration: float) -> int:
        """Send ``text`` up to ``count`` times within ``duration`` s; returns how many went."""

    async def send_burst(self, texts: list[str]) -> None:
        """Send these text frames back to back (in one write on a socket)."""

    def stop_reading(self) -> None:
        """Stop reading (until ``resume_reading``)."""

    def resume_reading(self) -> None:
        """Read again."""

    async def next_frame(self, timeout: float) -> str | int:
        """The next text frame, or the close code (1006 without one) once the server closed."""

    async def close(self) -> None:
        """Drop the connection."""


class SocketWire:
    def __init__(self, client: HostileClient) -> None:
        self.client = client
        self.close_reason = ""

    async def send_text(self, text: str) -> None:
        self.client.send_text(text)
        await self.client.drain(2.0)

    async def flood(self, text: str, count: int, duration: float) -> int:
        return await self.client.flood(encode_frame(TEXT, text), count=count, duration=duration)

    async def send_burst(self, texts: list[str]) -> None:
        self.client.write(b"".join(encode_frame(TEXT, text) for text in texts))
        await self.client.drain(2.0)

    def stop_reading(self) -> None:
        self.client.stop_reading()

    def resume_reading(self) -> None:
        self.client.resume_reading()

    async def next_frame(self, timeout: float) -> str | int:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    frame = await self.client.read_frame(timeout)
                except EOFError:
                    return 1006
                if frame.opcode == TEXT:
                    return frame.payload.decode()
                if frame.opcode == CLOSE:
                    self.close_reason = frame.payload[2:].decode(errors="replace")
                    return frame.close_code or 1005

    async def close(self) -> None:
        self.client.abort()


class MemoryWire:
    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport
        self.close_reason = ""

    async def send_text(self, text: str) -> None:
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(2.0):
                await self.transport.send_text(text)

    async def flood(self, text: str, count: int, duration: float) -> int:
        sent = 0
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(duration):
                for sent in range(1, count + 1):  # noqa: B007  # the count is the result
                    await self.transport.send_text(text)
        return sent

    async def send_burst(self, texts: list[str]) -> None:
        for text in texts:
            await self.send_text(text)

    def stop_reading(self) -> None:
        pass  # not calling receive() is not reading: the bounded buffer fills, senders wait

    def resume_reading(self) -> None:
        pass

    async def next_frame(self, timeout: float) -> str | int:
        try:
            async with asyncio.timeout(timeout):
                frame = await self.transport.receive()
        except ConnectionClosed as exc:
            self.close_reason = exc.reason
            return exc.code
        return frame if isinstance(frame, str) else frame.decode(errors="replace")

    async def close(self) -> None:
        await self.transport.close()


class ErrorRecords(logging.Handler):
    """The in-process server's ERROR records (the child's go to its log file)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@dataclass
class Server:
    """A running server for one case."""

    transport: str
    port: int | None = None
    pid: int | None = None
    log: Path | None = None
    memory: MemoryServer | None = None
    records: ErrorRecords | None = None
    tick_kinds: tuple[str, ...] = ("tick", "utick")
    wires: list[Wire] = field(default_factory=list)

    async def connect(self, token: str) -> Transport:
        """A client transport (for ``DaraClient``) with ``token`` as the user."""
        target = f"{DEFAULT_PATH}?token={token}"
        if self.memory is not None:
            return await self.memory.connect(target)
        from dara_ws_websockets import connect

        return await connect(f"ws://127.0.0.1:{self.port}{target}", open_timeout=REQUEST_TIMEOUT,
                             close_timeout=1)

    async def hostile(self, rcvbuf: int | None = None, local: str | None = None) -> SocketWire:
        """A raw socket (from the loopback address ``local``), not yet upgraded, dropped when
        the case ends."""
        assert self.port is not None, "socket attacks only"
        wire = SocketWire(await HostileClient.open(self.port, rcvbuf=rcvbuf, timeout=REQUEST_TIMEOUT,
                                                   local=local))
        self.wires.append(wire)
        return wire

    async def wire(self, token: str, *, rcvbuf: int | None = None, local: str | None = None) -> Wire:
        """An attacking connection (from the loopback address ``local``: sockets only),
        upgraded and past its ``init`` frame."""
        wire: Wire
        if self.memory is not None:
            wire = MemoryWire(await self.memory.connect(f"{DEFAULT_PATH}?token={token}"))
            self.wires.append(wire)
        else:
            wire = socket_wire = await self.hostile(rcvbuf, local)
            response = await socket_wire.client.handshake(f"{DEFAULT_PATH}?token={token}")
            assert response.status == 101, response
        init = await wire.next_frame(REQUEST_TIMEOUT)
        assert isinstance(init, str) and json.loads(init)["type"] == "init", init
        return wire

    def rss(self) -> int | None:
        if self.pid is None:
            return None
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def errors_logged(self) -> list[str]:
        if self.records is not None:
            return list(self.records.lines)
        if self.log is None or not self.log.exists():
            return []
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if line.startswith("ERROR") or " ERROR " in line]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(transport: str, config: dict[str, Any], *, cli: bool = False) -> AsyncIterator[Server]:
    """A fresh server for one case; every attacking connection is dropped at the end."""
    if transport == "memory":
        manager = WebsocketManager(ServerConfig(**config))
        endpoint = build_demo(manager)
        memory = MemoryServer(endpoint)
        records = ErrorRecords()
        logger = logging.getLogger("dara_ws_core")
        logger.addHandler(records)
        tickers = _tickers(manager)
        server = Server(transport, memory=memory, records=records)
        try:
            yield server
        finally:
            for task in tickers:
                task.cancel()
            for wire in server.wires:
                await wire.close()
            await endpoint.shutdown(grace=0)
            await asyncio.wait_for(memory.close(), 10)
            logger.removeHandler(records)
        return
    fd, name = tempfile.mkstemp(prefix=f"noisy-{transport}-", suffix=".log")
    os.close(fd)
    log = Path(name)
    if cli:
        port = _free_port()
        # dara-ws serve as deployed from a default shell: soft RLIMIT_NOFILE 1024.
        launcher = (
            "import resource, runpy, sys; "
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard)); "
            "sys.argv = ['dara-ws', *sys.argv[1:]]; "
            f"runpy.run_module({build_demo.__module__.removesuffix('.main')!r}, run_name='__main__')"
        )
        argv = ["-c", launcher, "serve", "--transport", transport, "--port", str(port),
                "--clock", str(TICK)]
    else:
        port = 0
        argv = ["-m", "tests.test_noisy_neighbour", transport, json.dumps(config)]
    stderr = os.open(log, os.O_WRONLY)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, cwd=ROOT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    finally:
        os.close(stderr)
    server = Server(transport, pid=proc.pid, log=log, tick_kinds=("clock",) if cli else ("tick", "utick"))
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError(f"server exited: {server.errors_logged()[-5:]}")
                if cli and b"dara-ws demo" in line:
                    break
                if not cli and line.startswith(b"{"):
                    port = int(json.loads(line)["port"])
                    break
        server.port = port
        yield server
    finally:
        for wire in server.wires:
            await wire.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# --------------------------------------------------------------------------- the attacks


@dataclass
class Outcome:
    """What an attack did and saw, and what it found wrong."""

    figures: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    #: The server must log no ERROR for this attack.
    check_errors: bool = False


#: How long a "stop reading" attack goes on not reading.
HOLD = 2.0


async def _hold(started: float, seconds: float = HOLD) -> None:
    """Go on not reading until ``seconds`` after ``started``: this attack is waiting."""
    await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))


def _custom(kind: str, data_json: str, rchan: str | None = None) -> str:
    """A custom frame whose ``data`` is given as JSON text (it may be what ``json`` refuses)."""
    tail = f',"__rchan":{json.dumps(rchan)}' if rchan is not None else ""
    return f'{{"type":"custom","message":{{"kind":{json.dumps(kind)},"data":{data_json}{tail}}}}}'


async def _reply_to(wire: Wire, rchan: str, timeout: float, seen: list[str]) -> str | int | None:
    """Read until the reply to ``rchan`` (returned as text) or the close (its code); ``None`` if
    neither comes within ``timeout``. Every text frame read is appended to ``seen``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        try:
            frame = await wire.next_frame(left)
        except TimeoutError:
            return None
        if isinstance(frame, int):
            return frame
        seen.append(frame)
        if _responds_to(frame, rchan):
            return frame
    return None


def _responds_to(frame: str, rchan: str) -> bool:
    if len(frame) > 65536:  # parsing a huge reply here would stall the healthy client's loop
        return f'"__response_for":{json.dumps(rchan)}' in frame
    with contextlib.suppress(ValueError):
        value = json.loads(frame)
        return isinstance(value, dict) and (value.get("message") or {}).get("__response_for") == rchan
    return False


def _describe(result: str | int | None, wire: Wire) -> str:
    if result is None:
        return "no reply"
    if isinstance(result, int):
        return f"closed {result} {wire.close_reason!r}"
    if len(result) > 65536:
        return f"reply of {len(result.encode()) / MiB:.1f} MiB"
    error = (json.loads(result).get("message") or {}).get("__error")
    return f"error reply {error['code']}" if error else "reply"


def _nonstrict(frames: list[str]) -> list[str]:
    bad = []
    for frame in frames:
        try:
            strict_loads(frame)
        except ValueError:
            bad.append(frame[:80])
    return bad


async def slow_consumer(server: Server, out: Outcome) -> None:
    """Item 2. A second connection of the healthy client's user stops reading and fills its own
    queue with 256 KiB echo replies; the server's policy is the default one. Broadcasts and
    per-user pushes must not wait on it."""
    started = time.monotonic()
    wire = await server.wire(HEALTHY, rcvbuf=4096)
    wire.stop_reading()
    frame = _custom("echo", json.dumps("x" * (256 * 1024)), "slow")
    out.figures["frames_sent"] = await wire.flood(frame, count=300, duration=HOLD)
    await _hold(started)


async def json_ping_flood(server: Server, out: Outcome) -> None:
    """Items 6 and 12. Up to 600,000 JSON pings (18 MiB) as fast as the server reads them
    within 2 s, never reading a pong (``send_timeout`` 1 s, so that a slow-consumer disconnect
    falls inside the case). The server must log no ERROR for it, and its event loop must go on
    serving the others while it reads the flood."""
    started = time.monotonic()
    wire = await server.wire("pinger", rcvbuf=4096)
    wire.stop_reading()
    out.figures["pings_sent"] = await wire.flood('{"type":"ping","message":null}', count=600_000,
                                                 duration=HOLD)
    await _hold(started)
    out.check_errors = True


async def chat_flood(server: Server, out: Outcome) -> None:
    """Amplification: 100,000 ``chat`` messages (fire-and-forget) as fast as the server reads
    them for 2 s, each broadcast to every other connection: the healthy client, which reads
    everything, must not be disconnected or left behind by what another client makes the server
    send it."""
    wire = await server.wire("chatter")
    frame = '{"type":"custom","message":{"kind":"chat","data":"spam"}}'
    out.figures["chats_sent"] = await wire.flood(frame, count=100_000, duration=HOLD)


async def protocol_ping_flood(server: Server, out: Outcome) -> None:
    """Item 6. 600,000 WebSocket pings (75 MiB, 125-byte payloads) as fast as the server reads
    them within 3 s, never reading a pong: what the server holds for the unread pongs must stay
    bounded (the RSS bound is the default ``max_queue_bytes``, 16 MiB, plus the slack)."""
    client = (await server.hostile(rcvbuf=4096)).client
    response = await client.handshake(f"{DEFAULT_PATH}?token=pinger")
    assert response.status == 101, response
    client.stop_reading()
    frame = encode_frame(PING, b"p" * 125)
    sent = await client.flood(frame, count=600_000, duration=3.0)
    out.figures["pings_sent"] = sent
    out.figures["ping_mib_sent"] = round(sent * len(frame) / MiB, 1)


NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e400", "[1, NaN]", '{"x": -1e400}')


async def non_finite_numbers(server: Server, out: Outcome) -> None:
    """Item 1. ``NaN``, ``Infinity``, ``1e400`` inside ``data`` of ``echo`` and ``chat``
    requests, one connection each. The attacker may be closed (1007), get an error reply or no
    reply, but never an echo (it could only carry a changed value); whatever it and everyone
    else receives must be strict JSON."""

    async def one(kind: str, n: int, data: str) -> tuple[str, str, list[str]]:
        wire = await server.wire(f"nf{kind}{n}")
        await wire.send_text(_custom(kind, data, f"nf{n}"))
        seen: list[str] = []
        result = await _reply_to(wire, f"nf{n}", 1.0, seen)
        return f"{kind} {data}", _describe(result, wire), seen

    results = await asyncio.gather(*(one(kind, n, data) for kind in ("echo", "chat")
                                     for n, data in enumerate(NON_FINITE)))
    out.figures["attacker_outcomes"] = sorted({outcome for _, outcome, _ in results})
    for label, outcome, seen in results:
        if bad := _nonstrict(seen):
            out.violations.append(f"attacker got non-JSON ({label}): {bad[0]}")
        elif label.startswith("echo") and outcome == "reply":
            # JSON cannot carry the value back: a reply means the data was silently changed.
            reply = next(f for f in seen if _responds_to(f, f"nf{NON_FINITE.index(label[5:])}"))
            data = json.loads(reply)["message"]["data"]
            out.violations.append(f"{label} was accepted and echoed as {json.dumps(data)}")


def _empty_objects_frame(size: int, kind: str = "echo", rchan: str = "big") -> str:
    """A custom request whose ``data`` is ``[{},{},...]``, the whole frame ``size`` bytes."""
    head = f'{{"type":"custom","message":{{"kind":"{kind}","__rchan":"{rchan}","data":['
    tail = "{}]}}"
    count = (size - len(head) - len(tail)) // 3
    return head + "{}," * count + tail


async def big_frame(server: Server, out: Outcome) -> None:
    """Item 10. One frame just under the default 16 MiB limit, of ``[{},{},...]`` (5.6 million
    objects), as an ``echo`` request. Any outcome for the attacker (reply, error, close); what
    it costs the server is bounded: RSS growth at most 4 x the frame size plus the slack."""
    await _one_big_frame(server, out, _empty_objects_frame(16 * MiB - 1024))


@functools.cache
def _many_keys_frame(keys: int) -> str:
    """A custom ``echo`` request whose ``data`` is one object of ``keys`` distinct keys."""
    body = ",".join(f'"k{i}":0' for i in range(keys))
    return f'{{"type":"custom","message":{{"kind":"echo","__rchan":"big","data":{{{body}}}}}}}'


async def big_frame_keys(server: Server, out: Outcome) -> None:
    """Item 10, another shape: one 11 MiB frame holding an object of 999,990 distinct keys (the
    most expensive value per byte; it was under the first value limit, a million). Same bounds as
    ``big_frame``."""
    await _one_big_frame(server, out, _many_keys_frame(KEYS))


async def big_frame_keys_under_limit(server: Server, out: Outcome) -> None:
    """Item 10: the same shape just under the default ``max_message_values``, so the frame is
    decoded, not refused: what the limit lets through must fit the same bounds."""
    await _one_big_frame(server, out, _many_keys_frame(KEYS_UNDER_LIMIT))


KEYS = 999_990
#: Keys plus the envelope's values stay under the default limit (the code before the fixes had
#: none: then the first one's default, 250,000, stands in).
KEYS_UNDER_LIMIT = getattr(ServerConfig(), "max_message_values", 250_000) - 10


async def _one_big_frame(server: Server, out: Outcome, frame: str) -> None:
    wire = await server.wire("big")
    out.figures["frame_mib"] = round(len(frame) / MiB, 1)
    started = time.monotonic()
    await wire.send_text(frame)
    result = await _reply_to(wire, "big", 6.0, [])
    out.figures["attacker_outcome"] = _describe(result, wire)
    out.figures["outcome_after"] = round(time.monotonic() - started, 2)


CHUNK_LIMIT = 4 * MiB
EMOJI_PART = json.dumps("\U0001f600" * 16384, ensure_ascii=False)  # 64 KiB of UTF-8
DICTS_PART = "[" + "{}," * 21844 + "{}]"  # 64 KiB on the wire


async def chunked_parts(server: Server, out: Outcome) -> None:
    """Item 5, with ``max_chunked_bytes`` = 4 MiB. The attacker calls ``ask`` and answers the
    server's request with parts of a 1000-part answer it never completes: 64 KiB parts of
    4-byte characters, then (another connection) of ``[{},...]``, up to 8 MiB each. The request
    must fail (the attacker's ``ask`` gets an error reply) once the parts' UTF-8 bytes pass the
    limit, and what the server holds stays bounded: RSS growth at most 2 x the limit plus the
    slack."""
    baseline = server.rss()
    for name, part in (("4-byte", EMOJI_PART), ("dicts", DICTS_PART)):
        wire = await server.wire(f"chunker-{name}")
        await wire.send_text(_custom("ask", '"q"', "ask"))
        rchan = await _server_request(wire)
        seen: list[str] = []
        answered = asyncio.get_running_loop().create_task(_reply_to(wire, "ask", 8.0, seen))
        sent = 0
        for _ in range(128):
            if answered.done():
                break
            frame = (f'{{"type":"message","channel":{json.dumps(rchan)},"chunk_count":1000,'
                     f'"message":{part}}}')
            await wire.send_text(frame)
            sent += len(frame.encode())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(answered), 1.0)
        rss = server.rss()
        out.figures[f"{name}_mib_sent"] = round(sent / MiB, 2)
        out.figures[f"{name}_rss_growth_mib"] = (
            None if rss is None or baseline is None else round((rss - baseline) / MiB, 1))
        result = answered.result() if answered.done() else None
        answered.cancel()
        out.figures[f"{name}_outcome"] = _describe(result, wire)
        if result is None and sent > CHUNK_LIMIT:
            out.violations.append(
                f"{name} parts: {sent / MiB:.1f} MiB of UTF-8 accepted under a {CHUNK_LIMIT // MiB} MiB "
                "limit, the request still pending")
        await wire.close()


async def _server_request(wire: Wire) -> str:
    """The ``__rchan`` of the next server request (ticks and chat pushes come in between)."""
    for _ in range(1000):
        frame = await wire.next_frame(REQUEST_TIMEOUT)
        assert isinstance(frame, str), f"closed with {frame} {wire.close_reason!r}"
        rchan = (json.loads(frame).get("message") or {}).get("__rchan")
        if isinstance(rchan, str):
            return rchan
    raise AssertionError("no server request in 1000 frames")


DEEP = "[" * 250 + "]" * 250
LONE_SURROGATE = '"\\ud800 a lone surrogate escape"'


async def json_limits(server: Server, out: Outcome) -> None:
    """Item 8. Valid JSON nested 250 deep, and a string with a lone-surrogate escape (a browser
    can send one), as ``echo`` requests. The attacker gets a reply, or a close whose reason is
    its own (not the generic "not valid JSON"): the documented limit."""
    for name, data in (("deep", DEEP), ("surrogate", LONE_SURROGATE)):
        wire = await server.wire(f"limits-{name}")
        await wire.send_text(_custom("echo", data, name))
        seen: list[str] = []
        result = await _reply_to(wire, name, 2.0, seen)
        out.figures[f"{name}_outcome"] = _describe(result, wire)
        if isinstance(result, int) and "not valid JSON" in wire.close_reason:
            out.violations.append(f"{name}: closed as {wire.close_reason!r}, not with its own reason")
        if result is None:
            out.violations.append(f"{name}: neither a reply nor a close within 2 s")
        if bad := _nonstrict(seen):
            out.violations.append(f"{name}: attacker got non-JSON {bad[0]}")


HALF_OPEN = 1100


async def half_open(server: Server, out: Outcome) -> None:
    """Item 4, against ``dara-ws serve`` started with a soft fd limit of 1024. 1,100 connections
    send a partial HTTP upgrade and wait; meanwhile five new clients connect: every one must
    connect and get its ``echo`` answered within 2 s."""
    assert server.port is not None

    async def opener(i: int) -> bool:
        try:
            client = await HostileClient.open(server.port or 0, timeout=1.0)
        except (OSError, TimeoutError):
            return False
        server.wires.append(SocketWire(client))
        client.send_partial_handshake()
        return True

    opened = 0
    for batch in range(0, HALF_OPEN, 100):
        opened += sum(await asyncio.gather(*(opener(i) for i in range(batch, batch + 100))))
    out.figures["half_open"] = opened

    async def legit(i: int) -> str | None:
        client = DaraClient(lambda: server.connect(f"legit{i}"), ping_interval=None,
                            init_timeout=REQUEST_TIMEOUT)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await client.connect()
                await client.request("echo", i, timeout=REQUEST_TIMEOUT)
        except Exception as exc:
            return type(exc).__name__
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2)
        return None

    failures = [f for f in await asyncio.gather(*(legit(i) for i in range(5))) if f is not None]
    out.figures["legit_failed"] = f"{len(failures)}/5"
    if failures:
        out.violations.append(f"{len(failures)} of 5 legit connects failed during the flood: "
                              f"{sorted(set(failures))}")
    out.figures["half_open_held_at_end"] = _held(server.port, [
        w.client.local_port for w in server.wires if isinstance(w, SocketWire)])


def _held(server_port: int, client_ports: list[int]) -> int:
    """How many of these connections' server ends a process still holds (/proc/net/tcp)."""
    wanted, held = set(client_ports), 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if local == server_port and remote in wanted and fields[9] != "0":
                held += 1
    return held


def _cookie_header(size: int) -> str:
    cookies = (f"k{i}=v" for i in itertools.count())
    parts: list[str] = []
    length = 0
    for cookie in cookies:
        if length + len(cookie) + 2 > size:
            break
        parts.append(cookie)
        length += len(cookie) + 2
    return "; ".join(parts)


async def huge_headers(server: Server, out: Outcome) -> None:
    """Item 11. Five handshakes at once, each with 100 ``Cookie`` headers of 8 KB of tiny
    cookies, then one with a single 64 KB ``Cookie`` header. Each attacker gets an HTTP answer
    (any status) or a closed connection within 2 s; the healthy client's pushes go on."""
    cookie = _cookie_header(8000)

    async def attempt(headers: list[tuple[str, str]]) -> str:
        client = (await server.hostile()).client
        started = time.monotonic()
        try:
            response = await client.handshake(f"{DEFAULT_PATH}?token=cookie", headers,
                                              timeout=REQUEST_TIMEOUT)
        except TimeoutError:
            return "no answer"
        except EOFError:
            return f"closed after {time.monotonic() - started:.1f} s"
        return f"HTTP {response.status} after {time.monotonic() - started:.1f} s"

    repeated = await asyncio.gather(*(attempt([("Cookie", cookie)] * 100) for _ in range(5)))
    single = await attempt([("Cookie", "a=" + "x" * 65536)])
    out.figures["repeated_cookies"] = repeated
    out.figures["one_64k_header"] = single
    for label, result in (*(("100 x 8 KB cookies", r) for r in repeated), ("64 KB header", single)):
        if result == "no answer":
            out.violations.append(f"{label}: no answer within {REQUEST_TIMEOUT} s")


RATE_LIMIT = 200


async def rate_limited(server: Server, out: Outcome) -> None:
    """Item 12, with ``rate_limit`` = 200 frames per second. Two attackers, each busy (not
    reading) while it floods, then reading: one writes 300 ``echo`` requests at once and reads
    0.3 s later (the replies within the limit are queued when the server closes), the other
    streams 400, 1 ms apart, and reads 0.2 s later (its frames still arrive while the server
    closes). Each must get the replies to its first 200 requests (those within the limit), in
    order, then a 1008 close: a server must neither drop what it queued before its close frame
    nor close its socket before the client's close frame came (RFC 6455 7.1.1), as frames
    arriving at a closed socket reset the connection and the client's kernel then drops the
    replies it had not read yet."""
    outcomes: list[str] = []
    for pattern in ("burst", "stream"):
        wire = await server.wire(f"flooder-{pattern}")
        wire.stop_reading()
        if pattern == "burst":
            await wire.send_burst([_custom("echo", str(n), f"r{n}") for n in range(300)])
            await asyncio.sleep(0.3)
        else:
            for n in range(400):
                await wire.send_burst([_custom("echo", str(n), f"r{n}")])
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.2)
        wire.resume_reading()
        replies: list[int] = []
        code: int | None = None
        for _ in range(500):
            try:
                frame = await wire.next_frame(3.0)
            except TimeoutError:
                break
            if isinstance(frame, int):
                code = frame
                break
            message = json.loads(frame).get("message") or {}
            if str(message.get("__response_for", "")).startswith("r"):
                replies.append(int(message["data"]))
        await wire.close()
        outcomes.append(f"{pattern}: {len(replies)} replies, close {code}")
        in_order = replies == list(range(len(replies)))
        if not in_order or len(replies) < RATE_LIMIT:
            out.violations.append(f"{pattern}: {len(replies)} of the {RATE_LIMIT} replies within the "
                                  f"limit arrived (in order: {in_order})")
        if code != 1008:
            out.violations.append(f"{pattern}: closed with {code}, not 1008")
    out.figures["flooders"] = outcomes


def _costly_frame_text() -> str:
    """A frame of just under the default 16 MiB limit, of the costliest shape the limits let
    through: an answer (its ``"channel"`` key) in parts (``chunk_count``, so not a plain one)
    to no pending request, whose data is ~3,900 integers of 4,299 digits (just under
    ``MAX_NUMBER_DIGITS``; the longest numbers cost the most per byte to decode), a string
    ``"NaN"`` and a lone surrogate escape. Each of these once made the decoder parse the frame
    again: four parses of 16 MiB."""
    head = '{"type":"message","channel":"nobody","chunk_count":2,"message":['
    tail = ',"NaN","\\ud800"]}'
    number = "9" * 4299
    count = (16 * MiB - 4096 - len(head) - len(tail)) // (len(number) + 1)
    return head + ",".join([number] * count) + tail


@functools.cache
def _costly_frame() -> bytes:
    """:func:`_costly_frame_text` as a masked frame, built once (masking 16 MiB here would
    stall the test's own loop, and with it the healthy client's measurement)."""
    return encode_frame(TEXT, _costly_frame_text(), mask_key=b"\x01\x02\x03\x04")


COSTLY_SENDERS = 2


async def costly_frames(server: Server, out: Outcome) -> None:
    """Amplification of decoding: two connections of one client send the costliest frame
    within the limits (:func:`_costly_frame_text`) as fast as the server reads them, for 3 s.
    Each frame is ignored (an answer to nothing); what one costs the event loop must stay
    within what a frame of that size is documented to cost, so that the healthy client's pushes
    keep their bound while a few connections send them side by side."""
    frame = _costly_frame()
    wires = [await server.wire(f"costly{n}") for n in range(COSTLY_SENDERS)]

    async def send(wire: Wire) -> int:
        assert isinstance(wire, SocketWire)
        return await wire.client.flood(frame, count=40, duration=3.0)

    sent = await asyncio.gather(*(send(wire) for wire in wires))
    out.figures["frames_sent"] = sent
    out.figures["mib_sent"] = round(sum(sent) * len(frame) / MiB)


async def fragment_flood(server: Server, out: Outcome) -> None:
    """A message that never ends: a text frame's first fragment, then empty continuation frames
    (6 bytes each on the wire) as fast as the server reads them, for 3 s, never reading."""
    wire = await server.wire("fragments", rcvbuf=4096)
    assert isinstance(wire, SocketWire)
    wire.stop_reading()
    wire.client.send_frame(TEXT, b'{"type":"ping",', fin=False)
    out.figures["fragments_sent"] = await wire.client.flood(
        encode_frame(CONTINUATION, b"", fin=False), count=3_000_000, duration=3.0)


async def pong_flood(server: Server, out: Outcome) -> None:
    """Unsolicited pongs of 125 bytes, as fast as the server reads them, for 3 s."""
    wire = await server.wire("ponger", rcvbuf=4096)
    assert isinstance(wire, SocketWire)
    wire.stop_reading()
    out.figures["pongs_sent"] = await wire.client.flood(encode_frame(PONG, b"p" * 125), count=1_000_000,
                                                         duration=3.0)


MANY = 64


async def ping_flood_many(server: Server, out: Outcome) -> None:
    """One client, many connections: ``MANY`` connections, each its own user, flood JSON pings
    for 3 s as fast as the server reads them, reading (and dropping) every pong. Each is within
    every bound of one connection; together they must not take more of each turn of the event
    loop than one client's share (before, 64 shares: every turn held 1 to 2 s)."""
    await _flood_pings([await server.wire(f"pinger{n}") for n in range(MANY)], out)


async def _flood_pings(wires: list[Wire], out: Outcome) -> None:
    """``wires`` flood JSON pings for 3 s as fast as the server reads them, dropping the pongs."""
    for wire in wires:
        assert isinstance(wire, SocketWire)
        wire.client.discard_input()
    frame = '{"type":"ping","message":null}'
    sent = await asyncio.gather(*(wire.flood(frame, count=1_000_000, duration=3.0) for wire in wires))
    out.figures["pings_sent"] = sum(sent)


#: Client addresses of the many-address attacks: 127.0.0.2 to 127.0.0.49.
ADDRESSES = tuple(f"127.0.0.{n}" for n in range(2, 50))


async def ping_flood_many_addresses(server: Server, out: Outcome) -> None:
    """Many clients (or one holding many addresses): a connection from each of ``ADDRESSES``
    floods JSON pings for 3 s as fast as the server reads them, reading (and dropping) every
    pong. Each address is within its own per-turn shares; together they must not take every
    turn of the event loop (before, each address's share was a share on top of the others':
    48 of them held every turn for a second or more, as 64 connections of one address did
    before those shares)."""
    await _flood_pings([await server.wire(f"far{n}", local=address) for n, address in enumerate(ADDRESSES)], out)


async def reconnect_storm(server: Server, out: Outcome) -> None:
    """Four loops of one client connect, authenticate, read ``init`` and close, for 3 s."""
    assert server.port is not None
    port = server.port
    deadline = time.monotonic() + 3.0

    async def loop() -> int:
        done = 0
        while time.monotonic() < deadline:
            client = await HostileClient.open(port, timeout=REQUEST_TIMEOUT)
            try:
                response = await client.handshake(f"{DEFAULT_PATH}?token=storm{done}")
                assert response.status == 101, response
                await client.read_frame(REQUEST_TIMEOUT)
                client.send_close(1000)
                await client.read_close(REQUEST_TIMEOUT)
                done += 1
            finally:
                client.abort()
        return done

    out.figures["connections"] = sum(await asyncio.gather(*(loop() for _ in range(4))))


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    attack: Callable[[Server, Outcome], Awaitable[None]]
    item: str
    transports: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    #: Most RSS growth the attack may cost the server (bytes); ``None``: not measured.
    rss_bound: int | None = None
    cli: bool = False
    #: Called before the case starts: work of the attacker's that must not stall the test's loop.
    prepare: Callable[[], object] | None = None
    echo_every: float = ECHO_EVERY
    chat_every: float = CHAT_EVERY


CASES: dict[str, Case] = {
    "slow_consumer": Case(slow_consumer, "2", ALL),
    "json_ping_flood": Case(json_ping_flood, "6, 12", ALL, {"send_timeout": 1.0}),
    "chat_flood": Case(chat_flood, "2", ALL),
    "protocol_ping_flood": Case(protocol_ping_flood, "6", SOCKETS, rss_bound=16 * MiB + RSS_SLACK),
    "non_finite_numbers": Case(non_finite_numbers, "1", ALL),
    "big_frame": Case(big_frame, "10", ALL, rss_bound=4 * 16 * MiB + RSS_SLACK),
    "big_frame_keys": Case(big_frame_keys, "10", ALL, rss_bound=4 * 16 * MiB + RSS_SLACK,
                           prepare=functools.partial(_many_keys_frame, KEYS)),
    "big_frame_keys_under_limit": Case(
        big_frame_keys_under_limit, "10", ALL, rss_bound=4 * 16 * MiB + RSS_SLACK,
        prepare=functools.partial(_many_keys_frame, KEYS_UNDER_LIMIT)),
    "chunked_parts": Case(chunked_parts, "5", SOCKETS, {"max_chunked_bytes": CHUNK_LIMIT},
                          rss_bound=2 * CHUNK_LIMIT + RSS_SLACK),
    "json_limits": Case(json_limits, "8", ALL),
    "half_open": Case(half_open, "4", SOCKETS, cli=True),
    "huge_headers": Case(huge_headers, "11", SOCKETS),
    "rate_limited": Case(rate_limited, "12", ALL, {"rate_limit": RATE_LIMIT, "rate_window": 1.0}),
    "costly_frames": Case(costly_frames, "10", SOCKETS, prepare=_costly_frame),
    "fragment_flood": Case(fragment_flood, "6", SOCKETS, rss_bound=RSS_SLACK),
    "pong_flood": Case(pong_flood, "6", SOCKETS, rss_bound=RSS_SLACK),
    "reconnect_storm": Case(reconnect_storm, "4", SOCKETS),
    "ping_flood_many": Case(ping_flood_many, "6", SOCKETS),
    "ping_flood_many_addresses": Case(ping_flood_many_addresses, "6", SOCKETS),
}

#: Cases that fail on the code before issue 10's fixes: strict, so a fix turns them into
#: failures until the mark is removed.
XFAIL: dict[tuple[str, str], str] = {}


def _params() -> Iterator[Any]:
    for name, case in CASES.items():
        for transport in case.transports:
            reason = XFAIL.get((name, transport))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(name, transport, id=f"{name}-{transport}", marks=marks)


async def _sample_rss(server: Server, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss = server.rss()
        if rss is not None:
            peak[0] = max(peak[0], rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _report(record: dict[str, Any]) -> None:
    if path := os.environ.get("DARA_NOISY_REPORT"):
        with open(path, "a") as report:
            report.write(json.dumps(record) + "\n")


@pytest.mark.parametrize(("name", "transport"), list(_params()))
async def test_a_hostile_client_never_hurts_a_healthy_one(name: str, transport: str) -> None:
    case = CASES[name]
    if case.prepare is not None:
        case.prepare()
    async with serving(transport, case.config, cli=case.cli) as server:
        healthy = Healthy(lambda: server.connect(HEALTHY), server.tick_kinds, case.echo_every,
                          case.chat_every)
        await healthy.start()
        baseline = server.rss()
        peak = [baseline or 0]
        stop_sampling = asyncio.Event()
        sampler = asyncio.get_running_loop().create_task(_sample_rss(server, peak, stop_sampling))
        out = Outcome()
        started = time.monotonic()
        try:
            async with asyncio.timeout(ATTACK_LIMIT):
                await case.attack(server, out)
        except TimeoutError:
            out.violations.append(f"the attack did not end within {ATTACK_LIMIT} s")
        with contextlib.suppress(TimeoutError):  # the healthy client goes on measuring
            await asyncio.wait_for(asyncio.Event().wait(), OBSERVE)
        stop_sampling.set()
        await sampler
        attack_seconds = round(time.monotonic() - started, 2)
        figures = await healthy.stop()
        violations = healthy.violations(figures) + out.violations
        end = server.rss()
        if baseline is not None and end is not None:
            figures["rss_peak_growth_mib"] = round((peak[0] - baseline) / MiB, 1)
            figures["rss_end_growth_mib"] = round((end - baseline) / MiB, 1)
            if case.rss_bound is not None and peak[0] - baseline > case.rss_bound:
                violations.append(f"server RSS grew {(peak[0] - baseline) / MiB:.0f} MiB > "
                                  f"{case.rss_bound / MiB:.0f} MiB")
        errors = server.errors_logged()
        figures["server_errors_logged"] = len(errors)
        if out.check_errors and errors:
            violations.append(f"server logged {len(errors)} ERROR lines, e.g. {errors[0][:100]}")
    record = {"case": name, "item": case.item, "transport": transport, "seconds": attack_seconds,
              "server_log": str(server.log) if server.log else None,
              **figures, **out.figures, "violations": violations}
    _report(record)
    if not violations and server.log is not None:
        _discard(server.log)  # a failing case keeps its server's log, named in the assertion
    assert not violations, json.dumps(record, indent=1)


if __name__ == "__main__":  # the child server: python -m tests.test_noisy_neighbour TRANSPORT CONFIG
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=SOCKETS)
    parser.add_argument("config", type=json.loads)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_child(args.transport, args.config))
