"""A server -> client round trip's own cost in the server, for an instruction counter or a
system-call tracer: one server process (any implementation of ``benchmarks.server``), one lean
client process answering in its frame callback (``benchmarks.client --mode answer``, as in the
``server_request`` scenario), ``--warmup`` round trips, then ``--m`` measured ones, all of them
run by the event loop inside one ``functools.reduce`` call, so that only they are counted with::

    valgrind --tool=callgrind --toggle-collect=functools_reduce \\
        python -m benchmarks.rt_instructions --impl ours-picows

Instructions per round trip = the collected total / m: everything the server's process does in
user space for it (its event loop's iterations included), none of the client's. It also prints
the measured round trips' p50 and the CPU time per round trip of the server (user, system) and of
the client process (from /proc). ``--strace`` traces the server's system calls during the
measured round trips (``strace -c -f``: totals, divide by m), ``--cprofile PATH`` profiles them.
``--impl floor`` serves :class:`Floor`, a server that does no work; ``--impl
exp:/path/file.py:Class`` any other ``benchmarks.server.Impl`` subclass (an experiment). Environment: ``RT_CONFIG``
(JSON for the implementation's config), ``RT_CLIENT_CPUS`` (``taskset -c`` list for the
client), ``RT_CLIENT_STRACE`` (a path: the client's system calls, ``strace -c``).
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import asyncio
import base64
import functools
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, cast

from .procs import ROOT, loop_factory
from .server import IMPLS, Impl

#: The WebSocket handshake's GUID (RFC 6455 section 1.3).
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Floor(Impl):
    """``--impl floor``: a server that does no work, to see what a round trip costs without one.
    An asyncio ``BufferedProtocol`` (reading into one buffer, as the adapters do) that answers
    the upgrade, sends the ``init`` frame, and per request writes one prebuilt frame and
    completes one future on whatever arrives next: no frame parsing, no JSON, no checks. Not a
    server to use: only the lean client on 127.0.0.1 talks to it."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.conn: asyncio.Transport | None = None  # the one connection (the answering client)
        self.reply: asyncio.Future[None] | None = None
        self.frame = b""

    async def start(self) -> int:
        bench = self
        view = memoryview(bytearray(64 * 1024))
        request = b'{"type":"message","message":{"q":1,"__rchan":"x"}}'
        bench.frame = bytes((0x81, len(request))) + request

        class Protocol(asyncio.BufferedProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)
                self.head: bytes | None = b""

            def get_buffer(self, sizehint: int) -> memoryview:
                return view

            def buffer_updated(self, nbytes: int) -> None:
                if self.head is not None:  # the upgrade request
                    self.head += view[:nbytes]
                    head = self.head
                    if b"\r\n\r\n" not in head:
                        return
                    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                               if line.lower().startswith(b"sec-websocket-key:"))
                    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
                    init = b'{"type":"init","message":{"channel":"c"}}'
                    self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                                         + b"\r\n\r\n" + bytes((0x81, len(init))) + init)
                    self.head = None
                    bench.conn = self.transport
                    return
                reply = bench.reply
                if reply is not None and not reply.done():
                    reply.set_result(None)

        self.server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def conn_count(self) -> int:
        return 0 if self.conn is None else 1

    async def stop(self) -> None:
        self.server.close()

    async def ask(self) -> Any:
        self.reply = reply = asyncio.get_running_loop().create_future()
        assert self.conn is not None
        self.conn.write(self.frame)
        await reply


def _proc_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _run(loop: asyncio.AbstractEventLoop, _: Any, coroutine: Any) -> Any:
    return loop.run_until_complete(coroutine)


async def _start(impl_name: str) -> tuple[Any, asyncio.subprocess.Process]:
    if impl_name.startswith("exp:"):  # an experiment's server class: exp:/path/file.py:Class
        import importlib.util
        path, cls = impl_name[4:].rsplit(":", 1)
        spec = importlib.util.spec_from_file_location("exp_server", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        factory = getattr(module, cls)
    else:
        factory = Floor if impl_name == "floor" else IMPLS[impl_name]
    impl = factory(json.loads(os.environ.get("RT_CONFIG", "{}")))
    port = await impl.start()
    pin = os.environ.get("RT_CLIENT_CPUS")
    client = await asyncio.create_subprocess_exec(
        *(["taskset", "-c", pin] if pin else []),
        *(["strace", "-c", "-o", os.environ["RT_CLIENT_STRACE"]] if os.environ.get("RT_CLIENT_STRACE") else []),
        sys.executable, "-m", "benchmarks.client", "--mode", "answer", "--port", str(port),
        "--heartbeat", "0", "--max-seconds", "600", cwd=str(ROOT),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert client.stdout is not None
    if b'"ready"' not in await asyncio.wait_for(client.stdout.readline(), 60):
        raise RuntimeError("the client process failed")
    deadline = time.monotonic() + 30
    while impl.conn_count() < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the client did not register")
        await asyncio.sleep(0.01)
    return impl, client


async def _stop(impl: Any, client: asyncio.subprocess.Process) -> None:
    assert client.stdin is not None
    client.stdin.close()
    try:
        await asyncio.wait_for(client.wait(), 10)
    except TimeoutError:
        client.kill()
        await client.wait()
    await impl.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="ours-picows", help=f"one of {sorted(IMPLS)}")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--m", type=int, default=200, help="measured round trips")
    parser.add_argument("--strace", action="store_true",
                        help="trace the measured round trips' system calls (strace -c)")
    parser.add_argument("--cprofile", metavar="PATH", help="cProfile the measured round trips into PATH")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    factory = loop_factory(args.loop) or asyncio.new_event_loop
    loop = factory()
    asyncio.set_event_loop(loop)
    impl, client = loop.run_until_complete(_start(args.impl))
    loop.run_until_complete(impl.ask_loop(args.warmup, 0))
    tracer = None
    if args.strace:
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(os.getpid()), "-o", "/dev/stderr"])
        time.sleep(1.0)  # strace attaches
    profile = None
    if args.cprofile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    client_cpu = _proc_cpu(client.pid)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    samples = functools.reduce(functools.partial(_run, loop), [impl.ask_loop(0, args.m)], None)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    client_user, client_sys = (b - a for a, b in zip(client_cpu, _proc_cpu(client.pid), strict=True))
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.cprofile)
    if tracer is not None:
        tracer.terminate()
        tracer.wait(10)
    loop.run_until_complete(_stop(impl, client))
    samples.sort()
    print(f"{args.impl}: {args.m} round trips counted (divide the collected instructions by it); "
          f"p50 {samples[len(samples) // 2] / 1000:.0f} us, {wall / args.m * 1e6:.0f} us each; CPU us "
          f"per round trip: server user {(after.ru_utime - usage.ru_utime) / args.m * 1e6:.0f} "
          f"sys {(after.ru_stime - usage.ru_stime) / args.m * 1e6:.0f}, client user "
          f"{client_user / args.m * 1e6:.0f} sys {client_sys / args.m * 1e6:.0f}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
