"""The bench's outputs: medians, the table, the JSON results and the SVG chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from scenarios import RunResult

# Issue 3's reference figures (wrk, 2 cores, PostgreSQL 15, medians of 3 runs).
REFERENCE: dict[str, dict[str, dict[str, float]]] = {
    "seed": {
        "B1": {"answered_per_s": 3160, "p99_ms": 34, "winners": 1009},
        "B2": {"first_per_s": 881, "second_per_s": 613, "ratio": 613 / 881},
        "B3": {"median_ms": 42, "body_mb": 1.3},
        "B4": {"tps": 2170},
    },
    "peer": {
        "B1": {"answered_per_s": 4120, "p99_ms": 71, "winners": 1000},
        "B2": {"first_per_s": 1264, "second_per_s": 1251, "ratio": 1251 / 1264},
    },
    "target": {
        "B1": {"answered_per_s": 4200, "p99_ms": 50, "winners": 1000},
        "B2": {"first_per_s": 1300, "ratio": 0.95},
        "B3": {"median_ms": 40},
        "B4": {"b2_fraction": 0.6},
    },
}


@dataclass(frozen=True)
class Row:
    """One line of the table: a metric of a scenario and how to print it."""

    scenario: str
    key: str
    label: str
    digits: int


ROWS = [
    Row("B1", "answered_per_s", "answered claims/s", 0),
    Row("B1", "p50_ms", "latency p50 (ms)", 1),
    Row("B1", "p99_ms", "latency p99 (ms)", 1),
    Row("B1", "winners", "winners", 0),
    Row("B1", "peak_rss_mib", "peak worker RSS (MiB)", 1),
    Row("B2", "first_per_s", "claims/s, first window", 0),
    Row("B2", "second_per_s", "claims/s, second window", 0),
    Row("B2", "ratio", "second / first", 2),
    Row("B2", "p99_ms", "latency p99 (ms)", 1),
    Row("B2", "peak_rss_mib", "peak worker RSS (MiB)", 1),
    Row("B3", "median_ms", "GET median (ms)", 1),
    Row("B3", "p99_ms", "GET p99 (ms)", 1),
    Row("B3", "body_mb", "response size (MB)", 2),
    Row("B3", "peak_rss_mib", "peak worker RSS (MiB)", 1),
    Row("B4", "tps", "pgbench transactions/s", 0),
    Row("B4", "b2_fraction", "B2 first window / B4", 2),
]


def medians(runs: dict[str, list[RunResult]]) -> dict[str, dict[str, float]]:
    """Return the median of every metric of every scenario, plus B2 as a fraction of B4."""
    summary = {
        scenario: {
            key: statistics.median(result.metrics[key] for result in results)
            for key in results[0].metrics
        }
        for scenario, results in runs.items()
    }
    if "B2" in summary and "B4" in summary:
        summary["B4"]["b2_fraction"] = summary["B2"]["first_per_s"] / summary["B4"]["tps"]
    return summary


def spreads(runs: dict[str, list[RunResult]]) -> dict[str, dict[str, tuple[float, float]]]:
    """Return the lowest and highest value of every metric over the runs."""
    return {
        scenario: {
            key: (min(r.metrics[key] for r in results), max(r.metrics[key] for r in results))
            for key in results[0].metrics
        }
        for scenario, results in runs.items()
    }


def _number(value: float | None, digits: int) -> str:
    """Format a figure with thousands separators, or a dash when there is none."""
    return "—" if value is None else f"{value:,.{digits}f}"


def table(
    summary: dict[str, dict[str, float]], spread: dict[str, dict[str, tuple[float, float]]]
) -> str:
    """Return the results as a Markdown table beside the reference figures."""
    lines = [
        "| scenario | metric | ours (median) | ours (min–max) | seed (Go) | peer (Go) | target |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        if row.key not in summary.get(row.scenario, {}):
            continue
        low, high = spread.get(row.scenario, {}).get(row.key, (None, None))
        cells = [
            row.scenario,
            row.label,
            _number(summary[row.scenario][row.key], row.digits),
            "—" if low is None else f"{_number(low, row.digits)}–{_number(high, row.digits)}",
            *(
                _number(REFERENCE[source].get(row.scenario, {}).get(row.key), row.digits)
                for source in ("seed", "peer", "target")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write the results document as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


# Chart


COLOURS = {"seed": "#9e9e9e", "peer": "#4e79a7", "ours": "#59a14f"}
PANEL_WIDTH, PANEL_HEIGHT, TOP, BOTTOM, LEFT = 420, 320, 50, 60, 60


def _bar(x: float, value: float, scale: float, width: float, colour: str) -> str:
    """One bar, standing on the axis, with its value above it."""
    height = value * scale
    y = TOP + PANEL_HEIGHT - height
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{colour}"/>'
        f'<text x="{x + width / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" font-size="11">'
        f"{value:,.0f}</text>"
    )


def _panel(
    offset: float, title: str, groups: list[str], series: dict[str, list[float]], target: float
) -> str:
    """A bar chart panel: a group of bars per label in groups, a bar per series, a target line."""
    top_value = max([target, *(v for values in series.values() for v in values)]) * 1.15
    scale = PANEL_HEIGHT / top_value
    group_width = (PANEL_WIDTH - LEFT) / len(groups)
    bar_width = group_width * 0.8 / len(series)
    parts = [
        f'<text x="{offset + PANEL_WIDTH / 2:.1f}" y="28" text-anchor="middle" '
        f'font-size="14" font-weight="bold">{escape(title)}</text>'
    ]
    axis_y = TOP + PANEL_HEIGHT
    parts.append(
        f'<line x1="{offset + LEFT}" y1="{axis_y}" x2="{offset + PANEL_WIDTH}" '
        f'y2="{axis_y}" stroke="#333"/>'
    )
    for index, group in enumerate(groups):
        start = offset + LEFT + index * group_width + group_width * 0.1
        for position, (name, values) in enumerate(series.items()):
            parts.append(
                _bar(
                    start + position * bar_width,
                    values[index],
                    scale,
                    bar_width * 0.9,
                    COLOURS[name],
                )
            )
        parts.append(
            f'<text x="{start + group_width * 0.4:.1f}" y="{axis_y + 18}" '
            f'text-anchor="middle" font-size="12">{escape(group)}</text>'
        )
    target_y = axis_y - target * scale
    parts.append(
        f'<line x1="{offset + LEFT}" y1="{target_y:.1f}" x2="{offset + PANEL_WIDTH}" '
        f'y2="{target_y:.1f}" stroke="#e15759" stroke-dasharray="6 4"/>'
    )
    parts.append(
        f'<text x="{offset + LEFT + 4}" y="{target_y - 5:.1f}" font-size="11" '
        f'fill="#e15759">target {target:,.0f}</text>'
    )
    return "".join(parts)


def _legend(names: list[str], y: float) -> str:
    """Colour keys of the series."""
    labels = {"seed": "seed (Go, oversells)", "peer": "peer (Go)", "ours": "this service (median)"}
    parts = []
    for index, name in enumerate(names):
        x = LEFT + index * 220
        parts.append(
            f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{COLOURS[name]}"/>'
            f'<text x="{x + 18}" y="{y}" font-size="12">{escape(labels[name])}</text>'
        )
    return "".join(parts)


def _series(
    scenario: str, keys: list[str], summary: dict[str, dict[str, float]]
) -> dict[str, list[float]]:
    """The seed's, the peer's and our figures for the given metrics of a scenario."""
    sources = {
        "seed": REFERENCE["seed"][scenario],
        "peer": REFERENCE["peer"][scenario],
        "ours": summary[scenario],
    }
    return {name: [figures[key] for key in keys] for name, figures in sources.items()}


def chart(summary: dict[str, dict[str, float]], sizes: dict[str, int], caption: str) -> str:
    """Return an SVG comparing our B1 and B2 figures with the seed's and the peer's.

    The reference figures are for the full sizes; sizes label the groups with ours.
    """
    panels = []
    window = sizes["b2_window_s"]
    if "B1" in summary:
        panels.append(
            (
                "B1 hot coupon: answered claims/s",
                [f"stock {sizes['b1_stock']:,}, {sizes['b1_claims']:,} claims"],
                _series("B1", ["answered_per_s"], summary),
                REFERENCE["target"]["B1"]["answered_per_s"],
            )
        )
    if "B2" in summary:
        panels.append(
            (
                "B2 every claim wins: claims/s",
                [f"first {window} s", f"next {window} s"],
                _series("B2", ["first_per_s", "second_per_s"], summary),
                REFERENCE["target"]["B2"]["first_per_s"],
            )
        )
    width = max(1, len(panels)) * (PANEL_WIDTH + 40)
    height = TOP + PANEL_HEIGHT + BOTTOM + 30
    body = [
        _panel(index * (PANEL_WIDTH + 40), title, groups, series, target)
        for index, (title, groups, series, target) in enumerate(panels)
    ]
    body.append(_legend(list(COLOURS), TOP + PANEL_HEIGHT + 45))
    body.append(
        f'<text x="{LEFT}" y="{height - 8}" font-size="11" fill="#555">{escape(caption)}</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>\n'
    )


def write_chart(
    path: Path, summary: dict[str, dict[str, float]], sizes: dict[str, int], caption: str
) -> None:
    """Write the chart as an SVG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(chart(summary, sizes, caption))


