"""The benchmark scenarios of issue 4; each is ``async (Sizes, impls) -> list[Row]``.

Measurement methods (why the numbers mean what they say):

* Round trips are timed with ``perf_counter_ns`` by the side that starts them, one at a time on
  one connection, after a warm-up; the peer runs in another process.
* Fan-out: the server takes ``t0 = time.monotonic()`` just before its first send; every client
  process reports the ``time.monotonic()`` at which its *last* connection received its *last*
  message. Linux's CLOCK_MONOTONIC is system-wide, so values from different processes on this
  machine compare. The round time is ``max(last) - t0``; deliveries/s is ``N * M / time``; the
  median over rounds is reported.
* Server CPU (``server_cpu_us``): the server process's CPU time over a round (fan-out: until
  the last client has the last message; divided by the deliveries) or a block of round trips
  (divided by the requests), from ``/proc/PID/schedstat``. A busy machine stretches wall time
  far more than it stretches the CPU a piece of work takes, so this is the steadier comparison.
* Memory: ``psutil`` RSS of the server process after ``gc.collect()`` in it, against a baseline
  taken after a warm-up batch of connections came and went.
* Slow consumers: a paced broadcast for a fixed time; healthy clients count frames and sample
  the delivery lag from a send timestamp in the payload; the orchestrator samples server RSS
  every second. The same run without slow clients is the reference for the cost.

Clients never offer permessage-deflate, so every server runs uncompressed whatever its defaults.
"""

from __future__ import annotations

__all__ = ["SCENARIOS", "Sizes"]

import asyncio
import contextlib
import importlib
import importlib.util
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from . import micro
from .procs import BenchError, Proc
from .stats import Row, latency_curve, latency_metrics, median, percentile

MiB = 1024 * 1024

#: Wire spoken by each server implementation, hence which lean client talks to it.
PROTO = {"raw": "dara", "ours": "dara", "ours-aiohttp": "dara", "ours-asgi": "dara", "ours-otel": "dara", "sio": "sio",
         "sio-asgi": "sio", "ours-picows": "dara", "raw-picows": "dara"}


@dataclass(frozen=True)
class Sizes:
    """How big every scenario is; ``FULL`` is the issue's sizing."""

    rt_warmup: int = 200
    rt_iters: int = 2000
    #: Round trips are measured in this many alternating blocks per implementation.
    rt_blocks: int = 8
    fanout_ns: tuple[int, ...] = (100, 1000)
    fanout_m: int = 100
    fanout_rounds: int = 5
    users: int = 1000
    per_user: int = 2
    user_m: int = 10
    user_rounds: int = 3
    idle_warm: int = 200
    idle_n: int = 1000
    capacity_n: int = 10_000
    settle_s: float = 2.0
    slow_n: int = 1000
    slow_k: int = 10
    slow_seconds: float = 30.0
    slow_rate: float = 5.0
    #: Big enough that 30 s of frames (~9.6 MiB) outgrow the 2-4 MiB the loopback kernel buffers
    #: for a client that does not read, so the server's own buffering shows in its RSS.
    slow_pad: int = 65536
    slow_drain_s: float = 1.0
    client_procs: int = 1
    #: Connection churn: connections opened and closed per block, how many at a time, and the
    #: users they are spread over.
    connect_n: int = 2000
    connect_concurrency: int = 32
    connect_users: int = 100
    connect_blocks: int = 4
    micro_iters: int = 20_000
    #: Extra ``ServerConfig`` keyword arguments for ours (``--ours-config``).
    ours_config: dict[str, Any] = field(default_factory=dict)


FULL = Sizes()
QUICK = replace(FULL, rt_iters=1000, rt_warmup=100, fanout_rounds=3, user_rounds=2, connect_n=1000,
                capacity_n=5000, slow_seconds=10.0, micro_iters=5000, settle_s=1.0)
TINY = replace(FULL, rt_warmup=10, rt_iters=50, rt_blocks=2, fanout_ns=(6,), fanout_m=5, fanout_rounds=2,
               users=3, per_user=2, user_m=3, user_rounds=1, idle_warm=4, idle_n=10,
               capacity_n=20, settle_s=0.2, client_procs=2, slow_n=6, slow_k=2, slow_seconds=1.0,
               slow_rate=20.0, slow_pad=64, slow_drain_s=0.3, micro_iters=200, connect_n=6,
               connect_concurrency=2, connect_users=3, connect_blocks=2)
