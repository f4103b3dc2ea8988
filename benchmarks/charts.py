"""The benchmark results as SVG charts, written next to the tables: ``python -m benchmarks.run
--charts DIR`` (by default beside the ``--json`` file).

Three charts, each drawn from the rows of one run, so every curve in a chart was measured under
the same load:

* ``latency-cdf.svg``: the distribution of ``send_and_wait`` round trips (scenario
  ``server_request``) per implementation, as a cumulative curve: the fraction of requests answered
  within x microseconds.
* ``fanout-throughput.svg``: broadcast deliveries per second by number of clients N.
* ``memory-per-connection.svg``: server memory per idle connection (KiB).

``python -m benchmarks.charts ROWS.json DIR`` draws them again from a saved ``--json`` file.

A chart whose scenario did not run is not written. The SVG is produced here, by a few lines of
string formatting, so the ``[bench]`` extra needs no plotting library; every drawn value is also
in the file as text (a ``<title>`` on each bar and point, ``data-*`` attributes on each curve), so
the figures can be read back, and are, by ``tests/test_benchmarks_smoke.py``.
"""

from __future__ import annotations

__all__ = ["CHARTS", "bar_chart", "line_chart", "rows_from_json", "write_charts"]

import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from html import escape
from pathlib import Path

from .stats import Row

WIDTH, HEIGHT = 640, 360
#: Plot area inside the picture: left, top, right, bottom margins.
LEFT, TOP, RIGHT, BOTTOM = 78, 40, 150, 52
#: One colour per implementation, in order of appearance (colour-blind safe, Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

Points = Sequence[tuple[float, float]]


def _number(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:,.0f}k"
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering ``low`` .. ``high`` (linear)."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if step * factor >= raw:
            step *= factor
            break
    value = math.floor(low / step) * step
    ticks: list[float] = []
    while len(ticks) < 50:  # up to the first tick at or above high: the top value fits
        ticks.append(round(value, 10))
        if value >= high - step * 1e-9:
            break
        value += step
    return ticks


def _frame(title: str, x_label: str, y_label: str, body: list[str]) -> str:
    plot_h = HEIGHT - TOP - BOTTOM
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
        f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2}" y="{HEIGHT - 12}" '
        f'text-anchor="middle">{escape(x_label)}</text>',
        f'<text transform="translate(16 {TOP + plot_h / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>',
        *body,
        "</svg>",
        "",
    ])


def _axes(x_ticks: list[tuple[float, str]], y_ticks: list[tuple[float, str]]) -> list[str]:
    """Axis lines, grid and labels; tick positions are already in pixels."""
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM
    out = ['<g stroke="#ccc" stroke-width="1">']
    out += [f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>' for y, _ in y_ticks]
    out.append("</g>")
    out.append(f'<path d="M{LEFT},{TOP} V{bottom} H{right}" fill="none" stroke="#333"/>')
    out += [f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>'
            for y, label in y_ticks]
    out += [f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{escape(label)}</text>'
            for x, label in x_ticks]
    return out


def _legend(names: Sequence[str]) -> list[str]:
    x = WIDTH - RIGHT + 14
    out = []
    for k, name in enumerate(names):
        y = TOP + 8 + 18 * k
        out.append(f'<rect x="{x}" y="{y - 9}" width="12" height="12" fill="{PALETTE[k % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 18}" y="{y + 1}">{escape(name)}</text>')
    return out


def line_chart(title: str, x_label: str, y_label: str, series: Mapping[str, Points], *,
               log_x: bool = False, y_max: float | None = None) -> str:
    """An SVG line chart: one polyline (with a marker per point) per series."""
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    if not xs:
        raise ValueError("a chart needs at least one point")
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    if log_x:
        low = 10 ** math.floor(math.log10(min(x for x in xs if x > 0)))
        high = 10 ** math.ceil(math.log10(max(xs)))
        if high <= low:
            high = low * 10
        x_ticks_values = [10.0 ** e for e in range(round(math.log10(low)), round(math.log10(high)) + 1)]

        def px(x: float) -> float:
            x = max(x, low)
            return LEFT + (math.log10(x) - math.log10(low)) / (math.log10(high) - math.log10(low)) * plot_w
    else:
        x_ticks_values = _ticks(min(0.0, *xs), max(xs))
        low, high = x_ticks_values[0], x_ticks_values[-1]

        def px(x: float) -> float:
            return LEFT + (x - low) / (high - low) * plot_w
    y_ticks_values = _ticks(0.0, y_max if y_max is not None else max(ys))
    y_high = y_ticks_values[-1]

    def py(y: float) -> float:
        return TOP + plot_h - y / y_high * plot_h

    body = _axes([(px(x), _number(x)) for x in x_ticks_values],
                 [(py(y), _number(y) if y_max is None or y_max > 1 else f"{y:g}")
                  for y in y_ticks_values])
    for k, (name, points) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        data = " ".join(f"{x!r},{y!r}" for x, y in points)  # exact: read back by tests
        body.append(f'<polyline class="series" data-name="{escape(name)}" data-points="{data}" '
                    f'points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(points) <= 20:
            for x, y in points:
                body.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}">'
                            f"<title>{escape(name)}: {x:g}, {y:g}</title></circle>")
    body += _legend(list(series))
    return _frame(title, x_label, y_label, body)


