"""The tensor-core attention forward (csrc/cuda/attention_tc.cu) under the CUDA emulation.

fp16/bf16 CUDA attention with head dims <= 256 runs this kernel (``PYLLM_ATTENTION_KERNEL=simt``
keeps the SIMT kernel). Every case is judged by the shared rule (pyllm.testing): error against an
fp64 oracle at most 2x torch's own error in the same dtype. Each case also checks that the kernel
really ran (ldmatrix phases counted by the emulator) without a shared-memory bank conflict.
The Makefile runs this file twice: emulated blocks in forward order, then in a random order.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import pyllm
import pyllm.functional as PF
from pyllm import _ext

from helpers import assert_close_to_ref, attention_torch, keep_mask

pytestmark = [
    pytest.mark.emulated,
    pytest.mark.skipif(not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})"),
]

HALF = [torch.float16, torch.bfloat16]


def emu():
    import pyllm._C_emu as m

    return m


def run_tc(q, k, v, mask=None, scale=None, causal=False, bottom_right=False, window=(-1, -1), dropout_p=0.0,
           seed=0, alibi=None):
    """torch.ops.pyllm_emu.attention with the bank-conflict counter read around it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    emu().ldmatrix_bank_stats(True)
    out, lse = torch.ops.pyllm_emu.attention(q, k, v, mask, scale, causal, bottom_right, window[0], window[1],
                                             dropout_p, seed, alibi)
    phases, extra = emu().ldmatrix_bank_stats(True)
    assert phases > 0, "the tensor-core kernel did not run (no ldmatrix)"
    assert extra == 0, f"{extra} extra shared-memory wavefronts from ldmatrix bank conflicts ({phases} phases)"
    return out, lse


def oracle(q, k, v, mask, causal, alignment, window, scale):
    """(fp64 output, fp64 lse, torch's same-dtype output) with every mask made explicit."""
    lq, lk = q.shape[-2], k.shape[-2]
    keep = keep_mask(lq, lk, causal, alignment, window)
    group = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = (q.double() @ k64.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    dead = (s == -math.inf).all(-1, keepdim=True)
    p = s.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, -1)
    return p @ v64, lse, attention_torch(q, k, v, mask, causal, alignment, window, scale)


def check(q, k, v, mask=None, causal=False, alignment="top_left", window=None, what=""):
    scale = q.shape[-1] ** -0.5
    w = window or (-1, -1)
    out, lse = run_tc(q, k, v, mask, scale, causal, alignment == "bottom_right", w)
    ref, lref, base = oracle(q, k, v, mask, causal, alignment, window, scale)
    assert out.dtype == q.dtype and out.is_contiguous()
    assert_close_to_ref(out, ref, base, mult=2.0, name=f"out {what}")
    # lse (fp32): a few fp32 ulps of its magnitude, -inf exactly on fully hidden rows.
    assert torch.equal(torch.isinf(lse), torch.isinf(lref)), f"lse -inf placement {what}"
    fin = torch.isfinite(lref)
    if fin.any():
        err = (lse.double() - lref)[fin].abs().max().item()
        assert err <= 1e-5 * max(1.0, lref[fin].abs().max().item()), f"lse error {err:.2e} {what}"


def rnd(shape, dtype, gen, layout="contiguous"):
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(dtype)
    b, h, l, d = shape
    if layout == "blhd":  # Hugging Face's [B, L, H, D] storage viewed as [B, H, L, D]
        return torch.randn(b, l, h, d, generator=gen).to(dtype).transpose(1, 2)
    if layout == "sliced":  # head-dim slice of a wider tensor (row stride != D)
        return torch.randn(b, h, l, d + 24, generator=gen).to(dtype)[..., 8:8 + d]
    if layout == "misaligned":  # storage offset of one element: not 16-byte aligned
        return torch.randn(b * h * l * d + 1, generator=gen).to(dtype)[1:].view(b, h, l, d)
    raise ValueError(layout)


# ------------------------------------------------------------------------- head dims
HEAD_DIMS = [32, 64, 96, 128, 256, 40, 80, 111]  # the last three run padded (64, 96, 128)
LEN_PAIRS = [(1, 1), (7, 200), (65, 127), (200, 17)]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("lq,lk", LEN_PAIRS)
def test_head_dims(d, lq, lk, dtype):
    gen = torch.Generator().manual_seed(d * 1000 + lq * 7 + lk)
    q, k, v = (rnd((1, 2, n, d), dtype, gen) for n in (lq, lk, lk))
    check(q, k, v, what=f"d={d} lq={lq} lk={lk}")


