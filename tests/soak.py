"""Churn and soak (issue 5, part 2): connect/disconnect cycles with work in flight, beside a
stream of messages to long-lived clients, on one transport, on 127.0.0.1.

Every churn cycle connects a raw client, has a server request in flight to it (``send_and_wait``,
waiting for an answer that never comes), and on two cycles in three also a custom handler task
running or half a chunked answer received, then disconnects (the client closes, or on every fifth
cycle the server does). Every such request must fail at once with ``ConnectionClosed``. Meanwhile
the server sends ``messages`` numbered messages to long-lived clients, which check that they get
every one, in order. Afterwards the manager must hold nothing, no task may be left, and RSS
must be back within a small margin of where it was after a warm-up.

    python -m tests.soak --cycles 10000 --messages 100000 [--transport websockets|all]

prints the figures. ``tests/test_soak.py`` runs the same at a size set by ``DARA_SOAK_SCALE``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from dara_ws_core import ConnectionClosed, ServerConfig, Transport

from .stacks import TRANSPORTS, HandshakeRejected, Stack, running_stack

MiB = 1024 * 1024
FULL_CYCLES = 10_000
FULL_MESSAGES = 100_000
#: How far RSS may stay above its post-warm-up value once everything is gone.
RSS_MARGIN = 16 * MiB
USERS = 50  # churn tokens spread over this many users, several channels each
TIMEOUT = 10.0


@dataclass
class SoakReport:
    """The figures of one run."""

    transport: str
    cycles: int = 0
    rejected_handshakes: int = 0
    server_disconnects: int = 0
    requests_in_flight_failed: int = 0
    handler_tasks_in_flight: int = 0
    partial_chunks_in_flight: int = 0
    messages: int = 0
    messages_received: int = 0
    out_of_order: int = 0
    errors: list[str] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    duration: float = 0.0
    #: (handlers, channels, sessions, users, connection tasks, tasks) left once everything closed.
    leftover: tuple[int, ...] = ()

    @property
    def messages_lost(self) -> int:
        return self.messages - self.messages_received

    @property
    def rss_growth(self) -> int:
        return self.rss_after - self.rss_before

    @property
    def clean(self) -> bool:
        return (
            not self.errors
            and self.messages_lost == 0
            and self.out_of_order == 0
            and self.requests_in_flight_failed == self.cycles - self.rejected_handshakes
            and not any(self.leftover)
            and self.rss_growth <= RSS_MARGIN
        )

    def lines(self) -> list[str]:
        return [
            f"transport                    {self.transport}",
            f"connect/disconnect cycles    {self.cycles:,} ({self.rejected_handshakes:,} rejected"
            f" handshakes, {self.server_disconnects:,} closed by the server)",
            f"requests in flight, failed   {self.requests_in_flight_failed:,} with"
            " ConnectionClosed at disconnect",
            f"handler tasks in flight      {self.handler_tasks_in_flight:,} cancelled at disconnect",
            f"half chunked answers         {self.partial_chunks_in_flight:,} dropped at disconnect",
            f"messages sent / received     {self.messages:,} / {self.messages_received:,}",
            f"messages lost / out of order {self.messages_lost:,} / {self.out_of_order:,}",
            f"RSS at the start             {self.rss_before / MiB:.1f} MiB",
            f"RSS peak                     {self.rss_peak / MiB:.1f} MiB",
            f"RSS at the end               {self.rss_after / MiB:.1f} MiB"
            f" ({self.rss_growth / MiB:+.1f} MiB, margin {RSS_MARGIN / MiB:.0f} MiB)",
            f"left behind                  {self.leftover}"
            " (handlers, channels, sessions, users, connection tasks, tasks)",
            f"duration                     {self.duration:.1f} s",
            f"errors                       {len(self.errors)}"
            + "".join(f"\n  {e}" for e in self.errors[:10]),
            f"verdict                      {'clean' if self.clean else 'NOT CLEAN'}",
        ]


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


async def _receive_json(transport: Transport) -> dict[str, Any]:
    value = json.loads(await asyncio.wait_for(transport.receive(), TIMEOUT))
    assert isinstance(value, dict)
    return value


async def _until_closed(transport: Transport) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                await transport.receive()
            except ConnectionClosed:
                return


async def churn_cycle(stack: Stack, i: int, report: SoakReport) -> None:
    """One connect/disconnect cycle with a server request (and maybe more) in flight."""
    report.cycles += 1
    try:
        transport = await stack.connect("bad" if i % 97 == 96 else f"churn{i % USERS}:c{i}")
    except HandshakeRejected:
        report.rejected_handshakes += 1
        return
    except Exception as exc:
        report.errors.append(f"cycle {i}: connect failed: {exc!r}")
        return
    if i % 97 == 96:
        report.errors.append(f"cycle {i}: a bad token was accepted")
    request: asyncio.Task[Any] | None = None
    try:
        channel = (await _receive_json(transport))["message"]["channel"]
        request = asyncio.create_task(
            stack.manager.send_and_wait(channel, {"cycle": i}, timeout=60)
        )
        frame = await _receive_json(transport)  # the request is on the wire now
        rchan = frame["message"]["__rchan"]
        if i % 3 == 0:
            await transport.send(json.dumps({"type": "custom", "message": {
                "kind": "slow", "data": i, "__rchan": f"c{i}"}}).encode())
            report.handler_tasks_in_flight += 1
        elif i % 3 == 1:
            await transport.send(json.dumps({"type": "message", "channel": rchan,
                                             "chunk_count": 2, "message": i}).encode())
            report.partial_chunks_in_flight += 1
        if i % 5 == 4:
            stack.manager.close_channel(channel, 1000, "bye")
            report.server_disconnects += 1
            await _until_closed(transport)
    except Exception as exc:
        report.errors.append(f"cycle {i}: {exc!r}")
    finally:
        await transport.close()
    if request is None:
        return
    try:
        await asyncio.wait_for(request, TIMEOUT)
    except ConnectionClosed:
        report.requests_in_flight_failed += 1
    except Exception as exc:
        report.errors.append(f"cycle {i}: the request in flight ended with {exc!r}")
    else:
        report.errors.append(f"cycle {i}: the request in flight was answered")


async def churn(stack: Stack, cycles: int, report: SoakReport, workers: int) -> None:
    counter = itertools.count()

    async def worker() -> None:
        while (i := next(counter)) < cycles:
            await churn_cycle(stack, i, report)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def stream(stack: Stack, messages: int, report: SoakReport, clients: int) -> None:
    """Send ``messages`` numbered messages round-robin to long-lived clients; each checks it
    gets them all, in order. Odd messages go by user, even ones by channel."""
    transports = [await stack.connect(f"steady{k}:st{k}") for k in range(clients)]
    channels = [(await _receive_json(t))["message"]["channel"] for t in transports]
    expected = [len(range(k, messages, clients)) for k in range(clients)]

    async def read(k: int) -> None:
        transport, want = transports[k], 0
        while want < expected[k]:
            frame = await _receive_json(transport)
            seq = frame["message"]["seq"]
            if seq != want:
                report.out_of_order += 1
            want = seq + 1
            report.messages_received += 1

    readers = [asyncio.create_task(read(k)) for k in range(clients)]
    manager = stack.manager
    sent = [0] * clients
    for i in range(messages):
        k = i % clients
        payload = {"seq": sent[k]}
        if i % 2:
            await manager.send_message_to_user(f"steady{k}", payload)
        else:
            await manager.send_message(channels[k], payload)
        sent[k] += 1
        report.messages += 1
        if i % 256 == 0:
            await asyncio.sleep(0)  # let the churn interleave
    # A reader gives up after TIMEOUT seconds without a frame, so this wait has an end.
    for outcome in await asyncio.gather(*readers, return_exceptions=True):
        if outcome is not None:
            report.errors.append(f"reader: {outcome!r}")
    for transport in transports:
        await transport.close()


async def run_soak(
    transport: str = "websockets",
    cycles: int = FULL_CYCLES,
    messages: int = FULL_MESSAGES,
    *,
    workers: int = 32,
    clients: int = 16,
    warmup: int | None = None,
    passes: int = 1,
) -> list[SoakReport]:
    """Run the soak on one server ``passes`` times and return the figures of each pass (never
    raises for what it finds). RSS is taken with the server still up, all clients gone."""
    reports: list[SoakReport] = []
    baseline_tasks = asyncio.all_tasks()
    config = ServerConfig(request_timeout=60, handler_timeout=60)
    async with running_stack(transport, config) as stack:
        serving = asyncio.all_tasks()

        async def slow(channel: str, data: Any) -> Any:
            await asyncio.sleep(3600)  # still running when its connection goes

        stack.manager.add_ws_handler("slow", slow)
        # Warm-up: imports, caches and the allocator's pools reach their working size before
        # RSS is taken. The stream outruns its readers until every client's queue is full (the
        # WAIT policy's bound), so the warm-up streams enough to fill them all once.
        warm = SoakReport(transport)
        warmup = max(20, cycles // 20) if warmup is None else warmup
        warm_messages = min(messages, clients * config.max_queue_messages)
        await asyncio.gather(churn(stack, warmup, warm, workers),
                             stream(stack, warm_messages, warm, clients))
        await _settle(stack, serving)
        for _ in range(passes):
            report = SoakReport(transport)
            report.errors.extend(f"warm-up: {e}" for e in warm.errors)
            warm.errors.clear()
            await _measured_pass(stack, serving, report, cycles=cycles, messages=messages,
                                 workers=workers, clients=clients)
            reports.append(report)
    await asyncio.sleep(0)
    stray = asyncio.all_tasks() - baseline_tasks
    if stray:
        reports[-1].errors.append(f"{len(stray)} tasks left after the server stopped")
    return reports


async def _measured_pass(
    stack: Stack, serving: set[asyncio.Task[Any]], report: SoakReport,
    *, cycles: int, messages: int, workers: int, clients: int,
) -> None:
    gc.collect()
    report.rss_before = report.rss_peak = rss()

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.25)
            report.rss_peak = max(report.rss_peak, rss())

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    try:
        await asyncio.gather(churn(stack, cycles, report, workers),
                             stream(stack, messages, report, clients))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    await _settle(stack, serving)
    report.duration = time.perf_counter() - started
    manager = stack.manager
    report.leftover = (
        len(manager.handlers),
        *manager.registry.counts(),
        stack.endpoint.connection_count,
        len(asyncio.all_tasks() - serving),
    )
    gc.collect()
    report.rss_after = rss()


async def _settle(stack: Stack, serving: set[asyncio.Task[Any]]) -> None:
    """Wait until every closed connection is gone from the server: the last closing handshakes
    and cleanups run in tasks of their own for a moment after the clients are done."""
    try:
        async with asyncio.timeout(TIMEOUT):
            while (stack.manager.handlers or stack.endpoint.connection_count
                   or asyncio.all_tasks() - serving):
                await asyncio.sleep(0.01)
    except TimeoutError:
        pass  # reported as leftovers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--cycles", type=int, default=FULL_CYCLES)
    parser.add_argument("--messages", type=int, default=FULL_MESSAGES)
    parser.add_argument("--transport", default="websockets",
                        choices=[*sorted(TRANSPORTS), "all"])
    parser.add_argument("--workers", type=int, default=32, help="concurrent churn clients")
    parser.add_argument("--clients", type=int, default=16, help="long-lived message clients")
    parser.add_argument("--passes", type=int, default=2,
                        help="full passes on one server; the verdict is the last one's, the "
                             "first shows the allocator's high-water mark being reached")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    names = sorted(TRANSPORTS) if args.transport == "all" else [args.transport]
    clean = True
    for name in names:
        reports = asyncio.run(run_soak(name, args.cycles, args.messages, workers=args.workers,
                                       clients=args.clients, passes=args.passes))
        clean = clean and all(not r.errors for r in reports) and reports[-1].clean
        for number, report in enumerate(reports, 1):
            if args.json:
                print(json.dumps({**asdict(report), "pass": number, "clean": report.clean,
                                  "messages_lost": report.messages_lost,
                                  "rss_growth": report.rss_growth}))
            else:
                print(f"pass {number} of {len(reports)}")
                print("\n".join(report.lines()), end="\n\n", flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