PRESETS = {"full": FULL, "quick": QUICK, "tiny": TINY}


def unavailable(impl: str) -> str | None:
    """Why ``impl`` cannot run here (``None`` when it can): the core has not landed, or the
    peer's packages are missing (they come with ``pip install -e ".[bench]"``)."""
    if impl == "ours":
        return ours_unavailable()
    needs = {"sio": ("socketio", "aiohttp"), "sio-asgi": ("socketio", "uvicorn")}.get(impl, ())
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        return f"unavailable: {', '.join(missing)} not installed (pip install -e '.[bench]')"
    return None


def ours_unavailable() -> str | None:
    """Why "ours" cannot run yet (the core has not landed), or ``None`` when it can."""
    try:
        core = importlib.import_module("dara_ws_core")
        importlib.import_module("dara_ws_websockets").serve  # noqa: B018
        for name in ("WebsocketManager", "Endpoint", "ServerConfig", "token_authenticator"):
            getattr(core, name)
    except (ImportError, AttributeError) as exc:
        return f"unavailable: {exc}"
    return None


# ------------------------------------------------------------------------------ processes


@contextlib.asynccontextmanager
async def server(impl: str, sizes: Sizes) -> AsyncIterator[Proc]:
    config = sizes.ours_config if impl.startswith("ours") else {}
    async with Proc.start(f"server-{impl}", "benchmarks.server", "--impl", impl,
                          "--config", json.dumps(config)) as proc:
        yield proc


@contextlib.asynccontextmanager
async def clients(
    srv: Proc, impl: str, mode: str, users: int, *, procs: int, per_user: int = 1,
    prefix: str = "user-", timeout: float = 120.0, **options: Any,
) -> AsyncIterator[list[Proc]]:
    """``procs`` client processes sharing ``users`` users (``per_user`` connections each)."""
    procs = max(1, min(procs, users))
    async with contextlib.AsyncExitStack() as stack:
        starts = []
        first = 0
        for k in range(procs):
            count = users // procs + (1 if k < users % procs else 0)
            args = ["--proto", PROTO[impl], "--mode", mode, "--port", str(srv.ready["port"]),
                    "--path", srv.ready["path"], "--token-prefix", prefix,
                    "--first", str(first), "--users", str(count), "--per-user", str(per_user)]
            for key, value in options.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
            starts.append(stack.enter_async_context(
                Proc.start(f"client-{impl}-{mode}-{k}", "benchmarks.client", *args,
                           ready_timeout=timeout)))
            first += count
        yield list(await asyncio.gather(*starts))


def rss(proc: Proc) -> int:
    return int(psutil.Process(proc.pid).memory_info().rss)


