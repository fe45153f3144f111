"""``python -m pyllm bench``: pyllm's ops vs the strongest PyTorch baselines.

Method (the same on CPU and CUDA):

* First the machine's limits are measured: copy bandwidth (a large ``Tensor.copy_``,
  best of N) and the matmul rate (``torch.mm``, best of N, fp32 and bf16). Every op row
  is then reported as a fraction of those limits, so a number means something on any
  machine.
* For each op, the pyllm call and its baselines are timed in the SAME run: repetitions
  are interleaved (candidate, baseline, baseline2, candidate, ... with the order rotated
  each repetition), each after a warm-up, and the speedup is the median of the paired
  per-repetition ratios; times are medians too. Noise from other processes therefore
  hits both sides alike.
* CPU: ``torch.set_num_threads(os.cpu_count())``, wall clock (``time.perf_counter``),
  several calls per sample when one call is short. CUDA: CUDA events, and a 256 MiB
  buffer is written before each sample so that inputs do not sit in L2.
* GB/s counts the bytes an ideal single pass reads and writes (inputs once, outputs
  once); GFLOP/s for attention uses 4*B*H*Lq*Lk*D (halved for causal).
* Each candidate's output is compared with the first baseline's as a sanity check
  (a benchmark of a wrong result is worthless); a mismatch is flagged in the table.
* The cases are the op registry's: each op's slice (``pyllm/ops/<op>.py``) gives its
  ``bench_cases`` (shapes, baselines, ideal bytes and FLOPs, speed targets), in fp32 and bf16.
  The path column is the backend decision of the case's warm-up call
  (``pyllm.backends.last_decision``); a row whose call ran the PyTorch reference says so in
  its note.

* Size sweep (for the plots): a few more sizes of the main ops (layer_norm, rms_norm, bias_gelu,
  masked_softmax, causal attention) against their first baseline, with fewer repetitions; in a
  full run the registry's quick-size cases too. These points are plotted and written to
  ``--json``; they are not rows of the table.

Outputs: the table on stdout, ``--output`` (default docs/benchmarks.md; ``--quick``
never overwrites that default, pass an explicit path), rows appended to
benchmarks/results.csv (full runs only), ``--csv PATH`` (this run's table rows, one per
measurement, the file rewritten), ``--json PATH`` (machine, limits, table rows and sweep
points) and PNG plots (``--plots DIR``; default for a full run: ``img/`` next to
``--output``, where the markdown embeds them): speedup vs problem size per op and dtype, and
achieved GB/s and GFLOP/s against the measured limits (roofline style). A progress bar with
an ETA goes to stderr when it is a terminal (``--no-progress`` turns it off).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import pyllm
import pyllm.backends
import pyllm.ops
from pyllm.ops import BenchCase
from pyllm.tools.timing import Clock, interleaved, paired_speedup

DTYPES = (torch.float32, torch.bfloat16)
ALIASES = {"attention": "scaled_dot_product_attention"}  # other names --ops accepts
DEFAULT_OUTPUT = os.path.join("docs", "benchmarks.md")
DEFAULT_CSV = os.path.join("benchmarks", "results.csv")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CSV_FIELDS = [
    "date", "machine", "device", "cores", "threads", "torch", "pyllm", "commit", "quick",
    "op", "case", "shape", "dtype", "path", "pyllm_us", "baseline", "baseline_us", "speedup",
    "gbps", "pct_copy_bw", "gflops", "pct_matmul", "target", "met", "note",
]


# --------------------------------------------------------------------------- data
@dataclass
class MachineLimits:
    copy_gbps: float
    copy_mib: int
    matmul_gflops: dict  # dtype name -> GFLOP/s
    matmul_n: dict  # dtype name -> matrix size used


@dataclass
class Row:
    op: str
    case: str
    shape: str
    dtype: str
    path: str
    pyllm_us: Optional[float] = None
    baseline: str = ""
    baseline_us: Optional[float] = None
    speedup: Optional[float] = None
    gbps: Optional[float] = None
    pct_copy_bw: Optional[float] = None
    gflops: Optional[float] = None
    pct_matmul: Optional[float] = None
    target: Optional[float] = None
    note: str = ""
    bytes: Optional[int] = None  # ideal bytes moved per call (the x axis of the speedup plots)
    flops: Optional[float] = None

    @property
    def met(self) -> Optional[bool]:
        if self.target is None or self.speedup is None:
            return None
        return self.speedup >= self.target


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- machine limits
def measure_limits(device: torch.device, quick: bool) -> MachineLimits:
    clock = Clock(device, quick)
    reps = 3 if quick else 10
    mib = 8 if quick else 256
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    clock.sync()
    best = min(clock.sample(lambda: dst.copy_(src)) for _ in range(reps))
    copy_gbps = 2 * n * 4 / best / 1e9
    del src, dst

    mm_n = 256 if quick else (4096 if device.type == "cuda" else 2048)
    rates, sizes = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        # Probe at 256 first: on CPUs without a fast bf16 GEMM in torch (measured 1.3 GFLOP/s on an
        # AMD EPYC with AVX512-BF16, torch 2.14) a 2048^3 bf16 product takes minutes.
        n = 256 if quick else mm_n
        a = torch.randn(256, 256, device=device).to(dtype)
        clock.sync()
        probe = clock.sample(lambda: torch.mm(a, a))
        if probe > 0.005:
            n = 256
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.mm(a, b)
        clock.sync()
        t = min(clock.sample(lambda: torch.mm(a, b, out=out)) for _ in range(reps))
        rates[_dname(dtype)] = 2 * n**3 / t / 1e9
        sizes[_dname(dtype)] = n
    return MachineLimits(copy_gbps, mib, rates, sizes)


# --------------------------------------------------------------------------- running
def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def resolve_ops(names) -> tuple:
    """(specs to run, unknown names) for ``--ops`` (None: every registered op). Spec names, plus
    the aliases of :data:`ALIASES`; registry order, each op once."""
    specs = pyllm.ops.specs()
    if names is None:
        return specs, []
    known = {s.name for s in specs}
    wanted = [ALIASES.get(n, n) for n in names]
    unknown = [n for n, w in zip(names, wanted) if w not in known]
    return [s for s in specs if s.name in wanted], unknown


def _path_and_note(spec_name: str, before) -> tuple:
    """(path column, note) from the backend decision the warm-up call recorded."""
    d = pyllm.backends.last_decision(spec_name)
    if d is None or d is before:
        return "unknown", f"no backend decision recorded for {spec_name}"
    if d.uses_kernel:
        return d.path, ""
    reason = d.reason
    for prefix in ("reference (PyTorch) because ", "reference because "):
        if reason.startswith(prefix):
            reason = reason[len(prefix):]
    return d.path, f"reference ({reason})"


def run_case(case: BenchCase, spec_name: str, clock: Clock, limits: MachineLimits, reps: int,
             budget_s: float) -> list:
    """Times one case (candidate and baselines interleaved); one row per baseline."""
    before = pyllm.backends.last_decision(spec_name)
    out_c = case.candidate()  # the warm-up call: its backend decision is the path column
    path, path_note = _path_and_note(spec_name, before)
    base_name = next(iter(case.baselines))
    out_b = case.baselines[base_name]()
    note = ""
    a, bb = _first(out_c).float(), _first(out_b).float()
    finite = torch.isfinite(bb)
    err = (a - bb)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, bb[finite].abs().max().item() if finite.any() else 1.0)
    if a.shape != bb.shape or not math.isfinite(err) or err > case.tol * scale:
        note = f"MISMATCH vs {base_name}: max abs diff {err:.3g}"
    note = "; ".join(n for n in (path_note, note) if n)
    del out_c, out_b, a, bb

    fns = {"pyllm": case.candidate, **case.baselines}
    times = interleaved(clock, fns, reps, budget_s)
    t_c = statistics.median(times["pyllm"])
    gbps = case.bytes / t_c / 1e9
    rows = []
    for name in case.baselines:
        r = Row(case.op, case.case, case.shape, _dname(case.dtype), path,
                pyllm_us=t_c * 1e6, baseline=name, baseline_us=statistics.median(times[name]) * 1e6,
                speedup=paired_speedup(times["pyllm"], times[name]),
                gbps=gbps, pct_copy_bw=100 * gbps / limits.copy_gbps,
                target=case.targets.get(name), note=note, bytes=int(case.bytes), flops=case.flops)
        if case.flops:
            r.gflops = case.flops / t_c / 1e9
            rate = limits.matmul_gflops.get(_dname(case.dtype))
            if rate:
                r.pct_matmul = 100 * r.gflops / rate
        rows.append(r)
    return rows


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rows: list, markdown: bool) -> str:
    head = ["op", "case", "shape", "dtype", "path", "pyllm us", "baseline", "baseline us", "speedup",
            "GB/s", "% copy BW", "GFLOP/s", "% matmul", "target", "met", "note"]
    body = []
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "NO")
        body.append([r.op, r.case, r.shape, r.dtype, r.path, _fmt(r.pyllm_us, ".1f"), r.baseline,
                     _fmt(r.baseline_us, ".1f"), "" if r.speedup is None else f"{r.speedup:.2f}x",
                     _fmt(r.gbps, ".1f"), _fmt(r.pct_copy_bw, ".0f"), _fmt(r.gflops, ".1f"),
                     _fmt(r.pct_matmul, ".0f"), "" if r.target is None else f">= {r.target}x", met, r.note])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    keep = [i for i in range(len(head)) if head[i] not in ("shape",)]
    cols = [[head[i]] + [row[i] for row in body] for i in keep]
    widths = [max(len(c) for c in col) for col in cols]
    out = []
    for j in range(len(body) + 1):
        out.append("  ".join(cols[i][j].ljust(widths[i]) for i in range(len(cols))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# --------------------------------------------------------------------------- machine / output
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_l3() -> str:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "l3": _cache_l3(),
        "torch": torch.__version__,
        "pyllm": pyllm.__version__,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "device": str(device),
    }
    bi = pyllm.build_info()
    info["native"] = (f"loaded (kernels: {', '.join(bi.get('kernels', []))}; built with CUDA: "
                      f"{bi.get('with_cuda')})" if bi["native_loaded"] else f"NOT loaded ({bi['native_error']})")
    try:
        info["load"] = "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        info["load"] = "unknown"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs)"
        info["cuda"] = torch.version.cuda
    info["machine"] = info.get("gpu", info["cpu"])
    return info


def write_markdown(path: str, info: dict, limits: MachineLimits, rows: list, quick: bool, notes: list,
                   models_text: Optional[str], plots: Optional[list] = None) -> None:
    lines = ["# pyllm benchmarks", "",
             f"Generated by `python -m pyllm bench{' --device ' + info['device'] if info['device'] != 'cpu' else ''}"
             f"{' --quick' if quick else ''}` on {info['date']}. Rerun it to refresh this page; every run "
             "also appends its rows to `benchmarks/results.csv`.", ""]
    if quick:
        lines += ["**Quick mode: tiny shapes and few repetitions; these numbers mean nothing about speed.**", ""]
    lines += ["## Machine", "",
              f"- CPU: {info['cpu']} ({info['cores']} logical cores, {info['threads']} torch threads, "
              f"L3 {info['l3']})"]
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']}, CUDA {info['cuda']}")
    lines += [f"- torch {info['torch']}, python {info['python']}, pyllm {info['pyllm']} (commit {info['commit']})",
              f"- native extension: {info['native']}",
              f"- load average at start: {info['load']}", "",
              "## Measured limits", "",
              f"- copy bandwidth: **{limits.copy_gbps:.1f} GB/s** (`Tensor.copy_` of {limits.copy_mib} MiB fp32, "
              "bytes read + written, best of N)"]
    for dt, rate in limits.matmul_gflops.items():
        lines.append(f"- matmul: **{rate:.1f} GFLOP/s** {dt} (`torch.mm` {limits.matmul_n[dt]}x{limits.matmul_n[dt]}, best of N)")
    lines += ["", "## Results", "",
              "Times are medians of interleaved repetitions; speedup = baseline time / pyllm time "
              "(median of paired repetitions; > 1 means pyllm is faster). GB/s counts the bytes an ideal "
              "single pass reads and writes; % copy BW compares that with the measured copy bandwidth "
              "(it can exceed 100% on CPU when the working set fits in the L3 cache). Attention GFLOP/s "
              "uses 4*B*H*Lq*Lk*D (halved for causal).", "",
              table(rows, markdown=True), ""]
    if plots:
        base = os.path.dirname(os.path.abspath(path))
        lines += ["## Plots", "",
                  "Speedup vs problem size (x: the ideal bytes an op moves per call, log scale) for each op, "
                  "dtype and baseline: the table's cases plus the size sweep (see Method), which uses fewer "
                  "repetitions. Then every case's achieved GB/s against the measured copy bandwidth, and the "
                  "attention cases' GFLOP/s at their arithmetic intensity under the roofline drawn from the "
                  "measured copy bandwidth and matmul rate.", ""]
        for title, png in plots:
            rel = os.path.relpath(os.path.abspath(png), base).replace(os.sep, "/")
            lines += [f"![{title}]({rel})", ""]
    targeted = [r for r in rows if r.target is not None and r.speedup is not None]
    if targeted:
        lines += ["## Targets", ""]
        for r in targeted:
            lines.append(f"- {r.op} {r.dtype} vs {r.baseline}: target >= {r.target}x, measured "
                         f"{r.speedup:.3f}x: **{'met' if r.met else 'NOT met'}**")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if models_text:
        from pyllm.tools.hf_bench import DESCRIPTION

        lines += ["## Model-level benchmarks", "", DESCRIPTION, "", models_text, ""]
    lines += ["## Method", "", __doc__.split("Method (the same on CPU and CUDA):", 1)[1].split("Outputs:", 1)[0].strip(), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _csv_row(info: dict, r: Row, quick: bool) -> dict:
    return {
        "date": info["date"], "machine": info["machine"], "device": info["device"],
        "cores": info["cores"], "threads": info["threads"], "torch": info["torch"],
        "pyllm": info["pyllm"], "commit": info["commit"], "quick": int(quick),
        "op": r.op, "case": r.case, "shape": r.shape, "dtype": r.dtype, "path": r.path,
        "pyllm_us": _fmt(r.pyllm_us, ".2f"), "baseline": r.baseline,
        "baseline_us": _fmt(r.baseline_us, ".2f"), "speedup": _fmt(r.speedup, ".3f"),
        "gbps": _fmt(r.gbps, ".2f"), "pct_copy_bw": _fmt(r.pct_copy_bw, ".1f"),
        "gflops": _fmt(r.gflops, ".2f"), "pct_matmul": _fmt(r.pct_matmul, ".1f"),
        "target": "" if r.target is None else r.target,
        "met": "" if r.met is None else int(r.met),
        "note": r.note,
    }


def append_csv(path: str, info: dict, rows: list, quick: bool) -> None:
    """Appends to the history file ``path``; a file with an older header is rewritten with the
    current one first (columns it lacked left empty)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != CSV_FIELDS:
                old = list(reader)
                with open(path, "w", newline="") as g:
                    w = csv.DictWriter(g, fieldnames=CSV_FIELDS, extrasaction="ignore", restval="")
                    w.writeheader()
                    w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(_csv_row(info, r, quick))


