"""``python -m pyllm soak --seconds N``: every registered op, forward and backward, at mixed shapes and
dtypes, over and over, reporting the process's resident memory (RSS) every few seconds; then
``pyllm.hf.optimize`` + ``revert`` repeated on a tiny Hugging Face model. A leak (a growing registry,
cache, hook list or a kernel that never frees) shows as RSS growth after the warm-up.

The calls come from each op's own samples (:func:`pyllm.ops.specs`), fp32 and bf16, with gradients,
so a new op is soaked when it is registered. Returns a :class:`SoakResult`; the command exits 1 when
the growth after warm-up exceeds ``--max-growth-mib``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import List, Tuple

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return 0.0


@dataclass
class SoakResult:
    seconds: float
    calls: int
    samples: List[Tuple[float, float]] = field(default_factory=list)  # (elapsed s, RSS MiB)
    warm_rss: float = 0.0
    end_rss: float = 0.0
    hf_cycles: int = 0
    hf_growth: float = 0.0

    @property
    def growth(self) -> float:
        return self.end_rss - self.warm_rss


def _calls():
    from pyllm import ops

    out = []
    for spec in ops.specs():
        for dtype in (torch.float32, torch.bfloat16):
            for sample in spec.samples("cpu", dtype, requires_grad=True):
                out.append((spec, sample))
    return out


def _one(spec, sample) -> None:
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in sample.args]
    out = spec.functional(*args, **sample.kwargs)
    out = out[0] if isinstance(out, tuple) else out
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if leaves:
        torch.autograd.grad(out.float().square().sum(), leaves, allow_unused=True)


def soak_ops(seconds: float, report_every: float = 5.0, warmup: float = None, log=print) -> SoakResult:
    calls = _calls()
    warmup = min(10.0, seconds / 3) if warmup is None else warmup
    res = SoakResult(seconds=seconds, calls=0)
    t0 = last = time.perf_counter()
    i = 0
    while True:
        now = time.perf_counter()
        if now - t0 >= seconds:
            break
        spec, sample = calls[i % len(calls)]
        _one(spec, sample)
        i += 1
        if not res.warm_rss and now - t0 >= warmup:
            res.warm_rss = rss_mib()
        if now - last >= report_every:
            last = now
            res.samples.append((now - t0, rss_mib()))
            log(f"  {now - t0:6.1f} s  {i:7d} calls  RSS {res.samples[-1][1]:8.1f} MiB")
    res.calls = i
    res.end_rss = rss_mib()
    res.warm_rss = res.warm_rss or res.end_rss
    return res


def soak_hf(cycles: int, log=print) -> Tuple[int, float]:
    """optimize + one forward + revert, ``cycles`` times on a tiny BERT: RSS growth after 10 cycles."""
    import pyllm.hf
    from pyllm.hf.testing import tiny_model

    model = tiny_model("bert", "eager")
    ids = torch.randint(4, 500, (2, 9))
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    warm = 0.0
    for c in range(cycles):
        pyllm.hf.optimize(model, warn=False)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am)
        pyllm.hf.revert(model)
        if c == 9:
            warm = rss_mib()
    growth = rss_mib() - warm
    log(f"  optimize + forward + revert x {cycles}: RSS growth after 10 cycles {growth:+.1f} MiB")
    return cycles, growth


def main(args) -> int:
    import pyllm

    torch.manual_seed(0)
    print(f"pyllm soak: {args.seconds} s of every registered op (fp32 + bf16, forward + backward), "
          f"backend {pyllm.current_backend()}, {torch.get_num_threads()} threads")
    res = soak_ops(args.seconds)
    res.hf_cycles, res.hf_growth = soak_hf(args.hf_cycles) if args.hf_cycles else (0, 0.0)
    print(f"  {res.calls} calls; RSS after warm-up {res.warm_rss:.1f} MiB, at the end {res.end_rss:.1f} MiB "
          f"({res.growth:+.1f} MiB)")
    bad = res.growth > args.max_growth_mib or res.hf_growth > args.max_growth_mib
    print("  FAIL: memory grows" if bad else "  ok: no growth beyond the limit "
          f"({args.max_growth_mib} MiB)")
    return 1 if bad else 0
