"""A dependency-free line plot written as PNG (zlib + struct), for the training demo's loss curve.

Uses matplotlib when it is installed; otherwise rasterizes the curve itself: axes, ticks,
numeric labels (a built-in 3x5 pixel font) and the polyline.
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Sequence

# 3x5 pixel glyphs, rows top to bottom, 3 bits per row (4 = left pixel).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 2, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0),
}


def write_png(path: str, pixels: Sequence[bytearray], width: int, height: int) -> None:
    """Write 8-bit RGB rows (``bytearray`` of ``3 * width`` each) as a PNG file."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 per scanline

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


class _Canvas:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.rows = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def set(self, x, y, color):
        if 0 <= x < self.w and 0 <= y < self.h:
            self.rows[y][3 * x: 3 * x + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color, thick=1):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        r = thick // 2
        for i in range(n + 1):
            t = i / n
            x, y = round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t)
            for dx in range(-r, r + 1):
                for dy in range(-r, r + 1):
                    self.set(x + dx, y + dy, color)

    def text(self, x, y, s, color=(0, 0, 0), scale=2):
        for ch in s:
            glyph = _FONT.get(ch, _FONT[" "])
            for row, bits in enumerate(glyph):
                for col in range(3):
                    if bits & (4 >> col):
                        for sx in range(scale):
                            for sy in range(scale):
                                self.set(x + col * scale + sx, y + row * scale + sy, color)
            x += 4 * scale


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) < 10 else f"{v:.0f}"


def save_line_plot(path: str, ys: Sequence[float], xs: Sequence[float] | None = None,
                   width: int = 640, height: int = 400, title: str = "loss") -> str:
    """Plot ``ys`` against ``xs`` (default 0..n-1) into ``path`` (PNG). Returns the backend used."""
    ys = [float(y) for y in ys]
    xs = list(range(len(ys))) if xs is None else [float(x) for x in xs]
    if not ys or len(xs) != len(ys):
        raise ValueError("pyllm: save_line_plot needs as many xs as ys (at least one point)")
    try:
        import matplotlib  # noqa: F401
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
        ax.plot(xs, ys)
        ax.set_xlabel("step")
        ax.set_ylabel(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        pass
    c = _Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    ymin, ymax = min(ys), max(ys)
    if not (math.isfinite(ymin) and math.isfinite(ymax)):
        raise ValueError("pyllm: save_line_plot got non-finite values")
    if ymax - ymin < 1e-12:
        ymin, ymax = ymin - 1, ymax + 1
    xmin, xmax = min(xs), max(xs)
    if xmax == xmin:
        xmax = xmin + 1

    def px(x):
        return left + (x - xmin) / (xmax - xmin) * (right - left)

    def py(y):
        return bottom - (y - ymin) / (ymax - ymin) * (bottom - top)

    grey, black, blue = (200, 200, 200), (0, 0, 0), (31, 119, 180)
    for i in range(5):  # grid and tick labels
        yv = ymin + (ymax - ymin) * i / 4
        c.line(left, py(yv), right, py(yv), grey)
        c.text(5, int(py(yv)) - 5, _fmt(yv))
        xv = xmin + (xmax - xmin) * i / 4
        c.line(px(xv), bottom, px(xv), bottom + 5, black)
        label = _fmt(xv)
        c.text(int(px(xv)) - 4 * len(label), bottom + 10, label)
    c.line(left, top, left, bottom, black, 2)
    c.line(left, bottom, right, bottom, black, 2)
    for i in range(1, len(ys)):
        c.line(px(xs[i - 1]), py(ys[i - 1]), px(xs[i]), py(ys[i]), blue, 2)
    write_png(path, c.rows, width, height)
    return "built-in PNG writer"
