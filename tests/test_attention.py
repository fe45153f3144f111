"""Attention (pyllm.functional.scaled_dot_product_attention, torch.ops.pyllm.attention) and
pyllm.nn.MultiheadAttention.

Accuracy rule (tests/helpers.py, as FlashAttention's tests): pyllm's max error against an fp64
oracle must be at most 2x (outputs) or 3x (gradients) plain torch's own error in the same dtype,
with a floor of about an ulp. Oracle and baseline are torch's F.scaled_dot_product_attention with
every mask made explicit (helpers.attention_torch), in fp64 and in the test dtype; for
MultiheadAttention, torch.nn.MultiheadAttention in fp64 and in fp32. Never pyllm's reference.

The suite runs on whatever the session selects: the native kernels, the reference
(PYLLM_BACKEND=torch) or no extension at all (PYLLM_DISABLE_EXT=1); only the tests that call the
native op directly, or measure the kernel's memory, need the extension and are skipped without it.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyllm
import pyllm.functional as PF
from pyllm import _ext

from helpers import (assert_close_to_ref, assert_grads_close, attention_torch, expected_path, keep_mask,  # noqa: E402
                     maybe_backend)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_ext = pytest.mark.skipif(not _ext.HAS_C, reason=f"calls the native op torch.ops.pyllm.attention, "
                               f"which needs the extension ({_ext.C_ERROR})")


def torch_baseline(q, k, v, mask, causal, alignment, window, scale=None):
    """Plain torch SDPA in the inputs' dtype with every mask materialized (fully masked rows: 0)."""
    return attention_torch(q, k, v, mask, causal, alignment, window, scale)


def reference64(q, k, v, mask, causal, alignment, window, scale=None):
    """The same composition on fp64 copies: the oracle."""
    m = mask if (mask is None or mask.dtype == torch.bool) else mask.double()
    return attention_torch(q.double(), k.double(), v.double(), m, causal, alignment, window, scale)


def check_rule(ours, theirs, exact, what="", grad=False):
    """helpers.assert_close_to_ref: 2x torch's error for outputs, 3x for gradients."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite output"
    assert_close_to_ref(ours, exact, theirs, mult=3.0 if grad else 2.0, name=what)


def assert_session_path():
    """The attention call just made ran what this session claims (native kernel or reference)."""
    msg = pyllm.explain("scaled_dot_product_attention")
    if expected_path() == "native":
        assert "native CPU kernel" in msg, msg
    else:
        assert "reference (PyTorch)" in msg, msg


def make_mask(kind, b, hq, lq, lk, dtype, gen):
    if kind == "none":
        return None
    if kind == "bool_pad":  # [B,1,1,Lk] padding, every row keeps >= 1 key
        m = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        for i in range(b):
            m[i, ..., max(1, lk - 3 * i - 2):] = False
        return m
    if kind == "t5_bias_pad":  # additive [1,H,Lq,Lk] position bias + -inf padding per batch
        bias = torch.randn(1, hq, lq, lk, generator=gen, dtype=torch.float32).to(dtype)
        pad = torch.zeros(b, 1, 1, lk, dtype=dtype)
        pad[-1, ..., max(1, lk - 2):] = float("-inf")
        return bias + pad
    if kind == "alibi":  # -slope_h * |i - j|
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / hq) for h in range(hq)]).view(1, hq, 1, 1)
        dist = (torch.arange(lq).view(-1, 1) - torch.arange(lk).view(1, -1)).abs()
        return (-slopes * dist).to(dtype)
    if kind == "expanded":  # stride-0 view of a per-key bias
        return torch.randn(1, 1, 1, lk, generator=gen).to(dtype).expand(b, hq, lq, lk)
    if kind == "fully_masked":  # bool [B,H,Lq,Lk] with whole rows hidden
        m = torch.rand(b, hq, lq, lk, generator=gen) > 0.3
        m[..., ::3, :] = False
        return m
    raise ValueError(kind)


def make_qkv(b, hq, hkv, lq, lk, d, dtype, gen, noncontig=False, dv=None):
    dv = dv or d

    def t(h, l, dd):
        if noncontig:  # [B, L, H, D] storage viewed as [B, H, L, D]
            return torch.randn(b, l, h, dd, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, h, l, dd, generator=gen).to(dtype)

    return t(hq, lq, d), t(hkv, lk, d), t(hkv, lk, dv)


GEOMS = [(False, "top_left", None), (True, "top_left", None), (True, "bottom_right", None),
         (False, "top_left", (3, 0)), (False, "bottom_right", (5, 2))]
MASKS = ["none", "bool_pad", "t5_bias_pad", "alibi", "expanded", "fully_masked"]
# (B, Hq, Hkv, Lq, Lk, D)
SHAPES = [
    (2, 4, 4, 7, 7, 64),
    (1, 2, 2, 1, 97, 16),
    (2, 8, 2, 97, 128, 80),
    (1, 8, 1, 128, 97, 111),
    (1, 2, 2, 1025, 1025, 64),
    (2, 2, 2, 1, 1025, 128),
    (1, 4, 2, 16, 300, 256),
    (1, 3, 3, 97, 1, 96),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", MASKS)
def test_forward_grid(shape, mask_kind, dtype):
    b, hq, hkv, lq, lk, d = shape
    idx = SHAPES.index(shape) + MASKS.index(mask_kind)
    causal, alignment, window = GEOMS[idx % len(GEOMS)]
    gen = torch.Generator().manual_seed(idx)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, gen, noncontig=idx % 2 == 1)
    mask = make_mask(mask_kind, b, hq, lq, lk, dtype, gen)
    out = PF.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=hq != hkv,
                                          causal_alignment=alignment, sliding_window=window)
    assert_session_path()
    assert out.dtype == dtype and out.shape == (b, hq, lq, d)
    exact = reference64(q, k, v, mask, causal, alignment, window)
    theirs = torch_baseline(q, k, v, mask, causal, alignment, window)
    check_rule(out, theirs, exact, f"{shape} {mask_kind} {causal} {alignment} {window}")


def lse_torch(q, k, v, mask, causal, alignment, window, scale):
    """logsumexp of the masked scores with torch ops (GQA by repeat_interleave); -inf for a
    query with no visible key."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    s = (q @ k.transpose(-1, -2)) * scale
    keep = keep_mask(q.shape[-2], k.shape[-2], causal, alignment, window)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask if keep is None else mask & keep
        else:
            s = s + mask.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.logsumexp(s, -1)


