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
import torch.nn.functional as TF

import pyllm
import pyllm.functional as PF
from pyllm import _ext, reference as R

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


def _native_path(op: str, device) -> None:
    expect = "native CUDA kernel" if device.type == "cuda" else "native CPU kernel"
    if _ext.HAS_C:
        assert expect in pyllm.explain(op), pyllm.explain(op)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 97, 1023, 4097])
def test_norms_on_device(device, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g).to(device, dtype).requires_grad_()
    r = torch.randn(3, 5, n, generator=g).to(device, dtype)
    w = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    x64, w64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))

    out = PF.layer_norm(x, n, w, b)
    _native_path("layer_norm", device)
    ref = TF.layer_norm(x64, (n,), w64, b64)
    base = TF.layer_norm(x.detach(), (n,), w.detach(), b.detach())
    assert_close_to_ref(out.cpu(), ref, base.cpu(), name="layer_norm")
    dy = torch.randn(out.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, (x, w, b), dy)
    ref_grads = torch.autograd.grad(ref, (x64, w64, b64), dy.cpu().double())
    xb, wb, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
    base_grads = torch.autograd.grad(TF.layer_norm(xb, (n,), wb, bb), (xb, wb, bb), dy)
    assert_grads_close([t.cpu() for t in grads], ref_grads, [t.cpu() for t in base_grads],
                       names=["dx", "dw", "db"])

    y, s = PF.add_layer_norm(x.detach(), r, n, w.detach(), b.detach())
    _native_path("add_layer_norm", device)
    s_ref = (x.detach() + r)
    assert torch.equal(s.cpu(), s_ref.cpu())
    assert_close_to_ref(y.cpu(), TF.layer_norm(s_ref.cpu().double(), (n,), w64.detach(), b64.detach()),
                        TF.layer_norm(s_ref, (n,), w.detach(), b.detach()).cpu(), name="add_layer_norm")

    yr = PF.rms_norm(x.detach(), n, w.detach())
    _native_path("rms_norm", device)
    eps = torch.finfo(torch.float32).eps
    assert_close_to_ref(yr.cpu(), TF.rms_norm(x64.detach(), (n,), w64.detach(), eps=eps),
                        TF.rms_norm(x.detach(), (n,), w.detach(), eps=eps).cpu(), name="rms_norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 97, 1023, 4097])
def test_masked_softmax_on_device(device, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 3, 5, n, generator=g).to(device, dtype)
    keep = torch.rand(2, 1, 1, n, generator=g) > 0.3
    keep[1] = False  # a fully masked batch row: zeros, not NaN
    keep = keep.to(device)
    bias = torch.randn(1, 3, 5, n, generator=g).to(device)
    for mask, causal in ((keep, False), (bias, True), (None, True)):
        out = PF.masked_softmax(x, mask, 0.5, causal)
        _native_path("masked_softmax", device)
        m64 = None if mask is None else mask.cpu() if mask.dtype == torch.bool else mask.cpu().double()
        ref = R.masked_softmax(x.cpu().double(), m64, 0.5, causal)
        s = x * 0.5
        if mask is not None and mask.dtype != torch.bool:
            s = s + mask.to(dtype)
        if causal:
            s = s.masked_fill(~torch.ones(5, n, dtype=torch.bool, device=device).tril(), float("-inf"))
        if mask is not None and mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        base = torch.softmax(s, -1).nan_to_num(0.0)
        assert_close_to_ref(out.cpu(), ref, base.cpu(), name=f"masked_softmax causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk,d,causal,align", [(7, 7, 64, False, "top_left"), (1, 97, 80, True, "bottom_right"),
                                                  (33, 33, 111, True, "top_left"), (128, 256, 128, False, "top_left")])
def test_attention_on_device(device, dtype, lq, lk, d, causal, align):
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    q = torch.randn(2, 4, lq, d, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(2, 2, lk, d, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(2, 2, lk, d, generator=g).to(device, dtype).requires_grad_()
    keep = torch.ones(2, 1, 1, lk, dtype=torch.bool)
    keep[1, ..., lk - lk // 3:] = False
    keep = keep.to(device)
    out = PF.scaled_dot_product_attention(q, k, v, keep, is_causal=causal, enable_gqa=True,
                                          causal_alignment=align)
    _native_path("scaled_dot_product_attention", device)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = R.scaled_dot_product_attention(q64, k64, v64, keep.cpu(), is_causal=causal, enable_gqa=True,
                                         causal_alignment=align)
    # plain torch in the same dtype: SDPA with the equivalent explicit bool mask
    allow = R.attention_keep(lq, lk, device, causal, align)
    full = keep if allow is None else keep & allow
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base = TF.scaled_dot_product_attention(qb, kb, vb, full, enable_gqa=True)
    assert_close_to_ref(out.detach().cpu(), ref, base.detach().nan_to_num(0.0).cpu(), mult=3.0, name="attention")
    dy = torch.randn(out.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dy)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dy.cpu().double())
    base_grads = torch.autograd.grad(base, (qb, kb, vb), dy)
    assert_grads_close([t.cpu() for t in grads], ref_grads, [t.nan_to_num(0.0).cpu() for t in base_grads],
                       names=["dq", "dk", "dv"])