@pytest.mark.parametrize("d,dv", [(64, 32), (40, 130), (192, 160), (16, 256)])
def test_different_v_head_dim(d, dv):
    gen = torch.Generator().manual_seed(d + dv)
    q, k, v = rnd((1, 2, 33, d), torch.float16, gen), rnd((1, 2, 70, d), torch.float16, gen), rnd(
        (1, 2, 70, dv), torch.float16, gen)
    check(q, k, v, causal=True, alignment="bottom_right", what=f"d={d} dv={dv}")


# ------------------------------------------------------------------------- lengths x geometry
LENS = [1, 7, 16, 17, 64, 65, 127, 200]


@pytest.mark.parametrize("lq", LENS)
@pytest.mark.parametrize("lk", LENS)
def test_lengths_causal_both_alignments(lq, lk):
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    dtype = HALF[(lq + lk) % 2]
    q, k, v = (rnd((1, 1, n, 64), dtype, gen) for n in (lq, lk, lk))
    check(q, k, v, what=f"lq={lq} lk={lk} full")
    for alignment in ("top_left", "bottom_right"):
        check(q, k, v, causal=True, alignment=alignment, what=f"lq={lq} lk={lk} causal {alignment}")


@pytest.mark.parametrize("window", [(0, 0), (3, 0), (16, 16), (64, -1), (-1, 5), (70, 1)])
@pytest.mark.parametrize("causal,alignment", [(False, "top_left"), (True, "bottom_right"), (True, "top_left")])
def test_windows(window, causal, alignment):
    gen = torch.Generator().manual_seed(sum(window) + 100 * causal)
    q, k, v = (rnd((1, 2, n, 64), torch.bfloat16, gen) for n in (200, 230, 230))
    check(q, k, v, causal=causal, alignment=alignment, window=window, what=f"window {window}")


# ------------------------------------------------------------------------- GQA, masks, layouts
@pytest.mark.parametrize("hq,hkv", [(8, 1), (4, 2)])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gqa(hq, hkv, dtype):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    q = rnd((2, hq, 65, 64), dtype, gen)
    k, v = rnd((2, hkv, 127, 64), dtype, gen), rnd((2, hkv, 127, 64), dtype, gen)
    check(q, k, v, causal=True, alignment="bottom_right", what=f"gqa {hq}:{hkv}")


