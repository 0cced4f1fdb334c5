"""Server-side line charts as inline SVG: no chart library in the browser, nothing the CSP has to allow.

Only presentation attributes are used (no ``style=``): the console's CSP forbids inline styles. Every text is
escaped here, because the result is inserted into the page as markup.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


@dataclass
class Series:
    """One line: ``points`` are (x, y); a y of None or NaN is a gap, +inf is drawn at the top and marked ∞."""

    name: str
    points: list[tuple[float, float | None]]
    dashed: bool = False
    color: str | None = None


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    hlines: list[tuple[str, float]] = field(default_factory=list)  # (label, y): dashed horizontal rules
    width: int = 640
    height: int = 260
    chart_id: str = ""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def render(chart: Chart) -> str:
    """The chart as an ``<svg>`` element (string)."""
    ml, mr, mt, mb = 56, 150, 26, 40
    w, h = chart.width, chart.height
    pw, ph = w - ml - mr, h - mt - mb
    xs = [x for s in chart.series for x, _ in s.points]
    ys = [y for s in chart.series for _, y in s.points if y is not None and math.isfinite(y)]
    ys += [y for _, y in chart.hlines if math.isfinite(y)]
    has_inf = any(y is not None and math.isinf(y) for s in chart.series for _, y in s.points)
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0 = min(0.0, min(ys)) if ys else 0.0
    y1 = max(ys) if ys else 1.0
    if y1 <= y0:
        y1 = y0 + 1.0
    y1 = y0 + (y1 - y0) * 1.1

    def px(x: float) -> float:
        return ml + pw * (x - x0) / (x1 - x0)

    def py(y: float) -> float:
        if math.isinf(y):
            return mt
        return mt + ph - ph * (min(y, y1) - y0) / (y1 - y0)

    cid = f' id="{_e(chart.chart_id)}"' if chart.chart_id else ""
    out = [f'<svg xmlns="http://www.w3.org/2000/svg"{cid} class="chart" role="img" width="{w}" height="{h}" '
           f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">',
           f"<title>{_e(chart.title)}</title>",
           f'<text x="{ml}" y="15" font-size="13" font-weight="bold">{_e(chart.title)}</text>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        y = py(yv)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 5}" y="{y + 4:.1f}" text-anchor="end">{_e(_fmt(yv))}</text>')
    ticks = sorted(set(xs))
    step = max(1, math.ceil(len(ticks) / 12))
    for x in ticks[::step]:
        out.append(f'<text x="{px(x):.1f}" y="{mt + ph + 14}" text-anchor="middle">{_e(_fmt(x))}</text>')
    out.append(f'<text x="{ml + pw / 2:.0f}" y="{h - 6}" text-anchor="middle">{_e(chart.x_label)}</text>'
               f'<text transform="translate(13 {mt + ph / 2:.0f}) rotate(-90)" text-anchor="middle">'
               f"{_e(chart.y_label)}</text>")
    legend_y = mt + 6
    for j, (label, y) in enumerate(chart.hlines):
        yy = py(y)
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#555" '
                   f'stroke-dasharray="6 4" class="hline"/>')
        out.append(f'<text x="{ml + pw + 8}" y="{legend_y + 4}" fill="#555">- - {_e(label)} {_e(_fmt(y))}</text>')
        legend_y += 16
    for j, s in enumerate(chart.series):
        color = s.color or PALETTE[j % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        segments: list[list[tuple[float, float]]] = [[]]
        for x, y in s.points:
            if y is None or math.isnan(y):
                segments.append([])
                continue
            segments[-1].append((px(x), py(y)))
        for seg in segments:
            if len(seg) > 1:
                pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in seg)
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{pts}"/>')
        for x, y in s.points:
            if y is None or math.isnan(y):
                continue
            title = f"{s.name}: {_fmt(x)} → {'∞' if math.isinf(y) else _fmt(y)}"
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"><title>{_e(title)}</title>'
                       "</circle>")
        out.append(f'<line x1="{ml + pw + 8}" x2="{ml + pw + 26}" y1="{legend_y:.0f}" y2="{legend_y:.0f}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>'
                   f'<text x="{ml + pw + 30}" y="{legend_y + 4:.0f}">{_e(s.name[:22])}</text>')
        legend_y += 16
    if has_inf:
        out.append(f'<text x="{ml + 4}" y="{mt + 12}" fill="#c62828">∞ = non-DP round (drawn at the top)</text>')
    if not xs:
        out.append(f'<text x="{ml + pw / 2:.0f}" y="{mt + ph / 2:.0f}" text-anchor="middle" fill="#777">'
                   "no data yet</text>")
    out.append("</svg>")
    return "".join(out)


def line_chart(title: str, x_label: str, y_label: str, series: Sequence[Series],
               hlines: Sequence[tuple[str, float]] = (), chart_id: str = "", width: int = 640,
               height: int = 260) -> str:
    return render(Chart(title, x_label, y_label, list(series), list(hlines), width, height, chart_id))
