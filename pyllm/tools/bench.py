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

Outputs: the table on stdout, ``--output`` (default docs/benchmarks.md; ``--quick``
never overwrites that default, pass an explicit path) and rows appended to
benchmarks/results.csv (full runs only, or ``args.csv`` when given).
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as TF

import pyllm
from pyllm import functional as PF

OPS = ("layer_norm", "add_layer_norm", "masked_softmax", "rms_norm", "attention")
DEFAULT_OUTPUT = os.path.join("docs", "benchmarks.md")
DEFAULT_CSV = os.path.join("benchmarks", "results.csv")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (op, baseline name) -> minimum speedup we aim for (pyllm time / baseline time).
TARGETS = {
    ("layer_norm", "F.layer_norm"): 1.0,
    ("add_layer_norm", "x + r; F.layer_norm"): 1.8,
    ("masked_softmax", "eager scale+masked_fill+softmax"): 3.0,
}

CSV_FIELDS = [
    "date", "machine", "device", "cores", "threads", "torch", "pyllm", "commit", "quick",
    "op", "case", "shape", "dtype", "path", "pyllm_us", "baseline", "baseline_us", "speedup",
    "gbps", "pct_copy_bw", "gflops", "pct_matmul", "target", "met",
]


# --------------------------------------------------------------------------- data
@dataclass
class Limits:
    copy_gbps: float
    copy_mib: int
    matmul_gflops: dict  # dtype name -> GFLOP/s
    matmul_n: int


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

    @property
    def met(self) -> Optional[bool]:
        if self.target is None or self.speedup is None:
            return None
        return self.speedup >= self.target


@dataclass
class Case:
    op: str
    case: str
    shape: str
    dtype: torch.dtype
    candidate: Callable
    baselines: dict  # name -> callable (first = correctness reference)
    bytes: int
    flops: Optional[float] = None
    tol: float = 1e-4
    extra: dict = field(default_factory=dict)


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- timing
class Clock:
    """Times callables on one device: wall clock on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush = None
        if self.cuda:
            n = (8 if quick else 256) * 2**20 // 4
            self.flush = torch.empty(n, dtype=torch.float32, device=device)
        # CPU: several calls per sample when a call is short (timer resolution, overhead).
        self.min_sample_s = 2e-4 if quick else 2e-3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sample(self, fn: Callable, inner: int = 1) -> float:
        """Seconds per call, averaged over `inner` back-to-back calls."""
        if self.cuda:
            self.flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    def inner_for(self, fn: Callable) -> int:
        t = min(self.sample(fn) for _ in range(2))
        if self.cuda and t >= 50e-6:
            return 1
        target = 200e-6 if self.cuda else self.min_sample_s
        return max(1, min(1000, math.ceil(target / max(t, 1e-9))))


def interleaved(clock: Clock, fns: dict, reps: int, budget_s: float, warmup: int = 2) -> dict:
    """Times every callable of `fns` `reps` times, interleaving them (rotating the order
    each repetition). Stops early (after at least 5 repetitions) when `budget_s` is spent."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    clock.sync()
    inner = {name: clock.inner_for(fns[name]) for name in names}
    times = {name: [] for name in names}
    t_start = time.perf_counter()
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(clock.sample(fns[name], inner[name]))
        if r + 1 >= 5 and time.perf_counter() - t_start > budget_s:
            break
    return times


def paired_speedup(cand: list, base: list) -> float:
    return statistics.median(b / c for b, c in zip(base, cand))


# --------------------------------------------------------------------------- machine limits
def measure_limits(device: torch.device, quick: bool) -> Limits:
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
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(mm_n, mm_n, device=device).to(dtype)
        b = torch.randn(mm_n, mm_n, device=device).to(dtype)
        out = torch.mm(a, b)
        clock.sync()
        t = min(clock.sample(lambda: torch.mm(a, b, out=out)) for _ in range(reps))
        rates[_dname(dtype)] = 2 * mm_n**3 / t / 1e9
    return Limits(copy_gbps, mib, rates, mm_n)


