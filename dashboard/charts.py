"""Small server-rendered SVG bar charts (no chart library, no CDN)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe


@dataclass
class Bar:
    value: float
    label: str = ""  # under the bar (sparse)
    title: str = ""  # tooltip
    cls: str = ""
    href: str = ""


def nice_max(v: float) -> float:
    if v <= 0:
        return 1
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def bar_chart(bars: list[Bar], *, chart_id: str, height: int = 140, unit: str = "",
              label: str = "", empty: str = "No data yet.") -> SafeString:
    """A responsive bar chart (viewBox scaled to the container's width), with a
    y axis of three gridlines, a tooltip per bar and ``data-value`` attributes."""
    if not bars:
        return mark_safe(f'<p class="muted chart-empty" id="{escape(chart_id)}">'
                         f'{escape(empty)}</p>')
    top = nice_max(max(b.value for b in bars))
    left, bottom, right, topm = 34, 18, 4, 8
    n = len(bars)
    width = max(640, n * 12)
    plot_w = width - left - right
    plot_h = height - bottom - topm
    slot = plot_w / n
    bw = min(28.0, max(2.0, slot * 0.72))
    values = n <= 24  # room for a value over each bar
    out = [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(label)}" '
        f'data-max="{fmt(top)}">'
    ]
    for frac in (0, 0.5, 1):
        y = topm + plot_h * (1 - frac)
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" '
                   f'y2="{y:.1f}"/>')
        out.append(f'<text class="axis" x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">'
                   f'{fmt(top * frac)}{escape(unit) if frac else ""}</text>')
    for i, b in enumerate(bars):
        h = plot_h * (b.value / top) if top else 0
        x = left + i * slot + (slot - bw) / 2
        y = topm + plot_h - h
        rect = (f'<rect class="bar {escape(b.cls)}" x="{x:.1f}" y="{y:.1f}" width="{bw:.1f}" '
                f'height="{max(h, 0):.1f}" data-value="{fmt(b.value)}">'
                f'<title>{escape(b.title or fmt(b.value))}</title></rect>')
        if b.href:
            rect = f'<a href="{escape(b.href)}">{rect}</a>'
        out.append(rect)
        if values and b.value:
            shown = fmt(round(b.value, 1 if b.value < 10 else 0))
            out.append(f'<text class="value" x="{x + bw / 2:.1f}" y="{y - 2:.1f}" '
                       f'text-anchor="middle">{escape(shown)}{escape(unit)}</text>')
        if b.label:
            out.append(f'<text class="axis" x="{x + bw / 2:.1f}" y="{height - 4}" '
                       f'text-anchor="middle">{escape(b.label)}</text>')
    out.append("</svg>")
    return mark_safe("".join(out))
