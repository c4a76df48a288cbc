"""Small PNG charts drawn with Pillow (no plotting dependency): grouped bars with confidence intervals."""

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