# --------------------------------------------------------------------------- cases
def _shapes(quick: bool) -> dict:
    if quick:
        return dict(ln=(64, 96), rms=(64, 128), sm=(2, 2, 16, 33),
                    bert=(1, 2, 32, 16), gpt=(1, 2, 64, 16), decode=(1, 2, 64, 16))
    return dict(ln=(4096, 768), rms=(4096, 4096), sm=(8, 12, 512, 512),
                bert=(8, 12, 512, 64), gpt=(4, 12, 1024, 64), decode=(8, 12, 2048, 64))


def _fmt_shape(s) -> str:
    return "[" + ", ".join(str(int(v)) for v in s) + "]"


def norm_cases(op: str, dtype: torch.dtype, device, quick: bool) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)
    shp = _shapes(quick)
    tol = 1e-4 if dtype == torch.float32 else 5e-2

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype)

    es = torch.tensor([], dtype=dtype).element_size()
    if op in ("layer_norm", "add_layer_norm"):
        n, d = shp["ln"]
        x, r, w, b = rand(n, d), rand(n, d), rand(d), rand(d)
        if op == "layer_norm":
            return [Case(op, "ln", _fmt_shape((n, d)), dtype,
                         lambda: PF.layer_norm(x, (d,), w, b),
                         {"F.layer_norm": lambda: TF.layer_norm(x, (d,), w, b)},
                         bytes=(2 * n * d + 2 * d) * es, tol=tol)]

        def eager():
            s = x + r
            return TF.layer_norm(s, (d,), w, b), s

        return [Case(op, "residual+ln", _fmt_shape((n, d)), dtype,
                     lambda: PF.add_layer_norm(x, r, (d,), w, b),
                     {"x + r; F.layer_norm": eager},
                     bytes=(4 * n * d + 2 * d) * es, tol=tol)]
    if op == "rms_norm":
        n, d = shp["rms"]
        x, w = rand(n, d), rand(d)
        return [Case(op, "rms", _fmt_shape((n, d)), dtype,
                     lambda: PF.rms_norm(x, (d,), w, 1e-6),
                     {"F.rms_norm": lambda: TF.rms_norm(x, (d,), w, 1e-6)},
                     bytes=(2 * n * d + d) * es, tol=tol)]
    raise ValueError(op)


