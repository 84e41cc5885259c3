"""Figures drawn with Pillow only (no matplotlib dependency): curves, bar charts, confusion matrices,
grids.

line_plot, bar_chart and confusion_png write a PNG through model.io.save_png, so a figure is replaced
atomically; image_grid returns the PIL image for its caller to save (as a contact sheet or a
validation grid, through save_png too).
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from model.io import save_png

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size=13):
    return ImageFont.load_default(size=size)


def _nice(v):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_plot(path, series, title="", xlabel="step", ylabel="", size=(720, 440), logy=False, ylim=None):
    """series: {name: (xs, ys)}. Draws axes with min/max ticks and a legend; writes PNG to path.
    ylim (lo, hi): a fixed y range (e.g. (0, 1) for an accuracy) instead of the data's."""
    width, height = size
    left, right, top, bottom = 70, 20, 36, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    pts = {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in series.items() if len(x)}
    draw.text((width // 2, 8), title, fill="black", font=_font(15), anchor="ma")
    if pts:
        xs = np.concatenate([x for x, _ in pts.values()])
        ys = np.concatenate([y for _, y in pts.values()])
        ok = np.isfinite(ys) & ((ys > 0) if logy else True)
        tf = (lambda v: np.log10(np.maximum(v, 1e-30))) if logy else (lambda v: v)
        x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-9)
        y0, y1 = (tf(ys[ok]).min(), tf(ys[ok]).max()) if ok.any() else (0.0, 1.0)
        if ylim:
            y0, y1 = (tf(np.float64(v)) for v in ylim)
        y1 = max(y1, y0 + 1e-9)
        px = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)
        py = lambda v: height - bottom - (tf(v) - y0) / (y1 - y0) * (height - top - bottom)
        for i, (name, (x, y)) in enumerate(pts.items()):
            keep = np.isfinite(y) & ((y > 0) if logy else True)
            line = [(float(px(a)), float(py(b))) for a, b in zip(x[keep], y[keep])]
            color = COLORS[i % len(COLORS)]
            if len(line) > 1:
                draw.line(line, fill=color, width=2)
            elif line:
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=color)
            legend_y = top + 8 + 16 * i
            draw.line([(width - right - 150, legend_y), (width - right - 130, legend_y)], fill=color, width=3)
            draw.text((width - right - 125, top + 1 + 16 * i), name, fill="black", font=font)
        lab = (lambda v: _nice(10 ** v)) if logy else _nice
        draw.text((left - 4, top), lab(y1), fill="black", font=font, anchor="ra")
        draw.text((left - 4, height - bottom), lab(y0), fill="black", font=font, anchor="rd")
        draw.text((left, height - bottom + 4), _nice(x0), fill="black", font=font)
        draw.text((width - right, height - bottom + 4), _nice(x1), fill="black", font=font, anchor="ra")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(((left + width - right) // 2, height - 18), xlabel, fill="black", font=font, anchor="ma")
    draw.text((6, top - 18), ylabel, fill="black", font=font)
    save_png(path, img)


def bar_chart(path, panels, series, title="", panel_size=(170, 300)):
    """Grouped bars: one panel per quantity (panels: {name: [value or None per series]}), each with
    its own scale from 0, one bar per series in its colour, the value above it ("n/a" for None)."""
    font, pw, ph = _font(12), *panel_size
    top, bottom, pad = 40 + 16 * len(series), 40, 14
    img = Image.new("RGB", (max(pw * len(panels), 320), top + ph + bottom), "white")
    draw = ImageDraw.Draw(img)
    draw.text((img.width // 2, 8), title, fill="black", font=_font(15), anchor="ma")
    for i, name in enumerate(series):
        y = 32 + 16 * i
        draw.rectangle([10, y, 24, y + 10], fill=COLORS[i % len(COLORS)])
        draw.text((30, y - 2), name, fill="black", font=font)
    bar_w = (pw - 2 * pad) / max(1, len(series))
    base = top + ph
    for p, (name, values) in enumerate(panels.items()):
        x0 = p * pw + pad
        known = [v for v in values if v is not None and math.isfinite(v)]
        high = max([abs(v) for v in known] + [0.0]) or 1.0
        for i, v in enumerate(values):
            left, right = x0 + i * bar_w + 2, x0 + (i + 1) * bar_w - 2
            if v is None or not math.isfinite(v):
                draw.text(((left + right) / 2, base - 4), "n/a", fill="gray", font=font, anchor="md")
                continue
            height = max(0.0, v) / high * (ph - 24)  # headroom for the value's label
            draw.rectangle([left, base - height, right, base], fill=COLORS[i % len(COLORS)])
            draw.text(((left + right) / 2, base - height - 3), _nice(v), fill="black", font=font, anchor="md")
        draw.line([(x0, base), (x0 + pw - 2 * pad, base)], fill="black")
        draw.text((x0 + (pw - 2 * pad) / 2, base + 8), name, fill="black", font=font, anchor="ma")
    save_png(path, img)


def confusion_png(path, matrix, class_names, title="confusion matrix (rows: true, columns: predicted)"):
    """Counts in the cells, shaded by the row-normalised value; class names on both axes."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    font = _font(12)
    cell = 44
    label_w = max(int(font.getlength(c)) for c in class_names) + 12
    width, height = label_w + n * cell + 20, 40 + label_w + n * cell + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((width // 2, 8), title, fill="black", font=_font(13), anchor="ma")
    ox, oy = label_w, 40 + label_w  # top-left corner of the grid
    rows = counts.sum(1, keepdims=True).clip(min=1)
    for i in range(n):
        draw.text((ox - 6, oy + i * cell + cell // 2), class_names[i], fill="black", font=font, anchor="rm")
        # Column labels are drawn on a strip rotated by 90 degrees, so long names fit.
        strip = Image.new("RGB", (label_w, cell), "white")
        ImageDraw.Draw(strip).text((4, cell // 2), class_names[i], fill="black", font=font, anchor="lm")
        img.paste(strip.rotate(90, expand=True), (ox + i * cell, 40))
        for j in range(n):
            share = counts[i, j] / rows[i, 0]
            shade = (int(255 - 200 * share), int(255 - 120 * share), 255)
            x, y = ox + j * cell, oy + i * cell
            draw.rectangle([x, y, x + cell, y + cell], fill=shade, outline=(200, 200, 200))
            draw.text((x + cell // 2, y + cell // 2), str(counts[i, j]), font=font, anchor="mm",
                      fill="white" if share > 0.6 else "black")
    draw.text((ox + n * cell // 2, oy + n * cell + 8), "predicted", fill="black", font=font, anchor="ma")
    save_png(path, img)


def image_grid(images, ncols, row_labels=None, cell=128):
    """Tile PIL images into a grid (row-major); optional label on the left of each row."""
    nrows = max(1, math.ceil(len(images) / ncols))
    font = _font(12)
    label_w = (max(int(font.getlength(label)) for label in row_labels) + 10) if row_labels else 0
    grid = Image.new("RGB", (label_w + ncols * cell, nrows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for index, im in enumerate(images):
        row, col = divmod(index, ncols)
        if im is not None:
            grid.paste(im.convert("RGB").resize((cell, cell), Image.BICUBIC), (label_w + col * cell, row * cell))
    for row, label in enumerate(row_labels or []):
        draw.text((4, row * cell + cell // 2), label, fill="black", font=font, anchor="lm")
    return grid
