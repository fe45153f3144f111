"""Tensors past 2^31 elements (issue 12, item 2): element offsets are 64-bit in every kernel.

On the CPU, layer_norm, rms_norm and masked_softmax run on bf16 tensors of 2.2e9 elements (4.4 GB
each, input + output about 9 GB) and attention on Lq = Lk = 50,000 with a bool mask of 2.5e9
elements, each well under 60 s on 2 cores. The rows that lie past element 2^31 (and the row that
straddles it) must equal the same rows computed alone (a small call, bit for bit: row-wise kernels
do not depend on a row's position) and match torch in fp64 by the shared rule.

For the CUDA kernels (run here under the emulation, and on the native CPU kernels too), 32-bit
wrap-around is provoked cheaply: small tensors viewed with strides past 2^31 elements over a large
allocation that is never touched (so it costs no memory), for every stride the kernels take
(q/k/v rows, mask rows, masked_softmax masks). A kernel that computes an offset in 32 bits reads
the wrong element (or faults) and fails the comparison with the same data made contiguous.
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import pyllm.functional as P
from pyllm import _ext

from helpers import assert_close_to_ref, maybe_backend

TWO31 = 2 ** 31
N = 4097          # odd row width: a wrapped offset lands mid-row, never on an equal row
PERIOD = 1024     # distinct rows; the big tensor repeats them (2^32 is not a multiple of N * PERIOD)
ROWS = PERIOD * (TWO31 // (N * PERIOD) + 4)   # 540,672 rows: 2.215e9 elements

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason=f"native extension not loaded ({_ext.C_ERROR})")


def _big_input():
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(PERIOD, N, generator=g) * torch.rand(PERIOD, 1, generator=g) * 4).to(torch.bfloat16)
    x = torch.empty(ROWS, N, dtype=torch.bfloat16)
    x.view(-1, PERIOD, N).copy_(base)
    assert x.numel() > TWO31
    return x


def _check_rows(op_name, big_out, x, call):
    """The rows around and past element 2^31 against the same rows computed alone."""
    straddle = TWO31 // N
    rows = torch.tensor([0, straddle - 1, straddle, straddle + 1, ROWS // 2 + 7, ROWS - PERIOD - 1, ROWS - 1])
    assert (straddle + 1) * N > TWO31 and straddle * N < TWO31
    small = call(x[rows].clone())
    assert torch.equal(big_out[rows], small), f"{op_name}: rows past element 2^31 differ from the same rows alone"
    return rows


NORM_OPS = {
    "layer_norm": (lambda x, w, b: P.layer_norm(x, N, w, b),
                   lambda x, w, b: F.layer_norm(x, (N,), w, b)),
    "rms_norm": (lambda x, w, b: P.rms_norm(x, N, w),
                 lambda x, w, b: F.rms_norm(x, (N,), w)),
    "masked_softmax": (lambda x, w, b: P.masked_softmax(x, b > 0, scale=0.5),
                       lambda x, w, b: (x * 0.5).masked_fill(~(b > 0), float("-inf")).softmax(-1)),
}


@pytest.mark.parametrize("op", list(NORM_OPS))
def test_row_ops_past_2_31_elements(op):
    pyllm_call, torch_call = NORM_OPS[op]
    g = torch.Generator().manual_seed(1)
    w = (torch.rand(N, generator=g) + 0.5).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)  # masked_softmax: the mask is b > 0
    x = _big_input()
    try:
        with torch.no_grad():
            out = pyllm_call(x, w, b)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        rows = _check_rows(op, out, x, lambda xs: pyllm_call(xs, w, b))
        xs = x[rows]
        ref = torch_call(xs.double(), w.double(), b.double())
        assert_close_to_ref(out[rows], ref, torch_call(xs, w, b), name=op)
    finally:
        del x
        gc.collect()


def test_attention_scores_past_2_31():
    """Lq = Lk = 50,000, D = 16: 2.5e9 scores and a 2.5e9-element bool mask (causal, written out),
    so every mask offset of the last 7,000 query rows is past 2^31."""
    L, D = 50_000, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, L, D, generator=g) for _ in range(3))
    keep = torch.ones(L, L, dtype=torch.bool).tril_()
    try:
        with torch.no_grad():
            out = P.scaled_dot_product_attention(q, k, v, keep)
        rows = torch.tensor([0, 1, TWO31 // L - 1, TWO31 // L, TWO31 // L + 1, 45_001, L - 2, L - 1])
        assert (TWO31 // L + 1) * L > TWO31
        sub = keep[rows]
        ref = F.scaled_dot_product_attention(q[:, :, rows].double(), k.double(), v.double(), sub)
        base = F.scaled_dot_product_attention(q[:, :, rows], k, v, sub)
        assert_close_to_ref(out[:, :, rows], ref, base, name="attention rows past 2^31 mask elements")
    finally:
        del keep
        gc.collect()


# ------------------------------------------------------------------ huge strides, no memory
BACKENDS = [pytest.param(None, id="native"), pytest.param(
    "cuda-emulated", id="emulated", marks=[pytest.mark.emulated, pytest.mark.skipif(
        not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")])]


def _strided_view(src, stride, dtype):
    """`src` [R, C] placed row r at element r * stride of a fresh, untouched allocation; only the
    touched pages are ever committed."""
    R, C = src.shape
    store = torch.empty((R - 1) * stride + C, dtype=dtype)
    view = store.as_strided((R, C), (stride, 1))
    view.copy_(src)
    return view


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_strides_past_2_31(backend):
    """K, V and the mask rows 2^30 + 3 elements apart: rows 2 and 3 start past element 2^31
    (row 4 past 2^32), so 32-bit offsets wrap or go negative."""
    g = torch.Generator().manual_seed(3)
    Lq, Lk, D, stride = 3, 5, 16, 2 ** 30 + 3
    q = torch.randn(1, 1, Lq, D, generator=g, dtype=torch.bfloat16)
    k0, v0 = (torch.randn(Lk, D, generator=g).to(torch.bfloat16) for _ in range(2))
    keep0 = torch.rand(Lq, Lk, generator=g) > 0.3
    keep0[:, -1] = True  # the far row is always seen
    k = _strided_view(k0, stride, torch.bfloat16)[None, None]
    v = _strided_view(v0, stride, torch.bfloat16)[None, None]
    keep = _strided_view(keep0, stride, torch.bool)[None, None]
    assert k.stride(2) * (Lk - 1) > 2 ** 32 and keep.stride(2) * (Lq - 1) > TWO31
    with maybe_backend(backend), torch.no_grad():
        out = P.scaled_dot_product_attention(q, k, v, keep)
    kc, vc, mc = k0[None, None], v0[None, None], keep0[None, None]
    ref = F.scaled_dot_product_attention(q.double(), kc.double(), vc.double(), mc)
    assert_close_to_ref(out, ref, F.scaled_dot_product_attention(q, kc, vc, mc), name="attention, huge strides")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_softmax_mask_with_stride_past_2_31(backend):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 33, generator=g)
    keep0 = torch.rand(5, 33, generator=g) > 0.4
    keep0[:, 0] = True
    keep = _strided_view(keep0, 2 ** 30 + 5, torch.bool)
    assert keep.stride(0) * 4 > 2 ** 32
    with maybe_backend(backend), torch.no_grad():
        out = P.masked_softmax(x, keep)
    ref = x.double().masked_fill(~keep0, float("-inf")).softmax(-1)
    assert_close_to_ref(out, ref, x.masked_fill(~keep0, float("-inf")).softmax(-1), name="masked_softmax, huge mask stride")