def _padding_mask(b: int, lk: int, device, g) -> torch.Tensor:
    """Bool [b, 1, 1, lk] keep-mask: each sequence keeps a random prefix of >= lk/2 keys."""
    lengths = torch.randint(max(1, lk // 2), lk + 1, (b,), generator=g)
    keep = torch.arange(lk)[None, :] < lengths[:, None]
    return keep[:, None, None, :].to(device)


def softmax_cases(dtype: torch.dtype, device, quick: bool) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, lq, lk = _shapes(quick)["sm"]
    x = torch.randn(b, h, lq, lk, generator=g).to(device=device, dtype=dtype)
    mask = _padding_mask(b, lk, device, g)
    scale = 0.125
    es = x.element_size()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    return [Case("masked_softmax", "padding mask", _fmt_shape(x.shape) + " mask " + _fmt_shape(mask.shape),
                 dtype, lambda: PF.masked_softmax(x, mask, scale),
                 {"eager scale+masked_fill+softmax": lambda: (x * scale).masked_fill(~mask, float("-inf")).softmax(-1),
                  "torch.softmax (no mask, floor)": lambda: torch.softmax(x, -1)},
                 bytes=2 * x.numel() * es + mask.numel(), tol=tol)]


def attention_cases(dtype: torch.dtype, device, quick: bool) -> list:
    g = torch.Generator(device="cpu").manual_seed(0)
    shp = _shapes(quick)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    cases = []

    def qkv(b, h, lq, lk, d):
        mk = lambda l: torch.randn(b, h, l, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        return mk(lq), mk(lk), mk(lk)

    def eager(q, k, v, keep=None):
        s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v

    es = torch.tensor([], dtype=dtype).element_size()

    # BERT-base encoder with a padding mask.
    b, h, l, d = shp["bert"]
    q, k, v = qkv(b, h, l, l, d)
    mask = _padding_mask(b, l, device, g)
    cases.append(Case(
        "attention", "bert padding", f"B{b} H{h} L{l} D{d}", dtype,
        lambda: PF.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        {"F.scaled_dot_product_attention": lambda: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask),
         "eager matmul+softmax+matmul": lambda: eager(q, k, v, mask)},
        bytes=4 * q.numel() * es + mask.numel(), flops=4.0 * b * h * l * l * d, tol=tol))

    # GPT causal self-attention.
    b, h, l, d = shp["gpt"]
    q2, k2, v2 = qkv(b, h, l, l, d)
    causal = torch.ones(l, l, dtype=torch.bool, device=device).tril()
    cases.append(Case(
        "attention", "gpt causal", f"B{b} H{h} L{l} D{d}", dtype,
        lambda: PF.scaled_dot_product_attention(q2, k2, v2, is_causal=True),
        {"F.scaled_dot_product_attention": lambda: TF.scaled_dot_product_attention(q2, k2, v2, is_causal=True),
         "eager matmul+softmax+matmul": lambda: eager(q2, k2, v2, causal)},
        bytes=4 * q2.numel() * es, flops=4.0 * b * h * l * l * d / 2, tol=tol))

    # Decoding one token against a KV cache.
    b, h, lk, d = shp["decode"]
    q3, k3, v3 = qkv(b, h, 1, lk, d)
    cases.append(Case(
        "attention", "decode q_len 1", f"B{b} H{h} Lq1 Lk{lk} D{d}", dtype,
        lambda: PF.scaled_dot_product_attention(q3, k3, v3),
        {"F.scaled_dot_product_attention": lambda: TF.scaled_dot_product_attention(q3, k3, v3),
         "eager matmul+softmax+matmul": lambda: eager(q3, k3, v3)},
        bytes=(2 * q3.numel() + 2 * k3.numel()) * es, flops=4.0 * b * h * 1 * lk * d, tol=tol))
    return cases


# --------------------------------------------------------------------------- running
def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _path_of(op: str) -> str:
    exp = pyllm.explain("scaled_dot_product_attention" if op == "attention" else op)
    return exp.split("-> ", 1)[-1] if "-> " in exp else exp


def attention_is_native(device) -> tuple:
    """(native?, why): calls pyllm's SDPA once and checks that neither the backend
    registry nor the call itself fell back to the reference implementation."""
    from pyllm import reference

    q = torch.randn(1, 2, 8, 16, device=device)
    calls = []
    orig = reference.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    reference.scaled_dot_product_attention = spy
    try:
        PF.scaled_dot_product_attention(q, q, q)
    except NotImplementedError as e:
        return False, f"the native attention path raised NotImplementedError ({e})"
    finally:
        reference.scaled_dot_product_attention = orig
    why = pyllm.explain("scaled_dot_product_attention")
    if calls:
        return False, f"the reference ran ({why})"
    if "reference" in why:
        return False, why
    return True, why


def run_case(case: Case, clock: Clock, limits: Limits, reps: int, budget_s: float) -> list:
    out_c = case.candidate()
    path = _path_of(case.op)
    base_name = next(iter(case.baselines))
    out_b = case.baselines[base_name]()
    note = ""
    a, bb = _first(out_c).float(), _first(out_b).float()
    finite = torch.isfinite(bb)
    err = (a - bb)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, bb[finite].abs().max().item() if finite.any() else 1.0)
    if a.shape != bb.shape or not math.isfinite(err) or err > case.tol * scale:
        note = f"MISMATCH vs {base_name}: max abs diff {err:.3g}"
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
                target=TARGETS.get((case.op, name)), note=note)
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