def write_csv(path: str, info: dict, rows: list, quick: bool) -> None:
    """``--csv PATH``: this run's rows, one per measurement (the file is rewritten)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(_csv_row(info, r, quick))


def row_dict(r: Row) -> dict:
    d = dataclasses.asdict(r)
    d["met"] = r.met
    # strict JSON: a non-finite number (never expected) becomes null
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def write_json(path: str, info: dict, limits: MachineLimits, rows: list, sweep: list, quick: bool) -> None:
    """``--json PATH``: machine, measured limits, the table rows and the size-sweep points."""
    doc = {"machine": info, "quick": quick, "limits": dataclasses.asdict(limits),
           "fields": [f.name for f in dataclasses.fields(Row)] + ["met"],
           "rows": [row_dict(r) for r in rows], "sweep": [row_dict(r) for r in sweep]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=str)
        f.write("\n")


# --------------------------------------------------------------------------- size sweep and plots
SWEEP_OPS = ("layer_norm", "rms_norm", "bias_gelu", "masked_softmax", "scaled_dot_product_attention")


def sweep_sizes(op: str, quick: bool) -> list:
    """The sizes of the size sweep of ``op`` (none for ops without a sweep)."""
    if op in ("layer_norm", "rms_norm", "bias_gelu"):
        return [8, 32] if quick else [64, 512, 2048, 8192]  # rows
    if op == "masked_softmax":
        return [16, 48] if quick else [64, 128, 256, 512]  # sequence length
    if op == "scaled_dot_product_attention":
        return [16, 48] if quick else [128, 256, 512]  # causal sequence length
    return []


def sweep_case(op: str, size: int, dtype: torch.dtype, device: torch.device, quick: bool) -> BenchCase:
    """One point of the size sweep: the op at ``size`` against its first registry baseline."""
    import torch.nn.functional as TF

    from pyllm import functional as PF
    from pyllm.ops.masked_softmax import padding_keep

    g = torch.Generator().manual_seed(size)
    rnd = (lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype))  # noqa: E731
    es = torch.tensor([], dtype=dtype).element_size()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    n = size
    if op == "layer_norm":
        d = 96 if quick else 768
        x, w, b = rnd(n, d), rnd(d), rnd(d)
        return BenchCase(op, "ln", f"[{n}, {d}]", dtype, lambda: PF.layer_norm(x, (d,), w, b),
                         {"F.layer_norm": lambda: TF.layer_norm(x, (d,), w, b)}, bytes=(2 * n * d + 2 * d) * es, tol=tol)
    if op == "rms_norm":
        d = 128 if quick else 4096
        x, w = rnd(n, d), rnd(d)
        return BenchCase(op, "rms", f"[{n}, {d}]", dtype, lambda: PF.rms_norm(x, (d,), w, 1e-6),
                         {"F.rms_norm": lambda: TF.rms_norm(x, (d,), w, 1e-6)}, bytes=(2 * n * d + d) * es, tol=tol)
    if op == "bias_gelu":
        d = 96 if quick else 3072
        x, b = rnd(n, d), rnd(d)
        return BenchCase(op, "bias+gelu none", f"[{n}, {d}]", dtype, lambda: PF.bias_gelu(x, b, "none"),
                         {"F.gelu(x + b)": lambda: TF.gelu(x + b)}, bytes=2 * x.numel() * es + d * es,
                         tol=1e-5 if dtype == torch.float32 else 2e-2)
    if op == "masked_softmax":
        bsz, h = (2, 2) if quick else (8, 12)
        x = rnd(bsz, h, n, n)
        mask = padding_keep(bsz, n, device, g)
        eager = "eager scale+masked_fill+softmax"
        return BenchCase(op, "padding mask", f"[{bsz}, {h}, {n}, {n}]", dtype, lambda: PF.masked_softmax(x, mask, 0.125),
                         {eager: lambda: (x * 0.125).masked_fill(~mask, float("-inf")).softmax(-1)},
                         bytes=2 * x.numel() * es + mask.numel(), tol=1e-5 if dtype == torch.float32 else 1e-2)
    if op == "scaled_dot_product_attention":
        bsz, h, d = (1, 2, 16) if quick else (1, 12, 64)
        q, k, v = rnd(bsz, h, n, d), rnd(bsz, h, n, d), rnd(bsz, h, n, d)
        return BenchCase(op, "gpt causal", f"B{bsz} H{h} L{n} D{d}", dtype,
                         lambda: PF.scaled_dot_product_attention(q, k, v, is_causal=True),
                         {"F.scaled_dot_product_attention": lambda: TF.scaled_dot_product_attention(q, k, v, is_causal=True)},
                         bytes=4 * q.numel() * es, flops=4.0 * bsz * h * n * n * d / 2, tol=tol)
    raise KeyError(op)


def speedup_series(rows: list) -> dict:
    """``{op: {dtype: {"case vs baseline": [(bytes, speedup, shape), ...]}}}`` from measured rows."""
    out: dict = {}
    for r in rows:
        if r.speedup is None or not r.bytes:
            continue
        label = f"{r.case} vs {r.baseline}"
        out.setdefault(r.op, {}).setdefault(r.dtype, {}).setdefault(label, []).append((r.bytes, r.speedup, r.shape))
    return out


def draw_plots(plot_dir: str, limits: MachineLimits, rows: list, sweep: list) -> list:
    """Writes the PNG plots into ``plot_dir``; returns ``[(title, path), ...]``."""
    from pyllm.tools.plot import save_roofline_plot, save_speedup_plot

    written = []
    series = speedup_series(rows + sweep)
    for op, panels in series.items():
        path = os.path.join(plot_dir, f"speedup_{op}.png")
        save_speedup_plot(path, op, panels)
        written.append((f"{op}: speedup vs problem size", path))
    points = []
    seen = set()
    for r in rows:
        key = (r.op, r.case, r.dtype)
        if key in seen or r.gbps is None:
            continue
        seen.add(key)
        p = {"label": f"{r.op} {r.case} {'bf16' if r.dtype == 'bfloat16' else r.dtype}", "dtype": r.dtype,
             "gbps": r.gbps}
        if r.gflops and r.bytes:
            p.update(gflops=r.gflops, intensity=r.flops / r.bytes)
        points.append(p)
    if points:
        path = os.path.join(plot_dir, "roofline.png")
        save_roofline_plot(path, limits.copy_gbps, limits.matmul_gflops, points, height=max(480, 120 + 18 * len(points)))
        written.append(("achieved bandwidth and FLOP rate vs the measured limits", path))
    return written


class Progress:
    """A tqdm bar with an ETA on stderr (off when stderr is not a terminal or ``enabled`` is
    False); :meth:`write` prints a line above it (to stdout)."""

    def __init__(self, total: float, enabled: bool):
        self.bar = None
        if enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty():
            from tqdm import tqdm

            try:
                cols = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                cols = 0
            # a terminal that reports no size (0 x 0) would get an empty or hidden bar from tqdm
            width = {"dynamic_ncols": True} if cols else {"ncols": 100, "nrows": 24}
            self.bar = tqdm(total=total, file=sys.stderr, unit="step", **width,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def step(self, n: float = 1.0, desc: Optional[str] = None) -> None:
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description_str(desc, refresh=False)
            self.bar.update(n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_models(quick: bool) -> Optional[str]:
    from pyllm.tools import hf_bench

    print("model-level benchmarks (pyllm.tools.hf_bench.run):")
    try:
        result = hf_bench.run(quick)
    except Exception as e:  # keep the op results of this run; report the failure
        import traceback

        traceback.print_exc()
        return f"`pyllm.tools.hf_bench.run` FAILED: {type(e).__name__}: {e}"
    if isinstance(result, str):
        print(result)
        return result
    if isinstance(result, list) and result and isinstance(result[0], dict):
        keys = list(result[0])
        text = "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                         + ["| " + " | ".join(str(d.get(k, "")) for k in keys) + " |" for d in result])
        print(text)
        return text
    return None if result is None else f"```\n{result}\n```"


# --------------------------------------------------------------------------- entry point
def main(args) -> int:
    quick = bool(getattr(args, "quick", False))
    device = torch.device(getattr(args, "device", "cpu") or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"pyllm bench: unsupported device {device} (cpu or cuda)", file=sys.stderr)
        return 2
    specs, unknown = resolve_ops(getattr(args, "ops", None))
    if unknown:
        choices = [s.name for s in pyllm.ops.specs()] + list(ALIASES)
        print(f"pyllm bench: unknown op(s) {unknown}; choose from {choices}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        # All cores, unless PYLLM_BENCH_THREADS says otherwise (e.g. on a shared machine).
        torch.set_num_threads(int(os.environ.get("PYLLM_BENCH_THREADS", 0)) or os.cpu_count() or 1)
    torch.manual_seed(0)

    info = machine_info(device)
    print(f"pyllm bench on {info['machine']} ({info['cores']} cores, {info['threads']} threads), "
          f"torch {info['torch']}, native extension {info['native']}")
    notes = []
    if not pyllm.build_info()["native_loaded"]:
        notes.append("The native extension is NOT loaded: every pyllm row below runs the PyTorch reference.")
        print("WARNING: " + notes[-1])
    if os.cpu_count() and device.type == "cpu":
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * os.cpu_count()
        notes.append(f"Load average at start {info['load']} on {info['cores']} cores"
                     + (": **the machine was busy; these numbers are for development only, rerun on a quiet "
                        "machine before quoting them.**" if busy else
                        "; interleaving keeps the ratios fair if other processes share the CPU."))

    plot_dir = getattr(args, "plots", None)
    output = getattr(args, "output", DEFAULT_OUTPUT)
    if output and quick and os.path.normpath(output) == os.path.normpath(DEFAULT_OUTPUT):
        output = ""  # reported below
        skipped_default = True
    else:
        skipped_default = False
    if plot_dir is None:
        # full runs draw the plots next to the markdown page; quick runs only when asked
        plot_dir = os.path.join(os.path.dirname(output) or ".", "img") if output and not quick else ""
    want_sweep = bool(plot_dir or getattr(args, "json", None))
    sweep_plan = [(spec.name, dtype, size) for spec in specs for dtype in DTYPES
                  for size in sweep_sizes(spec.name, quick)] if want_sweep else []
    # full runs: the registry's quick-size cases are sweep points too (quick: they are the table's)
    extra_registry = [(spec, dtype) for spec in specs for dtype in DTYPES] if want_sweep and not quick else []
    bar = Progress(1 + len(specs) * len(DTYPES) + len(sweep_plan) + len(extra_registry),
                   enabled=not getattr(args, "no_progress", False))

    bar.step(0, "machine limits")
    limits = measure_limits(device, quick)
    bar.step(1)
    print(f"limits: copy {limits.copy_gbps:.1f} GB/s ({limits.copy_mib} MiB), matmul "
          + ", ".join(f"{v:.1f} GFLOP/s {k}" for k, v in limits.matmul_gflops.items())
          + " (" + ", ".join(f"{k} {v}^3" for k, v in limits.matmul_n.items()) + ")")

    clock = Clock(device, quick)
    reps = 5 if quick else 30
    budget = 0.5 if quick else 20.0
    rows, sweep = [], []

    def line(r: Row, prefix: str = "  ") -> str:
        return (f"{prefix}{r.op:15s} {r.case:15s} {r.dtype:9s} {r.path:13s} pyllm {r.pyllm_us:10.1f} us  "
                f"{r.baseline:34s} {r.baseline_us:10.1f} us  {r.speedup:5.2f}x  {r.gbps:7.1f} GB/s {r.note}")

    for spec in specs:
        for dtype in DTYPES:
            bar.step(0, f"{spec.name} {_dname(dtype)}")
            cases = spec.bench_cases(dtype, device, quick)
            for case in cases:
                new = run_case(case, spec.name, clock, limits, reps, budget)
                for r in new:
                    bar.write(line(r))
                rows += new
                bar.step(1 / len(cases))
            if not cases:
                bar.step(1)
            del cases
            case = None  # frees the last case's tensors

    # Size sweep (plots, --json): fewer repetitions, not in the table.
    sweep_reps, sweep_budget = (3, 0.2) if quick else (10, 2.0)
    for spec, dtype in extra_registry:
        bar.step(0, f"sweep {spec.name} {_dname(dtype)} (quick size)")
        cases = spec.bench_cases(dtype, device, True)
        for case in cases:
            new = run_case(case, spec.name, clock, limits, sweep_reps, sweep_budget)
            for r in new:
                bar.write(line(r, "  sweep "))
            sweep += new
            bar.step(1 / len(cases))
        if not cases:
            bar.step(1)
        del cases
        case = None
    for op, dtype, size in sweep_plan:
        bar.step(0, f"sweep {op} {_dname(dtype)} {size}")
        case = sweep_case(op, size, dtype, device, quick)
        new = run_case(case, op, clock, limits, sweep_reps, sweep_budget)
        for r in new:
            bar.write(line(r, "  sweep "))
        sweep += new
        bar.step(1)
        del case
    bar.close()

    models_text = run_models(quick) if getattr(args, "models", False) else None

    print()
    print(table(rows, markdown=False))
    for r in rows:
        if r.target is not None and r.speedup is not None:
            print(f"target {r.op} {r.dtype} vs {r.baseline}: >= {r.target}x -> {r.speedup:.3f}x "
                  f"{'met' if r.met else 'NOT met'}")

    if skipped_default:
        print(f"--quick: not overwriting {DEFAULT_OUTPUT} (pass --output FILE to write quick results)")
    plots = []
    if plot_dir and rows:
        plots = draw_plots(plot_dir, limits, rows, sweep)
        for _, png in plots:
            print(f"wrote {png}")
    if output:
        write_markdown(output, info, limits, rows, quick, notes, models_text, plots)
        print(f"wrote {output}")
    measured = [r for r in rows if r.pyllm_us is not None]
    csv_path = getattr(args, "csv", None)
    if csv_path:
        write_csv(csv_path, info, measured, quick)
        print(f"wrote {len(measured)} rows to {csv_path}")
    if not quick and measured:
        history = os.path.join(ROOT, DEFAULT_CSV) if os.path.isdir(os.path.join(ROOT, "benchmarks")) else DEFAULT_CSV
        append_csv(history, info, measured, quick)
        print(f"appended {len(measured)} rows to {history}")
    json_path = getattr(args, "json", None)
    if json_path:
        write_json(json_path, info, limits, measured, sweep, quick)
        print(f"wrote {json_path}")
    return 0
