"""pyllm's norm and softmax ops against an fp64 oracle, judged like FlashAttention's suite.

The oracle is a torch composition on fp64 copies of the inputs (F.layer_norm, x + r then
F.layer_norm, F.rms_norm or the Hugging Face RMSNorm formulas, the masked softmax chain); the
baseline is the same composition in the test dtype. Never pyllm's own reference: under
PYLLM_BACKEND=torch that would compare the reference with itself. pyllm's error must be at
most 2x the baseline's for outputs, 3x for gradients, with a floor of about an ulp (see
tests/helpers.py). test_reference_backend_matches_torch checks the reference itself.

The suite runs whatever backend the session selects (`auto`: native kernels when built;
the Makefile also runs it with PYLLM_BACKEND=torch and PYLLM_DISABLE_EXT=1). Cases marked
`emulated` rerun the same checks with small shapes under `pyllm.use_backend("cuda-emulated")`
(the CUDA kernel sources on the CPU emulation of CUDA).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF

import pyllm
from pyllm import _ext
from pyllm import functional as P

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

from helpers import (RMS_STYLES, assert_close_to_ref, grads_of, keep_mask, make_input, maybe_backend,  # noqa: E402
                     rms_norm_torch, softmax_torch, to64, ulp_of)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_EPS = torch.finfo(torch.float32).eps
EMU = "cuda-emulated"

# (width, leading shape): keep the biggest cases few.
WIDTHS = [(1, (3, 5)), (7, (3, 5)), (97, (3, 5)), (1023, (2, 3)), (4097, (3,)), (20000, (2,))]
EMU_WIDTHS = [(1, (2, 3)), (7, (2, 3)), (97, (2, 2)), (1030, (3,)), (2100, (2,))]


def cases(default, emulated, ids=None):
    """Parameters (backend, *case): the session backend for `default`, plus the same checks
    under the cuda-emulated backend (marked `emulated`) for the small `emulated` list."""
    out = [pytest.param(None, *c, id=f"{c[0]}" if ids is None else ids(c)) for c in default]
    out += [pytest.param(EMU, *c, marks=pytest.mark.emulated, id=f"emu-{c[0] if ids is None else ids(c)}")
            for c in emulated]
    return out


def dtype_id(dt):
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------- oracles
def sm_baseline(x, mask, scale, causal):
    """Plain PyTorch's masked softmax chain in x's dtype (an additive mask is added in x's dtype)."""
    return softmax_torch(x, mask, scale, causal)


def sm_ref64(x, mask, scale, causal):
    """The same chain on fp64 copies: the oracle."""
    m = None if mask is None else (mask if mask.dtype == torch.bool else mask.detach().double())
    return softmax_torch(x.detach().double(), m, scale, causal)


def ln64(x, normalized_shape, w=None, b=None, eps=1e-5):
    """F.layer_norm on fp64 copies: the LayerNorm oracle."""
    x64, w64, b64 = to64(x, w, b)
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return tF.layer_norm(x64, ns, w64, b64, eps)


def rms64(x, w, eps, style="torch"):
    """rms_norm_torch (F.rms_norm or the HF module's formula) on fp64 copies: the RMSNorm oracle."""
    x64, w64 = to64(x, w)
    return rms_norm_torch(x64, w64, eps, style)


# ----------------------------------------------------------------------------- path check
def test_ops_take_the_expected_path():
    """The session really runs what it claims: native kernels under auto+extension, the
    reference under PYLLM_BACKEND=torch or PYLLM_DISABLE_EXT=1."""
    P.layer_norm(torch.randn(2, 4), 4)
    msg = pyllm.explain("layer_norm")
    backend = pyllm.current_backend()
    assert msg.startswith(f"layer_norm: backend {backend!r} -> ")
    if backend in ("auto", "native") and _ext.HAS_C:
        assert msg.endswith("native CPU kernel")
    elif backend == "torch":
        assert "reference (PyTorch) because backend is 'torch'" in msg
    elif not _ext.HAS_C:
        assert "reference (PyTorch) because native extension not loaded" in msg


# ----------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_reference_backend_matches_torch(dtype):
    """The pure-PyTorch reference (backend 'torch': the spec and the fallback) is held to the same
    rule against torch's compositions in every session; the rest of the suite checks it only when
    the session itself runs on the reference (PYLLM_BACKEND=torch, or no extension)."""
    n = 257
    x = make_input((3, 5, n), dtype, scale=2.0, shift=0.5).requires_grad_()
    r = make_input((3, 5, n), dtype)
    w = make_input((n,), dtype, shift=1.0).requires_grad_()
    b = make_input((n,), dtype).requires_grad_()
    add = make_input((5, n), dtype, scale=2.0).requires_grad_()
    keep = torch.rand(3, 1, n) < 0.7
    gy = torch.randn(x.shape).to(dtype)
    with pyllm.use_backend("torch"):
        ln = P.layer_norm(x, n, w, b)
        assert "reference (PyTorch) because backend is 'torch'" in pyllm.explain("layer_norm")
        aln, summed = P.add_layer_norm(x, r, n, w, b)
        rms = {st: P.rms_norm(x, n, w, 1e-6, style=st) for st in RMS_STYLES}
        sm_add = P.masked_softmax(x, add, 0.5)
        sm_bool = P.masked_softmax(x, keep, 0.5, causal=True)
        g_ln = grads_of((ln * gy).sum(), [x, w, b])
        g_sm = grads_of((sm_add * gy).sum(), [x, add])
    assert_close_to_ref(ln, ln64(x, n, w, b), tF.layer_norm(x, (n,), w, b), name="reference layer_norm")
    assert torch.equal(summed, x + r)
    assert_close_to_ref(aln, ln64(x + r, n, w, b), tF.layer_norm(x + r, (n,), w, b), name="reference add_layer_norm")
    for st, out in rms.items():
        assert_close_to_ref(out, rms64(x, w, 1e-6, st), rms_norm_torch(x, w, 1e-6, st), name=f"reference rms_norm[{st}]")
    assert_close_to_ref(sm_add, sm_ref64(x, add, 0.5, False), sm_baseline(x, add, 0.5, False), name="reference softmax")
    assert_close_to_ref(sm_bool, sm_ref64(x, keep, 0.5, True), sm_baseline(x, keep, 0.5, True),
                        name="reference softmax bool+causal")
    i64 = to64(x, w, b, add)
    ref_ln = grads_of((tF.layer_norm(i64[0], (n,), i64[1], i64[2]) * gy.double()).sum(), i64[:3])
    base_ln = grads_of((tF.layer_norm(x, (n,), w, b) * gy).sum(), [x, w, b])
    _check_grads(g_ln, ref_ln, base_ln, ["reference ln input", "weight", "bias"])
    ref_sm = grads_of((softmax_torch(i64[0], i64[3], 0.5) * gy.double()).sum(), [i64[0], i64[3]])
    base_sm = grads_of((sm_baseline(x, add, 0.5, False) * gy).sum(), [x, add])
    _check_grads(g_sm, ref_sm, base_sm, ["reference softmax input", "mask"])


# ----------------------------------------------------------------------------- LayerNorm
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("affine", AFFINE, ids=lambda a: f"w{int(a[0])}b{int(a[1])}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n,lead", cases(WIDTHS, EMU_WIDTHS))
def test_layer_norm_forward(backend, n, lead, dtype, affine):
    x = make_input(lead + (n,), dtype, scale=2.0, shift=0.5)
    w = make_input((n,), dtype, shift=1.0) if affine[0] else None
    b = make_input((n,), dtype) if affine[1] else None
    with maybe_backend(backend):
        out = P.layer_norm(x, (n,), w, b, eps=1e-5)
    assert_close_to_ref(out, ln64(x, n, w, b, 1e-5), tF.layer_norm(x, (n,), w, b, eps=1e-5), name="layer_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("backend,lead,n", cases(
    [((1,), 97), ((1, 1), 7), ((4, 6), 33), ((2, 3, 4), 65), ((2, 2, 3, 5), 130)],
    [((1,), 97), ((2, 3), 33)], ids=lambda c: f"{'x'.join(map(str, c[0]))}x{c[1]}"))