@needs_ext
@pytest.mark.parametrize("causal,alignment,window", GEOMS)
def test_lse_and_fully_masked_rows(causal, alignment, window):
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 4, 2, 37, 53, 32, torch.float32, gen)
    mask = make_mask("fully_masked", 2, 4, 37, 53, torch.float32, gen)
    out, lse = torch.ops.pyllm.attention(q, k, v, mask, 0.3, causal, alignment == "bottom_right",
                                         *(window or (-1, -1)), 0.0, 0)
    r = reference64(q, k, v, mask, causal, alignment, window, scale=0.3)
    rl = lse_torch(q.double(), k.double(), v.double(), mask, causal, alignment, window, 0.3)
    hidden = torch.isinf(rl)
    assert hidden.any() and torch.equal(torch.isinf(lse), hidden)
    assert (out[hidden] == 0).all()
    base_lse = lse_torch(q, k, v, mask, causal, alignment, window, 0.3)
    assert_close_to_ref(lse[~hidden], rl[~hidden], base_lse[~hidden], name="lse")
    check_rule(out, torch_baseline(q, k, v, mask, causal, alignment, window, scale=0.3), r, "out")


def test_lq_ne_lk_and_window_geometry():
    # bottom-right alignment with Lq > Lk hides the first Lq - Lk queries entirely.
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(1, 2, 2, 9, 4, 16, torch.float32, gen)
    out = PF.scaled_dot_product_attention(q, k, v, is_causal=True, causal_alignment="bottom_right")
    assert (out[:, :, :5] == 0).all() and (out[:, :, 5:].abs() > 0).all()
    exact = reference64(q, k, v, None, True, "bottom_right", None)
    check_rule(out, torch_baseline(q, k, v, None, True, "bottom_right", None), exact, "bottom_right Lq > Lk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    # (B, Hq, Hkv, Lq, Lk, D, mask, causal, alignment, window)
    (2, 4, 4, 33, 45, 64, "none", False, "top_left", None),
    (1, 8, 2, 97, 130, 80, "bool_pad", True, "top_left", None),
    (2, 4, 1, 20, 700, 111, "t5_bias_pad", True, "bottom_right", None),
    (1, 2, 2, 150, 150, 32, "alibi", False, "top_left", (7, 3)),
    (2, 2, 2, 5, 600, 16, "fully_masked", False, "top_left", None),
])
def test_gradients(case, dtype):
    b, hq, hkv, lq, lk, d, mk, causal, alignment, window = case
    gen = torch.Generator().manual_seed(lq + lk)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, gen, noncontig=lq % 2 == 1)
    mask = make_mask(mk, b, hq, lq, lk, dtype, gen)
    grad_mask = mask is not None and mask.dtype != torch.bool
    go = torch.randn(b, hq, lq, d, generator=gen).to(dtype)

    def grads(fn, q, k, v, m):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        ml = m.detach().clone().requires_grad_() if grad_mask else m
        out = fn(*leaves, ml)
        out.backward(go.to(out.dtype))
        return [t.grad for t in leaves] + ([ml.grad] if grad_mask else [])

    ours = grads(lambda q, k, v, m: PF.scaled_dot_product_attention(
        q, k, v, m, is_causal=causal, enable_gqa=hq != hkv, causal_alignment=alignment, sliding_window=window),
        q, k, v, mask)
    theirs = grads(lambda q, k, v, m: torch_baseline(q, k, v, m, causal, alignment, window), q, k, v, mask)
    exact = grads(lambda q, k, v, m: reference64(q, k, v, m, causal, alignment, window),
                  q.double(), k.double(), v.double(), None if mask is None else (mask if mask.dtype == torch.bool else mask.double()))
    assert len(ours) == len(exact) == (4 if grad_mask else 3)
    for name, o, t, e in zip(["dq", "dk", "dv", "dmask"], ours, theirs, exact):
        assert o.shape == e.shape and o.dtype == dtype
        check_rule(o, t, e, f"{name} {case}", grad=True)


