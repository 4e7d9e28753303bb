"""Small SVG charts written by hand: no plotting library for two kinds of picture.

`line_chart` draws a few series over the same x labels (a trend over nights, a reliability
curve); `bar_chart` draws two shares side by side per category (tonight against the reference).
Every number is printed into the SVG's <title> elements, so a reader can hover to read them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 720, 360
LEFT, RIGHT, TOP, BOTTOM = 60, 170, 40, 70
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _frame(title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}"'
        f' viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="14">{escape(title)}</text>',
    ]


def _axes(top: float) -> list[str]:
    """The y axis from 0 to `top`, with four grid lines."""
    plot_h = HEIGHT - TOP - BOTTOM
    lines = []
    for i in range(5):
        value = top * i / 4
        y = HEIGHT - BOTTOM - plot_h * i / 4
        lines.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.2g}</text>'
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
            f"{escape(label[:24])}</text>"
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


def bar_chart(title: str, categories: Sequence[str], groups: Mapping[str, Sequence[float]]) -> str:
    """One bar per group and category (shares, say), groups side by side."""
    values = [v for bars in groups.values() for v in bars]
    top = max([1e-9, *values])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(1, len(categories))
    width = step * 0.8 / max(1, len(groups))
    parts = [*_frame(title), *_axes(top), *_x_labels(categories, step)]
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
