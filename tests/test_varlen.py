"""varlen_attention (packed, padding-free attention) and unpad_input / pad_input.

The oracle is a per-sequence loop of torch's SDPA (tests/helpers.attention_torch, bottom-right
causal/window masks made explicit) on fp64 copies; the baseline is the same loop in the test dtype.
The generic suites (test_native opcheck, test_device, test_errors, the sanitizer, the bench) cover
the op through the registry as well.
"""
from __future__ import annotations

import pytest
import torch

import pyllm
from pyllm import _ext
from pyllm import functional as PF

from helpers import assert_close_to_ref, assert_grads_close, attention_torch, maybe_backend


def _packed(lens_q, lens_k, hq, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def mk(t, h):
        return torch.randn(t, h, d, generator=g).to(dtype)

    cq = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    ck = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    return mk(sum(lens_q), hq), mk(sum(lens_k), hk), mk(sum(lens_k), hk), cq, ck


def _loop(q, k, v, cq, ck, causal, window):
    """Per-sequence SDPA: each sequence as [1, H, L, D], bottom-right aligned."""
    outs = []
    for (q0, q1), (k0, k1) in zip(zip(cq[:-1].tolist(), cq[1:].tolist()), zip(ck[:-1].tolist(), ck[1:].tolist())):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        w = None if window == (-1, -1) else window
        outs.append(attention_torch(qs, ks, vs, None, causal, "bottom_right", w)[0].transpose(0, 1))
    return torch.cat(outs)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


BACKENDS = [pytest.param(None, id="session")] + [
    pytest.param("cuda-emulated", id="emulated", marks=[pytest.mark.emulated, pytest.mark.skipif(
        not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("seed,hq,hk,causal,window", [
    (0, 4, 4, False, (-1, -1)), (1, 4, 2, True, (-1, -1)), (2, 6, 2, False, (8, 3)), (3, 2, 1, True, (16, 0))])
def test_varlen_matches_per_sequence_sdpa(backend, dtype, seed, hq, hk, causal, window):
    g = torch.Generator().manual_seed(100 + seed)
    n = 3 if backend == "cuda-emulated" else 6
    hi = 40 if backend == "cuda-emulated" else 300
    lens_q = torch.randint(1, hi + 1, (n,), generator=g).tolist()
    lens_q[0] = 1
    lens_k = lens_q if seed % 2 == 0 else [lq + int(torch.randint(0, 9, (), generator=g)) for lq in lens_q]
    q, k, v, cq, ck = _packed(lens_q, lens_k, hq, hk, 32, dtype, seed)
    leaves = _leaves(q, k, v)
    with maybe_backend(backend):
        out = PF.varlen_attention(*leaves, cq, ck, max(lens_q), max(lens_k), causal=causal, window_size=window)
    if backend == "cuda-emulated":
        assert pyllm.last_decision("varlen_attention").path == "cuda-emulated"
    l64 = _leaves(q.double(), k.double(), v.double())
    ref = _loop(*l64, cq, ck, causal, window)
    lb = _leaves(q, k, v)
    base = _loop(*lb, cq, ck, causal, window)
    assert_close_to_ref(out.detach(), ref.detach(), base.detach(), name="varlen out")
    dy = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_grads = torch.autograd.grad(ref, l64, dy.double())
    base_grads = torch.autograd.grad(base, lb, dy)
    assert_grads_close(grads, ref_grads, base_grads, names=["dq", "dk", "dv"])


def test_varlen_return_lse_and_empty_sequences():
    q, k, v, cq, ck = _packed([3, 0, 5], [3, 0, 5], 2, 2, 16, torch.float32, 7)
    out, lse = PF.varlen_attention(q, k, v, cq, ck, 5, 5, causal=True, return_lse=True)
    assert out.shape == (8, 2, 16) and lse.shape == (8, 2) and lse.dtype == torch.float32
    def lse_torch(q, k):
        s0 = (q[:3].transpose(0, 1) @ k[:3].transpose(0, 1).transpose(-1, -2)) / 4.0
        return s0.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf")).logsumexp(-1)

    assert_close_to_ref(lse[:3].t(), lse_torch(q.double(), k.double()), lse_torch(q, k), name="lse")
    assert out[3:3].numel() == 0 and torch.isfinite(out).all()


def test_varlen_equals_dense_on_padded_batch():
    """Packed real tokens give what dense pyllm SDPA gives on the padded batch (right padding)."""
    g = torch.Generator().manual_seed(3)
    b, l, h, d = 4, 23, 3, 16
    lens = torch.tensor([23, 1, 17, 9])
    keep = torch.arange(l)[None, :] < lens[:, None]
    x = torch.randn(b, l, h, d, generator=g)
    packed, idx, cu, mx = PF.unpad_input(x, keep)
    assert mx == 23 and cu.tolist() == [0, 23, 24, 41, 50] and cu.dtype == torch.int32
    out = PF.varlen_attention(packed, packed, packed, cu, cu, mx, mx, causal=True)
    dense = PF.scaled_dot_product_attention(x.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2),
                                            keep[:, None, None, :], is_causal=True).transpose(1, 2)
    assert_close_to_ref(PF.pad_input(out, idx, b, l)[keep], dense[keep].double(), None, name="varlen vs dense")


@pytest.mark.parametrize("layout", ["right", "left", "holes", "none", "single"])
def test_unpad_pad_round_trip(layout):
    g = torch.Generator().manual_seed(5)
    b, l = (1, 7) if layout == "single" else (3, 7)
    h = torch.randn(b, l, 5, generator=g)
    if layout == "right":
        keep = torch.arange(l)[None, :] < torch.tensor([7, 2, 4])[:, None]
    elif layout == "left":
        keep = torch.arange(l)[None, :] >= torch.tensor([0, 5, 3])[:, None]
    elif layout == "holes":
        keep = torch.rand(b, l, generator=g) > 0.4
    else:
        keep = torch.ones(b, l, dtype=torch.bool)
    packed, idx, cu, mx = PF.unpad_input(h, keep.long())
    assert packed.shape == (int(keep.sum()), 5)
    assert torch.equal(packed, h[keep])
    assert cu.tolist() == [0] + keep.sum(-1).cumsum(0).tolist() and mx == int(keep.sum(-1).max())
    back = PF.pad_input(packed, idx, b, l)
    assert torch.equal(back, h * keep[..., None])


def test_unpad_input_errors():
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, seqlen\] = \[2, 3\]"):
        PF.unpad_input(torch.randn(2, 3, 4), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"indices must be 1-D with one entry per packed row"):
        PF.pad_input(torch.randn(4, 2), torch.arange(3), 2, 2)


def test_varlen_compiles():
    """The native op compiles into one graph (fullgraph); the reference fallback splits sequences by
    the values of cu_seqlens (data-dependent shapes), so it compiles with graph breaks."""
    q, k, v, cq, ck = _packed([3, 5], [3, 5], 2, 2, 8, torch.float32, 9)
    PF.varlen_attention(q, k, v, cq, ck, 5, 5)
    kernel = pyllm.last_decision("varlen_attention").uses_kernel
    f = torch.compile(lambda q, k, v: PF.varlen_attention(q, k, v, cq, ck, 5, 5, causal=True), fullgraph=kernel)
    assert_close_to_ref(f(q, k, v), _loop(q.double(), k.double(), v.double(), cq, ck, True, (-1, -1)),
                        _loop(q, k, v, cq, ck, True, (-1, -1)), name="compiled varlen")


def _alibi(slopes, lq, lk, shift):
    """ALiBi written out for the oracle: bias[h, i, j] = -slopes[h] * |i + shift - j|."""
    i = torch.arange(lq, dtype=torch.float64)[:, None] + shift
    j = torch.arange(lk, dtype=torch.float64)[None, :]
    return -slopes.double()[:, None, None] * (i - j).abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_seq,causal,hq,hk", [(False, True, 4, 2), (True, False, 4, 4), (True, True, 2, 1)],
                         ids=["H-causal-gqa", "BH", "BH-causal-gqa"])
def test_varlen_alibi(backend, dtype, per_seq, causal, hq, hk):
    g = torch.Generator().manual_seed(11)
    hi = 40 if backend == "cuda-emulated" else 200
    lens_q = [1, 7] + torch.randint(2, hi, (2,), generator=g).tolist()
    lens_k = [lq + int(torch.randint(0, 5, (), generator=g)) for lq in lens_q]
    q, k, v, cq, ck = _packed(lens_q, lens_k, hq, hk, 32, dtype, 12)
    slopes = torch.rand(len(lens_q), hq, generator=g) if per_seq else 2.0 ** -torch.arange(1, hq + 1.0)
    leaves = _leaves(q, k, v)
    with maybe_backend(backend):
        out = PF.varlen_attention(*leaves, cq, ck, max(lens_q), max(lens_k), causal=causal, alibi_slopes=slopes)
    if backend == "cuda-emulated":
        assert pyllm.last_decision("varlen_attention").path == "cuda-emulated"

    def loop(q, k, v):
        outs = []
        for b in range(len(lens_q)):
            q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
            qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
            bias = _alibi(slopes[b] if per_seq else slopes, q1 - q0, k1 - k0, (k1 - k0) - (q1 - q0))
            outs.append(attention_torch(qs, ks, vs, bias.unsqueeze(0), causal, "bottom_right")[0].transpose(0, 1))
        return torch.cat(outs)

    l64, lb = _leaves(q.double(), k.double(), v.double()), _leaves(q, k, v)
    ref, base = loop(*l64), loop(*lb)
    assert_close_to_ref(out.detach(), ref.detach(), base.detach(), name="varlen alibi out")
    # ALiBi changes the answer: the same call without slopes is far from the oracle
    plain = PF.varlen_attention(q.float(), k.float(), v.float(), cq, ck, max(lens_q), max(lens_k), causal=causal)
    assert (plain.double() - ref.detach()).abs().max() > 1e-2
    dy = torch.randn(out.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(out, leaves, dy)
    assert_grads_close(grads, torch.autograd.grad(ref, l64, dy.double()), torch.autograd.grad(base, lb, dy),
                       names=["dq", "dk", "dv"])