def test_layer_norm_layouts(backend, lead, n, layout, dtype):
    """1-row, 3-D and 4-D inputs, transposed and sliced (non-contiguous) memory."""
    x = make_input(lead + (n,), dtype, layout=layout, scale=3.0)
    w, b = make_input((n,), dtype, shift=1.0), make_input((n,), dtype)
    with maybe_backend(backend):
        out = P.layer_norm(x, n, w, b)
    assert out.shape == x.shape
    assert_close_to_ref(out, ln64(x, n, w, b), tF.layer_norm(x, (n,), w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,shape,k", cases(
    [((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3), ((3, 7, 11), 2), ((6, 1, 9), 2)],
    [((2, 3, 4, 5), 2)], ids=lambda c: f"{c[0]}-last{c[1]}"))
def test_layer_norm_multi_dim_normalized_shape(backend, shape, k, dtype):
    x = make_input(shape, dtype, layout="transposed", scale=2.0)
    ns = shape[-k:]
    w, b = make_input(ns, dtype, shift=1.0), make_input(ns, dtype)
    with maybe_backend(backend):
        out = P.layer_norm(x, ns, w, b)
        out_nw = P.layer_norm(x, list(ns))
    ref = tF.layer_norm(*to64(x), ns, *to64(w, b))
    assert_close_to_ref(out, ref, tF.layer_norm(x, ns, w, b))
    assert_close_to_ref(out_nw, tF.layer_norm(x.double(), ns), tF.layer_norm(x, ns))


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("backend,n", cases([(7,), (1023,)], [(97,)]))
def test_layer_norm_mixed_dtype(backend, n, xdtype):
    """Half input with fp32 weight/bias (autocast-style): output in the input's dtype."""
    x = make_input((4, n), xdtype, scale=2.0)
    w, b = make_input((n,), torch.float32, shift=1.0), make_input((n,), torch.float32)
    with maybe_backend(backend):
        out = P.layer_norm(x, n, w, b)
        out2, summed = P.add_layer_norm(x, x.flip(0), n, w, b)
    assert out.dtype == xdtype and out2.dtype == xdtype and summed.dtype == xdtype
    assert_close_to_ref(out, ln64(x, n, w, b), tF.layer_norm(x, (n,), w, b))
    s = x + x.flip(0)
    assert torch.equal(summed, s)
    assert_close_to_ref(out2, ln64(s, n, w, b), tF.layer_norm(s, (n,), w, b))


# ----------------------------------------------------------------------------- add + LayerNorm
@pytest.mark.parametrize("affine", [(True, True), (False, True), (False, False)],
                         ids=lambda a: f"w{int(a[0])}b{int(a[1])}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n,lead", cases(WIDTHS, EMU_WIDTHS))
def test_add_layer_norm_forward(backend, n, lead, dtype, affine):
    x = make_input(lead + (n,), dtype, scale=2.0, shift=0.5)
    r = make_input(lead + (n,), dtype, layout="sliced")
    w = make_input((n,), dtype, shift=1.0) if affine[0] else None
    b = make_input((n,), dtype) if affine[1] else None
    with maybe_backend(backend):
        out, summed = P.add_layer_norm(x, r, (n,), w, b, eps=1e-6)
    s = x + r
    # summed is exactly x + r in x's dtype, and the norm is of that rounded sum
    assert summed.dtype == dtype and torch.equal(summed, s)
    assert_close_to_ref(out, ln64(s, n, w, b, 1e-6), tF.layer_norm(s, (n,), w, b, eps=1e-6), name="add_layer_norm")


@pytest.mark.parametrize("affine", [(True, True), (False, False)], ids=lambda a: f"w{int(a[0])}b{int(a[1])}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n,lead", cases(WIDTHS, EMU_WIDTHS))
def test_add_layer_norm_inplace(backend, n, lead, dtype, affine):
    x = make_input(lead + (n,), dtype, scale=2.0, shift=0.5)
    r = make_input(lead + (n,), dtype, layout="sliced")
    w = make_input((n,), dtype, shift=1.0) if affine[0] else None
    b = make_input((n,), dtype) if affine[1] else None
    s = x + r
    y = x.clone()
    ptr = y.data_ptr()
    with maybe_backend(backend), torch.no_grad():
        got = P.add_layer_norm_(y, r, (n,), w, b, eps=1e-6)
        oop = P.add_layer_norm(x, r, (n,), w, b, eps=1e-6)[0]
    assert got is y and y.data_ptr() == ptr  # written in place, returned
    assert torch.equal(y, oop)  # exactly the out-of-place op's values
    assert_close_to_ref(y, ln64(s, n, w, b, 1e-6), tF.layer_norm(s, (n,), w, b, eps=1e-6),
                        name="add_layer_norm_")


@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_add_layer_norm_inplace_strided_and_grad(backend):
    base = make_input((6, 10), torch.float32)
    orig, r = base.clone(), make_input((6, 5), torch.float32)
    with maybe_backend(backend):
        P.add_layer_norm_(base[:, ::2], r, 5)  # non-contiguous: computed out of place, copied back
    assert_close_to_ref(base[:, ::2], tF.layer_norm(orig[:, ::2].double() + r.double(), (5,)),
                        tF.layer_norm(orig[:, ::2] + r, (5,)), name="strided add_layer_norm_")
    assert torch.equal(base[:, 1::2], orig[:, 1::2])  # the other columns untouched
    x = make_input((3, 8), torch.float32).requires_grad_()
    with pytest.raises(RuntimeError, match="writes input in place and has no backward"):
        P.add_layer_norm_(x.detach(), x, 8)  # residual requires grad
    with torch.no_grad():  # inference: allowed
        P.add_layer_norm_(x.detach().clone(), x, 8)


@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_add_layer_norm_multi_dim_and_3d(backend):
    x = make_input((2, 3, 4, 5), torch.float32, layout="transposed")
    r = make_input((2, 3, 4, 5), torch.float32)
    w, b = make_input((4, 5), torch.float32, shift=1), make_input((4, 5), torch.float32)
    with maybe_backend(backend):
        out, summed = P.add_layer_norm(x, r, (4, 5), w, b)
    s = x + r
    assert torch.equal(summed, s)
    assert_close_to_ref(out, tF.layer_norm(s.double(), (4, 5), w.double(), b.double()),
                        tF.layer_norm(s, (4, 5), w, b))


# ----------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("has_weight", [True, False], ids=["w", "now"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n,lead", cases(WIDTHS, EMU_WIDTHS))
def test_rms_norm_forward_torch_style(backend, n, lead, dtype, has_weight):
    x = make_input(lead + (n,), dtype, scale=2.0, shift=0.5)
    w = make_input((n,), dtype, shift=1.0) if has_weight else None
    with maybe_backend(backend):
        out = P.rms_norm(x, (n,), w)                    # eps=None: finfo(float32).eps like torch
        out_eps = P.rms_norm(x, (n,), w, eps=1e-3)
    assert_close_to_ref(out, rms64(x, w, FP32_EPS), tF.rms_norm(x, (n,), w))
    assert_close_to_ref(out_eps, rms64(x, w, 1e-3), tF.rms_norm(x, (n,), w, eps=1e-3))


# The CUDA row kernels' two paths (csrc/cuda/common.cuh RowRegs, norm.cu, softmax.cu): a row held in
# registers (16-byte loads and stores, a scalar head and tail: odd widths put every row but the
# first off a 16-byte boundary) up to 1024 (a warp per row) or 8192 (+ a tail; a block per row)
# elements when its tensors share a 16-byte phase; element loops otherwise. Widths on both sides of
# each limit, every dtype, and inputs starting one element past a 16-byte boundary (the outputs are
# fresh, so the phases differ: element loops): the four norm forwards and masked_softmax forward
# (bool mask + causal) and backward. Dropping the head and tail elements fails the odd widths.
NORM_PATH_WIDTHS = [1, 7, 8, 97, 1024, 1025, 4096, 8192, 8193]


@pytest.mark.emulated
@pytest.mark.skipif(not _ext.HAS_EMU, reason="emulated CUDA module not built")
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "offset1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", NORM_PATH_WIDTHS)
def test_row_kernel_paths_emulated(n, dtype, misaligned):
    rows = 3 if n <= 1024 else 2

    def mk(seed, shape, scale=1.0, shift=0.0):
        g = torch.Generator().manual_seed(seed)
        numel = math.prod(shape)
        buf = (torch.randn(numel + 1, generator=g) * scale + shift).to(dtype)
        t = (buf[1:] if misaligned else buf[:-1]).view(shape)
        assert (t.data_ptr() % 16 != 0) == misaligned
        return t

    x, r = mk(1, (rows, n), 2.0, 0.5), mk(2, (rows, n))
    w, b = mk(3, (n,), shift=1.0), mk(4, (n,))
    w32 = w.float()  # rms_norm llama style with an fp32 weight: fp32 output from a half input
    with pyllm.use_backend(EMU):
        ln = P.layer_norm(x, (n,), w, b, eps=1e-5)
        aln, s1 = P.add_layer_norm(x, r, (n,), w, b, eps=1e-5)
        rms = P.rms_norm(x, (n,), w32, 1e-6, style="llama")
        arms, s2 = P.add_rms_norm(x, r, (n,), w, 1e-6, style="llama")
    s = x + r
    assert torch.equal(s1, s) and torch.equal(s2, s)  # the sums exactly as the dtype's own add
    assert_close_to_ref(ln, ln64(x, n, w, b), tF.layer_norm(x, (n,), w, b), name=f"layer_norm n={n}")
    assert_close_to_ref(aln, ln64(s, n, w, b), tF.layer_norm(s, (n,), w, b), name=f"add_layer_norm n={n}")
    assert rms.dtype == torch.promote_types(dtype, torch.float32)
    assert_close_to_ref(rms, rms64(x, w32, 1e-6, "llama"), rms_norm_torch(x, w32, 1e-6, "llama"),
                        name=f"rms_norm n={n}")
    assert_close_to_ref(arms, rms64(s, w, 1e-6, "llama"), rms_norm_torch(s, w, 1e-6, "llama"),
                        name=f"add_rms_norm n={n}")
    keep = torch.arange(n) % 5 != 3  # a broadcast bool mask; with causal, row i sees keys <= i
    for causal in (False, True):
        xs = x.detach().requires_grad_()  # a view of x's memory: misaligned stays misaligned
        with pyllm.use_backend(EMU):
            p = P.masked_softmax(xs, keep, 0.7, causal)
            (dx,) = torch.autograd.grad(p, xs, r)
        x64 = x.detach().double().requires_grad_()
        p64 = softmax_torch(x64, keep, 0.7, causal)
        xb = x.detach().clone().requires_grad_()
        pb = sm_baseline(xb, keep, 0.7, causal)
        assert_close_to_ref(p, p64, pb, name=f"masked_softmax n={n} causal={causal}")
        assert_close_to_ref(dx, torch.autograd.grad(p64, x64, r.double())[0], torch.autograd.grad(pb, xb, r)[0],
                            mult=3.0, name=f"masked_softmax backward n={n} causal={causal}")
    # The dx backwards (register path: dy and x read once): layer_norm with weight and bias, rms_norm
    # with an fp32 weight (fp32 dy), add_rms_norm (dy in the dtype), each against fp64 autograd.
    # At n = 1 RMSNorm's dx is g * eps / (x^2 + eps)^1.5: with eps << x^2 every fp32 evaluation
    # (torch's too) is cancellation noise set by rstd's last bit, so there eps is 0.5 (well-conditioned).
    e = 0.5 if n == 1 else 1e-6
    grads = {}
    for name, fn in [("layer_norm", lambda t: P.layer_norm(t, (n,), w, b, eps=1e-5)),
                     ("rms_norm", lambda t: P.rms_norm(t, (n,), w32, e, style="llama")),
                     ("add_rms_norm", lambda t: P.add_rms_norm(t, r, (n,), w, e, style="llama")[0])]:
        xs = x.detach().requires_grad_()
        with pyllm.use_backend(EMU):
            y = fn(xs)
            dy = r.to(y.dtype) if y.dtype == dtype else r.float()
            grads[name] = (torch.autograd.grad(y, xs, dy)[0], dy)
    x64, xb = x.detach().double().requires_grad_(), x.detach().clone().requires_grad_()
    refs = {"layer_norm": (tF.layer_norm(x64, (n,), w.double(), b.double(), 1e-5), tF.layer_norm(xb, (n,), w, b, 1e-5)),
            "rms_norm": (rms_norm_torch(x64, w32.double(), e, "llama"), rms_norm_torch(xb, w32, e, "llama")),
            "add_rms_norm": (rms_norm_torch(x64 + r.double(), w.double(), e, "llama"),
                             rms_norm_torch(xb + r, w, e, "llama"))}
    for name, (dx, dy) in grads.items():
        y64, yb = refs[name]
        assert_close_to_ref(dx, torch.autograd.grad(y64, x64, dy.double(), retain_graph=True)[0],
                            torch.autograd.grad(yb, xb, dy.to(yb.dtype), retain_graph=True)[0], mult=3.0,
                            name=f"{name} backward n={n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("backend,lead,n", cases(
    [((1,), 97), ((2, 3, 4), 65), ((2, 2, 3, 5), 130)], [((2, 3), 33)],
    ids=lambda c: f"{'x'.join(map(str, c[0]))}x{c[1]}"))