def masks(b, h, lq, lk, dtype, gen):
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[0, ..., lk // 2:] = False
    strided = (torch.rand(lk, lq, generator=gen) > 0.4).t()  # [Lq, Lk] with column stride Lq
    dead = torch.rand(b, h, lq, lk, generator=gen) > 0.5
    dead[:, :, ::5] = False  # fully masked rows -> zeros, lse -inf
    t5 = torch.randn(1, h, lq, lk, generator=gen).to(dtype)  # additive position bias [1, H, Lq, Lk]
    addpad = torch.zeros(b, 1, 1, lk, dtype=dtype)
    addpad[-1, ..., 3:] = -math.inf
    alibi = (-(torch.arange(h).view(h, 1, 1) + 1) * 0.1 *
             (torch.arange(lq).view(-1, 1) - torch.arange(lk).view(1, -1)).abs()).to(dtype)
    strided_add = torch.randn(b, h, lk, lq, generator=gen).to(dtype).transpose(-1, -2)
    return {"bool_pad": pad, "bool_strided": strided, "bool_dead_rows": dead, "t5_bias": t5,
            "t5_bias_pad": t5 + addpad, "alibi_bias": alibi, "add_strided": strided_add}


@pytest.mark.parametrize("kind", ["bool_pad", "bool_strided", "bool_dead_rows", "t5_bias", "t5_bias_pad",
                                  "alibi_bias", "add_strided"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_masks(kind, dtype):
    gen = torch.Generator().manual_seed(len(kind))
    b, h, lq, lk = 2, 2, 70, 97
    q, k, v = (rnd((b, h, n, 96), dtype, gen) for n in (lq, lk, lk))
    mask = masks(b, h, lq, lk, dtype, gen)[kind]
    check(q, k, v, mask=mask, what=kind)
    check(q, k, v, mask=mask, causal=True, alignment="bottom_right", what=f"{kind} causal")


@pytest.mark.skipif(not _ext.HAS_C, reason=f"compares with the native CPU kernel's dropout mask ({_ext.C_ERROR})")
def test_alibi_slopes_and_dropout_mask():
    # ALiBi from slopes, against the same bias written out as an additive mask.
    gen = torch.Generator().manual_seed(5)
    b, h, lq, lk = 1, 4, 37, 90
    q, k, v = (rnd((b, h, n, 64), torch.float16, gen) for n in (lq, lk, lk))
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)])
    shift = lk - lq
    dist = ((torch.arange(lq).view(-1, 1) + shift) - torch.arange(lk).view(1, -1)).abs()
    bias = (-slopes.view(h, 1, 1) * dist)
    scale = 64 ** -0.5
    out, _ = run_tc(q, k, v, None, scale, True, True, (-1, -1), alibi=slopes)
    ref, _, _ = oracle(q, k, v, bias.double(), True, "bottom_right", None, scale)
    base = attention_torch(q, k, v, bias.to(torch.float16), True, "bottom_right", None, scale)
    assert_close_to_ref(out, ref, base, name="alibi slopes")
    # Dropout: q = 0 and v = I expose the kernel's keep mask Z (same counter hash as the SIMT
    # and CPU kernels); the dropped output must equal softmax * Z / (1 - p) @ v.
    p, seed = 0.3, 1234
    eye = torch.eye(lk, dtype=torch.float16).expand(b, h, lk, lk)
    w, _ = run_tc(torch.zeros_like(q), k, eye, None, scale, False, False, (-1, -1), p, seed)
    z = w != 0
    assert abs((1 - z.float().mean().item()) - p) < 0.03
    simt = torch.ops.pyllm.attention(torch.zeros_like(q).float(), k.float(), eye.float(), None, scale, False, False,
                                     -1, -1, p, seed, None)[0]
    assert torch.equal(simt != 0, z), "dropout mask differs from the CPU kernel's"
    out, _ = run_tc(q, k, v, None, scale, False, False, (-1, -1), p, seed)
    s = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1)
    ref = (s * z / (1 - p)) @ v.double()
    base = ((torch.softmax((q @ k.transpose(-1, -2)).float() * scale, -1).to(q.dtype) * z / (1 - p)) @ v)
    assert_close_to_ref(out, ref, base, name="dropout")


@pytest.mark.parametrize("layout", ["blhd", "sliced", "misaligned"])
def test_noncontiguous_inputs(layout):
    gen = torch.Generator().manual_seed(len(layout))
    q, k, v = (rnd((2, 3, n, 64), torch.bfloat16, gen, layout) for n in (65, 100, 100))
    assert not q.is_contiguous() or q.data_ptr() % 16 != 0
    check(q, k, v, causal=True, what=layout)


def test_nonfinite_v_at_hidden_keys_contributes_nothing():
    # Inf/NaN in V at keys every query hides: the tensor-core product would give 0 * inf = NaN;
    # the kernel must take its exact path and return the finite answer.
    gen = torch.Generator().manual_seed(9)
    lq, lk = 40, 150
    q, k, v = (rnd((1, 2, n, 64), torch.float16, gen) for n in (lq, lk, lk))
    mask = torch.ones(1, 1, 1, lk, dtype=torch.bool)
    mask[..., 100:110] = False
    v[:, :, 100, 3] = math.inf
    v[:, :, 105, :] = math.nan
    out, _ = run_tc(q, k, v, mask)
    v0 = v.clone()
    v0[:, :, 100:110] = 0
    ref, _, base = oracle(q, k, v0, mask, False, "top_left", None, 64 ** -0.5)
    assert torch.isfinite(out).all()
    assert_close_to_ref(out, ref, base, name="non-finite v at hidden keys")
    # A visible key with an Inf in V makes that column non-finite, as in torch.
    mask[..., 100] = True
    out, _ = run_tc(q, k, v, mask)
    assert not torch.isfinite(out[..., 3]).any() and torch.isnan(out).all(-1).logical_not().all()


def test_nan_query_row_is_nan():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (rnd((1, 1, n, 64), torch.float16, gen) for n in (20, 30, 30))
    q[0, 0, 4, 7] = math.nan
    out, lse = run_tc(q, k, v)
    assert torch.isnan(out[0, 0, 4]).all() and torch.isnan(lse[0, 0, 4])
    assert torch.isfinite(out[0, 0, 5:]).all()