def cpu_ns(proc: Proc) -> int:
    """CPU time the process has used so far, in nanoseconds: Linux's scheduler statistics
    (nanosecond resolution), else psutil's user + system time (clock ticks)."""
    try:
        return int(Path(f"/proc/{proc.pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        times = psutil.Process(proc.pid).cpu_times()
        return int((times.user + times.system) * 1e9)


def _failure(exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0]
    return f"failed: {type(exc).__name__}: {first}"


async def per_impl(
    scenario: str, impls: Sequence[str], measure: Callable[[str], Awaitable[list[Row]]],
) -> list[Row]:
    """Run ``measure`` for each implementation; a failure becomes a row with a note, not a crash."""
    rows: list[Row] = []
    for impl in impls:
        why = unavailable(impl)
        if why:
            rows.append(Row(scenario, impl, note=why))
            continue
        try:
            rows += await measure(impl)
        except Exception as exc:  # one implementation failing must not lose the others' rows
            rows.append(Row(scenario, impl, note=_failure(exc)))
    return rows


async def interleaved(
    scenario: str,
    impls: Sequence[str],
    blocks: int,
    *,
    setup: Callable[[str, contextlib.AsyncExitStack], Awaitable[Any]],
    step: Callable[[str, Any, int], Awaitable[Any]],
    summarize: Callable[[str, list[Any]], dict[str, float]],
    variant: str = "",
) -> list[Row]:
    """Measure every implementation in alternating blocks, all set up at once.

    Every implementation's processes are started first (idle ones cost nothing), then block ``k``
    runs ``step`` once per implementation, in an order rotated by ``k``. So a change in the
    machine's background load during the run hits every implementation alike instead of
    whichever happened to be measured at that moment: the ratios stay honest on a shared machine.
    """
    failed: dict[str, str] = {}
    states: dict[str, Any] = {}
    stacks: dict[str, contextlib.AsyncExitStack] = {}
    samples: dict[str, list[Any]] = {impl: [] for impl in impls}
    try:
        for impl in impls:
            why = unavailable(impl)
            if why:
                failed[impl] = why
                continue
            stacks[impl] = contextlib.AsyncExitStack()
            try:
                states[impl] = await setup(impl, stacks[impl])
            except Exception as exc:
                failed[impl] = _failure(exc)
                await stacks.pop(impl).aclose()
        for k in range(blocks):
            live = [impl for impl in impls if impl in states and impl not in failed]
            if not live:
                break
            shift = k % len(live)
            for impl in live[shift:] + live[:shift]:
                try:
                    samples[impl].append(await step(impl, states[impl], k))
                except Exception as exc:
                    failed[impl] = _failure(exc)
    finally:
        for stack in stacks.values():
            await stack.aclose()
    return [Row(scenario, impl, note=failed[impl], variant=variant) if impl in failed
            else Row(scenario, impl, summarize(impl, samples[impl]), variant=variant)
            for impl in impls]


# ------------------------------------------------------------------------------ scenarios


async def _round_trips(scenario: str, sizes: Sizes, impls: Sequence[str], *, server_side: bool,
                       ) -> list[Row]:
    """Sequential round trips on one connection, timed by the side that starts them: the server
    (``ask``: send_and_wait, the client answers) or the client (``run``: custom requests)."""
    mode, command = ("answer", "ask") if server_side else ("request", "run")

    async def setup(impl: str, stack: contextlib.AsyncExitStack) -> tuple[Proc, Proc]:
        srv = await stack.enter_async_context(server(impl, sizes))
        (cli,) = await stack.enter_async_context(clients(srv, impl, mode, 1, procs=1))
        await srv.call("wait_conns", 30, n=1)
        return (srv if server_side else cli), srv

    async def step(impl: str, procs: tuple[Proc, Proc], k: int) -> dict[str, Any]:
        # The full warm-up before the first block; a short one before each later block, since
        # the other implementations ran in between.
        timer, srv = procs
        warmup = sizes.rt_warmup if k == 0 else max(1, sizes.rt_warmup // 10)
        cpu = cpu_ns(srv)
        result: dict[str, Any] = await timer.call(command, 120, warmup=warmup,
                                                  iters=sizes.rt_iters // sizes.rt_blocks)
        # The server's CPU per request (warm-up included in both): a cost that the machine's
        # other load does not inflate the way it does wall time.
        return {**result, "server_cpu_ns": cpu_ns(srv) - cpu, "ops": len(result["samples"]) + warmup}

    curves: dict[str, tuple[float, ...]] = {}

    def summarize(impl: str, blocks: list[dict[str, Any]]) -> dict[str, float]:
        samples = [v for b in blocks for v in b["samples"]]
        curves[impl] = latency_curve(samples)
        return {**latency_metrics(samples, sum(b["total_s"] for b in blocks)),
                "server_cpu_us": sum(b["server_cpu_ns"] for b in blocks)
                / sum(b["ops"] for b in blocks) / 1000}

    rows = await interleaved(scenario, impls, sizes.rt_blocks, setup=setup, step=step,
                             summarize=summarize)
    return [replace(row, curve=curves.get(row.impl, ())) for row in rows]


async def server_request(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(1) Server -> client request answered by the client (send_and_wait), sequential."""
    return await _round_trips("server_request", sizes, impls, server_side=True)


async def client_request(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(2) Client -> server custom request with reply, sequential."""
    return await _round_trips("client_request", sizes, impls, server_side=False)


async def round_end(cps: Sequence[Proc], r: int) -> float:
    """When the last connection of the ``fanout`` client processes ``cps`` got the last message of
    round ``r`` (monotonic clock, shared by the processes of one machine)."""
    lasts = []
    for cp in cps:
        event = await cp.expect("round", 120)
        if event["r"] != r:
            raise BenchError(f"{cp.name}: round {event['r']} reported during round {r}")
        lasts.append(event["last"])
    return float(max(lasts))


async def _fanout(
    scenario: str, sizes: Sizes, impls: Sequence[str], *, users: int, per_user: int, m: int,
    rounds: int, command: str, variant: str = "", **params: Any,
) -> list[Row]:
    """Rounds of ``command`` (M messages to every connection), interleaved across impls; the
    first round of each is a warm-up and is not counted."""
    conns = users * per_user

    async def setup(impl: str, stack: contextlib.AsyncExitStack) -> tuple[Proc, list[Proc]]:
        srv = await stack.enter_async_context(server(impl, sizes))
        cps = await stack.enter_async_context(clients(
            srv, impl, "fanout", users, procs=sizes.client_procs, per_user=per_user, m=m))
        await srv.call("wait_conns", 60, n=conns)
        return srv, cps

    async def step(impl: str, state: tuple[Proc, list[Proc]], r: int) -> tuple[float, float, int]:
        srv, cps = state
        cpu = cpu_ns(srv)
        res = await srv.call(command, 300, r=r, m=m, **params)
        last = await round_end(cps, r)
        # The server's CPU for the round, once every client has everything.
        used = cpu_ns(srv) - cpu
        await asyncio.sleep(0.2)  # let the machine settle before the next implementation
        return last - res["t0"], res["t_sent"] - res["t0"], used

    def summarize(impl: str, samples: list[tuple[float, float, int]]) -> dict[str, float]:
        counted = samples[1:] or samples
        total = median(t for t, _, _ in counted)
        return {"users": users, "N": conns, "M": m, "total_ms": total * 1000,
                "send_ms": median(s for _, s, _ in counted) * 1000,
                "deliveries_per_s": conns * m / total,
                "worst_ms": max(t for t, _, _ in counted) * 1000,
                "server_cpu_us": median(c for _, _, c in counted) / (conns * m) / 1000}

    return await interleaved(scenario, impls, rounds + 1, setup=setup, step=step,
                             summarize=summarize, variant=variant)


async def broadcast(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(3) Broadcast of M small messages to N connected clients."""
    rows: list[Row] = []
    for n in sizes.fanout_ns:
        rows += await _fanout("broadcast", sizes, impls, users=n, per_user=1, m=sizes.fanout_m,
                              rounds=sizes.fanout_rounds, command="broadcast", variant=f"N={n}")
    return rows


async def broadcast_burst(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(3b) Broadcast of M messages to the largest N, k per event-loop iteration: k = 1 is the
    case no server can coalesce, k = 10 a burst that costs a coalescing server one write per
    connection instead of ten (scenario 3 sends all M in one iteration)."""
    n = sizes.fanout_ns[-1]
    rows: list[Row] = []
    for k in (1, 10):
        rows += await _fanout("broadcast_burst", sizes, impls, users=n, per_user=1,
                              m=sizes.fanout_m, rounds=sizes.fanout_rounds, command="broadcast",
                              variant=f"k={k} N={n}", per_iter=k)
    return rows


async def per_user(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(4) Per-user fan-out: every user gets M messages on each of its connections."""
    return await _fanout("per_user", sizes, impls, users=sizes.users, per_user=sizes.per_user,
                         m=sizes.user_m, rounds=sizes.user_rounds, command="user_fanout",
                         user_ids=[f"user-{i}" for i in range(sizes.users)])


async def connect(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(8) Connection churn, as in a reconnect storm after a deploy: ``connect_n`` connections,
    ``connect_concurrency`` at a time, each through its handshake and first frame (``init``)
    and then closed by the client; in blocks interleaved across implementations. Connections per
    second (as the client saw them) and the server's CPU time per connection."""

    async def setup(impl: str, stack: contextlib.AsyncExitStack) -> Proc:
        return await stack.enter_async_context(server(impl, sizes))

    async def step(impl: str, srv: Proc, r: int) -> tuple[int, float, int]:
        procs = max(1, min(sizes.client_procs, sizes.connect_users))
        cpu = cpu_ns(srv)
        async with clients(srv, impl, "churn", sizes.connect_users, procs=procs,
                           connects=sizes.connect_n // procs, concurrency=sizes.connect_concurrency,
                           timeout=max(60.0, sizes.connect_n / 20)) as cps:
            used = cpu_ns(srv) - cpu
            done = sum(int(cp.ready["connected"]) for cp in cps)
            seconds = max(float(cp.ready["seconds"]) for cp in cps)
        await asyncio.sleep(0.2)  # let the machine settle before the next implementation
        return done, seconds, used

    def summarize(impl: str, samples: list[tuple[int, float, int]]) -> dict[str, float]:
        return {"N": samples[0][0],
                "connects_per_s": median(n / s for n, s, _ in samples),
                "server_cpu_us": median(c / n for n, _, c in samples) / 1000}

    return await interleaved("connect", impls, sizes.connect_blocks, setup=setup, step=step,
                             summarize=summarize)


async def memory(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(5) Server RSS per 1000 idle connections, and RSS holding ``capacity_n`` of them.

    ``start_MiB`` is the RSS before any connection; ``base_MiB`` the RSS once ``idle_warm``
    connections came and went, the base the per-connection figures are measured from.
    """

    def idle(
        srv: Proc, impl: str, n: int, prefix: str
    ) -> contextlib.AbstractAsyncContextManager[list[Proc]]:
        # Idle connections cost the clients little: one process per 500 is plenty.
        procs = min(sizes.client_procs, max(1, n // 500))
        return clients(srv, impl, "idle", n, procs=procs, prefix=prefix,
                       timeout=max(60.0, n / 50))

    async def settled_rss(srv: Proc, n: int) -> tuple[int, int]:
        await srv.call("wait_conns", max(60.0, n / 50), n=n)
        await asyncio.sleep(sizes.settle_s)
        held = (await srv.call("gc", 60))["conns"]
        return rss(srv), held

    async def measure(impl: str) -> list[Row]:
        async with server(impl, sizes) as srv:
            # Before the first connection: what the process costs to start (issue 14's figure).
            await srv.call("gc", 60)
            start = rss(srv)
            async with idle(srv, impl, sizes.idle_warm, "warm-"):
                await srv.call("wait_conns", 60, n=sizes.idle_warm)
            await asyncio.sleep(sizes.settle_s)
            await srv.call("gc", 60)
            base = rss(srv)
            async with idle(srv, impl, sizes.idle_n, "idle-"):
                at_n, _ = await settled_rss(srv, sizes.idle_n)
                extra = sizes.capacity_n - sizes.idle_n
                async with idle(srv, impl, extra, "more-"):
                    at_cap, held = await settled_rss(srv, sizes.capacity_n)
        per_k = (at_n - base) / sizes.idle_n * 1000
        per_k_cap = (at_cap - base) / sizes.capacity_n * 1000
        return [Row("memory", impl, {
            "start_MiB": start / MiB,
            "base_MiB": base / MiB,
            "N": sizes.idle_n,
            "MiB_per_1000": per_k / MiB,
            "KiB_per_conn": per_k / 1000 / 1024,
            "held": held,
            "RSS_at_held_MiB": at_cap / MiB,
            "MiB_per_1000_at_held": per_k_cap / MiB,
        })]

    return await per_impl("memory", impls, measure)


async def slow_consumer(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(7) Paced broadcast to N clients of which K never read: healthy throughput, lag, RSS."""
    rows: list[Row] = []
    reference: dict[str, float] = {}
    for slow in (0, sizes.slow_k):
        healthy = sizes.slow_n - slow

        async def measure(impl: str, slow: int = slow, healthy: int = healthy) -> list[Row]:
            async with server(impl, sizes) as srv, clients(
                srv, impl, "stream", healthy, procs=sizes.client_procs,
            ) as cps, contextlib.AsyncExitStack() as stack:
                if slow:
                    await stack.enter_async_context(
                        clients(srv, impl, "slow", slow, procs=1, prefix="slow-"))
                await srv.call("wait_conns", 60, n=sizes.slow_n)
                await srv.call("gc", 30)
                samples: list[int] = [rss(srv)]

                async def sample_rss() -> None:
                    while True:
                        await asyncio.sleep(1.0)
                        samples.append(rss(srv))

                sampler = asyncio.create_task(sample_rss())
                try:
                    res = await srv.call("stream", sizes.slow_seconds + 120, rate=sizes.slow_rate,
                                         seconds=sizes.slow_seconds, pad=sizes.slow_pad)
                    await asyncio.sleep(sizes.slow_drain_s)  # let in-flight frames arrive
                finally:
                    sampler.cancel()
                samples.append(rss(srv))
                reports = [await cp.call("report", 60) for cp in cps]
                end = await srv.call("gc", 30)
            received = sum(r["received"] for r in reports)
            last = max(r["last"] for r in reports)
            lags = sorted(v for r in reports for v in r["lags"])
            rate = received / (last - res["t0"]) if last > res["t0"] else math.nan
            # The cost of slow clients is judged per healthy client: 990 clients cannot receive
            # as many frames in total as 1000.
            per_client = rate / healthy
            if slow == 0:
                reference[impl] = per_client
            target = sizes.slow_rate * sizes.slow_seconds
            return [Row("slow_consumer", impl, {
                "N": sizes.slow_n, "slow": slow, "sent_pct_of_rate": 100 * res["sent"] / target,
                "healthy_deliveries_per_s": rate,
                "per_client_msgs_per_s": per_client,
                "delivered_pct": 100 * received / max(1, res["sent"] * healthy),
                "vs_no_slow": per_client / reference.get(impl, math.nan) if slow else 1.0,
                "lag_p50_ms": percentile(lags, 50) * 1000,
                "lag_p99_ms": percentile(lags, 99) * 1000,
                "rss_start_MiB": samples[0] / MiB,
                "rss_max_MiB": max(samples) / MiB,
                "rss_end_MiB": samples[-1] / MiB,
                "rss_growth_MiB": (samples[-1] - samples[0]) / MiB,
                "conns_end": end["conns"],
            }, variant=f"slow={slow}",
                note="" if res["sent"] >= 0.95 * target else "server could not keep the rate")]

        found = await per_impl("slow_consumer", impls, measure)
        rows += [replace(r, variant=f"slow={slow}") for r in found]
    return rows


async def codec(sizes: Sizes, impls: Sequence[str]) -> list[Row]:
    """(6) Pure-core micro-benchmarks, in this process (no sockets)."""
    return micro.run(sizes.micro_iters, impls)


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Sizes, Sequence[str]], Awaitable[list[Row]]]
    impls: tuple[str, ...]
    ratio_keys: tuple[str, ...]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("server_request", "(1) server -> client request (send_and_wait), sequential",
             server_request, ("raw", "ours", "sio", "ours-aiohttp", "ours-asgi", "ours-otel", "ours-picows",
                              "raw-picows"),
             ("p50_us", "p99_us", "ops_per_s", "server_cpu_us")),
    Scenario("client_request", "(2) client -> server custom request with reply, sequential",
             client_request, ("raw", "ours", "sio", "ours-aiohttp", "ours-asgi", "ours-otel"),
             ("p50_us", "p99_us", "ops_per_s", "server_cpu_us")),
    Scenario("broadcast", "(3) broadcast fan-out", broadcast,
             ("raw", "ours", "sio", "ours-aiohttp", "ours-asgi", "ours-otel", "ours-picows", "raw-picows"),
             ("deliveries_per_s", "server_cpu_us")),
    Scenario("broadcast_burst", "(3b) broadcast, k messages per loop iteration", broadcast_burst,
             ("raw", "ours", "ours-aiohttp", "ours-picows", "raw-picows"), ("deliveries_per_s",)),
    Scenario("per_user", "(4) per-user fan-out", per_user, ("raw", "ours", "sio", "ours-picows", "raw-picows"),
             ("deliveries_per_s", "server_cpu_us")),
    Scenario("memory", "(5) idle connections: server RSS", memory,
             ("raw", "ours", "sio", "ours-aiohttp", "ours-asgi", "ours-picows", "raw-picows"),
             ("MiB_per_1000", "MiB_per_1000_at_held")),
    Scenario("codec", "(6) codec and reassembly micro-benchmarks (pure core)", codec,
             ("raw", "ours"), ("ns_per_op",)),
    Scenario("slow_consumer", "(7) slow consumers during a paced broadcast", slow_consumer,
             ("raw", "ours"), ("healthy_deliveries_per_s", "lag_p99_ms")),
    Scenario("connect", "(8) connection churn: handshake, first frame, close", connect,
             ("raw", "ours", "ours-aiohttp", "ours-asgi", "ours-picows", "raw-picows"),
             ("connects_per_s", "server_cpu_us")),
)}