def test_rms_norm_layouts(backend, lead, n, layout, dtype):
    x = make_input(lead + (n,), dtype, layout=layout, scale=3.0)
    w = make_input((n,), dtype, shift=1.0)
    with maybe_backend(backend):
        out = P.rms_norm(x, n, w, 1e-6)
    assert_close_to_ref(out, rms64(x, w, 1e-6), tF.rms_norm(x, (n,), w, 1e-6))


@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rms_norm_multi_dim_and_mixed(backend, dtype):
    x = make_input((3, 4, 6, 5), dtype, layout="transposed", scale=2.0)
    w = make_input((6, 5), dtype, shift=1.0)
    w32 = make_input((5,), torch.float32, shift=1.0)
    with maybe_backend(backend):
        out = P.rms_norm(x, (6, 5), w)
        mixed = P.rms_norm(x, 5, w32)
    assert_close_to_ref(out, tF.rms_norm(x.double(), (6, 5), w.double(), FP32_EPS), tF.rms_norm(x, (6, 5), w))
    assert mixed.dtype == dtype  # torch style: output in the input's dtype, like F.rms_norm
    assert_close_to_ref(mixed, tF.rms_norm(x.double(), (5,), w32.double(), FP32_EPS), tF.rms_norm(x, (5,), w32))


