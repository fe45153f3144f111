"""NaN and Inf propagate as in torch (issue 12, item 1), with one rule for hidden keys.

The torch composition of each op is the oracle of *where* non-finite values appear: a NaN in a
visible score makes that softmax row NaN at every visible position, a NaN key makes every query
that sees it NaN, an Inf in V gives what p @ V gives over the visible keys. A hidden key (score
-inf) contributes nothing, forward or backward, and a hidden position of a softmax is a constant 0;
rows whose keys are all masked get zeros. Checked row for row on the native kernels, the reference
and the emulated CUDA kernels: first softmax scores and attention q / k / v, then one table over
every op, input, dtype and backend, forward and backward (test_nonfinite_table; its notes and
choices are above TABLE).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import pyllm
import pyllm.functional as PF
from pyllm import _ext
from pyllm import ops as pyllm_ops

from helpers import assert_close_to_ref, maybe_backend, rms_norm_torch, softmax_torch

NAN, INF = float("nan"), float("inf")
BACKENDS = [pytest.param(None, id="session"), pytest.param("torch", id="reference"), pytest.param(
    "cuda-emulated", id="emulated", marks=[pytest.mark.emulated, pytest.mark.skipif(
        not _ext.HAS_EMU, reason=f"emulated CUDA module not built ({_ext.C_EMU_ERROR})")])]


def _pattern(t):
    return torch.isnan(t), torch.isposinf(t), torch.isneginf(t)


def _assert_same_pattern(got, want, what):
    for g, w, kind in zip(_pattern(got), _pattern(want), ("NaN", "+Inf", "-Inf")):
        assert torch.equal(g, w), f"{what}: {kind} at {int(g.sum())} places, torch has {int(w.sum())}"


def _softmax_torch(x, keep, scale):
    s = (x.double() * scale).masked_fill(~keep, -INF)
    dead = ~keep.any(-1, keepdim=True)  # only rows with no visible key get zeros
    return torch.where(dead, 0.0, s.softmax(-1)).masked_fill(~keep, 0.0)  # hidden: a constant 0


SOFTMAX_CASES = {
    "one NaN score": lambda x, keep: x.index_put_((torch.tensor(0), torch.tensor(3)), torch.tensor(NAN)),
    "NaN at a masked position": lambda x, keep: x.index_put_((torch.tensor(1), torch.tensor(7)), torch.tensor(NAN)),
    "whole row NaN": lambda x, keep: x[2].fill_(NAN),
    "+Inf score": lambda x, keep: x.index_put_((torch.tensor(3), torch.tensor(0)), torch.tensor(INF)),
    "-Inf score": lambda x, keep: x.index_put_((torch.tensor(0), torch.tensor(5)), torch.tensor(-INF)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(SOFTMAX_CASES))
def test_masked_softmax_nonfinite(backend, dtype, case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=g)
    keep = torch.ones(5, 9, dtype=torch.bool)
    keep[1, 6:] = False   # a partly masked row (position 7 hidden)
    keep[4] = False       # a fully masked row: zeros
    SOFTMAX_CASES[case](x, keep)
    x = x.to(dtype)
    with maybe_backend(backend):
        got = PF.masked_softmax(x, keep, scale=0.5)
    want = _softmax_torch(x, keep, 0.5)
    _assert_same_pattern(got, want, f"masked_softmax {case}")
    assert torch.equal(got[4], torch.zeros_like(got[4]))  # fully masked: zeros, never NaN
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], atol=1e-2 if dtype != torch.float32 else 1e-6,
                               rtol=0)


def _attention_torch(q, k, v, keep):
    """The composition softmax(masked_fill(q k^T * scale, ~keep, -inf)) @ v in fp64: a hidden key's
    NaN score is replaced, not added to (F.scaled_dot_product_attention adds its -inf bias to the
    NaN and spreads it to every query; masked_fill, as the reference and the kernels, does not)."""
    s = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return s.masked_fill(~keep, -INF).softmax(-1) @ v.double()


ATTN_CASES = {
    "NaN in q": ("q", (0, 0, 1, 3), NAN),
    "NaN in k": ("k", (0, 0, 2, 3), NAN),
    "NaN in v": ("v", (0, 1, 4, 5), NAN),
    "+Inf in v": ("v", (0, 1, 4, 5), INF),
    "NaN in a masked key": ("k", (0, 0, 5, 0), NAN),
    "+Inf in k": ("k", (0, 1, 0, 2), INF),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_nonfinite(backend, case):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 4, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g), \
        torch.randn(1, 2, 6, 16, generator=g)
    which, idx, val = ATTN_CASES[case]
    {"q": q, "k": k, "v": v}[which][idx] = val
    keep = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    keep[..., 5] = False  # key 5 hidden from every query
    with maybe_backend(backend):
        got = PF.scaled_dot_product_attention(q, k, v, keep)
    want = _attention_torch(q, k, v, keep)
    _assert_same_pattern(got, want, f"attention {case}")
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_fully_masked_row_stays_zero_next_to_nan(backend):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 3, 8, generator=g) for _ in range(3))
    k[0, 0, 1, 0] = NAN
    keep = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    keep[0, 0, 2] = False           # query 2 sees nothing: zeros
    keep[0, 0, 0, 1] = False        # query 0 does not see the NaN key: finite
    with maybe_backend(backend):
        out = PF.scaled_dot_product_attention(q, k, v, keep)
    assert torch.isfinite(out[0, 0, 0]).all()
    assert torch.isnan(out[0, 0, 1]).all()
    assert torch.equal(out[0, 0, 2], torch.zeros(8))


# =============================================================================== every op, one table
# Issue 12, item 1 for every op: NaN / +Inf / -Inf in any input gives the non-finite pattern of the
# torch composition of the same op, element for element, on every backend and dtype, and so do the
# gradients. TABLE lists (op, input, position, value); each row builds the op's small inputs, casts
# them to the test dtype, writes the value in and checks
#
#   * every output against the torch composition on fp64 copies of the same inputs: isnan /
#     isposinf / isneginf equal element for element, finite values by the project's accuracy rule
#     (helpers.assert_close_to_ref: 2x the error of the same composition run in the test dtype, or
#     about an ulp of the dtype at max|ref|);
#   * the gradients (torch.autograd.grad with the inputs' grad_output tensors) against torch's
#     autograd through the fp64 composition (3x rule), when the op has a backward and the row writes
#     into a grad_output ("grad", "grad_summed") or writes a NaN into a forward input. Rows with
#     +/-Inf in a forward input check the forward only. With +/-Inf in a grad_output only *which*
#     gradient elements are non-finite is compared, not NaN versus +/-Inf: torch does not define
#     that; F.layer_norm's backward, the same layer norm written as mean/var ops and as var_mean /
#     sqrt give different NaN / Inf mixes on the same row (Inf - Inf depending on signs of x - mean).
#   * fully masked rows (an op's `dead` rows: every key hidden) give exact zeros, and get exact
#     zero gradients (dx / dq / dmask of that row), as the issue asks, while they stay fully masked
#     (a NaN written into such a row makes it a NaN row, as in torch).
#
# The compositions follow each op's reference function (the spec), written with torch ops apart
# from pyllm's code:
#   layer_norm       F.layer_norm;  add_layer_norm: s = x + r, (F.layer_norm(s), s)
#   rms_norm         helpers.rms_norm_torch (F.rms_norm / the Hugging Face modules' formulas)
#   bias_gelu        F.gelu(x + b, approximate)
#   masked_softmax   _softmax_comp: x * scale + additive mask, masked_fill(-inf) for a bool mask,
#                    softmax, hidden positions (score -inf) a constant 0.
#   attention        _attention_comp: s = q k^T * scale - slope * |i - j| + additive mask,
#                    masked_fill(~keep, -inf), softmax, out = sum over the visible keys of p * v.
#   varlen_attention that attention per sequence (bottom-right causal keep, GQA by repeat_interleave),
#                    concatenated: a NaN in one sequence leaves the other sequences finite.
# The rule for hidden keys (pyllm's, documented in docs/RELIABILITY.md and pyllm/ops/attention.py):
#   - a key whose final score is -inf for a query -- hidden by a bool mask (masked_fill), the causal
#     or window geometry, or an additive -inf -- contributes nothing to that query, forward or
#     backward: not its K or V even when they hold a NaN / Inf, and no gradient reaches its score.
#     This is FlashAttention's behaviour (hidden keys are never read) and the only one a kernel that
#     skips hidden tiles can keep. torch's dense spellings differ exactly there: p @ v gives
#     0 * NaN = NaN from a hidden key's V, and F.scaled_dot_product_attention turns a bool mask into an
#     additive -inf and spreads a NaN through it. The compositions above are written elementwise with
#     the hidden pairs' operands replaced by zeros, so torch computes the rule itself.
#   - a NaN score (a NaN in q, in a visible k, in an additive mask, in an ALiBi slope; NaN + -inf is
#     NaN) is visible: its row is NaN at every visible key, as torch's softmax gives it.
#   - a fully masked row is the constant zero with zero gradients (the issue: "fully-masked rows still
#     give zeros"), and its grad_output reaches nothing.
EPS = 1e-5
N = 37  # norm / gelu width: a vector body plus a tail on the CPU kernels


def _randn(*shape, gen, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


class _Op(NamedTuple):
    make: Callable[[], dict]            # fp32 / bool / int inputs, including grad_outputs "grad*"
    run: Callable[[dict], tuple]        # the pyllm call -> outputs
    oracle: Callable[[dict], tuple]     # the torch composition -> outputs (fp64 oracle, test-dtype baseline)
    decision: str                       # pyllm.last_decision's op name
    diff: tuple = ()                    # inputs that carry a gradient (empty: no backward)
    grads: tuple = ("grad",)            # grad_output of each output, in order
    fixed: tuple = ()                   # floating inputs kept in their own dtype (ALiBi slopes)
    dead: tuple = (None, ())            # (index of the fully masked rows in the output, the inputs
                                        #  whose gradient has those rows at the same index)


# ------------------------------------------------------------------------------------ inputs
def _norm_inputs(seed, residual=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    t = {"x": _randn(4, N, gen=g), "w": _randn(N, gen=g), "grad": _randn(4, N, gen=g)}
    if bias:
        t["b"] = _randn(N, gen=g)
    if residual:
        t["r"] = _randn(4, N, gen=g)
        t["grad_summed"] = _randn(4, N, gen=g)
    return t


def _gelu_inputs():
    g = torch.Generator().manual_seed(20)
    return {"x": _randn(4, N, gen=g, scale=2.0), "b": _randn(N, gen=g), "grad": _randn(4, N, gen=g)}


def _softmax_inputs(additive):
    """x [5, 19]; row 1 hides keys 15.., row 4 hides every key (dead)."""
    g = torch.Generator().manual_seed(21)
    t = {"x": _randn(5, 19, gen=g, scale=2.0), "grad": _randn(5, 19, gen=g)}
    if additive:
        m = _randn(5, 19, gen=g, scale=0.5)
        m[1, 15:] = -INF
        m[4] = -INF
    else:
        m = torch.ones(5, 19, dtype=torch.bool)
        m[1, 15:] = False
        m[4] = False
    t["mask"] = m
    return t


def _attn_inputs(kind):
    """q [1, 2, 4, 16], k / v [1, 2, 6, 16]. additive: a float mask that hides key 5 from every
    query (-inf) and every key from query 3 of head 1 (dead); alibi: slopes [2] with a bool mask
    hiding key 5 from every query and every key from query 3 (dead in both heads)."""
    g = torch.Generator().manual_seed(22)
    t = {"q": _randn(1, 2, 4, 16, gen=g), "k": _randn(1, 2, 6, 16, gen=g), "v": _randn(1, 2, 6, 16, gen=g),
         "grad": _randn(1, 2, 4, 16, gen=g)}
    if kind == "additive":
        m = _randn(1, 2, 4, 6, gen=g, scale=0.5)
        m[..., 5] = -INF
        m[0, 1, 3] = -INF
        t["mask"] = m
    else:
        keep = torch.ones(1, 1, 4, 6, dtype=torch.bool)
        keep[..., 5] = False
        keep[..., 3, :] = False
        t["mask"] = keep
        t["slopes"] = torch.tensor([0.5, 0.25])
    return t


VARLEN_Q, VARLEN_K = (3, 5, 3), (3, 5, 1)  # sequence 2: Lq 3 > Lk 1, so causal hides all keys from queries 0, 1


def _varlen_inputs():
    g = torch.Generator().manual_seed(23)
    tq, tk = sum(VARLEN_Q), sum(VARLEN_K)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    return {"q": _randn(tq, 2, 16, gen=g), "k": _randn(tk, 1, 16, gen=g), "v": _randn(tk, 1, 16, gen=g),
            "grad": _randn(tq, 2, 16, gen=g), "cu_q": cu(VARLEN_Q), "cu_k": cu(VARLEN_K)}


# ------------------------------------------------------------------------------------ torch compositions
def _attention_comp(q, k, v, keep=None, bias=None, slopes=None):
    """The rule, in torch ops: a key whose final score is -inf for a query (hidden) contributes
    nothing to that query, forward or backward. Every product is written elementwise with the hidden
    pairs' operands replaced by zeros (torch.where drops the gradient there), so IEEE 0 * NaN never
    meets a hidden key's K / V or the query's dO."""
    scale = q.shape[-1] ** -0.5
    lq, lk = q.shape[-2], k.shape[-2]
    dist = (torch.arange(lq).unsqueeze(-1) - torch.arange(lk)).abs()

    def extras(s, b):
        if slopes is not None:
            s = s - slopes.to(s.dtype)[:, None, None] * dist.to(s.dtype)
        if b is not None:
            s = s + b
        return s if keep is None else s.masked_fill(~keep, -INF)

    with torch.no_grad():
        hidden = extras((q @ k.transpose(-2, -1)) * scale, bias) == -INF
    h = hidden.unsqueeze(-1)
    qx = torch.where(h, 0.0, q.unsqueeze(-2))
    kx = torch.where(h, 0.0, k.unsqueeze(-3))
    s = extras((qx * kx).sum(-1) * scale, None if bias is None else torch.where(hidden, 0.0, bias))
    s = s.masked_fill(hidden, -INF)
    dead = hidden.all(-1, keepdim=True)
    p = s.masked_fill(dead, 0.0).softmax(-1).masked_fill(hidden, 0.0)
    return (p.unsqueeze(-1) * torch.where(h, 0.0, v.unsqueeze(-3))).sum(-2)


def _softmax_comp(x, mask, scale):
    """softmax(x * scale + mask) with the rule: a position whose score is -inf (hidden by a bool mask
    or an additive -inf; every position of a fully masked row) is a constant 0, so its gradient,
    even a NaN one, reaches nothing; in a row holding a NaN score too (torch's softmax would make
    the hidden positions NaN as well: the one place pyllm's answer differs, by design)."""
    s = x * scale
    if mask.dtype == torch.bool:
        s = s.masked_fill(~mask, -INF)
    else:
        with torch.no_grad():
            hid = (s + mask) == -INF
        s = s + torch.where(hid, 0.0, mask)
        s = s.masked_fill(hid, -INF)
    hidden = (s == -INF).detach()
    dead = hidden.all(-1, keepdim=True)
    return s.masked_fill(dead, 0.0).softmax(-1).masked_fill(hidden, 0.0)


def _varlen_comp(t):
    outs = []
    cq, ck = t["cu_q"].tolist(), t["cu_k"].tolist()
    for q0, q1, k0, k1 in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        q, k, v = (x.transpose(0, 1) for x in (t["q"][q0:q1], t["k"][k0:k1], t["v"][k0:k1]))
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        lq, lk = q1 - q0, k1 - k0
        keep = torch.arange(lk) <= torch.arange(lq)[:, None] + (lk - lq)  # bottom-right causal (tril(lk - lq))
        outs.append(_attention_comp(q, k, v, keep).transpose(0, 1))
    return (torch.cat(outs),)


def _add_ln_comp(t):
    s = t["x"] + t["r"]
    return F.layer_norm(s, (N,), t["w"], t["b"], EPS), s


def _add_ln_inplace(t):
    x = t["x"]
    out = PF.add_layer_norm_(x, t["r"], N, t["w"], t["b"], EPS)
    assert out is x, "add_layer_norm_ must return its input"
    return (x,)


_SOFTMAX_SCALE = 0.5
OPS = {
    "layer_norm": _Op(lambda: _norm_inputs(10),
                      lambda t: (PF.layer_norm(t["x"], N, t["w"], t["b"], EPS),),
                      lambda t: (F.layer_norm(t["x"], (N,), t["w"], t["b"], EPS),),
                      "layer_norm", diff=("x", "w", "b")),
    "add_layer_norm": _Op(lambda: _norm_inputs(11, residual=True),
                          lambda t: PF.add_layer_norm(t["x"], t["r"], N, t["w"], t["b"], EPS),
                          _add_ln_comp, "add_layer_norm", diff=("x", "r", "w", "b"),
                          grads=("grad", "grad_summed")),
    "add_layer_norm_": _Op(lambda: _norm_inputs(12, residual=True), _add_ln_inplace,
                           lambda t: _add_ln_comp(t)[:1], "add_layer_norm"),
    **{f"rms_norm[{style}]": _Op(
        lambda: _norm_inputs(13, bias=False),
        (lambda t, s=style: (PF.rms_norm(t["x"], N, t["w"], EPS, style=s),)),
        (lambda t, s=style: (rms_norm_torch(t["x"], t["w"], EPS, s),)),
        "rms_norm", diff=("x", "w")) for style in ("torch", "llama", "t5", "gemma")},
    **{f"add_rms_norm[{style}]": _Op(
        lambda: _norm_inputs(14, residual=True, bias=False),
        (lambda t, s=style: PF.add_rms_norm(t["x"], t["r"], N, t["w"], EPS, style=s)),
        (lambda t, s=style: (rms_norm_torch(t["x"] + t["r"], t["w"], EPS, s), t["x"] + t["r"])),
        "add_rms_norm", diff=("x", "r", "w"), grads=("grad", "grad_summed")) for style in ("torch", "llama")},
    **{f"bias_gelu[{a}]": _Op(
        _gelu_inputs,
        (lambda t, a=a: (PF.bias_gelu(t["x"], t["b"], a),)),
        (lambda t, a=a: (F.gelu(t["x"] + t["b"], approximate=a),)),
        "bias_gelu", diff=("x", "b")) for a in ("tanh", "none")},
    "masked_softmax[additive]": _Op(
        lambda: _softmax_inputs(True),
        lambda t: (PF.masked_softmax(t["x"], t["mask"], _SOFTMAX_SCALE),),
        lambda t: (_softmax_comp(t["x"], t["mask"], _SOFTMAX_SCALE),),
        "masked_softmax", diff=("x", "mask"), dead=((4,), ("x", "mask"))),
    "masked_softmax[bool]": _Op(
        lambda: _softmax_inputs(False),
        lambda t: (PF.masked_softmax(t["x"], t["mask"], _SOFTMAX_SCALE),),
        lambda t: (_softmax_comp(t["x"], t["mask"], _SOFTMAX_SCALE),),
        "masked_softmax", diff=("x",), dead=((4,), ("x",))),
    "attention[additive]": _Op(
        lambda: _attn_inputs("additive"),
        lambda t: (PF.scaled_dot_product_attention(t["q"], t["k"], t["v"], t["mask"]),),
        lambda t: (_attention_comp(t["q"], t["k"], t["v"], bias=t["mask"]),),
        "scaled_dot_product_attention", diff=("q", "k", "v", "mask"),
        dead=((0, 1, 3), ("q", "mask"))),
    "attention[alibi]": _Op(
        lambda: _attn_inputs("alibi"),
        lambda t: (PF.scaled_dot_product_attention(t["q"], t["k"], t["v"], t["mask"], alibi_slopes=t["slopes"]),),
        lambda t: (_attention_comp(t["q"], t["k"], t["v"], keep=t["mask"], slopes=t["slopes"]),),
        "scaled_dot_product_attention", diff=("q", "k", "v"), fixed=("slopes",),
        dead=((slice(None), slice(None), 3), ("q",))),
    "varlen_attention": _Op(
        _varlen_inputs,
        lambda t: (PF.varlen_attention(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], max(VARLEN_Q),
                                       max(VARLEN_K), causal=True),),
        _varlen_comp, "varlen_attention", diff=("q", "k", "v"), dead=(slice(8, 10), ("q",))),
}


