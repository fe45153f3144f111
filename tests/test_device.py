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

from pyllm.testing import check_op_samples

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
    check_op_samples(spec, device, dtype, lambda spec: _check_native_path(spec.name, device))


def test_every_op_has_device_samples():
    for spec in SPECS:
        assert len(spec.samples("cpu", torch.float32)) >= 3, spec.name