def _alibi_bias(slopes, lq, lk, shift):
    """ALiBi written out for the oracle: -slope * |i + shift - j|, [*slopes.shape, lq, lk] in fp64."""
    i = torch.arange(lq, dtype=torch.float64)[:, None] + shift
    return -slopes.double()[..., None, None] * (i - torch.arange(lk, dtype=torch.float64)[None, :]).abs()


ALIBI_BACKENDS = [pytest.param(None, id="session"), pytest.param(
    "cuda-emulated", id="emulated", marks=[pytest.mark.emulated, pytest.mark.skipif(
        not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")])]


@pytest.mark.parametrize("backend", ALIBI_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [
    # (B, Hq, Hkv, Lq, Lk, D, slopes per batch, causal, alignment, window, bool padding)
    (2, 4, 2, 33, 45, 64, False, True, "bottom_right", None, False),
    (2, 2, 2, 97, 97, 32, True, False, "top_left", None, True),
    (1, 8, 1, 1, 130, 80, False, False, "bottom_right", (40, 0), False),
    (3, 3, 3, 7, 7, 16, True, True, "top_left", None, True),
])
def test_alibi_slopes(backend, case, dtype):
    b, hq, hkv, lq, lk, d, per_batch, causal, alignment, window, pad = case
    if backend == "cuda-emulated" and lq * lk > 5000:
        lq, lk = min(lq, 40), min(lk, 45)
    gen = torch.Generator().manual_seed(hq * 7 + lq)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, gen, noncontig=lq % 2 == 1)
    slopes = torch.rand(b, hq, generator=gen) if per_batch else 2.0 ** -torch.arange(1, hq + 1.0)
    keep = make_mask("bool_pad", b, hq, lq, lk, dtype, gen) if pad else None
    shift = lk - lq if alignment == "bottom_right" else 0
    bias = _alibi_bias(slopes, lq, lk, shift)
    bias = bias if per_batch else bias.unsqueeze(0)
    if keep is not None:
        bias = bias.masked_fill(~keep, float("-inf"))
    go = torch.randn(b, hq, lq, d, generator=gen).to(dtype)

    def run(fn, q, k, v):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [out.detach()] + list(torch.autograd.grad(out, leaves, go.to(out.dtype)))

    with maybe_backend(backend):
        ours = run(lambda q, k, v: PF.scaled_dot_product_attention(
            q, k, v, keep, is_causal=causal, enable_gqa=hq != hkv, causal_alignment=alignment,
            sliding_window=window, alibi_slopes=slopes), q, k, v)
    if backend == "cuda-emulated":
        assert pyllm.last_decision("scaled_dot_product_attention").path == "cuda-emulated"
    theirs = run(lambda q, k, v: torch_baseline(q, k, v, bias, causal, alignment, window), q, k, v)
    exact = run(lambda q, k, v: reference64(q, k, v, bias, causal, alignment, window), q.double(), k.double(),
                v.double())
    for name, o, t, e in zip(["out", "dq", "dk", "dv"], ours, theirs, exact):
        check_rule(o, t, e, f"alibi {name} {case}", grad=name != "out")
    no_alibi = PF.scaled_dot_product_attention(q.float(), k.float(), v.float(), keep, is_causal=causal,
                                               enable_gqa=hq != hkv, causal_alignment=alignment, sliding_window=window)
    assert (no_alibi.double() - exact[0]).abs().max() > 1e-2  # the slopes matter in this case


def test_mask_grad_broadcast_shapes():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(2, 3, 3, 11, 13, 16, torch.float32, gen)
    for shape in [(13,), (1, 3, 1, 13), (2, 1, 11, 13), (11, 13)]:
        m = torch.randn(shape, generator=gen, requires_grad=True)
        PF.scaled_dot_product_attention(q, k, v, m).sum().backward()
        md = m.detach().double().requires_grad_()
        reference64(q, k, v, md, False, "top_left", None).sum().backward()
        mb = m.detach().clone().requires_grad_()
        torch_baseline(q, k, v, mb, False, "top_left", None).sum().backward()
        assert m.grad.shape == m.shape
        check_rule(m.grad, mb.grad, md.grad, f"dmask {shape}", grad=True)


def test_leading_dims_and_3d():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 4, 9, 16, generator=gen)
    k = torch.randn(2, 3, 4, 11, 16, generator=gen)
    v = torch.randn(2, 3, 4, 11, 8, generator=gen)
    m = torch.rand(3, 1, 9, 11, generator=gen) > 0.2
    m[..., 0] = True  # every query keeps a key
    out = PF.scaled_dot_product_attention(q, k, v, m)
    assert out.shape == (2, 3, 4, 9, 8)
    check_rule(out, torch_baseline(q, k, v, m, False, "top_left", None),
               reference64(q, k, v, m, False, "top_left", None), "5-D")
    out3 = PF.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0], m[0, 0])
    assert out3.shape == (4, 9, 8)
    check_rule(out3, torch_baseline(q[0, 0], k[0, 0], v[0, 0], m[0, 0], False, "top_left", None),
               reference64(q[0, 0], k[0, 0], v[0, 0], m[0, 0], False, "top_left", None), "3-D")


