"""Concurrent calls (issue 12, item 4): 8 Python threads calling every registered op at once give
bit-identical results to the same calls made one by one, with and without autograd, with
``torch.set_num_threads`` changed between calls; and pyllm's kernels give bit-identical results
for any thread count (work is split by shape, never by thread count). The calls come from the
registry (each op's own samples), so a new op is covered when it is added."""
from __future__ import annotations

import threading

import pytest
import torch

import pyllm
import pyllm.ops as ops
from pyllm import _ext


def _calls():
    out = []
    for spec in ops.specs():
        for i, sample in enumerate(spec.samples("cpu", torch.float32, requires_grad=True)):
            out.append((f"{spec.name}[{i}]", spec, sample))
    return out


def _run(spec, sample, grad):
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in sample.args]
    kwargs = dict(sample.kwargs)
    if spec.name in ("scaled_dot_product_attention", "varlen_attention"):
        kwargs.pop("dropout_p", None)  # dropout draws from torch's RNG: not comparable across orders
    with torch.set_grad_enabled(grad):
        out = spec.functional(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if not grad:
            return [out.detach()]
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(out.float().square().sum(), leaves, allow_unused=True)
        return [out.detach()] + [g for g in grads if g is not None]


def _backends():
    out = [None, "torch"]
    if _ext.HAS_EMU:
        out.append("cuda-emulated")
    return out


def _sequential(calls, grad, backend):
    if backend is None:
        return [_run(spec, sample, grad) for _, spec, sample in calls]
    with pyllm.use_backend(backend):
        return [_run(spec, sample, grad) for _, spec, sample in calls]


@pytest.mark.parametrize("vary_threads", [False, True], ids=["fixed-threads", "set_num_threads-varied"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_threads_match_sequential(grad, vary_threads):
    """Threads on different backends at once (use_backend is per thread): each matches the
    sequential calls on its own backend, bit for bit. With ``vary_threads`` every call first sets
    ``torch.set_num_threads`` to 1, 2 or 3 (a process-wide setting, so every thread sees the
    changes): only pyllm's kernels are held to that (see _kernel_backends for why not torch's)."""
    calls = _calls()
    assert len(calls) >= 20
    backends = [b for b in _backends() if not (vary_threads and b == "torch")]
    want = {b: _sequential(calls, grad, b) for b in backends}
    results = [[None] * len(calls) for _ in range(8)]
    errors = []

    def worker(t):
        backend = backends[t % len(backends)]
        try:
            order = list(range(len(calls)))
            if t % 2:
                order.reverse()  # different interleavings per thread
            with (pyllm.use_backend(backend) if backend else _null()):
                for i in order:
                    if vary_threads:
                        torch.set_num_threads(1 + (t + i) % 3)
                    results[t][i] = _run(calls[i][1], calls[i][2], grad)
                    assert pyllm.current_backend() == (backend or "auto") or backend is None
        except Exception as e:  # noqa: BLE001  (reported below with the thread)
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    nt = torch.get_num_threads()
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        torch.set_num_threads(nt)
    assert not errors, errors
    for t in range(8):
        for (name, _, _), got, ref in zip(calls, results[t], want[backends[t % len(backends)]]):
            assert len(got) == len(ref), name
            for g, r in zip(got, ref):
                assert torch.equal(g, r) or (torch.isnan(g).equal(torch.isnan(r)) and
                                             torch.equal(g.nan_to_num(), r.nan_to_num())), \
                    f"thread {t} ({backends[t % len(backends)]}): {name} differs from the sequential call"


def _null():
    import contextlib

    return contextlib.nullcontext()


def test_use_backend_is_per_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other():
        entered.wait(5)
        seen["other"] = pyllm.current_backend()
        release.set()

    th = threading.Thread(target=other)
    th.start()
    with pyllm.use_backend("torch"):
        entered.set()
        release.wait(5)
        seen["main"] = pyllm.current_backend()
    th.join()
    assert seen == {"main": "torch", "other": pyllm.backends._DEFAULT}


def _same(g, r):
    return torch.equal(g.nan_to_num(), r.nan_to_num()) and torch.equal(torch.isnan(g), torch.isnan(r))


def _kernel_backends():
    """pyllm's kernels: native CPU and emulated CUDA. The "torch" reference backend is torch's own
    composition: torch's matmul and reductions split work by thread count, so its results may
    differ in the last bit between thread counts (measured: attention, varlen and masked_softmax
    gradients), which is torch's behaviour, not pyllm's."""
    out = [pytest.param(None, id="native", marks=pytest.mark.skipif(not _ext.HAS_C, reason="no native"))]
    if _ext.HAS_EMU:
        out.append(pytest.param("cuda-emulated", id="emulated"))
    return out


def _with_threads(nt, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(nt)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", _kernel_backends())
def test_registry_calls_do_not_depend_on_thread_count(backend):
    calls = _calls()

    def all_calls():
        return _sequential(calls, True, backend)
    want = _with_threads(1, all_calls)
    for nt in ((2, 3, 7) if backend is None else (3,)):  # the emulation is ~10x slower: one count
        got = _with_threads(nt, all_calls)
        for (name, _, _), g_list, r_list in zip(calls, got, want):
            for i, (g, r) in enumerate(zip(g_list, r_list)):
                assert _same(g, r), f"{name} output {i}: {nt} threads differ from 1 thread"


def _big_cases():
    """Shapes where the work is split into many parts: the norms' weight/bias-grad partial sums
    over row chunks (3000 rows), and decode attention's key splits (Lk 2500: 5 splits, combined by LSE)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 96, generator=g)
    w, b = torch.rand(96, generator=g) + 0.5, torch.randn(96, generator=g)
    q = torch.randn(2, 8, 1, 64, generator=g)
    k, v = torch.randn(2, 2, 2500, 64, generator=g), torch.randn(2, 2, 2500, 64, generator=g)
    return {
        "layer_norm backward": (pyllm.functional.layer_norm, (x, 96, w, b), {}),
        "rms_norm backward": (pyllm.functional.rms_norm, (x, 96, w), {}),
        "decode attention (GQA 4:1)": (pyllm.functional.scaled_dot_product_attention, (q, k, v),
                                       {"enable_gqa": True}),
    }


@pytest.mark.parametrize("backend", _kernel_backends())
@pytest.mark.parametrize("case", list(_big_cases()))
def test_split_work_does_not_depend_on_thread_count(backend, case):
    fn, args, kwargs = _big_cases()[case]

    def once():
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        with (pyllm.use_backend(backend) if backend else _null()):
            out = fn(*leaves, **kwargs)
            grads = torch.autograd.grad(out.square().sum(), [a for a in leaves if isinstance(a, torch.Tensor)])
        return [out.detach(), *grads]
    want = _with_threads(1, once)
    for nt in ((2, 3, 8) if backend is None else (3,)):
        for i, (g, r) in enumerate(zip(_with_threads(nt, once), want)):
            assert torch.equal(g, r), f"{case}: output {i} with {nt} threads differs from 1 thread"