# --- Hugging Face RMSNorm variants: "llama", "t5", "gemma" styles reproduce them.
def _hf_module(style, n, wdtype):
    if style == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as M
    elif style == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm as M
    else:
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as M
    m = M(n, eps=1e-6).to(wdtype)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n) * 0.5 + (0.0 if style == "gemma" else 1.0))
    return m


HF_STYLES = ["llama", "t5", "gemma"]
HF_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


@pytest.mark.parametrize("dtypes", HF_DTYPES, ids=lambda d: f"x{dtype_id(d[0])}-w{dtype_id(d[1])}")
@pytest.mark.parametrize("style", HF_STYLES)
@pytest.mark.parametrize("backend,n", cases([(7,), (1023,), (4097,)], [(97,)]))
def test_rms_norm_reproduces_hugging_face(backend, n, style, dtypes):
    """Same output dtype as the HF module; bit-exact on the reference path (it performs the
    same fp32 operations in the same order as HF); native kernels sum in a different order,
    so they are held to a few-ulp bound instead (see below)."""
    xdtype, wdtype = dtypes
    m = _hf_module(style, n, wdtype)
    x = make_input((6, n), xdtype, scale=3.0)
    with torch.no_grad():
        want = m(x)
    with maybe_backend(backend):
        got = P.rms_norm(x, n, m.weight.detach(), m.variance_epsilon if style != "gemma" else m.eps, style=style)
        path = pyllm.explain("rms_norm")
    assert got.dtype == want.dtype and got.shape == want.shape
    if "reference" in path:
        assert torch.equal(got, want), f"reference path not bit-exact with HF {style}"
        return
    # Native/emulated: HF's result and ours come from the same fp32 pipeline except for
    # the order of the sum of squares, so rstd differs by a few fp32 ulps. Measured over
    # widths 7..20000 and 3 seeds: <= 4.0 fp32 ulps for fp32 outputs; for half outputs a
    # rounded value can flip by 1 ulp, which the weight multiply (|w| < 2) can carry to
    # 2 ulps of the output (measured max 2.0, on ~0.01% of elements). Bounds: 6 and 2 ulps.
    diff = (got.double() - want.double()).abs()
    ulps = diff / ulp_of(want)
    limit = 6.0 if want.dtype == torch.float32 else 2.0
    assert ulps.max().item() <= limit, f"{style}: {ulps.max().item():.2f} ulps from HF (limit {limit})"
    if want.dtype != torch.float32:  # nearly all equal: flips only at rounding ties
        assert (diff > 0).float().mean().item() < 0.01