def test_dropout_statistics_and_consistency():
    # q = 0: uniform probabilities 1/Lk; v = I: out = P * Z / (1 - p) exposes the mask Z.
    p, lk = 0.3, 64
    q = torch.zeros(2, 4, 32, 16)
    k = torch.randn(2, 4, lk, 16)
    eye = torch.eye(lk).expand(2, 4, lk, lk)
    torch.manual_seed(123)
    w = PF.scaled_dot_product_attention(q, k, eye, dropout_p=p)
    z = w != 0
    dropped = 1 - z.float().mean().item()
    assert abs(dropped - p) < 0.02, dropped  # 16384 draws: 4.6 sigma
    assert torch.allclose(w[z], torch.full_like(w[z], 1 / (lk * (1 - p))))
    v = torch.randn(2, 4, lk, 16)
    torch.manual_seed(7)
    mean = PF.scaled_dot_product_attention(q, k, torch.ones(2, 4, lk, 16), dropout_p=p).mean().item()
    assert abs(mean - 1.0) < 0.02
    # Same seed -> same mask in forward and backward: gradients equal an explicit-mask reference.
    qr = torch.randn(2, 4, 32, 16)
    torch.manual_seed(123)
    w2 = PF.scaled_dot_product_attention(torch.zeros_like(qr), k, eye, dropout_p=p)
    assert torch.equal(w2 != 0, z)
    leaves = [t.clone().requires_grad_() for t in (qr, k, v)]
    torch.manual_seed(123)
    out = PF.scaled_dot_product_attention(*leaves, dropout_p=p)
    go = torch.randn_like(out)
    out.backward(go)

    def explicit(q, k, v):  # torch: softmax, then the mask Z seen above, scaled by 1 / (1 - p)
        return (torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) * z / (1 - p)) @ v

    qd, kd, vd = [t.double().requires_grad_() for t in (qr, k, v)]
    rout = explicit(qd, kd, vd)
    rout.backward(go.double())
    qb, kb, vb = [t.clone().requires_grad_() for t in (qr, k, v)]
    bout = explicit(qb, kb, vb)
    bout.backward(go)
    check_rule(out, bout, rout, "dropout out")
    for name, a, b_, c in zip(["dq", "dk", "dv"], leaves, (qd, kd, vd), (qb, kb, vb)):
        check_rule(a.grad, c.grad, b_.grad, f"dropout {name}", grad=True)


