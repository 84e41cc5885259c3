"""PNG figures drawn with Pillow only (no matplotlib dependency): curves, confusion matrices, grids.

Every function writes through model.io.save_png, so figures are replaced atomically.
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


def line_plot(path, series, title="", xlabel="step", ylabel="", size=(720, 440), logy=False):
    """series: {name: (xs, ys)}. Draws axes with min/max ticks and a legend; writes PNG to path."""
    w, h = size
    left, right, top, bottom = 70, 20, 36, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font()
    pts = {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in series.items() if len(x)}
    d.text((w // 2, 8), title, fill="black", font=_font(15), anchor="ma")
    if pts:
        xs = np.concatenate([x for x, _ in pts.values()])
        ys = np.concatenate([y for _, y in pts.values()])
        ok = np.isfinite(ys) & ((ys > 0) if logy else True)
        tf = (lambda v: np.log10(np.maximum(v, 1e-30))) if logy else (lambda v: v)
        x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-9)
        y0, y1 = (tf(ys[ok]).min(), tf(ys[ok]).max()) if ok.any() else (0.0, 1.0)
        y1 = max(y1, y0 + 1e-9)
        px = lambda v: left + (v - x0) / (x1 - x0) * (w - left - right)
        py = lambda v: h - bottom - (tf(v) - y0) / (y1 - y0) * (h - top - bottom)
        for i, (name, (x, y)) in enumerate(pts.items()):
            keep = np.isfinite(y) & ((y > 0) if logy else True)
            line = [(float(px(a)), float(py(b))) for a, b in zip(x[keep], y[keep])]
            color = COLORS[i % len(COLORS)]
            if len(line) > 1:
                d.line(line, fill=color, width=2)
            elif line:
                d.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=color)
            d.line([(w - right - 150, top + 8 + 16 * i), (w - right - 130, top + 8 + 16 * i)], fill=color, width=3)
            d.text((w - right - 125, top + 1 + 16 * i), name, fill="black", font=font)
        lab = (lambda v: _nice(10 ** v)) if logy else _nice
        d.text((left - 4, top), lab(y1), fill="black", font=font, anchor="ra")
        d.text((left - 4, h - bottom), lab(y0), fill="black", font=font, anchor="rd")
        d.text((left, h - bottom + 4), _nice(x0), fill="black", font=font)
        d.text((w - right, h - bottom + 4), _nice(x1), fill="black", font=font, anchor="ra")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text(((left + w - right) // 2, h - 18), xlabel, fill="black", font=font, anchor="ma")
    d.text((6, top - 18), ylabel, fill="black", font=font)
    save_png(path, img)


def confusion_png(path, matrix, class_names, title="confusion matrix (rows: true, columns: predicted)"):
    """Counts in the cells, shaded by the row-normalised value; class names on both axes."""
    m = np.asarray(matrix, dtype=np.int64)
    n = len(class_names)
    font = _font(12)
    cell = 44
    label_w = max(int(font.getlength(c)) for c in class_names) + 12
    w, h = label_w + n * cell + 20, 40 + label_w + n * cell + 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((w // 2, 8), title, fill="black", font=_font(13), anchor="ma")
    ox, oy = label_w, 40 + label_w  # top-left corner of the grid
    rows = m.sum(1, keepdims=True).clip(min=1)
    for i in range(n):
        d.text((ox - 6, oy + i * cell + cell // 2), class_names[i], fill="black", font=font, anchor="rm")
        # Column labels are drawn on a strip rotated by 90 degrees, so long names fit.
        strip = Image.new("RGB", (label_w, cell), "white")
        ImageDraw.Draw(strip).text((4, cell // 2), class_names[i], fill="black", font=font, anchor="lm")
        img.paste(strip.rotate(90, expand=True), (ox + i * cell, 40))
        for j in range(n):
            v = m[i, j] / rows[i, 0]
            shade = (int(255 - 200 * v), int(255 - 120 * v), 255)
            x, y = ox + j * cell, oy + i * cell
            d.rectangle([x, y, x + cell, y + cell], fill=shade, outline=(200, 200, 200))
            d.text((x + cell // 2, y + cell // 2), str(m[i, j]), font=font, anchor="mm",
                   fill="white" if v > 0.6 else "black")
    d.text((ox + n * cell // 2, oy + n * cell + 8), "predicted", fill="black", font=font, anchor="ma")
    save_png(path, img)


def image_grid(images, ncols, row_labels=None, cell=128):
    """Tile PIL images into a grid (row-major); optional label on the left of each row."""
    nrows = max(1, math.ceil(len(images) / ncols))
    font = _font(12)
    label_w = (max(int(font.getlength(t)) for t in row_labels) + 10) if row_labels else 0
    grid = Image.new("RGB", (label_w + ncols * cell, nrows * cell), "white")
    d = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        r, c = divmod(k, ncols)
        if im is not None:
            grid.paste(im.convert("RGB").resize((cell, cell), Image.BICUBIC), (label_w + c * cell, r * cell))
    for r, t in enumerate(row_labels or []):
        d.text((4, r * cell + cell // 2), t, fill="black", font=font, anchor="lm")
    return grid