# ------------------------------------------------------------------------------------ the table
class Case(NamedTuple):
    op: str
    input: str
    pos: tuple
    value: float
    also: tuple = ()  # further (input, pos, value) written in the same call

    @property
    def id(self):
        v = lambda x: "nan" if math.isnan(x) else ("+inf" if x > 0 else "-inf")  # noqa: E731
        at = lambda p: ",".join(map(str, p))  # noqa: E731
        s = f"{self.op}-{self.input}[{at(self.pos)}]={v(self.value)}"
        return s + "".join(f"&{n}[{at(p)}]={v(x)}" for n, p, x in self.also)


VALUES = (NAN, INF, -INF)
TABLE = [
    # layer_norm: x [4, 37] (row 1 col 3 in the vector body, row 2 col 36 in the tail), w / b [37]
    *[Case("layer_norm", "x", (1, 3), val) for val in VALUES],
    Case("layer_norm", "x", (2, 36), NAN),
    *[Case("layer_norm", p, (5,), val) for p in ("w", "b") for val in VALUES],
    *[Case("layer_norm", "grad", (1, 3), val) for val in VALUES],
    Case("layer_norm", "grad", (2, 36), NAN),
    # add_layer_norm: outputs (layer_norm(x + r), x + r), both with a grad_output
    *[Case("add_layer_norm", "x", (1, 3), val) for val in VALUES],
    *[Case("add_layer_norm", "r", (2, 36), val) for val in VALUES],
    Case("add_layer_norm", "x", (1, 3), INF, also=(("r", (1, 3), -INF),)),  # inf - inf in the sum
    Case("add_layer_norm", "w", (5,), NAN), Case("add_layer_norm", "w", (5,), INF),
    Case("add_layer_norm", "b", (5,), NAN), Case("add_layer_norm", "b", (5,), -INF),
    Case("add_layer_norm", "grad", (1, 3), NAN), Case("add_layer_norm", "grad", (1, 3), INF),
    Case("add_layer_norm", "grad_summed", (1, 3), NAN), Case("add_layer_norm", "grad_summed", (1, 3), -INF),
    # add_layer_norm_ (in place, inference only: forward)
    *[Case("add_layer_norm_", "x", (1, 3), val) for val in VALUES],
    Case("add_layer_norm_", "r", (2, 36), NAN), Case("add_layer_norm_", "w", (5,), NAN),
    Case("add_layer_norm_", "b", (5,), -INF),
    Case("add_layer_norm_", "x", (1, 3), INF, also=(("r", (1, 3), -INF),)),
    # rms_norm, every style
    *[c for style in ("torch", "llama", "t5", "gemma") for c in (
        *[Case(f"rms_norm[{style}]", "x", (1, 3), val) for val in VALUES],
        Case(f"rms_norm[{style}]", "x", (2, 36), NAN),
        *[Case(f"rms_norm[{style}]", "w", (5,), val) for val in VALUES],
        Case(f"rms_norm[{style}]", "grad", (1, 3), NAN), Case(f"rms_norm[{style}]", "grad", (1, 3), INF))],
    # add_rms_norm: outputs (rms_norm(x + r), x + r), both with a grad_output
    *[c for style in ("torch", "llama") for c in (
        *[Case(f"add_rms_norm[{style}]", "x", (1, 3), val) for val in VALUES],
        *[Case(f"add_rms_norm[{style}]", "r", (2, 36), val) for val in VALUES],
        Case(f"add_rms_norm[{style}]", "x", (1, 3), INF, also=(("r", (1, 3), -INF),)),  # inf - inf in the sum
        Case(f"add_rms_norm[{style}]", "w", (5,), NAN), Case(f"add_rms_norm[{style}]", "w", (5,), -INF),
        Case(f"add_rms_norm[{style}]", "grad", (1, 3), NAN), Case(f"add_rms_norm[{style}]", "grad", (1, 3), INF),
        Case(f"add_rms_norm[{style}]", "grad_summed", (1, 3), NAN))],
    # bias_gelu, tanh and erf
    *[c for a in ("tanh", "none") for c in (
        *[Case(f"bias_gelu[{a}]", "x", (1, 3), val) for val in VALUES],
        Case(f"bias_gelu[{a}]", "x", (2, 36), NAN),
        *[Case(f"bias_gelu[{a}]", "b", (5,), val) for val in VALUES],
        *[Case(f"bias_gelu[{a}]", "grad", (1, 3), val) for val in VALUES])],
    # masked_softmax, additive float mask (row 1: keys 15.. at -inf; row 4: all -inf, dead)
    *[Case("masked_softmax[additive]", "mask", (0, 4), val) for val in VALUES],
    Case("masked_softmax[additive]", "mask", (4, 2), NAN),   # NaN in the dead row: NaN row
    Case("masked_softmax[additive]", "x", (3, 0), NAN),      # NaN row next to the dead row
    Case("masked_softmax[additive]", "x", (1, 17), NAN),     # NaN + -inf = NaN: the row is NaN
    Case("masked_softmax[additive]", "x", (2, 6), INF),
    Case("masked_softmax[additive]", "grad", (0, 4), NAN), Case("masked_softmax[additive]", "grad", (0, 4), INF),
    Case("masked_softmax[additive]", "grad", (1, 17), NAN),  # grad at a -inf key
    Case("masked_softmax[additive]", "grad", (4, 2), NAN),   # dead row: zero gradients
    # masked_softmax, bool mask (same geometry)
    Case("masked_softmax[bool]", "x", (0, 3), NAN),
    Case("masked_softmax[bool]", "x", (1, 17), NAN),         # hidden by masked_fill: finite
    Case("masked_softmax[bool]", "x", (3, 0), NAN),          # NaN row next to the dead row
    Case("masked_softmax[bool]", "grad", (0, 4), NAN), Case("masked_softmax[bool]", "grad", (0, 4), -INF),
    Case("masked_softmax[bool]", "grad", (1, 17), NAN),      # grad at a hidden key
    Case("masked_softmax[bool]", "grad", (4, 2), NAN),       # dead row: zero gradients
    # attention with an additive float mask ([1, 2, 4, 6]: key 5 at -inf, query 3 of head 1 dead)
    *[Case("attention[additive]", "mask", (0, 0, 1, 2), val) for val in VALUES],
    Case("attention[additive]", "mask", (0, 1, 3, 0), NAN),  # NaN in the dead query's row
    Case("attention[additive]", "mask", (0, 1, 2, 3), INF),
    Case("attention[additive]", "k", (0, 0, 5, 0), NAN),     # NaN key "hidden" by an additive -inf
    Case("attention[additive]", "q", (0, 0, 1, 3), NAN),
    Case("attention[additive]", "v", (0, 1, 4, 5), -INF),
    Case("attention[additive]", "grad", (0, 0, 1, 3), NAN), Case("attention[additive]", "grad", (0, 0, 2, 5), INF),
    Case("attention[additive]", "grad", (0, 1, 3, 0), NAN),  # grad_output of the dead query
    # attention with ALiBi slopes [2] and a bool mask (key 5 hidden, query 3 dead)
    *[Case("attention[alibi]", "slopes", (h,), val) for h, val in ((1, NAN), (0, INF), (0, -INF))],
    Case("attention[alibi]", "q", (0, 1, 2, 0), NAN),
    Case("attention[alibi]", "k", (0, 0, 5, 1), NAN),        # hidden by the bool mask: finite
    Case("attention[alibi]", "grad", (0, 0, 0, 1), NAN),
    # varlen_attention: sequences q 3 / 5 / 3 rows, k 3 / 5 / 1 rows, causal (bottom-right), GQA 2:1
    Case("varlen_attention", "q", (4, 1, 3), NAN),           # sequence 1 only
    Case("varlen_attention", "k", (5, 0, 2), NAN),           # sequence 1: queries that see key 2
    Case("varlen_attention", "v", (6, 0, 7), NAN), Case("varlen_attention", "v", (6, 0, 7), -INF),
    Case("varlen_attention", "k", (8, 0, 0), NAN),           # sequence 2's only key: its one live query
    Case("varlen_attention", "grad", (4, 1, 3), NAN),
    Case("varlen_attention", "grad", (8, 0, 0), NAN),        # grad_output of a dead query
]



