"""Run the benchmark suite: ``python -m benchmarks.run [--quick|--tiny] [--only NAME ...]``.

Prints the machine and library versions, one Markdown table per scenario (with ratios against the
raw ``websockets`` baseline measured in the same run), and the issue's targets as PASS/FAIL;
``--json`` writes the rows, and SVG charts of them go beside it (or into ``--charts DIR``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

from .charts import write_charts
from .procs import LOOP, PIN, ROOT, raise_fd_limit
from .scenarios import PRESETS, SCENARIOS, Sizes
from .stats import Row, format_table

#: (scenario, variant, metric, comparison, limit): ours / raw must satisfy ``comparison limit``.
TARGETS = [
    ("server_request", "", "p50_us", "<=", 1.3),
    ("server_request", "", "p99_us", "<=", 1.5),
    ("broadcast", "N=1000", "deliveries_per_s", ">=", 0.8),
    # Issue 14: coalesced writes put the websockets adapter at or past raw websockets.broadcast.
    ("broadcast", "N=1000", "deliveries_per_s", ">=", 1.0),
    ("broadcast_burst", "k=10 N=1000", "deliveries_per_s", ">=", 1.0),
    ("server_request", "", "p50_us", "<=", 1.1),
    ("memory", "", "MiB_per_1000", "<=", 1.3),
]
#: Issue 14: a server process before its first connection, MiB above raw websockets (a
#: difference, not a ratio: the cost of importing the core and pydantic, whatever raw weighs).
START_ABOVE_RAW_MIB = 10.0


def machine(loop: str = "asyncio") -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for dist in ("websockets", "python-socketio", "python-engineio", "aiohttp", "uvicorn",
                 "pydantic", "pydantic-core", "psutil", "picows", "uvloop"):
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} missing")
    load = os.getloadavg()[0]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=5, check=False).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        rev = "?"
    return (f"- machine: {cpu}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
            f"{platform.system()} {platform.release()}\n"
            f"- python: {platform.python_implementation()} {platform.python_version()} "
            f"(servers on {'uvloop' if loop == 'uvloop' else 'the asyncio default loop'})\n"
            f"- versions: {', '.join(versions)}\n- dara-ws-core: git {rev}\n"
            f"- load average at start: {load:.2f}"
            f"{'  (BUSY MACHINE: other processes distort every figure)' if load > 0.7 else ''}\n")


def check_targets(rows: Sequence[Row]) -> list[str]:
    lines = []
    for scenario, variant, metric, op, limit in TARGETS:
        found = {r.impl: r for r in rows
                 if r.scenario == scenario and r.variant == variant and r.available}
        if "ours" not in found or "raw" not in found:
            continue
        value = found["ours"].metrics[metric] / found["raw"].metrics[metric]
        ok = value <= limit if op == "<=" else value >= limit
        where = f"{scenario}{f' {variant}' if variant else ''} {metric}"
        lines.append(f"- {where}: ours/raw = {value:.2f} (target {op} {limit}) "
                     f"{'PASS' if ok else 'FAIL'}")
    start = {r.impl: r.metrics["start_MiB"] for r in rows
             if r.scenario == "memory" and not r.variant and "start_MiB" in r.metrics}
    if "ours" in start and "raw" in start:
        above = start["ours"] - start["raw"]
        lines.append(f"- memory start_MiB: ours - raw = {above:+.2f} MiB (target <= "
                     f"+{START_ABOVE_RAW_MIB:g}) {'PASS' if above <= START_ABOVE_RAW_MIB else 'FAIL'}")
    for r in rows:
        if r.scenario == "slow_consumer" and r.impl == "ours" and r.metrics.get("slow"):
            cost = 1 - r.metrics["vs_no_slow"]
            lines.append(f"- slow_consumer: healthy deliveries/s lost to {int(r.metrics['slow'])} "
                         f"slow clients = {cost:.1%} (target <= 10%) "
                         f"{'PASS' if cost <= 0.10 else 'FAIL'}; server RSS "
                         f"{r.metrics['rss_start_MiB']:.0f} -> {r.metrics['rss_max_MiB']:.0f} MiB")
    return lines


async def run(names: Sequence[str], sizes: Sizes, impl_filter: set[str] | None,
              sio_impl: str) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        scenario = SCENARIOS[name]
        impls = [sio_impl if i == "sio" else i for i in scenario.impls]
        if impl_filter is not None:
            impls = [i for i in impls if i in impl_filter or i == "raw"]
        else:  # telemetry's overhead is measured on request: --impls ours,ours-otel
            impls = [i for i in impls if i != "ours-otel"]
        t = time.monotonic()
        found = await scenario.run(sizes, impls)
        rows += found
        print(format_table(f"{scenario.title}  ({time.monotonic() - t:.0f} s)", found,
                           scenario.ratio_keys), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds, shorter soak")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help=f"scenario(s) to run, repeatable or comma-separated: "
                             f"{', '.join(SCENARIOS)}")
    parser.add_argument("--impls", help="comma-separated implementations (raw always runs)")
    parser.add_argument("--sio", choices=["sio", "sio-asgi"], default="sio",
                        help="python-socketio hosting: aiohttp (sio) or uvicorn (sio-asgi)")
    parser.add_argument("--client-procs", type=int, help="client load processes for fan-out")
    parser.add_argument("--fanout-ns", metavar="N,N...",
                        help="numbers of clients the broadcast scenario measures (default 100,1000)")
    parser.add_argument("--ours-config", default="{}",
                        help="JSON ServerConfig keyword arguments for ours")
    parser.add_argument("--slow-seconds", type=float, help="slow-consumer soak length (s)")
    parser.add_argument("--slow-rate", type=float, help="slow-consumer broadcasts per second")
    parser.add_argument("--slow-pad", type=int, help="slow-consumer payload padding (bytes)")
    parser.add_argument("--pin", action="store_true",
                        help="pin servers to CPU 0 and clients to the other CPUs")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="event loop of every server process (clients stay on asyncio)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    parser.add_argument("--charts", metavar="DIR",
                        help="write SVG charts (latency CDF, fan-out throughput by N, memory per "
                             "connection) into DIR; default with --json: PATH's name + '-charts' "
                             "beside it")
    args = parser.parse_args(argv)

    sizes = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    sizes = replace(sizes, ours_config=json.loads(args.ours_config))
    for name in ("client_procs", "slow_seconds", "slow_rate", "slow_pad"):
        if getattr(args, name):
            sizes = replace(sizes, **{name: getattr(args, name)})
    if args.fanout_ns:
        sizes = replace(sizes, fanout_ns=tuple(int(n) for n in args.fanout_ns.split(",")))
    names = [n for item in args.only for n in item.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    impl_filter = set(args.impls.split(",")) if args.impls else None

    raise_fd_limit()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) >= 2:
        PIN.update({"benchmarks.server": str(cpus[0]),
                    "benchmarks.client": ",".join(map(str, cpus[1:]))})
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            parser.error('--loop uvloop needs uvloop: pip install "dara-ws-core[uvloop]"')
    LOOP["benchmarks.server"] = args.loop
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    print(f"## dara-ws-core benchmarks ({preset})\n\n{machine(args.loop)}"
          f"- command: python -m benchmarks.run {' '.join(argv if argv is not None else sys.argv[1:])}\n",
          flush=True)
    t = time.monotonic()
    rows = asyncio.run(run(names, sizes, impl_filter, args.sio))
    targets = check_targets(rows)
    if targets:
        print("### targets (ours vs raw, same run)\n\n" + "\n".join(targets) + "\n")
    print(f"total {time.monotonic() - t:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"sizes": asdict(sizes), "rows": [asdict(r) for r in rows]},
            default=lambda v: None if isinstance(v, float) and math.isnan(v) else v, indent=1))
    charts = args.charts or (args.json and str(Path(args.json).with_suffix("")) + "-charts")
    if charts:
        for path in write_charts(rows, Path(charts)):
            print(f"chart: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