# ------------------------------------------------------------------------- decode
@pytest.mark.parametrize("lq", [1, 4, 16])
@pytest.mark.parametrize("lk", [1, 300, 1000])
def test_decode_over_kv_cache(lq, lk):
    gen = torch.Generator().manual_seed(lq + lk)
    q = rnd((1, 8, lq, 128), torch.bfloat16, gen)
    k, v = rnd((1, 2, lk, 128), torch.bfloat16, gen), rnd((1, 2, lk, 128), torch.bfloat16, gen)
    check(q, k, v, causal=True, alignment="bottom_right", what=f"decode lq={lq} lk={lk}")


def test_decode_splits_the_keys():
    # q_len 1 over 1000 keys, 8 query heads: 8 CTAs, far from filling a GPU -> split-KV.
    gen = torch.Generator().manual_seed(11)
    q = rnd((1, 8, 1, 128), torch.float16, gen)
    k, v = rnd((1, 2, 1000, 128), torch.float16, gen), rnd((1, 2, 1000, 128), torch.float16, gen)
    check(q, k, v, causal=True, alignment="bottom_right", what="decode split")
    assert emu().attention_tc_last_splits() > 1
    # GQA packing: the 4 query heads of each kv head share one CTA (2 kv heads -> 2 CTAs per split)
    assert emu().attention_tc_last_ctas() == 2
    # enough CTAs to fill the (modelled) GPU, 2 per SM of an H100 = 264: not split
    q = rnd((33, 8, 64, 32), torch.bfloat16, gen)
    k, v = rnd((33, 8, 512, 32), torch.bfloat16, gen), rnd((33, 8, 512, 32), torch.bfloat16, gen)
    check(q, k, v, what="many CTAs")
    assert emu().attention_tc_last_splits() == 1 and emu().attention_tc_last_ctas() == 33 * 8


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_kv_every_feature(splits, monkeypatch):
    """Forced key splits (PYLLM_ATTENTION_SPLITS) on the cases that stress the combine step:
    padding that leaves some splits or rows empty, fully masked rows, additive masks, causal
    bottom-right, windows, GQA, NaN rows, non-finite V at hidden keys, dropout."""
    monkeypatch.setenv("PYLLM_ATTENTION_SPLITS", str(splits))
    gen = torch.Generator().manual_seed(splits)
    b, h, lq, lk = 2, 4, 9, 300
    q = rnd((b, h, lq, 64), torch.bfloat16, gen)
    k, v = rnd((b, 2, lk, 64), torch.bfloat16, gen), rnd((b, 2, lk, 64), torch.bfloat16, gen)
    ms = masks(b, h, lq, lk, torch.bfloat16, gen)
    for kind in ("bool_pad", "bool_dead_rows", "t5_bias_pad"):
        check(q, k, v, mask=ms[kind], causal=True, alignment="bottom_right", what=f"{kind} split {splits}")
        assert emu().attention_tc_last_splits() == min(splits, math.ceil(lk / 64))  # at most one per key tile
    check(q, k, v, window=(40, 3), alignment="bottom_right", what=f"window split {splits}")
    qn = q.clone()
    qn[1, 2, 4, 0] = math.nan
    out, lse = run_tc(qn, k, v)
    assert torch.isnan(out[1, 2, 4]).all() and torch.isnan(lse[1, 2, 4]) and torch.isfinite(out[0]).all()
    vn = v.clone()
    vn[:, :, 250, :] = math.inf
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[..., 200:] = False
    out, _ = run_tc(q, k, vn, pad)
    ref, _, base = oracle(q, k, v, pad, False, "top_left", None, 64 ** -0.5)
    assert_close_to_ref(out, ref, base, name=f"inf V at hidden keys, split {splits}")
    # dropout: the same elements dropped as without splits
    o1, _ = run_tc(q, k, v, None, 0.125, False, False, (-1, -1), 0.2, 77)
    monkeypatch.setenv("PYLLM_ATTENTION_SPLITS", "1")
    o2, _ = run_tc(q, k, v, None, 0.125, False, False, (-1, -1), 0.2, 77)
    assert (o1.float() - o2.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * o2.float().abs().max()


# ------------------------------------------------------------------------- dispatch
def test_dispatch_and_simt_switch(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (rnd((1, 2, 20, 64), torch.float16, gen) for _ in range(3))
    emu().ldmatrix_bank_stats(True)
    with pyllm.use_backend("cuda-emulated"):
        a = PF.scaled_dot_product_attention(q, k, v)
    assert emu().ldmatrix_bank_stats(True)[0] > 0, "fp16 attention did not take the tensor-core kernel"
    for name in ("float32 inputs", "PYLLM_ATTENTION_KERNEL=simt"):
        if name.startswith("PYLLM"):
            monkeypatch.setenv("PYLLM_ATTENTION_KERNEL", "simt")
            qq, kk, vv = q, k, v
        else:
            qq, kk, vv = q.float(), k.float(), v.float()
        with pyllm.use_backend("cuda-emulated"):
            b = PF.scaled_dot_product_attention(qq, kk, vv)
        assert emu().ldmatrix_bank_stats(True)[0] == 0, f"{name}: expected the SIMT kernel"
        assert (a.double() - b.double()).abs().max() < 2e-3
    # The tensor-core kernel and the SIMT kernel agree on the same fp16 inputs (both by the rule).
    ref, _, base = oracle(q, k, v, None, False, "top_left", None, 64 ** -0.5)
    assert_close_to_ref(b, ref, base, name="simt")
    assert_close_to_ref(a, ref, base, name="tensor cores")


# ------------------------------------------------------------------------- backward
# fp16/bf16 with head dims <= 256: attention_backward runs the tensor-core backward
# (csrc/cuda/attention_tc_bwd.cu); gradients are judged by the shared rule at 3x torch's error.
def run_tc_bwd(go, q, k, v, out, lse, mask=None, scale=None, causal=False, bottom_right=False, window=(-1, -1),
               dropout_p=0.0, seed=0, alibi=None, mask_grad=False, expect_tc=True):
    """torch.ops.pyllm_emu.attention_backward with the ldmatrix counter read around it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    emu().ldmatrix_bank_stats(True)
    grads = torch.ops.pyllm_emu.attention_backward(go, q, k, v, mask, out, lse, scale, causal, bottom_right,
                                                   window[0], window[1], dropout_p, seed, mask_grad, alibi)
    phases, extra = emu().ldmatrix_bank_stats(True)
    if expect_tc:
        assert phases > 0, "the tensor-core backward did not run (no ldmatrix)"
        assert extra == 0, f"{extra} extra shared-memory wavefronts from ldmatrix bank conflicts ({phases} phases)"
    else:
        assert phases == 0, "the tensor-core backward ran where the SIMT kernels should"
    return grads


def composite(q, k, v, mask, keep, scale, z=None, p=0.0):
    """Attention from torch ops in q's dtype (GQA by repeat_interleave, dropout keep mask z)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    dead = (s == -math.inf).all(-1, keepdim=True)
    pr = s.masked_fill(dead, 0.0).softmax(-1).masked_fill(dead, 0.0)
    if z is not None:
        pr = pr * z / (1 - p)
    return pr @ v


def check_bwd(q, k, v, mask=None, causal=False, alignment="top_left", window=None, what="", dropout=None,
              alibi_bias=None, alibi=None, expect_tc=True):
    """Forward (emulated tensor cores) then backward; dq, dk, dv (and the additive mask's
    gradient) against fp64 autograd, within 3x torch's same-dtype error."""
    scale = q.shape[-1] ** -0.5
    w = window or (-1, -1)
    gen = torch.Generator().manual_seed(q.shape[-2] * 7 + k.shape[-2])
    p, seed = dropout or (0.0, 0)
    if expect_tc:
        out, lse = run_tc(q, k, v, mask, scale, causal, alignment == "bottom_right", w, p, seed, alibi)
    else:  # the SIMT forward (no ldmatrix to count)
        out, lse = torch.ops.pyllm_emu.attention(q, k, v, mask, scale, causal, alignment == "bottom_right", w[0], w[1],
                                                 p, seed, alibi)
    go = torch.randn(out.shape, generator=gen).to(q.dtype)
    mask_grad = mask is not None and mask.dtype != torch.bool
    dq, dk, dv, dm = run_tc_bwd(go, q, k, v, out, lse, mask, scale, causal, alignment == "bottom_right", w, p, seed,
                                alibi, mask_grad, expect_tc)
    z = None
    if p > 0:  # the keep mask of (row, key), from the native CPU kernel's identical counter hash
        eye = torch.eye(k.shape[-2]).expand(q.shape[0], q.shape[1], -1, -1)
        zq = torch.zeros(q.shape[:-1] + (4,))
        zk = torch.zeros(q.shape[0], q.shape[1], k.shape[-2], 4)
        z = torch.ops.pyllm.attention(zq, zk, eye, None, 1.0, False, False, -1, -1, p, seed, None)[0] != 0
    keep = keep_mask(q.shape[-2], k.shape[-2], causal, alignment, window)
    madd = mask if alibi_bias is None else alibi_bias

    def grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        m = madd
        if m is not None and m.dtype != torch.bool:
            m = m.detach().to(dtype).requires_grad_(mask_grad)
        o = composite(*leaves, m, keep, scale, z, p)
        o.backward(go.to(dtype))
        return [t.grad for t in leaves] + ([m.grad] if mask_grad else [])

    exact, theirs = grads(torch.float64), grads(q.dtype)
    ours = [dq, dk, dv] + ([dm.sum_to_size(mask.shape)] if mask_grad else [])  # the op's dS is [B, Hq, Lq, Lk]
    for name, o, t, e in zip(["dq", "dk", "dv", "dmask"], ours, theirs, exact):
        assert o.shape == e.shape, f"{name} shape {what}"
        if name != "dmask":
            assert o.dtype == q.dtype, f"{name} dtype {what}"
        assert_close_to_ref(o.to(t.dtype) if name == "dmask" else o, e, t, mult=3.0, name=f"{name} {what}")
    return dq, dk, dv


# 32 -> the 64 instantiation, 80 -> 128; 160 and 256 -> 256 (two CTAs per key block, 128 columns each)
BWD_HEAD_DIMS = [32, 64, 80, 128, 160, 256]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("d", BWD_HEAD_DIMS)
@pytest.mark.parametrize("lq,lk", [(1, 5), (65, 127), (97, 33)])
def test_bwd_head_dims(d, lq, lk, dtype):
    gen = torch.Generator().manual_seed(d + lq + lk)
    q, k, v = (rnd((2, 2, n, d), dtype, gen) for n in (lq, lk, lk))
    check_bwd(q, k, v, what=f"d={d} {lq}x{lk}")


@pytest.mark.parametrize("lq,window", [(1, (-1, -1)), (70, (0, 0))])
def test_bwd_single_key(lq, window):
    """One visible key per query (one key, or a (0, 0) window): P = 1, so dq = dk = 0 exactly in exact arithmetic (dS = dP - delta with delta = dP).
    The kernel's dP (fp32 tensor-core sums) and delta (fp64 from the rounded output) differ by
    fp32 rounding, so the zeros are zeros to fp32 precision of |dO| |V|; dv = dO exactly."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (rnd((1, 2, lq, 64), torch.float16, gen) for _ in range(3))
    out, lse = run_tc(q, k, v, window=window)
    go = torch.randn(out.shape, generator=gen).to(torch.float16)
    dq, dk, dv, _ = run_tc_bwd(go, q, k, v, out, lse, window=window)
    bound = 64 * torch.finfo(torch.float32).eps * (go.float().abs() * v.float().abs()).sum(-1).max().item()
    assert dq.abs().max().item() <= bound and dk.abs().max().item() <= bound
    assert torch.equal(dv, go)


@pytest.mark.parametrize("d,dv", [(64, 32), (40, 120)])
def test_bwd_different_v_head_dim(d, dv):
    gen = torch.Generator().manual_seed(d + dv)
    q, k = (rnd((1, 2, n, d), torch.float16, gen) for n in (50, 70))
    v = rnd((1, 2, 70, dv), torch.float16, gen)
    check_bwd(q, k, v, causal=True, what=f"d={d} dv={dv}")


@pytest.mark.parametrize("causal,alignment,window", [(True, "top_left", None), (True, "bottom_right", None),
                                                      (False, "top_left", (16, 16)),
                                                      (True, "bottom_right", (70, 1)),
                                                      (False, "top_left", (1, 0))])
@pytest.mark.parametrize("lq,lk", [(130, 130), (40, 200), (200, 40)])
def test_bwd_causal_and_windows(causal, alignment, window, lq, lk):
    gen = torch.Generator().manual_seed(lq * 3 + lk)
    q, k, v = (rnd((1, 2, n, 64), torch.bfloat16, gen) for n in (lq, lk, lk))
    check_bwd(q, k, v, causal=causal, alignment=alignment, window=window, what=f"{causal} {alignment} {window}")


@pytest.mark.parametrize("hq,hkv", [(8, 1), (4, 2)])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_bwd_gqa(hq, hkv, dtype):
    gen = torch.Generator().manual_seed(hq + hkv)
    q = rnd((2, hq, 65, 64), dtype, gen)
    k, v = rnd((2, hkv, 127, 64), dtype, gen), rnd((2, hkv, 127, 64), dtype, gen)
    check_bwd(q, k, v, causal=True, alignment="bottom_right", what=f"gqa {hq}:{hkv}")


@pytest.mark.parametrize("kind", ["bool_pad", "bool_strided", "bool_dead_rows", "t5_bias", "t5_bias_pad",
                                  "add_strided"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_bwd_masks(kind, dtype):
    """Bool masks, fully masked rows (zero gradients), additive masks with their gradient."""
    gen = torch.Generator().manual_seed(len(kind) + 3)
    b, h, lq, lk = 2, 2, 70, 97
    q, k, v = (rnd((b, h, n, 96), dtype, gen) for n in (lq, lk, lk))
    mask = masks(b, h, lq, lk, dtype, gen)[kind]
    check_bwd(q, k, v, mask=mask, what=kind)
    check_bwd(q, k, v, mask=mask, causal=True, alignment="bottom_right", what=f"{kind} causal")


@pytest.mark.skipif(not _ext.HAS_C, reason=f"takes the dropout keep mask from the native CPU kernel ({_ext.C_ERROR})")
def test_bwd_alibi_and_dropout():
    gen = torch.Generator().manual_seed(21)
    b, h, lq, lk = 1, 4, 37, 90
    q, k, v = (rnd((b, h, n, 64), torch.float16, gen) for n in (lq, lk, lk))
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)])
    dist = ((torch.arange(lq).view(-1, 1) + lk - lq) - torch.arange(lk).view(1, -1)).abs()
    bias = -slopes.view(h, 1, 1) * dist
    check_bwd(q, k, v, causal=True, alignment="bottom_right", alibi=slopes, alibi_bias=bias, what="alibi")
    check_bwd(q, k, v, dropout=(0.25, 99), what="dropout")
    check_bwd(q, k, v, causal=True, dropout=(0.5, 7), what="dropout causal")


@pytest.mark.parametrize("layout", ["blhd", "sliced", "misaligned"])
def test_bwd_noncontiguous_inputs(layout):
    gen = torch.Generator().manual_seed(len(layout) + 1)
    q, k, v = (rnd((2, 3, n, 64), torch.bfloat16, gen, layout) for n in (65, 100, 100))
    check_bwd(q, k, v, causal=True, what=layout)


@pytest.mark.parametrize("d,dv", [(136, 200), (256, 64), (48, 256)])
def test_bwd_split_columns_different_v_head_dims(d, dv):
    """Above 128 (of either head dim) the key block's two CTAs each own 128 columns of dK, dV and
    dQ; a part whose columns are all padding (d=136: dK's second part holds 8 real columns;
    dv=64: dV's second part none) must write nothing but still add its dK / dQ share."""
    gen = torch.Generator().manual_seed(d * 3 + dv)
    q, k = (rnd((1, 2, n, d), torch.bfloat16, gen) for n in (45, 81))
    v = rnd((1, 2, 81, dv), torch.bfloat16, gen)
    check_bwd(q, k, v, causal=True, alignment="bottom_right", what=f"d={d} dv={dv}")


@pytest.mark.skipif(not _ext.HAS_C, reason=f"takes the dropout keep mask from the native CPU kernel ({_ext.C_ERROR})")
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_bwd_split_columns_masks_gqa_dropout(dtype):
    """Head dim 192 (the 256 instantiation): GQA with a window, an additive mask with its gradient
    (dS written by one of the two column parts), dropout replayed in both parts."""
    gen = torch.Generator().manual_seed(29)
    q = rnd((1, 4, 40, 192), dtype, gen)
    k, v = rnd((1, 2, 70, 192), dtype, gen), rnd((1, 2, 70, 192), dtype, gen)
    check_bwd(q, k, v, causal=True, alignment="bottom_right", window=(24, 0), what="gqa window")
    mask = masks(1, 4, 40, 70, dtype, gen)["t5_bias_pad"]
    check_bwd(q, k, v, mask=mask, what="t5_bias_pad")
    check_bwd(q, k, v, dropout=(0.25, 5), what="dropout")


@pytest.mark.parametrize("d", [64, 192])
def test_bwd_deterministic_mode_bit_identical(d):
    """torch.use_deterministic_algorithms(True): dQ (and the mask's gradient) from the tensor-core
    dQ pass (a CTA per query block, no atomics): the gradients are bit-identical across runs and
    across the emulator's block orders, and right."""
    gen = torch.Generator().manual_seed(8)
    q = rnd((2, 4, 97, d), torch.bfloat16, gen)
    k, v = rnd((2, 2, 150, d), torch.bfloat16, gen), rnd((2, 2, 150, d), torch.bfloat16, gen)
    mask = masks(2, 4, 97, 150, torch.bfloat16, gen)["t5_bias_pad"]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for order in ("forward", "reverse", "random:5"):
            emu().set_order(order)
            runs.append(check_bwd(q, k, v, mask=mask, causal=True, what=f"deterministic {order}"))
    finally:
        emu().set_order(None)
        torch.use_deterministic_algorithms(prev)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), "deterministic gradients differ between block orders"


@contextlib.contextmanager
def deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.skipif(not _ext.HAS_C, reason=f"takes the dropout keep mask from the native CPU kernel ({_ext.C_ERROR})")
@pytest.mark.parametrize("d", [32, 128, 200])
def test_bwd_deterministic_dq_pass_features(d):
    """The deterministic dQ pass (attn_tc_dq_kernel, one instantiation per 64 / 128 / 256) on every
    mask feature: GQA with causal bottom-right and a window, a bool mask with dead rows, an additive
    mask with its gradient (written by this pass), ALiBi, dropout; odd lengths; both dtypes."""
    gen = torch.Generator().manual_seed(d)
    b, hq, hkv, lq, lk = 2, 4, 2, 67, 93
    for dtype in HALF:
        q = rnd((b, hq, lq, d), dtype, gen)
        k, v = rnd((b, hkv, lk, d), dtype, gen), rnd((b, hkv, lk, d), dtype, gen)
        mk = masks(b, hq, lq, lk, dtype, gen)
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(hq)])
        dist = ((torch.arange(lq).view(-1, 1) + lk - lq) - torch.arange(lk).view(1, -1)).abs()
        with deterministic():
            check_bwd(q, k, v, causal=True, alignment="bottom_right", window=(30, 0), what=f"det gqa window {dtype}")
            check_bwd(q, k, v, mask=mk["bool_dead_rows"], what=f"det bool dead rows {dtype}")
            check_bwd(q, k, v, mask=mk["t5_bias_pad"], causal=True, what=f"det t5 bias {dtype}")
            check_bwd(q, k, v, causal=True, alignment="bottom_right", alibi=slopes,
                      alibi_bias=-slopes.view(hq, 1, 1) * dist, what=f"det alibi {dtype}")
            check_bwd(q, k, v, dropout=(0.25, 3), what=f"det dropout {dtype}")