def bar_chart(title: str, y_label: str, values: Mapping[str, float]) -> str:
    """An SVG bar chart: one labelled bar per entry."""
    if not values:
        raise ValueError("a chart needs at least one bar")
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    y_ticks_values = _ticks(0.0, max(*values.values(), 0.0) or 1.0)
    y_high = y_ticks_values[-1]

    def py(y: float) -> float:
        return TOP + plot_h - max(y, 0.0) / y_high * plot_h

    slot = plot_w / len(values)
    body = _axes([(LEFT + slot * (k + 0.5), name) for k, name in enumerate(values)],
                 [(py(y), _number(y)) for y in y_ticks_values])
    for k, (name, value) in enumerate(values.items()):
        x, top = LEFT + slot * k + slot * 0.2, py(value)
        body.append(f'<rect class="bar" data-name="{escape(name)}" data-value="{value!r}" '
                    f'x="{x:.1f}" y="{top:.1f}" width="{slot * 0.6:.1f}" '
                    f'height="{TOP + plot_h - top:.1f}" fill="{PALETTE[k % len(PALETTE)]}">'
                    f"<title>{escape(name)}: {value:g}</title></rect>")
        body.append(f'<text x="{x + slot * 0.3:.1f}" y="{top - 5:.1f}" '
                    f'text-anchor="middle">{escape(_number(value))}</text>')
    return _frame(title, "", y_label, body)


# ------------------------------------------------------------------------------ from rows


def _by_impl(rows: Sequence[Row], scenario: str) -> dict[str, list[Row]]:
    found: dict[str, list[Row]] = {}
    for row in rows:
        if row.scenario == scenario and row.available:
            found.setdefault(row.impl, []).append(row)
    return found


def latency_cdf(rows: Sequence[Row]) -> str | None:
    series = {}
    for impl, found in _by_impl(rows, "server_request").items():
        curve = found[0].curve
        if curve:
            step = 1 / (len(curve) - 1) if len(curve) > 1 else 1.0
            series[impl] = [(value, round(k * step, 6)) for k, value in enumerate(curve)]
    if not series:
        return None
    return line_chart("send_and_wait latency (CDF)", "round trip (µs, log scale)",
                      "fraction of requests", series, log_x=True, y_max=1.0)


def fanout_throughput(rows: Sequence[Row]) -> str | None:
    series: dict[str, list[tuple[float, float]]] = {}
    for impl, found in _by_impl(rows, "broadcast").items():
        points = []
        for row in found:
            match = re.fullmatch(r"N=(\d+)", row.variant)
            if match:
                points.append((float(match.group(1)), row.metrics["deliveries_per_s"]))
        if points:
            series[impl] = sorted(points)
    if not series:
        return None
    return line_chart("broadcast throughput by number of clients", "clients (N, log scale)",
                      "deliveries per second", series, log_x=True)


def memory_per_connection(rows: Sequence[Row]) -> str | None:
    values = {impl: found[0].metrics["KiB_per_conn"]
              for impl, found in _by_impl(rows, "memory").items() if "KiB_per_conn" in found[0].metrics}
    if not values:
        return None
    return bar_chart("server memory per idle connection", "KiB per connection", values)


#: File name -> how to draw it from a run's rows (``None`` when its scenario did not run).
CHARTS: dict[str, Callable[[Sequence[Row]], str | None]] = {
    "latency-cdf.svg": latency_cdf,
    "fanout-throughput.svg": fanout_throughput,
    "memory-per-connection.svg": memory_per_connection,
}


def write_charts(rows: Sequence[Row], directory: Path) -> list[Path]:
    """Write every chart the rows allow into ``directory`` (created); returns the files."""
    written = []
    for name, draw in CHARTS.items():
        svg = draw(rows)
        if svg is None:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        path.write_text(svg, encoding="utf-8")
        written.append(path)
    return written


def rows_from_json(path: Path) -> list[Row]:
    """The rows of a ``benchmarks.run --json`` file."""
    rows = []
    for item in json.loads(path.read_text())["rows"]:
        metrics = {k: math.nan if v is None else float(v) for k, v in item["metrics"].items()}
        rows.append(Row(item["scenario"], item["impl"], metrics, item.get("note", ""),
                        item.get("variant", ""), tuple(item.get("curve", ()))))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m benchmarks.charts ROWS.json DIR", file=sys.stderr)
        return 2
    for path in write_charts(rows_from_json(Path(args[0])), Path(args[1])):
        print(f"chart: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