TABLE_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
                pytest.param(torch.float16, id="fp16")]


def _where(diff, got, want, limit=6):
    """'(index) pyllm-value/torch-value' for the first `limit` places where `diff` is set."""
    idx = diff.nonzero().tolist()
    g, w = got.detach().double(), want.detach().double()
    s = ", ".join(f"{tuple(i)} {g[tuple(i)].item():.4g}/{w[tuple(i)].item():.4g}" for i in idx[:limit])
    return s + (f" (+{len(idx) - limit} more)" if len(idx) > limit else "")


def _check(got, want, base, what, mult, kinds=True):
    """got (pyllm) against want (fp64 composition): non-finite pattern element for element (with
    kinds=False only which elements are non-finite, not NaN vs +/-Inf), then the finite values by
    the project's accuracy rule (base: the composition in the test dtype)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, torch {tuple(want.shape)}"
    tests = ((torch.isnan, "NaN"), (torch.isposinf, "+Inf"), (torch.isneginf, "-Inf")) if kinds else \
        ((lambda t: ~torch.isfinite(t), "non-finite"),)
    for test, kind in tests:
        g, w = test(got), test(want)
        if not torch.equal(g, w):
            raise AssertionError(
                f"{what}: {kind} pattern differs from torch (index pyllm/torch); pyllm only at "
                f"[{_where(g & ~w, got, want)}], torch only at [{_where(w & ~g, got, want)}]")
    if kinds:
        assert_close_to_ref(got, want, base, mult=mult, name=what)
    else:
        fin = torch.isfinite(want)
        assert_close_to_ref(got[fin], want[fin], base[fin], mult=mult, name=what)


def _dead_rows(op, outs):
    """The index of op's fully masked rows if they still are in this case (the composition gives
    exact zeros there; a NaN written into such a row revives it), else None."""
    idx = op.dead[0]
    return idx if idx is not None and bool((outs[0][idx] == 0).all()) else None


@contextlib.contextmanager
def _one_thread():
    """The torch compositions run on one intra-op thread: on these tiny tensors a parallel region
    only costs time (milliseconds each on a busy 2-core machine). pyllm's calls keep the default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _expected_path(backend):
    if backend == "torch":
        return "reference"
    if backend == "cuda-emulated":
        return "cuda-emulated"
    return "native-cpu" if (_ext.HAS_C and pyllm.current_backend() in ("auto", "native")) else "reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", TABLE_DTYPES)
