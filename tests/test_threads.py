"""Concurrent calls (issue 12, item 4, first part): 8 Python threads calling every registered op at
once give bit-identical results to the same calls made one by one, with and without autograd.
The calls come from the registry (each op's own samples), so a new op is covered when it is added."""
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


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_threads_match_sequential(grad):
    """Threads on different backends at once (use_backend is per thread): each matches the
    sequential calls on its own backend, bit for bit."""
    calls = _calls()
    assert len(calls) >= 20
    backends = _backends()
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
                    results[t][i] = _run(calls[i][1], calls[i][2], grad)
                    assert pyllm.current_backend() == (backend or "auto") or backend is None
        except Exception as e:  # noqa: BLE001  (reported below with the thread)
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
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
