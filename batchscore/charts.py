"""Small SVG charts written by hand: no plotting library for two kinds of picture.

`line_chart` draws a few series over the same x labels (a trend over nights, a reliability
curve); `bar_chart` draws two shares side by side per category (tonight against the reference).
Every number is printed into the SVG's <title> elements, so a reader can hover to read them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 720, 360
LEFT, RIGHT, TOP, BOTTOM = 60, 170, 40, 70
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
LABEL_CHARS = 18  # longer x labels are cut with an ellipsis, so that none runs off the picture


def _frame(title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}"'
        f' viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="14">{escape(title)}</text>',
    ]


def _axes(top: float, percent: bool = False) -> list[str]:
    """The y axis from 0 to `top`, with grid lines at round values (five steps when `top` is
    2.5 or 5 times a power of ten, else four)."""
    plot_h = HEIGHT - TOP - BOTTOM
    mantissa = top / 10 ** math.floor(math.log10(top))
    steps = 5 if round(mantissa, 6) in (2.5, 5.0) else 4
    lines = []
    for i in range(steps + 1):
        value = top * i / steps
        y = HEIGHT - BOTTOM - plot_h * i / steps
        lines.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{f'{value:.0%}' if percent else f'{value:.2g}'}</text>"
        )
    return lines


def _legend(n: int, name: str, color: str) -> str:
    y = TOP + 16 * n
    return (
        f'<rect x="{WIDTH - RIGHT + 12}" y="{y}" width="10" height="10" fill="{color}"/>'
        f'<text x="{WIDTH - RIGHT + 28}" y="{y + 9}">{escape(name)}</text>'
    )


def _x_labels(labels: Sequence[str], step: float) -> list[str]:
    every = max(1, len(labels) // 12)
    out = []
    for i, label in enumerate(labels):
        if i % every:
            continue
        x = LEFT + step * (i + 0.5)
        y = HEIGHT - BOTTOM + 12
        out.append(
            f'<text x="{x:.1f}" y="{y}" transform="rotate(35 {x:.1f} {y})">'
            f"{escape(label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + '…')}"
            "</text>"
        )
    return out


def line_chart(
    title: str,
    labels: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    top: float | None = None,
) -> str:
    """Series over the same x labels; a None value leaves a gap."""
    values = [v for points in series.values() for v in points if v is not None]
    top = top if top is not None else max([1e-9, *values])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(labels))
    parts = [*_frame(title), *_axes(top), *_x_labels(labels, step)]
    for n, (name, points) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        xy = [
            (LEFT + step * (i + 0.5), HEIGHT - BOTTOM - plot_h * min(v, top) / top, v, label)
            for i, (v, label) in enumerate(zip(points, labels, strict=True))
            if v is not None
        ]
        if len(xy) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in xy)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}"/>')
        for x, y, v, label in xy:
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}">'
                f"<title>{escape(name)} {escape(label)}: {v:.4f}</title></circle>"
            )
        parts.append(_legend(n, name, color))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def bar_chart(
    title: str,
    categories: Sequence[str],
    groups: Mapping[str, Sequence[float]],
    *,
    percent: bool = False,
) -> str:
    """One bar per group and category (shares, say), groups side by side; `percent` labels
    the axis in percent."""
    values = [v for bars in groups.values() for v in bars]
    top = nice_top(max([1e-9, *values]))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(categories))
    width = step * 0.8 / max(1, len(groups))
    parts = [*_frame(title), *_axes(top, percent), *_x_labels(categories, step)]
    for n, (name, bars) in enumerate(groups.items()):
        color = COLORS[n % len(COLORS)]
        for i, (category, value) in enumerate(zip(categories, bars, strict=True)):
            height = plot_h * value / top
            x = LEFT + step * i + step * 0.1 + width * n
            parts.append(
                f'<rect x="{x:.1f}" y="{HEIGHT - BOTTOM - height:.1f}" width="{width:.1f}"'
                f' height="{height:.1f}" fill="{color}"><title>{escape(name)}'
                f" {escape(category)}: {value:.4f}</title></rect>"
            )
        parts.append(_legend(n, name, color))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


PANEL_H = 120
PANEL_GAP = 44
PANEL_LEFT = 100  # room for the first night's slanted date


@dataclass(frozen=True)
class Panel:
    """One signal over the nights: its value per night, the band where nights without change
    fall (None where there is none), and which nights alerted."""

    name: str
    values: Sequence[float | None]
    low: Sequence[float | None]
    high: Sequence[float | None]
    alerts: Sequence[bool]
    percent: bool = False  # ticks as percentages


def band_panels(title: str, labels: Sequence[str], panels: Sequence[Panel], note: str) -> str:
    """One small panel per signal over the same x labels (nights): each night's value as a
    point, its band shaded grey behind it, and the nights that alerted as red points with a
    ring; `note` says what the band is."""
    plot_w = WIDTH - PANEL_LEFT - 30
    step = plot_w / max(1, len(labels))
    height = TOP + 34 + len(panels) * (PANEL_H + PANEL_GAP) + 60
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}"'
        f' viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="20" font-size="14">{escape(title)}</text>',
        f'<text x="{LEFT}" y="34" fill="#555">{escape(note)}</text>',
    ]
    for n, panel in enumerate(panels):
        parts += _panel(panel, TOP + 34 + n * (PANEL_H + PANEL_GAP), step, plot_w, labels)
    bottom = TOP + 34 + len(panels) * (PANEL_H + PANEL_GAP) - PANEL_GAP + 14
    every = max(1, len(labels) // 10)
    for i, label in enumerate(labels):
        if i % every == 0:
            x = PANEL_LEFT + step * (i + 0.5)
            parts.append(
                f'<text x="{x:.1f}" y="{bottom}" text-anchor="end"'
                f' transform="rotate(-30 {x:.1f} {bottom})">{escape(label)}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _panel(
    panel: Panel, top_y: float, step: float, plot_w: float, labels: Sequence[str]
) -> list[str]:
    seen = [v for v in (*panel.values, *panel.low, *panel.high) if v is not None]
    # Every signal drawn lies in [0, 1]; some room above the highest point or band edge, and a
    # top whose half is a round number.
    top = min(1.0, nice_top(max([0.1, *seen]) * 1.15, (1, 2, 5, 10)))

    def y_of(value: float) -> float:
        return top_y + PANEL_H - PANEL_H * min(max(value, 0.0), top) / top

    parts = [
        f'<text x="{PANEL_LEFT}" y="{top_y - 14}" font-size="12" font-weight="bold">'
        f"{escape(panel.name)}</text>"
    ]
    for i in range(3):
        tick = top * i / 2
        y = y_of(tick)
        shown = f"{tick:.0%}" if panel.percent else f"{tick:.2g}"
        parts.append(
            f'<line x1="{PANEL_LEFT}" y1="{y:.1f}" x2="{PANEL_LEFT + plot_w}" y2="{y:.1f}"'
            f' stroke="#e5e5e5"/><text x="{PANEL_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{shown}</text>"
        )
    for i, (low, high) in enumerate(zip(panel.low, panel.high, strict=True)):
        if low is not None and high is not None:
            x, y_top, y_bottom = PANEL_LEFT + step * (i + 0.15), y_of(high), y_of(low)
            parts.append(
                f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{step * 0.7:.1f}"'
                f' height="{max(y_bottom - y_top, 1):.1f}" fill="#ddd"/>'
            )
    for i, (value, alert) in enumerate(zip(panel.values, panel.alerts, strict=True)):
        if value is None:
            continue
        x, y = PANEL_LEFT + step * (i + 0.5), y_of(value)
        color = "#d62728" if alert else "#1f77b4"
        if alert:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="7" fill="none" stroke="{color}"/>')
        said = " (alert)" if alert else ""
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}">'
            f"<title>{escape(labels[i])}: {value:.4f}{said}</title></circle>"
        )
    return parts


def nice_top(value: float, mantissas: Sequence[float] = (1, 2, 2.5, 5, 10)) -> float:
    """The smallest of `mantissas` times a power of ten at or above `value`."""
    power = 10.0 ** math.floor(math.log10(value))
    return next(m * power for m in mantissas if m * power >= value * (1 - 1e-9))