@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_nonfinite_table(case, dtype, backend):
    """One TABLE row: the value written into one input (after the cast to dtype); outputs and, where
    the row asks for it, gradients against the fp64 torch composition (see the notes above TABLE)."""
    op = OPS[case.op]
    inputs = op.make()
    for name, t in inputs.items():
        if t.is_floating_point() and name not in op.fixed:
            inputs[name] = t.to(dtype)
    for name, pos, val in ((case.input, case.pos, case.value), *case.also):
        inputs[name][pos] = val
    backward = bool(op.diff) and (case.input.startswith("grad") or math.isnan(case.value))

    def copies(to):
        out = {}
        for name, t in inputs.items():
            c = t.detach().clone()
            if to is not None and c.is_floating_point() and name not in op.fixed:
                c = c.to(to)
            out[name] = c.requires_grad_(backward and name in op.diff)
        return out

    mine, ref, base = copies(None), copies(torch.float64), copies(None)
    with maybe_backend(backend), torch.set_grad_enabled(backward):
        got = op.run(mine)
        assert pyllm.last_decision(op.decision).path == _expected_path(backend), pyllm.explain(op.decision)
    with _one_thread():
        want, base_out = op.oracle(ref), op.oracle(base)
    dead = _dead_rows(op, want)
    for i, (g, w, b) in enumerate(zip(got, want, base_out)):
        _check(g, w, b, f"{case.id} output {i}", mult=2.0)
    if dead is not None:
        assert bool((got[0][dead] == 0).all()), f"{case.id}: fully masked rows must be zeros"
    if not backward:
        return
    names = list(op.diff)
    grad_out = [inputs[n] for n in op.grads]
    with maybe_backend(backend):
        g_mine = torch.autograd.grad(got, [mine[n] for n in names], grad_out)
    with _one_thread():
        g_ref = torch.autograd.grad(want, [ref[n] for n in names], [g.double() for g in grad_out])
        g_base = torch.autograd.grad(base_out, [base[n] for n in names], grad_out)
    # An Inf in a grad_output: which elements of a gradient are non-finite is defined, whether each
    # is NaN or +/-Inf is not (see the section's notes); a NaN: both are.
    kinds = not (case.input.startswith("grad") and math.isinf(case.value))
    for n, g, w, b in zip(names, g_mine, g_ref, g_base):
        zero_rows = dead is not None and n in op.dead[1]
        if zero_rows:  # fully masked rows get zero gradients (see the notes)
            w, b = w.clone(), b.clone()
            w[dead], b[dead] = 0, 0
        _check(g, w, b, f"{case.id} d{n}", mult=3.0, kinds=kinds)
        if zero_rows:
            assert bool((g[dead] == 0).all()), f"{case.id} d{n}: fully masked rows must get zero gradients"


def test_nonfinite_table_covers_every_op():
    """Every registered op has rows in TABLE, and every op with a backward has grad_output rows."""
    ops_in_table = {c.op for c in TABLE}
    tested = {OPS[o].decision for o in ops_in_table}
    assert {spec.name for spec in pyllm_ops.specs()} <= tested
    for name in OPS:
        assert name in ops_in_table, f"{name} has no row in TABLE"
        if OPS[name].diff:
            assert any(c.op == name and c.input.startswith("grad") for c in TABLE), f"{name}: no grad_output row"
