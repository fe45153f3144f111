"""Hypothesis property tests: random shapes, layouts, dtypes, masks, scales against an fp64
oracle with the FlashAttention-style rule (tests/helpers.py). Oracle and baseline are torch
compositions (F.layer_norm, F.rms_norm or the Hugging Face RMSNorm formulas, the masked softmax
chain) in fp64 and in the test dtype, never pyllm's reference. The profile (conftest.py) keeps
them modest: 25 derandomized examples each, no deadline."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tF

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyllm import functional as P  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")

from helpers import assert_close_to_ref, grads_of, make_input, rms_norm_torch, softmax_torch, to64  # noqa: E402

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
WIDTH = st.one_of(st.integers(1, 40), st.integers(41, 700), st.sampled_from([1023, 1024, 1025, 2049]))
LEAD = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
LAYOUT = st.sampled_from(["contiguous", "transposed", "sliced"])


def _input(data, shape, dtype, layout):
    if layout == "transposed" and len(shape) < 2:
        layout = "contiguous"
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    scale = data.draw(st.sampled_from([0.01, 1.0, 30.0]), label="scale")
    shift = data.draw(st.sampled_from([0.0, 5.0]), label="shift")
    return make_input(shape, dtype, layout=layout, seed=seed, scale=scale, shift=shift)


@given(data=st.data(), lead=LEAD, n=WIDTH, dtype=DTYPES, layout=LAYOUT,
       affine=st.tuples(st.booleans(), st.booleans()), eps=st.sampled_from([1e-5, 1e-6, 1e-2]))
def test_layer_norm_property(data, lead, n, dtype, layout, affine, eps):
    x = _input(data, lead + (n,), dtype, layout)
    w = make_input((n,), dtype, shift=1.0) if affine[0] else None
    b = make_input((n,), dtype) if affine[1] else None
    out = P.layer_norm(x, n, w, b, eps)
    x64, w64, b64 = to64(x, w, b)
    assert_close_to_ref(out, tF.layer_norm(x64, (n,), w64, b64, eps), tF.layer_norm(x, (n,), w, b, eps))


@given(data=st.data(), lead=LEAD, n=WIDTH, dtype=DTYPES, layout=LAYOUT)
def test_add_layer_norm_property(data, lead, n, dtype, layout):
    x = _input(data, lead + (n,), dtype, layout)
    r = _input(data, lead + (n,), dtype, "contiguous")
    w, b = make_input((n,), dtype, shift=1.0), make_input((n,), dtype)
    out, summed = P.add_layer_norm(x, r, n, w, b)
    s = x + r
    assert torch.equal(summed, s)
    s64, w64, b64 = to64(s, w, b)
    assert_close_to_ref(out, tF.layer_norm(s64, (n,), w64, b64), tF.layer_norm(s, (n,), w, b))


@given(data=st.data(), lead=LEAD, n=WIDTH, dtype=DTYPES, layout=LAYOUT,
       style=st.sampled_from(["torch", "llama", "t5", "gemma"]), wdtype=st.sampled_from(["same", "fp32", None]))
def test_rms_norm_property(data, lead, n, dtype, layout, style, wdtype):
    x = _input(data, lead + (n,), dtype, layout)
    wdt = {"same": dtype, "fp32": torch.float32, None: None}[wdtype]
    w = None if wdt is None else make_input((n,), wdt, shift=0.0 if style == "gemma" else 1.0)
    out = P.rms_norm(x, n, w, 1e-6, style=style)
    ref = rms_norm_torch(*to64(x, w), 1e-6, style)
    base = rms_norm_torch(x, w, 1e-6, style)  # F.rms_norm or the HF module's forward, dtype included
    assert_close_to_ref(out, ref, base)


@given(data=st.data(), lead=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
       lq=st.integers(1, 9), lk=st.one_of(st.integers(1, 40), st.sampled_from([257, 1100])), dtype=DTYPES,
       layout=LAYOUT, kind=st.sampled_from(["none", "bool", "add-f32", "add-same", "add-ninf"]),
       causal=st.booleans(), scale=st.sampled_from([1.0, 0.125, 2.5, -0.7]))
def test_masked_softmax_property(data, lead, lq, lk, dtype, layout, kind, causal, scale):
    shape = lead + (lq, lk)
    x = _input(data, shape, dtype, layout)
    # mask shape: each dim is either kept or broadcast (1), and leading dims may be dropped
    keep_dims = data.draw(st.lists(st.booleans(), min_size=len(shape), max_size=len(shape)), label="keep_dims")
    mshape = tuple(s if k else 1 for s, k in zip(shape, keep_dims))
    drop = data.draw(st.integers(0, len(shape) - 1), label="drop")
    if all(d == 1 for d in mshape[:drop]):
        mshape = mshape[drop:]
    expand = data.draw(st.booleans(), label="expand")
    if kind == "none":
        mask = None
    elif kind == "bool":
        mask = torch.rand(mshape) < data.draw(st.sampled_from([0.0, 0.3, 0.9]), label="p_keep")
    else:
        mdt = {"add-f32": torch.float32, "add-same": dtype, "add-ninf": dtype}[kind]
        mask = torch.randn(mshape) * 3
        if kind == "add-ninf":
            mask = mask.masked_fill(torch.rand(mshape) < 0.5, float("-inf"))
        mask = mask.to(mdt)
    if mask is not None and expand:
        mask = mask.expand(shape)  # stride-0 view
    out = P.masked_softmax(x, mask, scale, causal)
    assert not out.isnan().any()
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    ref = softmax_torch(x.double(), m64, scale, causal)
    assert_close_to_ref(out, ref, softmax_torch(x, mask, scale, causal))


@given(data=st.data(), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple),
       n=st.integers(1, 300), dtype=DTYPES, op=st.sampled_from(["ln", "rms", "sm"]))
def test_grads_property(data, lead, n, dtype, op):
    x = _input(data, lead + (n,), dtype, "contiguous").requires_grad_()
    w = make_input((n,), dtype, shift=1.0).requires_grad_()
    b = make_input((n,), dtype).requires_grad_()
    gy = torch.randn(x.shape).to(dtype)
    if op == "ln":
        ins = [x, w, b]
        got = grads_of((P.layer_norm(x, n, w, b) * gy).sum(), ins)
        i64 = to64(*ins)
        ref = grads_of((tF.layer_norm(i64[0], (n,), i64[1], i64[2]) * gy.double()).sum(), i64)
        base = grads_of((tF.layer_norm(x, (n,), w, b) * gy).sum(), ins)
    elif op == "rms":
        ins = [x, w]
        got = grads_of((P.rms_norm(x, n, w, 1e-6) * gy).sum(), ins)
        i64 = to64(*ins)
        ref = grads_of((tF.rms_norm(i64[0], (n,), i64[1], 1e-6) * gy.double()).sum(), i64)
        base = grads_of((tF.rms_norm(x, (n,), w, 1e-6) * gy).sum(), ins)
    else:
        m = torch.randn(n).to(dtype).requires_grad_()
        ins = [x, m]
        got = grads_of((P.masked_softmax(x, m, 0.5) * gy).sum(), ins)
        i64 = to64(*ins)
        ref = grads_of((softmax_torch(i64[0], i64[1], 0.5) * gy.double()).sum(), i64)
        base = grads_of((softmax_torch(x, m, 0.5) * gy).sum(), ins)
    for g, r, t in zip(got, ref, base):
        assert_close_to_ref(g, r, t, mult=3.0, name="grad")