@pytest.mark.parametrize("style", ["torch", "llama", "t5", "gemma"])
@pytest.mark.parametrize("backend,n", cases([(7,), (1023,)], [(97,)]))
def test_rms_norm_styles_vs_fp64(backend, n, style):
    """Each style in every dtype pair, against its library's formula in fp64 (F.rms_norm or the
    HF module's forward), judged by the same formula in the test dtypes (the HF module's own
    output, dtype included)."""
    for xdtype, wdtype in HF_DTYPES:
        x = make_input((4, n), xdtype, scale=2.0)
        w = make_input((n,), wdtype, shift=0.0 if style == "gemma" else 1.0)
        with maybe_backend(backend):
            got = P.rms_norm(x, n, w, 1e-6, style=style)
        assert_close_to_ref(got, rms64(x, w, 1e-6, style), rms_norm_torch(x, w, 1e-6, style),
                            name=f"rms_norm[{style}] x{xdtype} w{wdtype}")


# ----------------------------------------------------------------------------- masked softmax
def _mask(kind, shape, dtype):
    """Masks of every kind for scores of `shape` [B, H, Lq, Lk]."""
    B, H, Lq, Lk = shape
    keep_p = 0.7
    if kind == "none":
        return None
    if kind == "bool-full":
        return torch.rand(shape) < keep_p
    if kind == "bool-B11L":
        return torch.rand(B, 1, 1, Lk) < keep_p
    if kind == "bool-1HLL":
        return torch.rand(1, H, Lq, Lk) < keep_p
    if kind == "bool-L":
        return torch.rand(Lk) < keep_p
    if kind == "bool-expanded":  # stride-0 view
        return (torch.rand(B, 1, Lq, 1) < keep_p).expand(B, H, Lq, Lk)
    if kind == "bool-transposed":
        return (torch.rand(B, H, Lk, Lq) < keep_p).transpose(-1, -2)
    if kind.startswith("add-"):
        _, mdt, layout = kind.split("-")
        mdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[mdt]
        if layout == "full":
            return (torch.randn(shape) * 2).to(mdt)
        if layout == "B11L":
            m = torch.zeros(B, 1, 1, Lk)
            m[torch.rand(B, 1, 1, Lk) > keep_p] = float("-inf")
            return m.to(mdt)
        if layout == "sliced":
            return (torch.randn(B, H, Lq, 2 * Lk) * 2).to(mdt)[..., ::2]
        if layout == "L":
            return torch.randn(Lk).to(mdt)
    raise ValueError(kind)


MASK_KINDS = ["none", "bool-full", "bool-B11L", "bool-1HLL", "bool-L", "bool-expanded", "bool-transposed",
              "add-f32-full", "add-f16-B11L", "add-bf16-sliced", "add-f32-L", "add-f32-B11L"]


SM_SHAPES = [(2, 3, 5, 7), (2, 2, 3, 97), (1, 2, 2, 1023), (1, 1, 2, 4097), (1, 1, 2, 20000)]
SM_EMU_SHAPES = [(2, 2, 2, 7), (1, 2, 2, 97), (1, 1, 2, 1030)]
BIG_KINDS = ("none", "bool-B11L", "add-f32-full")  # widths >= 4097: a few kinds keep the suite fast


def _sm_cases():
    out = []
    for shape in SM_SHAPES:
        for kind in MASK_KINDS if shape[-1] < 4097 else BIG_KINDS:
            out.append(pytest.param(None, shape, kind, id=f"{'x'.join(map(str, shape))}-{kind}"))
    for shape in SM_EMU_SHAPES:
        for kind in MASK_KINDS:
            out.append(pytest.param(EMU, shape, kind, marks=pytest.mark.emulated,
                                    id=f"emu-{'x'.join(map(str, shape))}-{kind}"))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,shape,kind", _sm_cases())
def test_masked_softmax_forward(backend, shape, kind, dtype):
    x = make_input(shape, dtype, scale=3.0)
    mask = _mask(kind, shape, dtype)
    with maybe_backend(backend):
        out = P.masked_softmax(x, mask, scale=0.5)
    assert not out.isnan().any()
    assert_close_to_ref(out, sm_ref64(x, mask, 0.5, False), sm_baseline(x, mask, 0.5, False),
                        name=f"masked_softmax[{kind}]")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["none", "bool-B11L", "add-f32-full", "bool-1HLL"])
@pytest.mark.parametrize("backend,lq,lk", cases([(5, 5), (3, 9), (9, 3), (1, 1), (17, 1023)], [(5, 5), (3, 9)],
                                                 ids=lambda c: f"{c[0]}x{c[1]}"))
def test_masked_softmax_causal(backend, lq, lk, kind, dtype):
    """causal=True (top-left) alone and combined with masks; Lq != Lk both ways."""
    shape = (2, 2, lq, lk)
    x = make_input(shape, dtype, scale=3.0)
    mask = _mask(kind, shape, dtype)
    with maybe_backend(backend):
        out = P.masked_softmax(x, mask, 1.0, causal=True)
    assert not out.isnan().any()
    keep = keep_mask(lq, lk, causal=True)
    assert (out[..., ~keep] == 0).all(), "causal: a future key got probability"
    assert_close_to_ref(out, sm_ref64(x, mask, 1.0, True), sm_baseline(x, mask, 1.0, True))


def assert_rows_sum_to_one(p, n_visible):
    """Each row of probabilities `p` sums to 1 within what rounding allows: computed exactly (in
    fp64) from the output, sum_i p_i may differ from 1 by the rounding of each element to p's
    dtype (half an ulp each: sum_i ulp(p_i) / 2 <= eps / 2) plus the fp32 arithmetic before that
    rounding (recursive summation of the n visible terms and the division: n * eps32 / 2 + eps32,
    a worst-case bound). In bf16 at n = 1023 that is 0.0039 + 0.00006, where n * eps would be 8."""
    err = (p.double().sum(-1) - 1.0).abs()
    bound = (ulp_of(p) / 2).sum(-1) + (n_visible.double() / 2 + 1) * FP32_EPS
    assert (err <= bound).all(), f"row sums off by {err.tolist()} > bound {bound.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n", cases([(1,), (7,), (1023,)], [(7,), (1030,)]))