def test_bwd_simt_switch(monkeypatch):
    """PYLLM_ATTENTION_KERNEL=simt sends the backward (and forward) to the SIMT kernels; still right."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (rnd((1, 2, n, 64), torch.float16, gen) for n in (33, 47, 47))
    monkeypatch.setenv("PYLLM_ATTENTION_KERNEL", "simt")
    check_bwd(q, k, v, causal=True, what="SIMT switch", expect_tc=False)


@pytest.mark.parametrize("det", [False, True], ids=["atomics", "deterministic"])
def test_bwd_nonfinite_inputs_take_the_exact_simt_kernels(det):
    """A NaN / Inf in q, k, v or dO: tensor-core products would give 0 * inf = NaN for pairs whose
    probability is 0, which must contribute nothing; a device flag sends such calls to the SIMT
    kernels (no ldmatrix), finite calls to the tensor cores (in deterministic mode too: the dQ pass
    steps aside the same way). Gradients: tests/test_nonfinite.py."""
    gen = torch.Generator().manual_seed(17)
    q, k, v = (rnd((1, 2, n, 64), torch.float16, gen) for n in (20, 30, 30))
    out, lse = run_tc(q, k, v, causal=True)
    go = torch.randn(out.shape, generator=gen).to(torch.float16)
    go_nan = go.clone()
    go_nan[0, 1, 3, 5] = math.nan
    with deterministic() if det else contextlib.nullcontext():
        run_tc_bwd(go, q, k, v, out, lse, causal=True)  # finite: tensor cores
        dq, dk, dv, _ = run_tc_bwd(go_nan, q, k, v, out, lse, causal=True, expect_tc=False)
    # query 3 sees keys 0..3 (causal): dO's NaN reaches dv of those keys only, dq of row 3 only, head 1 only
    assert torch.isnan(dv[0, 1, :4]).any(dim=-1).all() and torch.isfinite(dv[0, 1, 4:]).all()
    assert torch.isfinite(dv[0, 0]).all() and torch.isfinite(dq[0, 1, :3]).all() and torch.isfinite(dq[0, 1, 4:]).all()
