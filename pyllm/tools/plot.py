"""Line plots for the tools (the training demo's loss curves), drawn with matplotlib's Agg backend.

The figure is rendered off-screen by its own Agg canvas (no pyplot, so the caller's matplotlib
backend and global state are left alone) and written as an 8-bit RGB PNG (a plot is opaque; no
alpha channel).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence


def save_line_plot(path: str, ys: Sequence[float], xs: Optional[Sequence[float]] = None, title: str = "",
                   xlabel: str = "step", ylabel: str = "loss", width: int = 640, height: int = 400) -> str:
    """Plots ``ys`` against ``xs`` (default 0..n-1) into the PNG file ``path``
    (``width`` x ``height`` pixels). Returns ``path``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image  # Pillow: a dependency of matplotlib

    ys = [float(y) for y in ys]
    xs = list(range(len(ys))) if xs is None else [float(x) for x in xs]
    if not ys or len(xs) != len(ys):
        raise ValueError("pyllm: save_line_plot needs as many xs as ys (at least one point)")

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, linewidth=1.5)
    if title:
        ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, format="PNG")
    return path