# Grouped bars, for the scaling charts (docs/scaling.md)

SERIES_COLOURS = ["#59a14f", "#4e79a7", "#f28e2b", "#b07aa1", "#9e9e9e"]


def grouped_bar_chart(
    title: str,
    groups: list[str],
    series: dict[str, list[float | None]],
    axis_label: str,
    caption: str,
) -> str:
    """Return an SVG of bars, a group per label in groups, a bar per series (in the order
    given, coloured from SERIES_COLOURS); a missing value (None) leaves a gap marked "—"."""
    group_width = max(150, 60 * len(series))
    width = LEFT + group_width * len(groups) + 20
    height = TOP + PANEL_HEIGHT + BOTTOM + 20 + 18 * len(series)
    values = [value for figures in series.values() for value in figures if value is not None]
    scale = PANEL_HEIGHT / (max([1.0, *values]) * 1.15)
    bar_width = group_width * 0.8 / len(series)
    axis_y = TOP + PANEL_HEIGHT
    parts = [
        f'<text x="{width / 2:.1f}" y="28" text-anchor="middle" font-size="14" '
        f'font-weight="bold">{escape(title)}</text>',
        f'<line x1="{LEFT}" y1="{axis_y}" x2="{width - 20}" y2="{axis_y}" stroke="#333"/>',
        f'<text x="16" y="{TOP + PANEL_HEIGHT / 2:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 16 {TOP + PANEL_HEIGHT / 2:.1f})">{escape(axis_label)}</text>',
    ]
    for index, group in enumerate(groups):
        start = LEFT + index * group_width + group_width * 0.1
        for position, figures in enumerate(series.values()):
            x = start + position * bar_width
            colour = SERIES_COLOURS[position % len(SERIES_COLOURS)]
            value = figures[index]
            if value is None:
                parts.append(
                    f'<text x="{x + bar_width * 0.45:.1f}" y="{axis_y - 4}" '
                    f'text-anchor="middle" font-size="11" fill="#777">—</text>'
                )
            else:
                parts.append(_bar(x, value, scale, bar_width * 0.9, colour))
        parts.append(
            f'<text x="{start + group_width * 0.4:.1f}" y="{axis_y + 18}" '
            f'text-anchor="middle" font-size="12">{escape(group)}</text>'
        )
    for position, name in enumerate(series):
        y = axis_y + 45 + 18 * position
        colour = SERIES_COLOURS[position % len(SERIES_COLOURS)]
        parts.append(
            f'<rect x="{LEFT}" y="{y - 10}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{LEFT + 18}" y="{y}" font-size="12">{escape(name)}</text>'
        )
    parts.append(
        f'<text x="{LEFT}" y="{height - 8}" font-size="11" fill="#555">{escape(caption)}</text>'
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'viewBox="0 0 {width:.0f} {height}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/>{"".join(parts)}</svg>\n'
    )
