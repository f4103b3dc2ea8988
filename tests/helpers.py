"""Shared test helpers: waiting for a condition, and the *healthy client* of the noisy-neighbour
invariant (issue 10), used by ``test_noisy_neighbour`` and the live fuzzer.

The invariant: while any attack runs, a well-behaved client's pushes keep arriving with bounded
delay and its requests never get ``busy`` or time out. A push carries its sequence number and the
time it was due (:func:`ticker`); the :class:`Healthy` client times every push on arrival, parses
every raw frame as strict JSON, and sends requests the whole time. The bounds are correctness
bounds for a noisy 2-core machine, not speed targets:

* ``PUSH_BOUND`` = 1.0 s: no push arrives later than this after it was due, none is lost, the
  next push never arrives more than this after the previous one's successor was due (a stalled
  pusher skips slots), and when measuring stops the next push is not overdue by more than this;
* ``REQUEST_TIMEOUT`` = 2.0 s: no request goes unanswered for longer, and none gets a ``busy`` or
  ``timeout`` error reply.

Both are for a machine whose cores are free. On an overloaded one (a newcomer's laptop running the
suite beside everything else: a load average of 7 on 2 cores made a chat flood's pushes 1.46 s
late) they are multiplied by ``LOAD_FACTOR``, the load average per core when the tests start (1
to 4): the harms the invariant is there for (a stalled loop, a sender paused for its neighbour's
burst, a broadcast waiting on one reader) are pauses of 5-10 s, still caught at 4 s. The push
bound also grows with the load the measurement itself ran under (:class:`RunQueue`: the tasks
ready to run per core, sampled every 10 ms while the healthy client runs), as the load average
lags the load by a minute: a suite that started on a quiet machine may have others' work beside
it by now.
"""

from __future__ import annotations

__all__ = [
    "LOAD_FACTOR",
    "PUSH_BOUND",
    "REQUEST_TIMEOUT",
    "TICK",
    "Healthy",
    "Meter",
    "RunQueue",
    "StrictTransport",
    "eventually",
    "strict_loads",
    "ticker",
]

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dara_ws_core import ConnectionClosed, DaraClient, RemoteError, RequestTimeout, Transport


def _load_factor() -> float:
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return 1.0
    return min(4.0, max(1.0, load))


#: How much more time the bounds below allow on a machine this loaded (see the module's docs).
LOAD_FACTOR = _load_factor()
PUSH_BOUND = 1.0 * LOAD_FACTOR
REQUEST_TIMEOUT = 2.0 * LOAD_FACTOR
TICK = 0.05


