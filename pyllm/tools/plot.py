"""Plots for the tools (the training demo's loss curves, the benchmark's speedup and roofline
plots), drawn with matplotlib's Agg backend.

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


# --------------------------------------------------------------------------- benchmark plots
def _new_figure(width: int, height: int, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, canvas, axes


def _save_rgb(fig, canvas, path: str) -> str:
    import numpy as np
    from PIL import Image

    fig.tight_layout()
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, format="PNG")
    return path


def save_speedup_plot(path: str, title: str, panels: dict, width: int = 1100, height: int = 420) -> str:
    """Speedup vs problem size, one panel per key of ``panels`` (e.g. a dtype).

    ``panels``: ``{panel title: {series label: [(bytes moved, speedup, size label), ...]}}``. The x axis
    is the ideal bytes moved per call (log scale, MiB); a dashed line marks parity (1x)."""
    panels = {k: v for k, v in panels.items() if any(v.values())}
    if not panels:
        raise ValueError("pyllm: save_speedup_plot needs at least one point")
    fig, canvas, axes = _new_figure(width, height, len(panels))
    markers = "osD^vP*X"
    for ax, (ptitle, series) in zip(axes, panels.items()):
        for i, (label, pts) in enumerate(sorted(series.items())):
            if not pts:
                continue
            pts = sorted(pts)
            xs = [p[0] / 2**20 for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, marker=markers[i % len(markers)], linewidth=1.5, label=label)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(f"{title} {ptitle}")
        ax.set_xlabel("problem size: ideal bytes moved per call (MiB, log)")
        ax.set_ylabel("speedup vs baseline (> 1: pyllm faster)")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="best")
    return _save_rgb(fig, canvas, path)


def save_roofline_plot(path: str, copy_gbps: float, matmul_gflops: dict, points: list,
                       width: int = 1200, height: int = 480) -> str:
    """Achieved rates against the machine's measured limits, roofline style.

    Left: achieved GB/s of every case (``points``: dicts with label, dtype, gbps, and optionally
    gflops and intensity = FLOP/byte) against the measured copy bandwidth. Right: the cases with a
    FLOP count at their arithmetic intensity, under the roofline min(copy BW x intensity, matmul
    rate) of each dtype's measured matmul rate."""
    import numpy as np

    if not points:
        raise ValueError("pyllm: save_roofline_plot needs at least one point")
    fig, canvas, (ax1, ax2) = _new_figure(width, height, 2)
    labels = [p["label"] for p in points]
    ys = np.arange(len(points))
    colors = ["tab:blue" if p["dtype"] == "float32" else "tab:orange" for p in points]
    ax1.barh(ys, [p["gbps"] for p in points], color=colors)
    ax1.axvline(copy_gbps, color="red", linestyle="--", linewidth=1.5, label=f"measured copy BW {copy_gbps:.1f} GB/s")
    ax1.set_yticks(ys, labels, fontsize=6)
    ax1.invert_yaxis()
    ax1.set_xlabel("achieved GB/s (ideal bytes / pyllm time); blue fp32, orange bf16")
    ax1.set_title("bandwidth vs measured copy bandwidth")
    ax1.legend(fontsize=7, loc="lower right")
    ax1.grid(True, axis="x", alpha=0.3)

    flop_pts = [p for p in points if p.get("gflops") and p.get("intensity")]
    lo = min([p["intensity"] for p in flop_pts] + [0.1]) / 2
    hi = max([p["intensity"] for p in flop_pts] + [100.0]) * 2
    xs = np.logspace(np.log10(lo), np.log10(hi), 200)
    for dt, rate in matmul_gflops.items():
        color = "tab:blue" if dt == "float32" else "tab:orange"
        ax2.plot(xs, np.minimum(copy_gbps * xs, rate), color=color, linestyle="--", linewidth=1.2,
                 label=f"roof {dt}: min({copy_gbps:.0f} GB/s x I, {rate:.1f} GFLOP/s matmul)")
    for p in flop_pts:
        color = "tab:blue" if p["dtype"] == "float32" else "tab:orange"
        ax2.scatter([p["intensity"]], [p["gflops"]], color=color, s=25, zorder=3)
        ax2.annotate(p["label"], (p["intensity"], p["gflops"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if not flop_pts:
        ax2.text(0.5, 0.5, "no case with a FLOP count in this run", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("arithmetic intensity I (FLOP / ideal byte)")
    ax2.set_ylabel("achieved GFLOP/s")
    ax2.set_title("roofline: attention cases")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.grid(True, alpha=0.3, which="both")
    return _save_rgb(fig, canvas, path)
