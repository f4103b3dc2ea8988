"""A client load process: ``python -m benchmarks.client --proto dara|sio --mode MODE ...``.

The clients are lean on purpose (:mod:`benchmarks.leanws`, a minimal RFC 6455 client that handles
each frame where it was read) and speak the wire directly: ``shared/protocol.md`` for
``dara``, Engine.IO 4 / Socket.IO 5 text packets for ``sio``. So the client side costs the same, and
as little as possible, whichever server is measured; ``raw`` and ``ours`` speak the same Dara wire
and get byte-for-byte the same client.

Modes:

* ``answer``: one connection that answers server -> client requests (scenario: send_and_wait).
* ``request``: one connection that times sequential custom requests on each ``run`` command
  (scenario: client request with reply).
* ``fanout``: many connections that count broadcast frames (those containing ``"bench"``) and
  report, for every round of ``--m`` messages, the time the *last* connection got its last one.
* ``idle``: many connections that only keep alive (memory scenario).
* ``slow``: many connections that stop reading right after the handshake (slow consumers).
* ``stream``: many connections that count frames and sample delivery lag (``t`` in the payload).

Many-connection modes on the Dara wire (except ``slow``) send the stock client's ``ping`` every
``--heartbeat`` seconds. The process prints ``{"event": "ready", "connected": n}`` once every
connection is open, and stops at end of stdin or after ``--max-seconds``. Commands:
``{"cmd": "report"}`` prints the counters; ``{"cmd": "run", "warmup": w, "iters": n}`` (mode
``request``) times ``n`` requests after ``w`` unmeasured ones.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from .leanws import LeanWS, open_lean
from .procs import emit, run_child, stdin_commands

BENCH = b'"bench"'
REQUEST_IDS = itertools.count()
SIO_PING = b"2"


class Counters:
    """What the connections of this process observed."""

    def __init__(self, n_conns: int, m: int) -> None:
        self.n_conns = n_conns
        self.m = m
        self.received = 0
        self.first = 0.0
        self.last = 0.0
        self.lags: list[float] = []
        self.rounds_done: dict[int, int] = {}
        self.rounds_last: dict[int, float] = {}

    def finished_round(self, r: int, now: float) -> None:
        self.rounds_done[r] = self.rounds_done.get(r, 0) + 1
        self.rounds_last[r] = max(self.rounds_last.get(r, 0.0), now)
        if self.rounds_done[r] == self.n_conns:
            emit({"event": "round", "r": r, "last": self.rounds_last.pop(r)})


def payload_of(proto: str, text: bytes) -> Any:
    """The application payload of a broadcast frame."""
    if proto == "sio":
        return json.loads(text[2:])[1]
    return json.loads(text)["message"]


async def open_conn(args: argparse.Namespace, token: str, extra_query: str = "") -> LeanWS:
    """Open one connection and complete the Dara (init) or Socket.IO (connect) handshake."""
    query = f"token={token}" if args.proto == "dara" else "EIO=4&transport=websocket"
    target = f"{args.path}?{query}{extra_query}"
    ws: LeanWS | None = None
    last: Exception | None = None
    for attempt in range(4):
        try:
            ws = await open_lean(args.port, target, timeout=30)
            break
        except (OSError, TimeoutError) as exc:
            last = exc
            await asyncio.sleep(0.2 * (attempt + 1))
    if ws is None:
        raise RuntimeError(f"could not connect to 127.0.0.1:{args.port}{target}: {last!r}")
    if args.mode == "slow" and args.proto == "dara":
        assert ws.transport is not None
        ws.transport.pause_reading()  # from now on this client reads nothing at all
        return ws
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    ws.on_text = inbox.put_nowait
    first = await asyncio.wait_for(inbox.get(), 30)
    if args.proto == "sio":
        if not first.startswith(b"0"):
            raise RuntimeError(f"unexpected Engine.IO open packet {first!r}")
        ws.send_text("40" + json.dumps({"token": token}))
        while True:
            packet = await asyncio.wait_for(inbox.get(), 30)
            if packet == SIO_PING:
                ws.send_text("3")
            elif packet.startswith(b"40"):
                break
            else:
                raise RuntimeError(f"Socket.IO connect refused: {packet!r}")
        if args.mode == "slow":
            assert ws.transport is not None
            ws.transport.pause_reading()
    elif json.loads(first).get("type") != "init":
        raise RuntimeError(f"expected init, got {first!r}")
    return ws


# ------------------------------------------------------------------------ one-connection modes


def answerer(args: argparse.Namespace, ws: LeanWS) -> Callable[[bytes], None]:
    """Answer every server request in the frame callback: Dara response / Socket.IO ack."""
    if args.proto == "sio":
        def on_sio(text: bytes) -> None:
            if text.startswith(b"42"):
                ws.send_text(b"43" + text[2:text.index(b"[")] + b'[{"a":1}]')
            elif text == SIO_PING:
                ws.send_text(b"3")
        return on_sio

    def on_dara(text: bytes) -> None:
        message = json.loads(text).get("message")
        if isinstance(message, dict) and "__rchan" in message:
            ws.send_text(json.dumps({"type": "message", "channel": message["__rchan"],
                                     "chunk_count": None, "message": {"a": 1}}))
    return on_dara


async def request(
    args: argparse.Namespace, ws: LeanWS, inbox: asyncio.Queue[bytes], warmup: int, iters: int
) -> dict[str, Any]:
    """Sequential client -> server requests with reply; nanoseconds of each after warm-up."""
    samples: list[int] = []
    t_start = time.perf_counter()
    for i in range(warmup + iters):
        if i == warmup:
            t_start = time.perf_counter()
        n = next(REQUEST_IDS)
        t = time.perf_counter_ns()
        if args.proto == "sio":
            ws.send_text(f"42{n}" + json.dumps(["echo", {"q": n}]))
            prefix = f"43{n}[".encode()
            while True:
                text = await inbox.get()
                if text.startswith(prefix):
                    break
                if text == SIO_PING:
                    ws.send_text(b"3")
        else:
            rchan = f"r{n}"
            ws.send_text(json.dumps({"type": "custom", "message": {
                "kind": "echo", "data": {"q": n}, "__rchan": rchan}}))
            while True:
                frame = json.loads(await inbox.get())
                message = frame.get("message")
                if (frame.get("type") == "custom" and isinstance(message, dict)
                        and message.get("__response_for") == rchan):
                    break
        if i >= warmup:
            samples.append(time.perf_counter_ns() - t)
    return {"samples": samples, "total_s": time.perf_counter() - t_start}


async def single(args: argparse.Namespace) -> None:
    """One connection: answers requests (``answer``), or times requests on each ``run``
    command (``request``), with unique request ids across runs."""
    ws = await open_conn(args, f"{args.token_prefix}0",
                         "&bench=rt" if args.mode == "answer" else "")
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    ws.on_text = answerer(args, ws) if args.mode == "answer" else inbox.put_nowait
    emit({"event": "ready", "connected": 1})
    async for command in stdin_commands():
        if command.get("cmd") == "run":
            result = await request(args, ws, inbox, command["warmup"], command["iters"])
            emit({"event": "result", "id": command.get("id"), **result})
    ws.abort()


# ----------------------------------------------------------------------- many-connection modes


def counter(args: argparse.Namespace, ws: LeanWS, counters: Counters) -> Callable[[bytes], None]:
    """Count benchmark frames on one connection (and answer Engine.IO pings)."""
    count = 0
    m = counters.m
    sample_every = args.sample_every
    stream = args.mode == "stream"
    proto = args.proto

    def on_text(text: bytes) -> None:
        nonlocal count
        if BENCH in text:
            count += 1
            now = time.monotonic()
            if stream:
                counters.received += 1
                counters.last = now
                if counters.first == 0.0:
                    counters.first = now
                if count % sample_every == 0:
                    counters.lags.append(now - payload_of(proto, text)["t"])
            elif count % m == 0:
                counters.finished_round(count // m - 1, now)
        elif text == SIO_PING:
            ws.send_text(b"3")

    return on_text


async def many(args: argparse.Namespace) -> None:
    tokens = [f"{args.token_prefix}{i}" for i in range(args.first, args.first + args.users)
              for _ in range(args.per_user)]
    sem = asyncio.Semaphore(args.concurrency)
    counters = Counters(len(tokens), args.m)

    async def opened(token: str) -> LeanWS:
        async with sem:
            ws = await open_conn(args, token)
        if args.mode != "slow":
            # At once, not after every connection is open: Engine.IO pings must be answered
            # while thousands of other handshakes are still going on.
            ws.on_text = counter(args, ws, counters)
        return ws

    conns = await asyncio.gather(*(opened(t) for t in tokens))
    beat = None
    if args.mode != "slow" and args.proto == "dara" and args.heartbeat > 0:
        # Like the stock client: servers may close connections that stay silent (ours after
        # ServerConfig.idle_timeout), e.g. while other implementations are being measured.
        beat = asyncio.create_task(heartbeat(conns, args.heartbeat))
    emit({"event": "ready", "connected": len(conns)})
    try:
        async for command in stdin_commands():
            if command.get("cmd") == "report":
                emit({"event": "result", "id": command.get("id"), "received": counters.received,
                      "first": counters.first, "last": counters.last,
                      "lags": sorted(counters.lags),
                      "open": sum(1 for ws in conns if ws.is_open)})
    finally:
        if beat is not None:
            beat.cancel()
        for ws in conns:
            ws.abort()


async def churn(args: argparse.Namespace) -> None:
    """Open ``--connects`` connections, ``--concurrency`` at a time, each through its handshake
    and first frame, then closed by the client with a closing handshake; report once all are
    done (a reconnect storm, as after a deploy)."""
    sem = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> None:
        async with sem:
            ws = await open_conn(args, f"{args.token_prefix}{args.first + i % args.users}")
            ws.close()
            await asyncio.wait_for(ws.closed, 30)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.connects)))
    emit({"event": "ready", "connected": args.connects, "seconds": time.perf_counter() - started})
    async for _ in stdin_commands():
        pass


async def heartbeat(conns: list[LeanWS], interval: float) -> None:
    """Send the stock client's ``ping`` on every connection every ``interval`` seconds, spread
    evenly (servers may close connections that stay silent, protocol.md section 2)."""
    ping = b'{"type":"ping","message":null}'
    slices = 10
    for _ in range(int(3600 / interval)):  # bounded: the process lives less than that
        for k in range(slices):
            for ws in conns[k::slices]:
                ws.send_text(ping)
            await asyncio.sleep(interval / slices)


async def amain(args: argparse.Namespace) -> None:
    if args.mode in ("answer", "request"):
        await single(args)
    elif args.mode == "churn":
        await churn(args)
    else:
        await many(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto", choices=["dara", "sio"], default="dara")
    parser.add_argument("--mode", required=True,
                        choices=["answer", "request", "churn", "fanout", "idle", "slow", "stream"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/core/ws")
    parser.add_argument("--token-prefix", default="user-")
    parser.add_argument("--first", type=int, default=0, help="first user number")
    parser.add_argument("--users", type=int, default=1)
    parser.add_argument("--per-user", type=int, default=1, help="connections per user")
    parser.add_argument("--m", type=int, default=1, help="fan-out messages per round")
    parser.add_argument("--sample-every", type=int, default=16)
    parser.add_argument("--heartbeat", type=float, default=5.0,
                        help="Dara ping interval in seconds (0: none)")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight")
    parser.add_argument("--connects", type=int, default=1000, help="connections opened (churn)")
    parser.add_argument("--max-seconds", type=float, default=900)
    run_child(amain, parser.parse_args())


if __name__ == "__main__":
    main()