def write_markdown(path: str, info: dict, limits: Limits, rows: list, quick: bool, notes: list,
                   models_text: Optional[str]) -> None:
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
        lines.append(f"- matmul: **{rate:.1f} GFLOP/s** {dt} (`torch.mm` {limits.matmul_n}x{limits.matmul_n}, best of N)")
    lines += ["", "## Results", "",
              "Times are medians of interleaved repetitions; speedup = baseline time / pyllm time "
              "(median of paired repetitions; > 1 means pyllm is faster). GB/s counts the bytes an ideal "
              "single pass reads and writes; % copy BW compares that with the measured copy bandwidth "
              "(it can exceed 100% on CPU when the working set fits in the L3 cache). Attention GFLOP/s "
              "uses 4*B*H*Lq*Lk*D (halved for causal).", "",
              table(rows, markdown=True), ""]
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
        lines += ["## Model-level benchmarks", "", models_text, ""]
    lines += ["## Method", "", __doc__.split("Method (the same on CPU and CUDA):", 1)[1].split("Outputs:", 1)[0].strip(), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


def append_csv(path: str, info: dict, rows: list, quick: bool) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({
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
            })


def run_models(quick: bool) -> Optional[str]:
    try:
        import importlib

        mod = importlib.import_module("pyllm.hf.bench")
    except ModuleNotFoundError as e:
        if e.name in ("pyllm.hf", "pyllm.hf.bench"):
            print("model-level benchmarks: not available (pyllm.hf.bench does not exist yet)")
            return "Not available: `pyllm.hf.bench` does not exist in this build."
        raise
    print("model-level benchmarks (pyllm.hf.bench.run):")
    try:
        result = mod.run(quick)
    except Exception as e:  # keep the op results of this run; report the failure
        import traceback

        traceback.print_exc()
        return f"`pyllm.hf.bench.run` FAILED: {type(e).__name__}: {e}"
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
    ops = list(OPS) if getattr(args, "ops", None) is None else list(args.ops)
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        print(f"pyllm bench: unknown op(s) {unknown}; choose from {list(OPS)}", file=sys.stderr)
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

    limits = measure_limits(device, quick)
    print(f"limits: copy {limits.copy_gbps:.1f} GB/s ({limits.copy_mib} MiB), matmul "
          + ", ".join(f"{v:.1f} GFLOP/s {k}" for k, v in limits.matmul_gflops.items())
          + f" ({limits.matmul_n}^3)")

    clock = Clock(device, quick)
    reps = 5 if quick else 30
    budget = 0.5 if quick else 20.0
    dtypes = (torch.float32, torch.bfloat16)
    rows = []
    for op in ops:
        cases = []
        if op == "attention":
            native, why = attention_is_native(device)
            if not native:
                msg = f"pyllm.functional.scaled_dot_product_attention runs the reference: {why}; not timed"
                print(f"attention: {msg}")
                rows.append(Row("attention", "all cases", "", "", "reference", note=msg))
                continue
        for dtype in dtypes:
            if op in ("layer_norm", "add_layer_norm", "rms_norm"):
                cases += norm_cases(op, dtype, device, quick)
            elif op == "masked_softmax":
                cases += softmax_cases(dtype, device, quick)
            elif op == "attention":
                cases += attention_cases(dtype, device, quick)
        for case in cases:
            new = run_case(case, clock, limits, reps, budget)
            for r in new:
                print(f"  {r.op:15s} {r.case:15s} {r.dtype:9s} pyllm {r.pyllm_us:10.1f} us  "
                      f"{r.baseline:34s} {r.baseline_us:10.1f} us  {r.speedup:5.2f}x  "
                      f"{r.gbps:7.1f} GB/s {r.note}", flush=True)
            rows += new
            del case
        del cases

    models_text = run_models(quick) if getattr(args, "models", False) else None

    print()
    print(table(rows, markdown=False))
    for r in rows:
        if r.target is not None and r.speedup is not None:
            print(f"target {r.op} {r.dtype} vs {r.baseline}: >= {r.target}x -> {r.speedup:.3f}x "
                  f"{'met' if r.met else 'NOT met'}")

    output = getattr(args, "output", DEFAULT_OUTPUT)
    if output and quick and os.path.normpath(output) == os.path.normpath(DEFAULT_OUTPUT):
        print(f"--quick: not overwriting {DEFAULT_OUTPUT} (pass --output FILE to write quick results)")
        output = ""
    if output:
        write_markdown(output, info, limits, rows, quick, notes, models_text)
        print(f"wrote {output}")
    csv_path = getattr(args, "csv", None)
    if csv_path is None and not quick:
        csv_path = os.path.join(ROOT, DEFAULT_CSV) if os.path.isdir(os.path.join(ROOT, "benchmarks")) else DEFAULT_CSV
    if csv_path and rows:
        append_csv(csv_path, info, [r for r in rows if r.pyllm_us is not None], quick)
        print(f"appended {sum(r.pyllm_us is not None for r in rows)} rows to {csv_path}")
    return 0
