"""Small PNG charts drawn with Pillow (no plotting dependency): grouped bars with confidence intervals; a scatter
with its Pareto front."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from safediff.storage import png_bytes

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148))  # tab10 + tab20's light tones


def bar_chart(title: str, groups: list[str], series: dict[str, list[tuple[float | None, list | None]]],
              y_label: str = "", y_max: float | None = None) -> bytes:
    """Grouped bars: ``series[name][g] = (value, [lo, hi] | None)`` for group g. Returns PNG bytes."""
    font = ImageFont.load_default()
    names = list(series)
    bar_w, left, top, bottom, legend_h = 14, 60, 44, 40, 16 * len(names) + 8
    slot = max(len(names) * bar_w + 18, max(font.getlength(g) for g in groups) + 12 if groups else 0)
    width = int(max(360, left + 20 + len(groups) * slot))
    height = 260 + legend_h
    plot_h = height - top - bottom - legend_h
    values = [v for s in series.values() for v, ci in s if v is not None]
    highs = [ci[1] for s in series.values() for v, ci in s if ci]
    top_value = y_max if y_max is not None else max(values + highs + [1e-9]) * 1.1
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black", font=font)

    def y(v: float) -> float:
        return top + plot_h * (1 - min(max(v, 0.0), top_value) / top_value)

    for k in range(5):
        v = top_value * k / 4
        d.line([(left, y(v)), (width - 10, y(v))], fill=(225, 225, 225))
        d.text((5, y(v) - 6), f"{v:.3g}", fill="black", font=font)
    d.line([(left, top), (left, top + plot_h)], fill="black")
    d.text((5, top - 20), y_label, fill="black", font=font)
    for g, group in enumerate(groups):
        x0 = int(left + 10 + g * slot)
        for s, name in enumerate(names):
            value, ci = series[name][g]
            if value is None:
                continue
            x = x0 + s * bar_w
            d.rectangle([x, y(value), x + bar_w - 2, top + plot_h], fill=PALETTE[s % len(PALETTE)])
            if ci:
                cx = x + bar_w // 2 - 1
                d.line([(cx, y(ci[0])), (cx, y(ci[1]))], fill="black", width=1)
                d.line([(cx - 3, y(ci[0])), (cx + 3, y(ci[0]))], fill="black")
                d.line([(cx - 3, y(ci[1])), (cx + 3, y(ci[1]))], fill="black")
        d.text((x0, top + plot_h + 6), group, fill="black", font=font)
    ly = height - legend_h
    for s, name in enumerate(names):
        d.rectangle([left, ly + 16 * s, left + 10, ly + 16 * s + 10], fill=PALETTE[s % len(PALETTE)])
        d.text((left + 16, ly + 16 * s - 1), name, fill="black", font=font)
    return png_bytes(img)


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the points no other point beats on both axes, x lower-is-better and y higher-is-better (ties on
    both axes keep every tied point), ordered by x."""
    front = [(label, x, y) for label, x, y in points
             if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for _, x2, y2 in points)]
    return [label for label, _, _ in sorted(front, key=lambda p: (p[1], -p[2]))]


def pareto_chart(title: str, points: list[tuple[str, float, float]], x_label: str, y_label: str,
                 goal: tuple[float, float] | None = None, marks: list[int] | None = None) -> bytes:
    """Scatter of labelled points in [0, 1]², x lower-is-better and y higher-is-better, the Pareto front joined by
    a line and, with ``goal`` = (x_max, y_min), the goal's corner shaded. ``marks``: a number per point, written
    beside it and before its legend entry, that also picks its colour: the same item keeps its number and colour
    across charts, and can be found among many whose colours repeat. Returns PNG bytes."""
    if marks is not None and len(marks) != len(points):
        raise ValueError(f"pareto_chart: {len(marks)} marks for {len(points)} points")
    font = ImageFont.load_default()
    left, top, size, legend_w = 60, 40, 420, 260
    width, height = left + size + 30 + legend_w, max(top + size + 50, top + 14 * len(points) + 10)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 10), title, fill="black", font=font)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + size * min(max(x, 0.0), 1.0), top + size * (1 - min(max(y, 0.0), 1.0))

    if goal is not None:
        d.rectangle([xy(0.0, 1.0), xy(*goal)], fill=(225, 245, 225))
    for k in range(6):
        v = k / 5
        d.line([xy(v, 0.0), xy(v, 1.0)], fill=(230, 230, 230))
        d.line([xy(0.0, v), xy(1.0, v)], fill=(230, 230, 230))
        d.text((xy(v, 0.0)[0] - 8, top + size + 6), f"{v:.1f}", fill="black", font=font)
        d.text((left - 28, xy(0.0, v)[1] - 6), f"{v:.1f}", fill="black", font=font)
    d.rectangle([xy(0.0, 1.0), xy(1.0, 0.0)], outline="black")
    d.text((left + size // 2 - 60, top + size + 24), x_label, fill="black", font=font)
    d.text((5, top - 20), y_label, fill="black", font=font)
    front = pareto_front(points)
    by_label = {label: (x, y) for label, x, y in points}
    if len(front) > 1:
        d.line([xy(*by_label[label]) for label in front], fill=(214, 39, 40), width=2)
    for k, (label, x, y) in enumerate(points):
        cx, cy = xy(x, y)
        colour = PALETTE[(k if marks is None else marks[k]) % len(PALETTE)]
        d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour, outline="black" if label in front else colour)
        mark = "" if marks is None else f"{marks[k]} "
        d.text((cx + 6, cy - 6), mark, fill=colour, font=font)
        ly = top + 14 * k
        d.ellipse([left + size + 30, ly + 2, left + size + 38, ly + 10], fill=colour)
        d.text((left + size + 44, ly), mark + ("* " if label in front else "") + label, fill="black", font=font)
    return png_bytes(img)