def _runnable() -> int | None:
    """How many tasks are ready to run on the machine now, not counting the one reading
    (``/proc/loadavg``'s fourth field); ``None`` where it cannot be read."""
    try:
        with open("/proc/loadavg") as loadavg:
            return max(0, int(loadavg.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return None


class RunQueue:
    """The machine's load over an interval as it happens: the tasks ready to run, sampled by a
    thread every 10 ms from :meth:`start` to :meth:`stop` (at most ``limit`` s)."""

    def __init__(self, limit: float = 600.0) -> None:
        self.limit = limit
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            runnable = _runnable()
            if runnable is None:
                return
            self.samples.append(runnable)
            self._stop.wait(0.01)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._sample, name="run-queue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def factor(self) -> float:
        """The mean of the tasks ready to run per core (1 to 4, as ``LOAD_FACTOR``)."""
        if not self.samples:
            return 1.0
        load = sum(self.samples) / len(self.samples) / (os.cpu_count() or 1)
        return min(4.0, max(1.0, load))


def run_on(loop: str, main: Awaitable[Any]) -> Any:
    """``main`` (a coroutine) run on a loop of its own: ``asyncio``, or ``uvloop`` (the suite's
    own loop is asyncio unless DARA_TEST_LOOP says otherwise)."""
    if loop == "uvloop":
        import uvloop  # the [test] extra has it

        return uvloop.run(main)  # type: ignore[arg-type]
    return asyncio.run(main)  # type: ignore[arg-type]


async def eventually(predicate: Callable[[], bool], what: str = "condition", timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` is true (polled every 5 ms); ``AssertionError`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"still not true after {timeout} s: {what}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond a double")
    return value


def strict_loads(frame: str | bytes) -> Any:
    """Parse as RFC 8259 JSON, as a browser's ``JSON.parse`` would: ``NaN``, ``Infinity`` and
    numbers beyond a double raise ``ValueError``."""
    return json.loads(frame, parse_constant=_reject_constant, parse_float=_finite)


async def ticker(push: Callable[[dict[str, Any]], Awaitable[None]], kind: str, interval: float = TICK) -> None:
    """Call ``push(payload)`` every ``interval`` on a fixed schedule, with a custom payload of
    ``kind`` carrying ``seq``, ``due`` (the slot it was due in) and ``sent`` (when it was pushed):
    the lateness shows even when the pushing loop itself stalls. Slots missed meanwhile are
    skipped, not made up in a burst, as a periodic push in an application would: a busy loop
    shows as pushes further apart, not as a backlog that grows. Runs until cancelled."""
    start = time.time()
    slot = 0
    for seq in itertools.count(1):
        slot = max(slot + 1, math.floor((time.time() - start) / interval))
        due = start + slot * interval
        await asyncio.sleep(max(0.0, due - time.time()))
        try:
            await push({"kind": kind, "data": {"seq": seq, "due": due, "sent": time.time()}})
        except Exception:  # a failed push shows as a lost one
            logging.getLogger("tests.ticker").exception("push failed")


@dataclass
class Meter:
    """What the healthy client saw arrive, timed on arrival."""

    kinds: tuple[str, ...]
    interval: float = TICK
    start: float = field(default_factory=time.time)
    last: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    max_delay: float = 0.0
    #: Of the delay, the most spent before the server pushed (its loop was busy) and after (the
    #: push waited in a queue or a buffer).
    max_late_send: float = 0.0
    max_transit: float = 0.0
    lost: int = 0
    frames: int = 0
    nonstrict: list[str] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def frame(self, frame: str | bytes, now: float) -> None:
        """Account for one raw frame received at ``now``."""
        self.frames += 1
        try:
            value = strict_loads(frame)
        except ValueError:
            self.nonstrict.append(str(frame[:120]))
            return
        message = value.get("message") if isinstance(value, dict) else None
        if value.get("type") != "custom" or not isinstance(message, dict):
            return
        kind, data = message.get("kind"), message.get("data")
        if kind not in self.kinds or not isinstance(data, dict):
            return
        # ``due`` from ticker(); the demo's clock has only ``time``, when it was pushed.
        seq, stamp = data.get("seq"), data.get("due", data.get("time"))
        due = float(stamp) if isinstance(stamp, int | float) else now
        previous = self.last.get(kind)
        # How late this push is, and how long after the previous one's successor was due: a
        # ticker that stalled and skipped slots shows in the second.
        expected = (previous[1] if previous is not None else self.start) + self.interval
        self.max_delay = max(self.max_delay, now - due, now - expected)
        sent = data.get("sent")
        if isinstance(sent, int | float):
            self.max_late_send = max(self.max_late_send, sent - due)
            self.max_transit = max(self.max_transit, now - sent)
        if previous is not None and previous[0] is not None and isinstance(seq, int):
            self.lost += max(0, seq - previous[0] - 1)
        self.last[kind] = (seq if isinstance(seq, int) else None, due)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if all(self.counts.get(k, 0) >= 2 for k in self.kinds):
            self.ready.set()

    def overdue(self, now: float) -> float:
        """How late the next push of the most delayed kind is at ``now`` (0 if none is due)."""
        return max((now - (self.last[k][1] if k in self.last else self.start) - self.interval
                    for k in self.kinds), default=0.0)


class StrictTransport:
    """The healthy client's transport: every received frame goes through the meter first."""

    def __init__(self, inner: Transport, meter: Meter) -> None:
        self._inner = inner
        self._meter = meter

    async def send(self, frame: bytes) -> None:
        await self._inner.send(frame)

    async def receive(self) -> str | bytes:
        frame = await self._inner.receive()
        self._meter.frame(frame, time.time())
        return frame

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._inner.close(code, reason)

    def abort(self) -> None:
        abort = getattr(self._inner, "abort", None)
        if abort is not None:
            abort()

    @property
    def closed(self) -> bool:
        return self._inner.closed


@dataclass
class Healthy:
    """The well-behaved client: reads everything, sends an ``echo`` request every
    ``echo_every`` s (one at a time) and, with ``chat_every``, fires a ``chat`` request (the demo's
    broadcast, answered ``{"delivered": true}``) that often without waiting for the previous one."""

    connect: Callable[[], Awaitable[Transport]]
    kinds: tuple[str, ...]
    echo_every: float = 0.02
    chat_every: float | None = None
    #: The pushes' interval (as given to :func:`ticker`).
    interval: float = TICK
    meter: Meter = field(init=False)
    client: DaraClient = field(init=False)
    ok: int = 0
    busy: int = 0
    timeouts: int = 0
    other: list[str] = field(default_factory=list)
    max_rtt: float = 0.0
    #: The load while measuring.
    load: RunQueue = field(default_factory=RunQueue)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _chats: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.meter = Meter(self.kinds, self.interval)

    async def _connect(self) -> Transport:
        return StrictTransport(await self.connect(), self.meter)

    async def start(self, *, wait_ready: bool = True) -> None:
        """Connect, optionally wait for two pushes of every kind, and start the request loops."""
        self.load.start()
        self.client = DaraClient(self._connect, ping_interval=None, init_timeout=REQUEST_TIMEOUT)
        await self.client.connect()
        if wait_ready:
            await asyncio.wait_for(self.meter.ready.wait(), 10)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._echo_loop()), loop.create_task(self._drain_inbox())]
        if self.chat_every is not None:
            self._tasks.append(loop.create_task(self._chat_loop(self.chat_every)))

    async def _request(self, kind: str, data: Any) -> None:
        started = time.monotonic()
        try:
            reply = await self.client.request(kind, data, timeout=REQUEST_TIMEOUT)
        except RemoteError as exc:
            if exc.code == "busy":
                self.busy += 1
            elif exc.code == "timeout":
                self.timeouts += 1
            else:
                self.other.append(f"{kind}: error reply {exc.code}")
            return
        except RequestTimeout:
            self.timeouts += 1
            return
        except ConnectionClosed as exc:
            self.other.append(f"{kind}: connection closed {exc.code} {exc.reason}")
            self._stop.set()
            return
        self.max_rtt = max(self.max_rtt, time.monotonic() - started)
        expected = data if kind == "echo" else {"delivered": True}
        if reply != expected:
            self.other.append(f"{kind}: wrong reply {str(reply)[:80]}")
        else:
            self.ok += 1

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _echo_loop(self) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            await self._request("echo", {"n": n})
            await self._pause(self.echo_every)

    async def _chat_loop(self, every: float) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            task = asyncio.get_running_loop().create_task(self._request("chat", f"hello {n}"))
            self._chats.add(task)
            task.add_done_callback(self._chats.discard)
            await self._pause(every)

    async def _drain_inbox(self) -> None:
        # Pushes are measured on arrival; the inbox only has to stay small.
        while not self._stop.is_set():
            await self._pause(0.2)
            self.client.received_nowait()

    async def stop(self) -> dict[str, Any]:
        """Stop the loops (requests in flight finish or time out), close, return the figures."""
        overdue = self.meter.overdue(time.time())
        self.load.stop()
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks, *self._chats), REQUEST_TIMEOUT + 5)
        await self.client.close()
        return {
            "max_delay": round(max(self.meter.max_delay, overdue), 3),
            "late_send": round(self.meter.max_late_send, 3),
            "transit": round(self.meter.max_transit, 3),
            "lost": self.meter.lost,
            "pushes": sum(self.meter.counts.values()),
            "busy": self.busy,
            "timeouts": self.timeouts,
            "other_errors": len(self.other),
            "requests_ok": self.ok,
            "max_rtt": round(self.max_rtt, 3),
            "nonstrict": len(self.meter.nonstrict),
            "load_factor": round(self.load.factor(), 2),
        }

    def violations(self, figures: dict[str, Any]) -> list[str]:
        """What broke the invariant, given :meth:`stop`'s figures (empty: it held)."""
        found = []
        # The load while measuring counts too (the factor is never lowered), and the load
        # average as the case ends.
        bound = round(max(PUSH_BOUND, 1.0 * _load_factor(), 1.0 * figures["load_factor"]), 3)
        if figures["max_delay"] > bound:
            found.append(f"healthy push delay {figures['max_delay']} s > {bound} s "
                         f"(load while measuring {figures['load_factor']} per core; "
                         f"server late to push {figures['late_send']} s, in transit "
                         f"{figures['transit']} s)")
        if figures["lost"]:
            found.append(f"healthy lost {figures['lost']} pushes")
        if figures["busy"] or figures["timeouts"]:
            found.append(f"healthy requests: {figures['busy']} busy, {figures['timeouts']} timed out")
        if not figures["requests_ok"]:
            found.append("healthy got no request answered")
        if self.other:
            found.append(f"healthy requests failed: {self.other[:3]}")
        if self.meter.nonstrict:
            found.append(f"healthy got {len(self.meter.nonstrict)} non-JSON frames, e.g. "
                         f"{self.meter.nonstrict[0][:60]}")
        return found
