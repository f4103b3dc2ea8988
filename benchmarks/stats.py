"""Rows, percentiles and the table printer shared by every scenario."""

from __future__ import annotations

__all__ = ["Row", "format_table", "latency_curve", "latency_metrics", "median", "percentile", "ratio"]

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One measured line of a scenario table.

    ``impl`` is ``raw`` for the baseline of the scenario, ``ours``, ``sio`` ... for the others;
    ``metrics`` keeps its insertion order, which is the column order. ``note`` is free text
    (``unavailable: ...`` when an implementation could not run).
    """

    scenario: str
    impl: str
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""
    #: Rows of one table are compared with the baseline row of the same variant ("N=1000").
    variant: str = ""
    #: A latency distribution for the charts (``benchmarks.charts``): the 0th to 100th
    #: percentiles of the samples in microseconds (101 values); empty when not a latency row.
    curve: tuple[float, ...] = ()

    @property
    def available(self) -> bool:
        return bool(self.metrics)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_metrics(samples_ns: Iterable[int], total_s: float) -> dict[str, float]:
    """p50/p90/p99/max in microseconds and operations per second of a sequential loop."""
    values = sorted(v / 1000 for v in samples_ns)
    return {
        "p50_us": percentile(values, 50),
        "p90_us": percentile(values, 90),
        "p99_us": percentile(values, 99),
        "max_us": values[-1] if values else math.nan,
        "ops_per_s": len(values) / total_s if total_s > 0 else math.nan,
        "n": float(len(values)),
    }


def latency_curve(samples_ns: Iterable[int]) -> tuple[float, ...]:
    """The 0th, 1st ... 100th percentiles of ``samples_ns`` in microseconds (a CDF to draw)."""
    values = sorted(v / 1000 for v in samples_ns)
    if not values:
        return ()
    return (values[0], *(percentile(values, q) for q in range(1, 101)))


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def ratio(value: float, baseline: float) -> float:
    if baseline == 0 or math.isnan(baseline) or math.isnan(value):
        return math.nan
    return value / baseline


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value == int(value) and abs(value) >= 100:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_table(
    title: str,
    rows: Sequence[Row],
    ratio_keys: Sequence[str] = (),
    baseline_impl: str = "raw",
) -> str:
    """A Markdown table of ``rows``, with one ``<key> x raw`` column per ``ratio_keys`` entry.

    The ratio compares each row with the row of ``baseline_impl`` of the same ``variant`` (e.g. the
    same number of clients).
    """
    columns: list[str] = []
    for row in rows:
        for key in row.metrics:
            if key not in columns:
                columns.append(key)
    show_variant = any(row.variant for row in rows)
    header = ["impl", *(["variant"] if show_variant else []), *columns, *(f"{k} x raw" for k in ratio_keys), "note"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        base = _baseline_for(row, rows, baseline_impl)
        cells = [row.impl, *([row.variant] if show_variant else [])]
        cells += [_fmt(row.metrics.get(c, math.nan)) for c in columns]
        for key in ratio_keys:
            if base is None or not row.available:
                cells.append("n/a")
            else:
                r = ratio(row.metrics.get(key, math.nan), base.metrics.get(key, math.nan))
                cells.append("n/a" if math.isnan(r) else f"{r:.2f}x")
        cells.append(row.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _baseline_for(row: Row, rows: Sequence[Row], baseline_impl: str) -> Row | None:
    for cand in rows:
        if cand.impl == baseline_impl and cand.available and cand.variant == row.variant:
            return cand
    return None