def _opcheck_args():
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(2, 4, 2, 9, 12, 16, torch.float32, gen)
    fm = torch.randn(1, 4, 9, 12, generator=gen, requires_grad=True)
    bm = torch.rand(2, 1, 1, 12, generator=gen) > 0.3
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    return [
        (q, k, v, None, 0.25, False, False, -1, -1, 0.0, 0),
        (qg, kg, vg, bm, 0.25, True, True, 4, -1, 0.0, 0),
        (qg, kg, vg, fm, 0.25, False, False, -1, -1, 0.0, 0),
        (qg.half(), kg.half(), vg.half(), None, 0.25, True, False, -1, 2, 0.0, 0),
    ]


@needs_ext
@pytest.mark.parametrize("i", range(4))
def test_opcheck(i):
    torch.library.opcheck(torch.ops.pyllm.attention.default, _opcheck_args()[i])


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def forward(self, q, k, v, m):
            return PF.scaled_dot_product_attention(q, k, v, m, is_causal=False, enable_gqa=True,
                                                   sliding_window=(4, 4)) * 2

    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(1, 4, 2, 17, 17, 32, torch.float32, gen)
    m = torch.rand(1, 1, 1, 17, generator=gen) > 0.2
    mod = Block()
    torch._dynamo.reset()
    cmod = torch.compile(mod, fullgraph=True, backend="aot_eager")
    qg = q.clone().requires_grad_()
    out = cmod(qg, k, v, m)
    out.sum().backward()
    qe = q.clone().requires_grad_()
    eo = mod(qe, k, v, m)
    eo.sum().backward()
    assert torch.equal(out, eo) and torch.allclose(qg.grad, qe.grad, atol=1e-6)


@pytest.mark.skipif(expected_path() != "native", reason="measures the native kernel's memory; the reference "
                    "materializes the 2 GiB of scores by design")
