"""Every op on a device's tensors (CPU here; CUDA on a GPU machine) vs the fp64 reference.

The CUDA parametrization is what `python -m pyllm gpu-check` runs: it needs a CUDA GPU and pyllm
built with CUDA kernels. With `PYLLM_TEST_DEVICE=cuda` (set by gpu-check) a missing GPU or
missing CUDA kernels is a failure, not a skip, so the GPU check can never pass vacuously.
The same code runs on CPU tensors everywhere, so it cannot rot on machines without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

import pyllm
from pyllm import _ext

from helpers import assert_close_to_ref, assert_grads_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "needs a CUDA GPU (none visible on this machine)"
    if not _ext.HAS_CUDA_KERNELS:
        return False, "pyllm was built without CUDA kernels"
    return True, ""


def _devices():
    ok, why = _cuda_ready()
    if os.environ.get("PYLLM_TEST_DEVICE") == "cuda":
        return ["cuda"]
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not ok, reason=why), id="cuda")]


@pytest.fixture(params=_devices())
def device(request):
    if request.param == "cuda":
        ok, why = _cuda_ready()
        if not ok:  # only reachable with PYLLM_TEST_DEVICE=cuda: a GPU check must not pass vacuously
            pytest.fail(f"PYLLM_TEST_DEVICE=cuda but {why}")
    return torch.device(request.param)


def _check_native_path(op: str, device) -> None:
    d = pyllm.last_decision(op)
    if _ext.HAS_C and pyllm.current_backend() in ("auto", "native"):
        want = "native-cuda" if device.type == "cuda" else "native-cpu"
        if d.path == "reference" and device.type == "cuda" and pyllm.current_backend() == "auto":
            # The documented CUDA rule (pyllm.ops.attention.CUDA_RULE): fp32 attention runs torch's.
            assert "float32 on CUDA" in d.reason, str(d)
            return
        assert d.path == want, str(d)


def _backends(device) -> list:
    """`auto` may route a CUDA call to torch by a documented rule; `native` then runs pyllm's kernel."""
    cur = pyllm.current_backend()
    return ["auto", "native"] if device.type == "cuda" and cur == "auto" and _ext.HAS_C else [cur]


def _to64(t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    c = t.detach().cpu().double()
    return c.requires_grad_() if t.requires_grad else c


def _detached(t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return t
    c = t.detach().clone()
    return c.requires_grad_() if t.requires_grad else c


def _first(out):
    return out[0] if isinstance(out, tuple) else out


SPECS = pyllm.ops.specs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_op_on_device(device, spec, dtype):
    """Every sample of every registered op: output and gradients vs torch's composition in fp64
    (the oracle), judged against the same composition in the test dtype (the baseline)."""
    for backend in _backends(device):
        with pyllm.use_backend(backend):
            _check_samples(spec, device, dtype)


def _check_samples(spec, device, dtype):
    for sample in spec.samples(device, dtype, requires_grad=True):
        args, kwargs = sample.args, sample.kwargs
        out = spec.functional(*args, **kwargs)
        _check_native_path(spec.name, device)
        args64 = [_to64(a) for a in args]
        ref = spec.torch_baseline(*args64, **kwargs)
        argsb = [_detached(a) for a in args]
        base = spec.torch_baseline(*argsb, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        refs = ref if isinstance(ref, tuple) else (ref,)
        bases = base if isinstance(base, tuple) else (base,)
        for i, (o, r, b) in enumerate(zip(outs, refs, bases)):
            assert_close_to_ref(o.detach().cpu(), r.detach(), b.detach().cpu(), name=f"{sample.desc} out[{i}]")
        leaves = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        if not leaves:
            continue
        g = torch.Generator().manual_seed(7)
        dy = torch.randn(_first(out).shape, generator=g).to(device, _first(out).dtype)
        grads = torch.autograd.grad(_first(out), [args[i] for i in leaves], dy)
        ref_grads = torch.autograd.grad(_first(ref), [args64[i] for i in leaves], dy.cpu().double())
        base_grads = torch.autograd.grad(_first(base), [argsb[i] for i in leaves], dy)
        assert_grads_close([t.cpu() for t in grads], ref_grads, [t.cpu() for t in base_grads],
                           names=[f"{sample.desc} grad[{i}]" for i in leaves])


def test_every_op_has_device_samples():
    for spec in SPECS:
        assert len(spec.samples("cpu", torch.float32)) >= 3, spec.name