def test_masked_softmax_fully_masked_rows(backend, n, dtype):
    """Rows with every key masked give zeros, never NaN: bool masks, -inf additive masks
    (in every mask dtype), and causal + mask combinations."""
    x = make_input((4, n), dtype)
    keep = torch.rand(4, n) < 0.6
    keep[[0, 2], -1] = True  # rows 0 and 2 keep at least one key
    keep[1] = False
    keep[3] = False
    keep[3, 0] = True  # only the first key visible in row 3
    add = torch.zeros(4, n)
    add[~keep] = float("-inf")
    causal_keep = torch.ones(4, 4, n, dtype=torch.bool)
    causal_keep[:, :, 0] = False  # first key hidden: causal row 0 has nothing left
    with maybe_backend(backend):
        outs = [P.masked_softmax(x, keep), P.masked_softmax(x, add), P.masked_softmax(x, add.to(dtype), 2.0),
                P.masked_softmax(x.expand(4, 4, n), causal_keep, causal=True)]
    for o in outs[:3]:
        assert not o.isnan().any()
        assert (o[1] == 0).all()
        assert torch.equal(o[3, 0], torch.ones((), dtype=dtype)) and (o[3, 1:] == 0).all()
        assert_rows_sum_to_one(o[[0, 2, 3]], keep[[0, 2, 3]].sum(-1))
    assert_close_to_ref(outs[0], sm_ref64(x, keep, 1.0, False), sm_baseline(x, keep, 1.0, False))
    assert_close_to_ref(outs[1], sm_ref64(x, add, 1.0, False), sm_baseline(x, add, 1.0, False))
    last = outs[3]
    assert not last.isnan().any() and (last[:, 0] == 0).all()
    xe = x.expand(4, 4, n)
    assert_close_to_ref(last, sm_ref64(xe, causal_keep, 1.0, True), sm_baseline(xe, causal_keep, 1.0, True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_masked_softmax_noncontiguous_input_and_scales(backend, dtype):
    x = make_input((2, 3, 9, 13), dtype, layout="transposed", scale=2.0)
    x2 = make_input((2, 3, 9, 13), dtype, layout="sliced", scale=2.0)
    mask = _mask("bool-expanded", (2, 3, 9, 13), dtype)
    for inp in (x, x2):
        for scale in (1.0, 0.125, 3.0, -1.5, 2):
            with maybe_backend(backend):
                out = P.masked_softmax(inp, mask, scale)
            assert_close_to_ref(out, sm_ref64(inp, mask, scale, False), sm_baseline(inp, mask, scale, False))


@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_masked_softmax_low_rank_inputs(backend):
    """1-D input, 2-D input with a mask of the same rank, and a 3-D input with a [Lk] mask."""
    x1 = torch.randn(11)
    x2 = torch.randn(4, 11)
    m = torch.rand(11) < 0.5
    m[0] = True
    with maybe_backend(backend):
        o1 = P.masked_softmax(x1, m, 2.0)
        o2 = P.masked_softmax(x2, None, 1.0, causal=True)
        o3 = P.masked_softmax(x2.expand(3, 4, 11), m)
    assert_close_to_ref(o1, sm_ref64(x1, m, 2.0, False), sm_baseline(x1, m, 2.0, False))
    assert_close_to_ref(o2, sm_ref64(x2, None, 1.0, True), sm_baseline(x2, None, 1.0, True))
    x3 = x2.expand(3, 4, 11)
    assert_close_to_ref(o3, sm_ref64(x3, m, 1.0, False), sm_baseline(x3, m, 1.0, False))


def test_empty_inputs():
    for dt in DTYPES:
        x = torch.randn(0, 8, dtype=dt)
        assert P.layer_norm(x, 8).shape == (0, 8)
        assert P.add_layer_norm(x, x, 8)[1].shape == (0, 8)
        assert P.rms_norm(x, 8).shape == (0, 8)
        assert P.masked_softmax(x).shape == (0, 8)
        assert P.masked_softmax(torch.randn(2, 0, dtype=dt)).shape == (2, 0)


def test_float64_inputs_use_reference_and_match_torch():
    """fp64 has no kernel: the reference runs, and matches torch's fp64 result to the fp64 floor
    (no more precise oracle exists, so the floor alone judges)."""
    x = torch.randn(3, 17, dtype=torch.float64)
    w, b = torch.randn(17, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    assert_close_to_ref(P.layer_norm(x, 17, w, b), tF.layer_norm(x, (17,), w, b), None)
    assert "reference" in pyllm.explain("layer_norm")
    assert_close_to_ref(P.rms_norm(x, 17, w), tF.rms_norm(x, (17,), w), None)
    assert_close_to_ref(P.masked_softmax(x, None, 0.5), (x * 0.5).softmax(-1), None)


# ----------------------------------------------------------------------------- gradients
GRAD_WIDTHS = [(1, (2, 3)), (7, (3, 5)), (97, (2, 3)), (1023, (2, 2)), (4097, (2,))]
EMU_GRAD_WIDTHS = [(7, (2, 3)), (1030, (2,))]


def _check_grads(got, ref, base, names):
    for g, r, t, name in zip(got, ref, base, names):
        if r is None:
            assert g is None, f"{name}: unexpected gradient"
            continue
        assert g is not None and g.dtype == t.dtype, f"{name}: gradient missing or wrong dtype"
        assert_close_to_ref(g, r, t, mult=3.0, name=f"grad {name}")


@pytest.mark.parametrize("affine", AFFINE, ids=lambda a: f"w{int(a[0])}b{int(a[1])}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n,lead", cases(GRAD_WIDTHS, EMU_GRAD_WIDTHS))
def test_layer_norm_grads(backend, n, lead, dtype, affine):
    x = make_input(lead + (n,), dtype, scale=2.0, shift=0.5).requires_grad_()
    w = make_input((n,), dtype, shift=1.0).requires_grad_() if affine[0] else None
    b = make_input((n,), dtype).requires_grad_() if affine[1] else None
    gy = torch.randn(x.shape).to(dtype)
    ins = [x, w, b]
    with maybe_backend(backend):
        got = grads_of((P.layer_norm(x, n, w, b) * gy).sum(), ins)
    i64 = to64(*ins)
    ref = grads_of((tF.layer_norm(i64[0], (n,), i64[1], i64[2]) * gy.double()).sum(), i64)
    base = grads_of((tF.layer_norm(x, (n,), w, b) * gy).sum(), ins)
    _check_grads(got, ref, base, ["input", "weight", "bias"])


@pytest.mark.parametrize("use", ["both", "out", "summed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n,lead", cases(GRAD_WIDTHS[1:], EMU_GRAD_WIDTHS))
def test_add_layer_norm_grads(backend, n, lead, dtype, use):
    """Loss through both outputs (out and summed), or only one of them."""
    x = make_input(lead + (n,), dtype, scale=2.0).requires_grad_()
    r = make_input(lead + (n,), dtype).requires_grad_()
    w = make_input((n,), dtype, shift=1.0).requires_grad_()
    b = make_input((n,), dtype).requires_grad_()
    gy, gs = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)
    ins = [x, r, w, b]

    def loss(out, summed, cast=lambda t: t):
        terms = []
        if use in ("both", "out"):
            terms.append((out * cast(gy)).sum())
        if use in ("both", "summed"):
            terms.append((summed * cast(gs)).sum())
        return sum(terms)

    with maybe_backend(backend):
        got = grads_of(loss(*P.add_layer_norm(x, r, n, w, b)), ins)
    i64 = to64(*ins)
    s64 = i64[0] + i64[1]
    ref = grads_of(loss(tF.layer_norm(s64, (n,), i64[2], i64[3]), s64, lambda t: t.double()), i64)
    st = x + r
    base = grads_of(loss(tF.layer_norm(st, (n,), w, b), st), ins)
    if use == "summed":  # weight and bias get no gradient; torch reports None, so must we (or zeros)
        got = [g if g is None or i < 2 else (None if g.abs().max() == 0 else g) for i, g in enumerate(got)]
        ref, base = ref[:2] + [None, None], base[:2] + [None, None]
    _check_grads(got, ref, base, ["input", "residual", "weight", "bias"])


@pytest.mark.parametrize("style", ["torch", "llama", "t5", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n,lead", cases(GRAD_WIDTHS, EMU_GRAD_WIDTHS))
def test_rms_norm_grads(backend, n, lead, dtype, style):
    x = make_input(lead + (n,), dtype, scale=2.0, shift=0.3).requires_grad_()
    w = make_input((n,), dtype, shift=0.0 if style == "gemma" else 1.0).requires_grad_()
    ins = [x, w]
    od = rms_norm_torch(x.detach(), w.detach(), 1e-6, style).dtype  # the library's output dtype
    gy = torch.randn(x.shape).to(od)
    with maybe_backend(backend):
        got = grads_of((P.rms_norm(x, n, w, 1e-6, style=style) * gy).sum(), ins)
        got_nw = grads_of((P.rms_norm(x, n, None, 1e-6, style=style) * gy).sum(), [x])
    i64 = to64(*ins)
    # Oracle: the style's formula in fp64 (its casts are no-ops there); baseline: the same
    # formula in the test dtype (F.rms_norm, or the HF module's forward; casts are
    # straight-through for autograd).
    ref = grads_of((rms_norm_torch(i64[0], i64[1], 1e-6, style) * gy.double()).sum(), i64)
    ref_nw = grads_of((rms_norm_torch(i64[0], None, 1e-6, style) * gy.double()).sum(), [i64[0]])
    base = grads_of((rms_norm_torch(x, w, 1e-6, style) * gy).sum(), ins)
    base_nw = grads_of((rms_norm_torch(x, None, 1e-6, style) * gy).sum(), [x])
    _check_grads(got, ref, base, ["input", "weight"])
    _check_grads(got_nw, ref_nw, base_nw, ["input (no weight)"])


MASK_GRAD_SHAPES = [None, "full", "B11L", "1HLL", "L", "expanded"]


@pytest.mark.parametrize("mshape", MASK_GRAD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,shape", cases([((2, 3, 4, 7),), ((1, 2, 3, 1023),)], [((1, 2, 3, 7),)],
                                                ids=lambda c: "x".join(map(str, c[0]))))
def test_masked_softmax_grads(backend, shape, dtype, mshape):
    """Gradients for the input and for an additive mask that requires grad, including
    broadcast (reduced) and expanded masks; bool masks and causal rows get input grads."""
    B, H, Lq, Lk = shape
    x = make_input(shape, dtype, scale=2.0).requires_grad_()
    if mshape is None:
        mask = None
    elif mshape == "expanded":
        # a stride-0 view over batch and queries: its gradient sums dS over them. (A view over
        # keys, [B, 1, Lq, 1], would be a per-row constant, whose exact gradient is 0: only
        # rounding noise would be compared, pyllm's with torch's.)
        leaf = torch.randn(1, H, 1, Lk).to(dtype).requires_grad_()
        mask = leaf.expand(shape)
    else:
        s = {"full": shape, "B11L": (B, 1, 1, Lk), "1HLL": (1, H, Lq, Lk), "L": (Lk,)}[mshape]
        leaf = mask = torch.randn(s).to(dtype).requires_grad_()
    ins = [x] if mask is None else [x, leaf]
    gy = torch.randn(shape).to(dtype)
    with maybe_backend(backend):
        got = grads_of((P.masked_softmax(x, mask, 0.7) * gy).sum(), ins)
        xc = x.detach().requires_grad_()
        keep = torch.rand(shape) < 0.7
        got_c = grads_of((P.masked_softmax(xc, keep, 0.7, causal=True) * gy).sum(), [xc])
    i64 = to64(*ins)
    m64 = None if mask is None else (i64[1].expand(shape) if mshape == "expanded" else i64[1])
    ref = grads_of((softmax_torch(i64[0], m64, 0.7) * gy.double()).sum(), i64)
    base = grads_of((sm_baseline(x, mask, 0.7, False) * gy).sum(), ins)
    _check_grads(got, ref, base, ["input", "mask"])
    xc64 = to64(xc)[0]
    ref_c = grads_of((softmax_torch(xc64, keep, 0.7, True) * gy.double()).sum(), [xc64])
    base_c = grads_of((sm_baseline(xc, keep, 0.7, True) * gy).sum(), [xc])
    _check_grads(got_c, ref_c, base_c, ["input (bool + causal)"])


@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_masked_softmax_grads_fully_masked_rows_are_zero(backend):
    x = torch.randn(3, 6, requires_grad=True)
    add = torch.zeros(3, 6)
    add[1] = float("-inf")
    add.requires_grad_()
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[2] = False
    with maybe_backend(backend):
        gx, gm = torch.autograd.grad(P.masked_softmax(x, add).pow(2).sum(), [x, add])
        (gx2,) = torch.autograd.grad(P.masked_softmax(x, keep).pow(2).sum(), [x])
    for g in (gx, gm, gx2):
        assert torch.isfinite(g).all()
    assert (gx[1] == 0).all() and (gm[1] == 0).all() and (gx2[2] == 0).all()
    assert gx[0].abs().sum() > 0


@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_grads_mixed_dtype_params(backend):
    """bf16 input with fp32 weight/bias: parameter grads in fp32, input grad in bf16."""
    n = 97
    x = make_input((4, n), torch.bfloat16, scale=2.0).requires_grad_()
    w = make_input((n,), torch.float32, shift=1.0).requires_grad_()
    b = make_input((n,), torch.float32).requires_grad_()
    gy = torch.randn(4, n).to(torch.bfloat16)
    with maybe_backend(backend):
        got = grads_of((P.layer_norm(x, n, w, b) * gy).sum(), [x, w, b])
        got_r = grads_of((P.rms_norm(x, n, w) * gy).sum(), [x, w])
    i64 = to64(x, w, b)
    ref = grads_of((tF.layer_norm(i64[0], (n,), i64[1], i64[2]) * gy.double()).sum(), i64)
    base = grads_of((tF.layer_norm(x, (n,), w, b) * gy).sum(), [x, w, b])
    _check_grads(got, ref, base, ["input", "weight", "bias"])
    ref_r = grads_of((tF.rms_norm(i64[0], (n,), i64[1], FP32_EPS) * gy.double()).sum(), i64[:2])
    base_r = grads_of((tF.rms_norm(x, (n,), w) * gy).sum(), [x, w])
    _check_grads(got_r, ref_r, base_r, ["input", "weight"])


@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_multi_dim_normalized_shape_grads(backend):
    x = make_input((3, 4, 5), torch.float32, layout="transposed").requires_grad_()
    w = make_input((4, 5), torch.float32, shift=1.0).requires_grad_()
    b = make_input((4, 5), torch.float32).requires_grad_()
    gy = torch.randn(3, 4, 5)
    with maybe_backend(backend):
        got = grads_of((P.layer_norm(x, (4, 5), w, b) * gy).sum(), [x, w, b])
        got_r = grads_of((P.rms_norm(x, (4, 5), w) * gy).sum(), [x, w])
    i64 = to64(x, w, b)
    ref = grads_of((tF.layer_norm(i64[0], (4, 5), i64[1], i64[2]) * gy.double()).sum(), i64)
    base = grads_of((tF.layer_norm(x, (4, 5), w, b) * gy).sum(), [x, w, b])
    _check_grads(got, ref, base, ["input", "weight", "bias"])
    ref_r = grads_of((tF.rms_norm(i64[0], (4, 5), i64[1], FP32_EPS) * gy.double()).sum(), i64[:2])
    base_r = grads_of((tF.rms_norm(x, (4, 5), w) * gy).sum(), [x, w])
    _check_grads(got_r, ref_r, base_r, ["input", "weight"])


def test_gradcheck_fp64_reference_path():
    """fp64 goes through the reference; gradcheck keeps the autograd formulas honest."""
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    m = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: P.layer_norm(x, 6, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: P.rms_norm(x, 6, w, style="gemma"), (x, w))
    assert torch.autograd.gradcheck(lambda x, m: P.masked_softmax(x, m, 0.3), (x, m))
    assert torch.autograd.gradcheck(lambda x, r: P.add_layer_norm(x, r, 6, w, b), (x, x.detach().flip(0).requires_grad_()))


def test_math_sanity_independent_of_reference():
    """Properties that hold whatever the reference says: normalized rows have mean 0 and
    variance 1, RMS-normalized rows have mean square 1, softmax rows sum to 1 and are
    invariant to a per-row shift."""
    x = torch.randn(8, 257) * 5 + 3
    y = P.layer_norm(x, 257, eps=0.0)
    torch.testing.assert_close(y.mean(-1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)
    z = P.rms_norm(x, 257, eps=0.0)
    torch.testing.assert_close(z.square().mean(-1), torch.ones(8), atol=1e-5, rtol=0)
    p = P.masked_softmax(x)
    torch.testing.assert_close(p.sum(-1), torch.ones(8))
    torch.testing.assert_close(P.masked_softmax(x + torch.randn(8, 1) * 10), p, atol=1e-6, rtol=1e-5)
    assert math.isclose(P.masked_softmax(torch.tensor([0.0, math.log(3.0)]))[1].item(), 0.75, rel_tol=1e-6)


# ----------------------------------------------------------------------------- regressions
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend,n", cases([(129,), (1023,), (4097,)], [(129,), (1030,)]))
def test_layer_norm_large_mean_small_std(backend, n, dtype):
    """|mean| >> std: x - mean cancels, so the mean must be accurate to its last bit (the
    CPU kernel's fp32 sum was 2.5x worse than torch here; it now accumulates in fp64)."""
    x = make_input((4, n), dtype, scale=0.01, shift=5.0, seed=0)
    w, b = make_input((n,), dtype, shift=1.0), make_input((n,), dtype)
    r = make_input((4, n), dtype, scale=0.01, seed=1)
    with maybe_backend(backend):
        out = P.layer_norm(x, n, w, b)
        out2, summed = P.add_layer_norm(x, r, n, w, b)
    assert torch.equal(summed, x + r)
    assert_close_to_ref(out, ln64(x, n, w, b), tF.layer_norm(x, (n,), w, b))
    assert_close_to_ref(out2, ln64(x + r, n, w, b), tF.layer_norm(x + r, (n,), w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", [None, pytest.param(EMU, marks=pytest.mark.emulated)])
def test_layer_norm_width1_input_grad_is_exactly_zero(backend, dtype):
    """With one element per row the output is the bias whatever x is: dx must be exactly 0
    (FMA contraction in the backward once left rstd * rounding-error ~ 1e-5)."""
    x = (torch.randn(6, 1) * 0.01).to(dtype).requires_grad_()
    r = torch.randn(6, 1).to(dtype).requires_grad_()
    w = (torch.rand(1) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(1).to(dtype).requires_grad_()
    gy = torch.randn(6, 1).to(dtype)
    with maybe_backend(backend):
        gx, gw = torch.autograd.grad((P.layer_norm(x, 1, w, b) * gy).sum(), [x, w])
        o, s = P.add_layer_norm(x, r, 1, w, b)
        gx2, gr2 = torch.autograd.grad((o * gy).sum(), [x, r])
    assert (gx == 0).all() and (gx2 == 0).all() and (gr2 == 0).all() and (gw == 0).all()