def test_memory_long_sequence():
    """Lq = Lk = 8192, B1 H8 D64 fp32: the scores alone would be 2 GiB. The child process
    reports the rise of its peak RSS (ru_maxrss) over the forward call: the kernel's real
    extra memory (outputs, fp32 staging, per-thread blocks), nothing hidden."""
    code = textwrap.dedent("""
        import resource, torch, pyllm.functional as PF
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, 8192, 64, generator=g) for _ in range(3))
        PF.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # warm up threads
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = PF.scaled_dot_product_attention(q, k, v)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(out).all()
        print((after - before) * 1024)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    extra = int(res.stdout.strip().splitlines()[-1])
    assert extra < 128 * 2**20, f"forward raised peak RSS by {extra / 2**20:.0f} MiB"


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: PF.scaled_dot_product_attention(q, k[..., :8], v), "head dims differ"),
    (lambda q, k, v: PF.scaled_dot_product_attention(q, k[:, :3], v[:, :3], enable_gqa=True), "multiple"),
    (lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, torch.ones(4, 5, dtype=torch.bool)), "broadcastable"),
    (lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, torch.ones(1, 5, dtype=torch.int64)), "attn_mask must be"),
    (lambda q, k, v: PF.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]), "rank"),
    (lambda q, k, v: PF.scaled_dot_product_attention(q, k.to("meta"), v), "key is on meta"),
    (lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, sliding_window=3), "sliding_window"),
    (lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, causal_alignment="middle"), "causal_alignment"),
])
def test_bad_inputs(bad, match):
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(q, k, v)


@needs_ext
def test_op_level_errors():
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(RuntimeError, match="multiple of key/value heads"):
        torch.ops.pyllm.attention(q, q[:, :3], q[:, :3], None, 1.0, False, False, -1, -1, 0.0, 0)
    with pytest.raises(RuntimeError, match="4-D"):
        torch.ops.pyllm.attention(q[0], q[0], q[0], None, 1.0, False, False, -1, -1, 0.0, 0)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
       lq=st.integers(1, 70), lk=st.integers(1, 600), d=st.sampled_from([8, 16, 33, 64, 96]),
       geom=st.sampled_from(GEOMS), mask_kind=st.sampled_from(["none", "bool_pad", "alibi", "fully_masked"]),
       seed=st.integers(0, 2**16))
def test_property_matches_torch(b, hkv, group, lq, lk, d, geom, mask_kind, seed):
    causal, alignment, window = geom
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, torch.float32, gen)
    mask = make_mask(mask_kind, b, hq, lq, lk, torch.float32, gen)
    out = PF.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True,
                                          causal_alignment=alignment, sliding_window=window)
    exact = reference64(q, k, v, mask, causal, alignment, window)
    check_rule(out, torch_baseline(q, k, v, mask, causal, alignment, window), exact, "property")


# ------------------------------------------------------------------ MultiheadAttention
# Oracle: torch.nn.MultiheadAttention with the same weights in fp64; baseline: it in fp32.
def _f64(m):
    return m.double() if (m is not None and m.is_floating_point()) else m


def _mha_pair(**kw):
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(**kw)
    p = pyllm.nn.MultiheadAttention(**kw)
    assert isinstance(p, torch.nn.MultiheadAttention)
    assert p.state_dict().keys() == t.state_dict().keys()
    p.load_state_dict(t.state_dict())
    return t.eval(), p.eval()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kv_dim", [None, 12])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "kpm_bool", "both_bool", "kpm_float_am_float", "3d"])
def test_mha_parity(batch_first, kv_dim, need_weights, average, masks):
    E, H, N, L, S = 32, 4, 3, 6, 9
    t, p = _mha_pair(embed_dim=E, num_heads=H, batch_first=batch_first, kdim=kv_dim, vdim=kv_dim, bias=True)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(N, L, E, generator=g)
    k = torch.randn(N, S, kv_dim or E, generator=g)
    v = torch.randn(N, S, kv_dim or E, generator=g)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    am = kpm = None
    kpm_b = torch.zeros(N, S, dtype=torch.bool)
    kpm_b[0, 6:] = True
    kpm_b[2, 2:4] = True
    if masks == "bool":
        am = torch.rand(L, S, generator=g) > 0.7
        am[:, 0] = False
    elif masks == "float":
        am = torch.randn(L, S, generator=g)
    elif masks == "kpm_bool":
        kpm = kpm_b
    elif masks == "both_bool":
        am, kpm = torch.triu(torch.ones(L, S, dtype=torch.bool), 1), kpm_b
    elif masks == "kpm_float_am_float":
        am, kpm = torch.randn(L, S, generator=g), torch.zeros(N, S).masked_fill(kpm_b, float("-inf"))
    elif masks == "3d":
        am = torch.randn(N * H, L, S, generator=g)
    kw = dict(key_padding_mask=kpm, need_weights=need_weights, attn_mask=am, average_attn_weights=average)
    to, tw = t(q, k, v, **kw)
    po, pw = p(q, k, v, **kw)
    kw64 = dict(kw, key_padding_mask=_f64(kpm), attn_mask=_f64(am))
    ro, rw = copy.deepcopy(t).double()(q.double(), k.double(), v.double(), **kw64)
    assert_close_to_ref(po, ro, to, name=f"MHA out {masks}")
    if need_weights:
        assert_close_to_ref(pw, rw, tw, name=f"MHA weights {masks}")
    else:
        assert pw is None and tw is None


def test_mha_unbatched_causal_and_grad():
    E, H, L = 16, 2, 7
    t, p = _mha_pair(embed_dim=E, num_heads=H)
    t64 = copy.deepcopy(t).double()
    x = torch.randn(L, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    to, _ = t(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    xp = x.clone().requires_grad_()
    po, _ = p(xp, xp, xp, attn_mask=causal, is_causal=True, need_weights=False)
    x64 = x.double().requires_grad_()
    ro, _ = t64(x64, x64, x64, attn_mask=causal.double(), is_causal=True, need_weights=False)
    assert_close_to_ref(po, ro, to, name="unbatched causal MHA")
    go = torch.randn(L, E)
    po.backward(go)
    ro.backward(go.double())
    xt = x.clone().requires_grad_()
    t(xt, xt, xt, attn_mask=causal, need_weights=False)[0].backward(go)
    assert_close_to_ref(xp.grad, x64.grad, xt.grad, mult=3.0, name="unbatched causal MHA dx")
    names = [n for n, _ in p.named_parameters()]
    assert names == [n for n, _ in t64.named_parameters()]
    assert_grads_close([q.grad for q in p.parameters()], [q.grad for q in t64.parameters()],
                       [q.grad for q in t.parameters()], names=[f"MHA grad {n}" for n in names])


def test_mha_delegates_bias_kv_and_zero_attn():
    t, p = _mha_pair(embed_dim=16, num_heads=2, add_bias_kv=True, add_zero_attn=True)
    x = torch.randn(5, 2, 16)
    a, b = t(x, x, x), p(x, x, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------ CUDA kernels, emulated
EMU_CASES = [
    # (dtype, B, Hq, Hkv, Lq, Lk, D, Dv, mask, causal, alignment, window)
    (torch.float32, 2, 4, 2, 5, 37, 16, 16, "none", False, "top_left", None),
    (torch.float32, 1, 2, 2, 9, 40, 40, 24, "t5_bias_pad", True, "bottom_right", None),
    (torch.float32, 2, 2, 1, 7, 33, 32, 32, "fully_masked", False, "top_left", (3, 1)),
    (torch.float16, 1, 2, 2, 6, 20, 64, 64, "bool_pad", True, "top_left", None),
    (torch.bfloat16, 1, 2, 1, 3, 18, 200, 130, "alibi", False, "top_left", (2, 2)),
]


@pytest.mark.emulated
@pytest.mark.skipif(not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[8]}")
def test_cuda_kernels_emulated(case):
    dtype, b, hq, hkv, lq, lk, d, dv, mk, causal, alignment, window = case
    gen = torch.Generator().manual_seed(lq * lk)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, gen, noncontig=lq % 2 == 1, dv=dv)
    mask = make_mask(mk, b, hq, lq, lk, dtype, gen)
    grad_mask = mask is not None and mask.dtype != torch.bool
    go = torch.randn(b, hq, lq, dv, generator=gen).to(dtype)

    def run(fn, q, k, v, m):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        ml = m.detach().clone().requires_grad_() if grad_mask else m
        out = fn(*leaves, ml)
        out.backward(go.to(out.dtype))
        return [out] + [t.grad for t in leaves] + ([ml.grad] if grad_mask else [])

    def ours_fn(q, k, v, m):
        with pyllm.use_backend("cuda-emulated"):
            out = PF.scaled_dot_product_attention(q, k, v, m, is_causal=causal, enable_gqa=hq != hkv,
                                                  causal_alignment=alignment, sliding_window=window)
            assert "CUDA kernel under the CPU emulation" in pyllm.explain("scaled_dot_product_attention")
            return out

    with pyllm.use_backend("cuda-emulated"):
        ours = run(ours_fn, q, k, v, mask)
    theirs = run(lambda q, k, v, m: torch_baseline(q, k, v, m, causal, alignment, window), q, k, v, mask)
    m64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    exact = run(lambda q, k, v, m: reference64(q, k, v, m, causal, alignment, window),
                q.double(), k.double(), v.double(), m64)
    for name, o, t, e in zip(["out", "dq", "dk", "dv", "dmask"], ours, theirs, exact):
        assert o.shape == e.shape
        check_rule(o, t, e, f"emulated {name} {case}", grad=name != "out")


@pytest.mark.emulated
@needs_ext
@pytest.mark.skipif(not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")
def test_cuda_kernel_emulated_dropout_matches_cpu_mask():
    # The counter-based mask is the same function on CPU and GPU: same seed, same output.
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 2, 6, 40, 16, torch.float32, g)
    outs = []
    for backend in ("native", "cuda-emulated"):
        with pyllm.use_backend(backend):
            torch.manual_seed(11)
            outs.append(PF.scaled_dot_product_attention(q, k, v, dropout_p=0.25))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
