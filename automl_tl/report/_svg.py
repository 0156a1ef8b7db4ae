"""Inline SVG charts for the report: plain strings, no plotting library, no external references.

Each function returns one ``<svg>`` element sized in pixels. Inline SVG inside HTML5 needs no ``xmlns``,
so the page holds no URL at all. Hovering a mark shows its ``<title>`` (trial id, value) in the browser.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from html import escape

__all__ = [
    "PALETTE",
    "Point",
    "Series",
    "bar_chart",
    "frontier_chart",
    "heatmap",
    "line_chart",
    "reliability_chart",
    "scatter_chart",
]

# Tableau 10: distinguishable, print-safe, and readable for the common colour-vision deficiencies.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
INK, GRID, MUTED, ALERT = "#333", "#e3e3e3", "#888", "#d62728"
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


@dataclasses.dataclass(frozen=True)
class Point:
    x: float
    y: float
    title: str = ""


@dataclasses.dataclass(frozen=True)
class Series:
    """One line of a line chart. ``end`` marks the last point: "stop" (a cross) or "done" (a dot)."""

    name: str
    points: tuple[Point, ...]
    color: str
    dashed: bool = False
    width: float = 1.6
    end: str = ""
    highlight: int | None = None  # x of a point to ring (the best epoch)


@dataclasses.dataclass(frozen=True)
class _Scale:
    lo: float
    hi: float
    start: float
    end: float
    log: bool = False

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.start + t * (self.end - self.start)

    def ticks(self, count: int = 5) -> list[float]:
        if self.log:
            first, last = math.floor(math.log10(self.lo) + 1e-9), math.ceil(math.log10(self.hi) - 1e-9)
            decades = [10.0**e for e in range(first, last + 1) if self.lo * 0.999 <= 10.0**e <= self.hi * 1.001]
            if len(decades) >= 2:
                return decades
            return [v for e in range(first - 1, last + 1) for m in (1, 2, 5)
                    if self.lo * 0.999 <= (v := m * 10.0**e) <= self.hi * 1.001]  # fmt: skip
        return _nice_ticks(self.lo, self.hi, count)


def _nice_ticks(lo: float, hi: float, count: int) -> list[float]:
    raw = (hi - lo) / max(count, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


def _padded(values: Sequence[float], clamp: tuple[float, float] | None, log: bool = False) -> tuple[float, float]:
    """A range around ``values`` with a little air, kept inside ``clamp``; never empty."""
    lo, hi = min(values), max(values)
    if log:
        lo, hi = lo / 1.5, hi * 1.5
        return (lo, hi) if hi > lo else (lo / 10, hi * 10)
    pad = (hi - lo) * 0.12 or max(abs(hi) * 0.1, 0.05)
    lo, hi = lo - pad, hi + pad
    if clamp is not None:
        lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def tick_label(v: float) -> str:
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        mantissa, exponent = f"{v:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{round(v, 6):g}"


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{escape(label)}" {FONT}>' + "".join(body) + "</svg>")  # fmt: skip


def _text(x: float, y: float, text: str, anchor: str = "middle", color: str = INK, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{color}" {extra}>{escape(text)}</text>'


def _axes(
    x: _Scale, y: _Scale, x_label: str, y_label: str, x_ticks: Sequence[tuple[float, str]] | None = None
) -> list[str]:
    """Grid lines, tick labels and axis titles of a plot area."""
    out = []
    top, bottom, left, right = y.end, y.start, x.start, x.end
    for v in y.ticks():
        py = y(v)
        out.append(f'<line x1="{left}" x2="{right}" y1="{py:.1f}" y2="{py:.1f}" stroke="{GRID}"/>')
        out.append(_text(left - 4, py + 3.5, tick_label(v), "end", MUTED))
    for v, text in x_ticks if x_ticks is not None else [(t, tick_label(t)) for t in x.ticks()]:
        px = x(v)
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{bottom}" stroke="{GRID}"/>')
        out.append(_text(px, bottom + 14, text, "middle", MUTED))
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#bbb"/>')
    out.append(_text((left + right) / 2, bottom + 29, x_label))
    out.append(_text(12, (top + bottom) / 2, y_label, "middle", INK, f'transform="rotate(-90 12 {(top + bottom) / 2:.1f})"'))
    return out


def _cross(x: float, y: float, color: str, title: str, size: float = 4.5) -> str:
    return (f'<path class="stop" d="M{x - size:.1f},{y - size:.1f}L{x + size:.1f},{y + size:.1f}M{x - size:.1f},'
            f'{y + size:.1f}L{x + size:.1f},{y - size:.1f}" stroke="{color}" stroke-width="2.2">'
            f"<title>{escape(title)}</title></path>")  # fmt: skip


def line_chart(
    series: Sequence[Series],
    x_max: int,
    x_label: str,
    y_label: str,
    width: int = 560,
    height: int = 300,
    y_clamp: tuple[float, float] | None = None,
    legend: bool = True,
) -> str:
    """Lines over integer x from 1 to ``x_max`` (epochs); each series may end with a stop or done mark."""
    ys = [p.y for s in series for p in s.points]
    if not ys:
        return _svg(width, 40, [_text(width / 2, 24, "no epochs recorded", "middle", MUTED)], y_label)
    # The legend flows above the plot, never over the lines.
    entries, lx, ly = [], 54.0, 12.0
    for s in series if legend and len(series) <= 12 else []:
        item = 24 + 6.2 * len(s.name[:16])
        if lx + item > width and lx > 54:
            lx, ly = 54.0, ly + 14
        entries.append((lx, ly, s))
        lx += item + 12
    top = ly + 10 if entries else 10
    x = _Scale(0.85, max(x_max, 2) + 0.15, 54, width - 14)
    y = _Scale(*_padded(ys, y_clamp), height - 40, top)
    step = max(1, math.ceil(x_max / 10))
    body = _axes(x, y, x_label, y_label, [(float(e), str(e)) for e in range(1, x_max + 1, step)])
    for s in series:
        coords = [(x(p.x), y(p.y)) for p in s.points]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in coords)
        body.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="{s.width}"{dash}>'
                    f"<title>{escape(s.name)}</title></polyline>")  # fmt: skip
        for p, (px, py) in zip(s.points, coords):
            title = f"<title>{escape(p.title)}</title>" if p.title else ""
            body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.2" fill="{s.color}">{title}</circle>')
            if s.highlight is not None and p.x == s.highlight:
                body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5.5" fill="none" stroke="{s.color}" stroke-width="1.5"/>')
        if coords and s.end == "stop":
            body.append(_cross(*coords[-1], ALERT, f"{s.name}: stopped early"))
        elif coords and s.end == "done":
            body.append(f'<circle cx="{coords[-1][0]:.1f}" cy="{coords[-1][1]:.1f}" r="4" fill="{s.color}"/>')
    for lx, ly, s in entries:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        body.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{s.color}" stroke-width="2"{dash}/>')
        body.append(_text(lx + 22, ly, s.name[:16], "start"))
    return _svg(width, height, body, y_label)


def scatter_chart(
    points: Sequence[Point],
    x_label: str,
    y_label: str,
    categories: Sequence[str] | None = None,
    log_x: bool = False,
    highlight: str | None = None,
    width: int = 300,
    height: int = 220,
) -> str:
    """y against a numeric x (``log_x`` for rates), or against ``categories`` (x is then an index).

    Points of one category are spread sideways so equal values stay visible; the point whose title equals
    ``highlight`` (the best trial) is drawn larger and outlined.
    """
    if not points:
        return _svg(width, 40, [_text(width / 2, 24, "no finished trials", "middle", MUTED)], x_label)
    y = _Scale(*_padded([p.y for p in points], (0.0, 1.0)), height - 42, 10)
    if categories is not None:
        x = _Scale(-0.5, len(categories) - 0.5, 50, width - 10)
        room = max(3, int((width - 60) / len(categories) / 6.5))
        ticks: list[tuple[float, str]] | None = [(float(i), c[:room]) for i, c in enumerate(categories)]
        # A strip plot: a category's points spread evenly over a band that widens with their number.
        counts: dict[float, int] = {}
        for p in points:
            counts[p.x] = counts.get(p.x, 0) + 1
        seen: dict[float, int] = {}
        placed = []
        for p in points:
            k, m = seen.setdefault(p.x, 0), counts[p.x]
            seen[p.x] += 1
            half = min(0.3, 0.05 * (m - 1))
            # Golden-ratio steps scatter consecutive points, so the spread says nothing about their order.
            placed.append((x(p.x + half * (2 * ((k * 0.618034) % 1.0) - 1)), p))
    else:
        lo, hi = _padded([p.x for p in points], None, log_x)
        if log_x and lo <= 0:
            log_x = False
        x = _Scale(lo, hi, 50, width - 10, log_x)
        ticks = None
        placed = [(x(p.x), p) for p in points]
    body = _axes(x, y, x_label, y_label, ticks)
    for px, p in sorted(placed, key=lambda item: item[1].title == highlight):
        best = p.title == highlight
        r, stroke = (5.5, f' stroke="{INK}" stroke-width="1.5"') if best else (4.0, "")
        color = PALETTE[1] if best else PALETTE[0]
        body.append(f'<circle cx="{px:.1f}" cy="{y(p.y):.1f}" r="{r}" fill="{color}" fill-opacity="0.8"{stroke}>'
                    f"<title>{escape(p.title)}: {p.y:.4f}</title></circle>")  # fmt: skip
    return _svg(width, height, body, f"{y_label} against {x_label}")


def bar_chart(labels: Sequence[str], values: Sequence[float], value_label: str, width: int = 520) -> str:
    """Horizontal bars, largest first as given, with the value printed beside each bar."""
    row, left = 24, 150
    height = row * len(labels) + 36
    top = max(values, default=0.0) or 1.0
    body = []
    for i, (label, v) in enumerate(zip(labels, values)):
        y0 = 8 + i * row
        length = (width - left - 60) * max(v, 0.0) / top
        body.append(_text(left - 6, y0 + 14, label, "end"))
        body.append(f'<rect x="{left}" y="{y0 + 3}" width="{length:.1f}" height="{row - 8}" fill="{PALETTE[0]}">'
                    f"<title>{escape(label)}: {v:.3f}</title></rect>")  # fmt: skip
        body.append(_text(left + length + 5, y0 + 14, f"{v:.2f}", "start", MUTED))
    body.append(_text(left + (width - left - 60) / 2, height - 8, value_label, "middle", MUTED))
    return _svg(width, height, body, value_label)


def _blend(share: float) -> str:
    """White to the palette's blue, by ``share`` in [0, 1]."""
    base = (0x4E, 0x79, 0xA7)
    r, g, b = (round(255 + (c - 255) * share) for c in base)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(matrix: Sequence[Sequence[int]], names: Sequence[str], title: str) -> str:
    """A confusion matrix: true classes as rows, predictions as columns, shaded by each row's share."""
    n = len(names)
    cell = max(14, min(64, 560 // max(n, 1)))
    label_w = min(140, 12 + 7 * max((len(s[:18]) for s in names), default=4))
    left, top = label_w + 24, label_w + 8
    size = cell * n
    body = [_text(left + size / 2, 12, "predicted", "middle", MUTED),
            _text(10, top + size / 2, "true", "middle", MUTED, f'transform="rotate(-90 10 {top + size / 2:.1f})"')]  # fmt: skip
    show_counts = cell >= 26
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        y0 = top + i * cell
        body.append(_text(left - 5, y0 + cell / 2 + 4, names[i][:18], "end"))
        for j, count in enumerate(row):
            share = count / total
            x0 = left + j * cell
            stroke = f' stroke="{INK}" stroke-width="1.2"' if i == j else ' stroke="#fff"'
            body.append(f'<rect x="{x0}" y="{y0}" width="{cell}" height="{cell}" fill="{_blend(share)}"{stroke}>'
                        f"<title>true {escape(names[i])}, predicted {escape(names[j])}: {count} ({share:.0%} of the row)"
                        "</title></rect>")  # fmt: skip
            if show_counts:
                color = "#fff" if share > 0.55 else INK
                body.append(_text(x0 + cell / 2, y0 + cell / 2 + 4, str(count), "middle", color, 'class="cm-count"'))
    for j, name in enumerate(names):
        cx = left + j * cell + cell / 2 + 4
        body.append(_text(cx, top - 6, name[:18], "start", INK, f'transform="rotate(-60 {cx:.1f} {top - 6})"'))
    return _svg(left + size + 10, top + size + 10, body, title)


def reliability_chart(curves: Sequence[tuple[str, Sequence[dict[str, float | int | None]], str]], width: int = 420) -> str:
    """Accuracy against confidence per bin (bars for the first curve, dots and lines for the others).

    Bars on the diagonal are perfectly calibrated; below it the model is over-confident. The strip under
    the plot shows how many predictions fall into each bin.
    """
    plot_h, strip_h, top = 300, 46, 12 + 15 * len(curves)
    x = _Scale(0.0, 1.0, 50, width - 12)
    y = _Scale(0.0, 1.0, top + plot_h, top)
    body = _axes(x, y, "confidence (top predicted probability)", "accuracy")
    body.append(f'<line x1="{x(0):.1f}" y1="{y(0):.1f}" x2="{x(1):.1f}" y2="{y(1):.1f}" stroke="{MUTED}" stroke-dasharray="4 3"/>')
    strip_top = top + plot_h + 40
    for k, (name, bins, color) in enumerate(curves):
        filled = [b for b in bins if b["count"]]
        if k == 0:
            most = max((int(b["count"] or 0) for b in bins), default=1) or 1
            for b in bins:
                lo, hi = float(b["lower"] or 0.0), float(b["upper"] or 0.0)
                count = int(b["count"] or 0)
                if count:
                    acc, conf = float(b["accuracy"] or 0.0), float(b["confidence"] or 0.0)
                    body.append(f'<rect x="{x(lo) + 1:.1f}" y="{y(acc):.1f}" width="{x(hi) - x(lo) - 2:.1f}" '
                                f'height="{y(0) - y(acc):.1f}" fill="{color}" fill-opacity="0.75"><title>{escape(name)}: '
                                f"{count} predictions with confidence in ({lo:.2f}, {hi:.2f}]: mean confidence {conf:.3f}, "
                                f"accuracy {acc:.3f}</title></rect>")  # fmt: skip
                h = (strip_h - 6) * count / most
                body.append(f'<rect x="{x(lo) + 1:.1f}" y="{strip_top + strip_h - h:.1f}" width="{x(hi) - x(lo) - 2:.1f}" '
                            f'height="{h:.1f}" fill="{MUTED}"><title>{count} predictions</title></rect>')  # fmt: skip
        else:
            coords = [(x(float(b["confidence"] or 0.0)), y(float(b["accuracy"] or 0.0))) for b in filled]
            body.append(f'<polyline points="{" ".join(f"{a:.1f},{c:.1f}" for a, c in coords)}" fill="none" '
                        f'stroke="{color}" stroke-width="1.8"/>')  # fmt: skip
            body.extend(f'<circle cx="{a:.1f}" cy="{c:.1f}" r="3.5" fill="{color}"/>' for a, c in coords)
        body.append(f'<rect x="{x(0)}" y="{2 + 15 * k}" width="12" height="10" fill="{color}"/>')
        body.append(_text(x(0) + 17, 11 + 15 * k, name, "start"))
    body.append(_text(x(0) - 4, strip_top + strip_h - 2, "count", "end", MUTED))
    body.append(f'<line x1="{x(0)}" x2="{x(1)}" y1="{strip_top + strip_h}" y2="{strip_top + strip_h}" stroke="#bbb"/>')
    return _svg(width, strip_top + strip_h + 6, body, "reliability diagram")


def frontier_chart(
    points: Sequence[tuple[Point, str]], served: str, x_label: str, y_label: str, width: int = 460, height: int = 300
) -> str:
    """Accuracy (y) against latency (x) of each point, drawn by kind (``trial``, ``ensemble``, ``cascade``),
    with the frontier: the points no other point beats on both at once, joined left to right. The point whose
    title is ``served`` is ringed and labelled."""
    if not points:
        return _svg(width, 40, [_text(width / 2, 24, "no latency figures", "middle", MUTED)], x_label)
    x = _Scale(*_padded([p.x for p, _ in points], (0.0, math.inf)), 50, width - 10)
    y = _Scale(*_padded([p.y for p, _ in points], (0.0, 1.0)), height - 58, 10)  # the legend below the axis title
    body = _axes(x, y, x_label, y_label)
    front = sorted((p for p, _ in points if not any(
        q.x <= p.x and q.y >= p.y and (q.x, q.y) != (p.x, p.y) for q, _ in points)), key=lambda p: (p.x, -p.y))  # fmt: skip
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(p.x):.1f},{y(p.y):.1f}" for i, p in enumerate(front))
    body.append(f'<path d="{path}" fill="none" stroke="{MUTED}" stroke-dasharray="4 3"><title>frontier</title></path>')
    colors = {"trial": PALETTE[0], "ensemble": PALETTE[1], "cascade": PALETTE[2]}
    for p, kind in sorted(points, key=lambda item: item[1] != "trial"):
        r = 4.0 if kind == "trial" else 6.0
        body.append(f'<circle cx="{x(p.x):.1f}" cy="{y(p.y):.1f}" r="{r}" fill="{colors.get(kind, INK)}" '
                    f'fill-opacity="0.8"><title>{escape(p.title)}: {p.y:.4f} at {p.x:.2f}</title></circle>')  # fmt: skip
        if p.title == served:
            body.append(f'<circle cx="{x(p.x):.1f}" cy="{y(p.y):.1f}" r="{r + 4}" fill="none" stroke="{INK}" '
                        f'stroke-width="1.5"/>')  # fmt: skip
            left = x(p.x) > width - 70  # near the right edge: the label goes to the left of the point
            body.append(_text(x(p.x) + (-r - 6 if left else r + 6), y(p.y) - r - 2, "served", "end" if left else "start"))
    for i, (kind, color) in enumerate(colors.items()):
        body.append(f'<circle cx="{60 + 80 * i}" cy="{height - 8}" r="4" fill="{color}"/>')
        body.append(_text(68 + 80 * i, height - 4, kind, "start", MUTED))
    return _svg(width, height, body, f"{y_label} against {x_label}")
