"""The one timing helper of pyllm's tools (bench, hf_bench, demo).

* :class:`Clock` times a callable on one device: wall clock (``time.perf_counter``) on CPU,
  CUDA events on GPU, where a buffer is written before each sample so that inputs do not sit
  in L2. On CPU, several back-to-back calls make one sample when a call is short.
* :func:`interleaved` times several callables in the same run: each is warmed up, then the
  repetitions are interleaved (A B C, B C A, C A B, ...), so that a change of machine load
  hits every candidate alike.
* :func:`paired_speedup` is the median of the per-repetition ratios; :func:`medians` the
  median time of each callable.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional, Union

import torch


class Clock:
    """Times callables on one device: wall clock on CPU, CUDA events on GPU."""

    def __init__(self, device: Union[torch.device, str] = "cpu", quick: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.flush = None
        if self.cuda:
            n = (8 if quick else 256) * 2**20 // 4
            self.flush = torch.empty(n, dtype=torch.float32, device=self.device)
        # CPU: several calls per sample when a call is short (timer resolution, overhead).
        self.min_sample_s = 2e-4 if quick else 2e-3

    def sync(self) -> None:
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
        """How many back-to-back calls make one sample of `fn` (1 for calls long enough)."""
        t = min(self.sample(fn) for _ in range(2))
        if self.cuda and t >= 50e-6:
            return 1
        target = 200e-6 if self.cuda else self.min_sample_s
        return max(1, min(1000, math.ceil(target / max(t, 1e-9))))


def interleaved(clock: Clock, fns: dict, reps: int, budget_s: float = math.inf, warmup: int = 2,
                inner: Optional[int] = None, progress: Optional[Callable[[], None]] = None) -> dict:
    """Times every callable of `fns` `reps` times, interleaving them (rotating the order each
    repetition), after `warmup` calls of each. Returns ``{name: [seconds per call, ...]}``.

    Stops early (after at least 5 repetitions) when `budget_s` is spent. `inner` fixes the
    calls per sample (default: calibrated per callable with :meth:`Clock.inner_for`, which
    costs two more calls; pass 1 for long calls). `progress` is called after each warm-up call
    and each sample (e.g. a progress bar's ``update``).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
            if progress is not None:
                progress()
    clock.sync()
    calls = {name: inner if inner is not None else clock.inner_for(fns[name]) for name in names}
    times = {name: [] for name in names}
    t_start = time.perf_counter()
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(clock.sample(fns[name], calls[name]))
            if progress is not None:
                progress()
        if r + 1 >= 5 and time.perf_counter() - t_start > budget_s:
            break
    return times


def paired_speedup(cand: list, base: list) -> float:
    """Median of the per-repetition ratios base / candidate (> 1: the candidate is faster)."""
    return statistics.median(b / c for b, c in zip(base, cand))


def medians(times: dict, scale: float = 1.0) -> dict:
    """``{name: median time * scale}`` of :func:`interleaved`'s result (scale 1e3: milliseconds)."""
    return {name: statistics.median(ts) * scale for name, ts in times.items()}
